/* dispatch.h — itsd's backend bookkeeping: the jobs the pipelines started, which worker runs
 * each, per-role queues for jobs no worker can take yet, heartbeats and liveness of workers,
 * re-dispatch of a lost worker's jobs (bounded retries), and the no-worker grace period.
 *
 * Owns the registry of workers and every job message until the job ends. Does no I/O itself:
 * messages to workers go out through ops->send, and a job that fails for good is reported
 * through ops->job_failed, always from the tail of a dispatch_* call with dispatch's own
 * state consistent, so the callback may call any dispatch function (start jobs, cancel
 * jobs). Times are monotonic milliseconds passed in. Logs worker life events.
 */
#ifndef ITS_DISPATCH_H
#define ITS_DISPATCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "proto.h"
#include "registry.h"

struct dispatch_config {
    uint32_t heartbeat_ms;       /* heartbeats to workers; expiry = heartbeat_ms * liveness */
    uint32_t liveness;
    uint32_t job_retries;        /* re-dispatches after a lost worker / retryable job_error */
    uint32_t no_worker_grace_ms; /* a queued job with no worker of its role fails after it */
    uint32_t max_queued_jobs;    /* per role */
    uint32_t max_workers;
};

struct dispatch_ops {
    /* Sends `m` to the worker with routing id rid. Returns 0, or negative when the worker
     * cannot be reached (then dispatch stops using it and drops it at the next tick). */
    int (*send)(void *ctx, const uint8_t *rid, size_t rid_len, const struct proto_msg *m);
    /* The job `job_id` of `owner` has failed for good and is gone: code is
     * PROTO_ERR_WORKER_LOST (retries spent), PROTO_ERR_NO_WORKER (no worker of `role`
     * within the grace period) or the code of the worker's job_error. */
    void (*job_failed)(void *ctx, void *owner, uint64_t job_id, enum proto_role role, int code,
                       const char *message);
};

struct dispatch_counters {
    uint64_t jobs_started, jobs_done, jobs_retried, jobs_failed, jobs_cancelled;
    uint64_t workers_registered, workers_lost, send_failures, stale_results;
    uint64_t heartbeat_expiries; /* of workers_lost: dropped for silence (the rest unreachable) */
};

struct dispatch;

/* Creates the dispatcher. `ops` is copied; ctx is passed back to it. Returns 0 with *out set,
 * or PROTO_ERR_NO_MEMORY. */
int dispatch_new(const struct dispatch_config *cfg, const struct dispatch_ops *ops, void *ctx,
                 struct dispatch **out);

/* Replaces the configuration (a reload). Jobs and workers stay as they are: a job keeps the
 * retries it has used (job_retries counts against the new value), the next tick sends
 * heartbeats at the new interval and expires workers silent for the new heartbeat_ms x
 * liveness, queued jobs get the new no_worker_grace_ms from when they were queued, and a
 * lower max_workers or max_queued_jobs drops nothing, only refuses what would go over. */
void dispatch_reconfigure(struct dispatch *d, const struct dispatch_config *cfg);

/* Frees every job and worker without calling ops. NULL-safe; clears *d. */
void dispatch_destroy(struct dispatch **d);

/* Starts a job for `owner`: takes ownership of *job (PROTO_GENERATE for instruct, feedback and
 * edit; PROTO_SCORE for select) and clears it, assigns a fresh job id (*job_id; each dispatch
 * to a worker writes its own fresh wire id into the message), and sends it to the least
 * loaded worker of the role that has room, else queues it. Returns 0; PROTO_ERR_BUSY when the
 * role's queue is full, PROTO_ERR_BAD_FIELD when the message does not fit the role,
 * PROTO_ERR_NO_MEMORY. On error *job is left to the caller. `label` (e.g. the request id) names
 * the owner in log lines and must live as long as the job. */
