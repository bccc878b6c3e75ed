/* frontend.h — itsd's client side: requests from submit to result. Validates a submit and
 * merges it with the configured defaults, admits it (run now, queue, or busy), drives its
 * pipeline (pipeline.h) with jobs through the dispatcher, enforces its deadline, sends
 * progress events and the result, answers cancel / get / status, keeps finished results for
 * a while (bounded count, bytes and age), and cancels the requests of clients that vanish.
 *
 * Owns every request, its pipeline and its kept result, the per-client records (only while a
 * client has live requests), and the templates: the current set, and each set a reload
 * replaced for as long as a running request renders with it. Reads the configuration through
 * the caller's pointer at every use, so that a reload (frontend_reconfigured) applies to
 * later decisions; a running request keeps the settings and templates it started with.
 * Sends only through ops->send; the dispatcher belongs to the caller and must outlive it.
 * Logs one line per request event.
 */
#ifndef ITS_FRONTEND_H
#define ITS_FRONTEND_H

#include <ev.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dispatch.h"
#include "itsd_config.h"
#include "proto.h"

struct metrics;
struct templates;

struct frontend_ops {
    /* Sends one encoded message (`len` bytes) to the client with routing id rid. Returns 0,
     * or negative when the client cannot be reached (it is then treated as gone). */
    int (*send)(void *ctx, const uint8_t *rid, size_t rid_len, const void *buf, size_t len);
    /* Monotonic milliseconds. */
    uint64_t (*now_ms)(void *ctx);
    /* Optional (NULL: status never carries metrics): fills status_reply.metrics for a status
     * that asks for them. */
    void (*metrics)(void *ctx, struct proto_metrics *out);
};

struct frontend_counters {
    uint64_t submitted, accepted, rejected, completed, failed, cancelled, deadlines, busy;
    uint64_t clients_gone, bad_messages, unreachable_clients, stale_job_messages;
};

struct frontend;

/* Creates the frontend. cfg and d must outlive it (cfg may change between calls: see
 * frontend_reconfigured); `ops` is copied. Takes ownership of *tpl and clears it on success
 * (on error it stays the caller's). Deadline timers run on `loop`. Every request that ends
 * and every submit refused is counted in `m` (metrics.h; NULL: not counted), which must
 * outlive the frontend. Returns 0 with *out set, or PROTO_ERR_NO_MEMORY with err set. */
int frontend_new(struct ev_loop *loop, const struct itsd_config *cfg, struct templates **tpl,
                 struct dispatch *d, const struct frontend_ops *ops, void *ctx,
                 struct metrics *m, struct frontend **out, char *err, size_t err_len);

/* Frees everything: requests still live are cancelled on the workers (cancel_job) without a
 * word to their clients (call frontend_stop first for that). NULL-safe; clears *fe. */
void frontend_destroy(struct frontend **fe);

/* A decoded client message (PROTO_FROM_CLIENT) from routing id rid over connection `fd`
 * (-1 when unknown). May take strings/arrays out of *m (leaving it freeable). */
void frontend_on_message(struct frontend *fe, const uint8_t *rid, size_t rid_len, int fd,
                         struct proto_msg *m);

/* The frontend connection with file descriptor fd closed: its clients' requests are
 * cancelled (from a later loop iteration, not from the caller's stack). */
void frontend_on_disconnect(struct frontend *fe, int fd);

/* Job messages for `owner` (the request a dispatcher job belongs to). */
void frontend_on_sample(struct frontend *fe, void *owner, uint64_t job, uint32_t index,
                        const struct proto_output *output);
void frontend_on_generate_result(struct frontend *fe, void *owner,
                                 const struct proto_generate_result *r);
void frontend_on_score_result(struct frontend *fe, void *owner,
                              const struct proto_score_result *r);
/* Suits dispatch_ops.job_failed (with ctx = the frontend). A no_worker failure fails the
 * whole request naming the role; others go to the pipeline, which may carry on without the
 * branch. */
void frontend_on_job_failed(void *fe_ctx, void *owner, uint64_t job_id, enum proto_role role,
                            int code, const char *message);

/* Periodic work: pending progress events, expiry of kept results. */
void frontend_tick(struct frontend *fe);

/* Starts shutdown: later submits get shutting_down, queued requests fail with it; running
 * requests go on. */
void frontend_stop_accepting(struct frontend *fe);

/* Ends every running request now: a partial result when something was scored, else an
 * error with `code` (e.g. PROTO_ERR_SHUTTING_DOWN); their jobs are cancelled. */
void frontend_finish_all(struct frontend *fe, int code, const char *message);

/* The templates requests that start now render with (owned by the frontend). */
const struct templates *frontend_templates(const struct frontend *fe);

/* A reload: requests that start from now on use *tpl, which the frontend takes (clearing
 * *tpl). Running requests keep the set they started with; a replaced set is freed when no
 * running request uses it any more. Returns 0, or PROTO_ERR_NO_MEMORY (nothing changed, *tpl
 * still the caller's). */
int frontend_set_templates(struct frontend *fe, struct templates **tpl);

/* The configuration behind the cfg pointer changed (a reload): new submits use it at once;
 * queued requests are merged again with the new defaults and limits when they start (one
 * that no longer fits fails too_large then); running requests keep their settings. Starts
 * queued requests if max_inflight grew and trims kept results to the new bounds. */
void frontend_reconfigured(struct frontend *fe);

uint32_t frontend_running(const struct frontend *fe);
uint32_t frontend_queued(const struct frontend *fe);
const struct frontend_counters *frontend_counters(const struct frontend *fe);

#endif
