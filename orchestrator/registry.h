/* registry.h — the workers itsd knows: who they are (routing id, name, role, model,
 * capacity), when they were last heard from, and how much of their capacity itsd's jobs use.
 *
 * Pure bookkeeping: no sockets, no clocks (times are passed in), no logging. Owns the worker
 * records and their strings. A routing id names at most one record; a worker that registers
 * again under the same routing id (restarted) is a new record with a new serial.
 */
#ifndef ITS_REGISTRY_H
#define ITS_REGISTRY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "proto.h"

#define REGISTRY_MAX_RID_BYTES 255 /* ZeroMQ routing ids are 1..255 bytes */

struct registry_worker {
    uint8_t rid[REGISTRY_MAX_RID_BYTES]; /* routing id on the backend socket */
    size_t rid_len;
    uint64_t serial;   /* unique per registration, never reused */
    char *name;        /* ready.worker */
    char *model;
    char *backend;
    enum proto_role role;
    struct proto_capacity capacity;
    struct proto_load load; /* from its last heartbeat */
    bool has_load;
    bool draining;     /* said disconnect: no new jobs */
    bool unreachable;  /* a send to it failed: expire at the next sweep */
    uint32_t used_seqs; /* sequences of the jobs itsd has on it */
    uint32_t n_jobs;    /* jobs itsd has on it */
    uint64_t registered_ms, last_seen_ms; /* monotonic */
};

struct registry;

/* Creates an empty registry of at most `max_workers` workers. Returns 0 with *out set, or
 * PROTO_ERR_NO_MEMORY. */
int registry_new(uint32_t max_workers, struct registry **out);

/* Changes the cap (a reload): workers already registered beyond it stay; registry_add refuses
 * until they are fewer. */
void registry_set_max_workers(struct registry *r, uint32_t max_workers);

/* Frees every record. NULL-safe; clears *r. */
void registry_destroy(struct registry **r);

/* The worker with this routing id, or NULL. */
struct registry_worker *registry_find(const struct registry *r, const void *rid, size_t rid_len);

/* Adds a worker from its `ready` (strings copied). The routing id must not be registered
 * (remove the old record first). Returns 0 with *out pointing at the record (owned by the
 * registry), PROTO_ERR_BUSY when max_workers are registered, PROTO_ERR_BAD_FIELD for a
 * routing id of 0 or over REGISTRY_MAX_RID_BYTES bytes, or PROTO_ERR_NO_MEMORY. */
int registry_add(struct registry *r, const void *rid, size_t rid_len,
                 const struct proto_ready *ready, uint64_t now_ms, struct registry_worker **out);

/* Removes and frees `w` (which must be in r). Pointers to it are invalid afterwards. */
void registry_remove(struct registry *r, struct registry_worker *w);

/* The least loaded worker of `role` that can take a job of `cost` sequences: not draining,
 * not unreachable, and either with cost sequences free or idle (an idle worker takes any job:
 * its own scheduler queues what does not fit). Least loaded = lowest used/max_seqs, then
 * fewest jobs, then registered first. NULL when none can. */
struct registry_worker *registry_pick(const struct registry *r, enum proto_role role,
                                      uint32_t cost);

/* Workers of `role` that can be given jobs (registered, not draining, not unreachable). */
uint32_t registry_count_live(const struct registry *r, enum proto_role role);

/* Iteration: registry_size() records, registry_at(i) for i below it. Adding or removing
 * workers reorders them. */
size_t registry_size(const struct registry *r);
struct registry_worker *registry_at(const struct registry *r, size_t i);

#endif