int dispatch_submit(struct dispatch *d, void *owner, const char *label, enum proto_role role,
                    struct proto_msg *job, uint64_t now_ms, uint64_t *job_id);

/* Cancels a job: a queued one is dropped, a running one gets cancel_job sent to its worker.
 * Returns 0, or PROTO_ERR_NOT_FOUND for an unknown (e.g. already finished) job. */
int dispatch_cancel(struct dispatch *d, uint64_t job_id);

/* Cancels every job of `owner`; returns how many there were. */
size_t dispatch_cancel_owner(struct dispatch *d, const void *owner);

/* ---- messages from workers ---- */

/* A worker said `ready`: registers it (a known routing id is a restarted worker: the old
 * record's jobs are re-dispatched and a fresh record made). Returns 0, PROTO_ERR_BUSY
 * (max_workers reached), or another negative enum proto_err; err says why. */
int dispatch_on_ready(struct dispatch *d, const uint8_t *rid, size_t rid_len,
                      const struct proto_ready *ready, uint64_t now_ms, char *err,
                      size_t err_len);

/* The registered worker with this routing id, marked as heard from now; NULL when none. */
struct registry_worker *dispatch_touch(struct dispatch *d, const uint8_t *rid, size_t rid_len,
                                       uint64_t now_ms);

void dispatch_on_heartbeat(struct dispatch *d, struct registry_worker *w,
                           const struct proto_heartbeat *hb);

/* The worker said `disconnect` (it is going away): it is forgotten and its jobs go to other
 * workers at once (each such move counts as a retry). `w` is invalid afterwards. */
void dispatch_on_disconnect(struct dispatch *d, struct registry_worker *w, const char *reason,
                            uint64_t now_ms);

/* A sample or result arrived from w for `wire`, the job id w was given. Checks that the job
 * is running on w, sets *owner and *job_id (the id dispatch_submit returned, which the
 * pipeline knows); when `final` (generate_result / score_result) the job ends here and w's
 * capacity is freed. Returns 0, or PROTO_ERR_NOT_FOUND for a job that is not w's (late,
 * cancelled, re-dispatched or unknown: the caller drops the message). */
int dispatch_on_job_message(struct dispatch *d, struct registry_worker *w, uint64_t wire,
                            bool final, void **owner, uint64_t *job_id);

/* The worker failed the job it knows as e->job. Retryable codes (busy, no_memory, internal,
 * shutting_down, worker_lost) send it to another worker while retries last; others fail it
 * for good (ops->job_failed). Returns 0, or PROTO_ERR_NOT_FOUND as above. */
int dispatch_on_job_error(struct dispatch *d, struct registry_worker *w,
                          const struct proto_job_error *e, uint64_t now_ms);

/* Periodic work, at least every heartbeat interval: heartbeats out, silent or unreachable
 * workers dropped (their jobs re-dispatched), jobs past the no-worker grace failed, queues
 * retried. */
void dispatch_tick(struct dispatch *d, uint64_t now_ms);

/* Fills the worker part of a status_reply: roles (live workers per role) and workers (a
 * malloc'd array whose strings are malloc'd, freed with the message). Returns 0 or
 * PROTO_ERR_NO_MEMORY. */
int dispatch_status(const struct dispatch *d, struct proto_status_reply *out);

/* Jobs waiting in the queue of `role`, and jobs running on workers (all, or of `role`). */
uint32_t dispatch_queued(const struct dispatch *d, enum proto_role role);
uint32_t dispatch_running(const struct dispatch *d);
uint32_t dispatch_running_role(const struct dispatch *d, enum proto_role role);

/* Counts the registered workers by role and by the state status_reply gives them:
 * out[role][enum proto_worker_state] (overwritten). */
void dispatch_worker_states(const struct dispatch *d,
                            uint32_t out[PROTO_ROLE_COUNT][PROTO_WORKER_STATE_COUNT]);

const struct dispatch_counters *dispatch_counters(const struct dispatch *d);

#endif
