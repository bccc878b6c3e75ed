/* dispatch.c — see dispatch.h. Every job is in the id map and the `all` list from submit to
 * its end, and in exactly one of: its role's queue (QUEUED), a worker (RUNNING, job->worker),
 * or the failed list (FAILED: waiting to be reported). Reporting happens only at the end of a
 * public entry point and never nests, so ops->job_failed sees a consistent dispatcher.
 *
 * Two ids per job: `id`, which the pipeline knows for the job's whole life, and `wire`, the id
 * of its current dispatch, which is what the worker sees. The protocol wants a re-dispatched
 * job to go out under a fresh id, so that a late answer from the worker that lost it can
 * never be taken for the new one; both come from one counter, so no id is ever reused.
 */
#include "dispatch.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include "idmap.h"
#include "itsd_log.h"

enum dispatch_state { DISPATCH_QUEUED, DISPATCH_RUNNING, DISPATCH_FAILED };

struct dispatch_job {
    uint64_t id;   /* the pipeline's */
    uint64_t wire; /* of the current dispatch, RUNNING only (0 otherwise) */
    uint32_t sends;/* dispatches so far */
    enum proto_role role;
    enum dispatch_state state;
    struct proto_msg msg; /* PROTO_GENERATE or PROTO_SCORE, id filled in */
    uint32_t cost;        /* sequences it occupies on a worker */
    void *owner;
    const char *label;              /* the owner's name for log lines (borrowed) */
    struct registry_worker *worker; /* RUNNING only */
    uint64_t avoid_serial;          /* the worker that last failed it, tried last */
    uint32_t attempts;              /* re-dispatches so far */
    uint64_t queued_ms;
    int fail_code;
    char fail_msg[320];
    TAILQ_ENTRY(dispatch_job) all_link;
    TAILQ_ENTRY(dispatch_job) q_link; /* role queue or failed list */
};

TAILQ_HEAD(dispatch_list, dispatch_job);

struct dispatch {
    struct dispatch_config cfg;
    struct dispatch_ops ops;
    void *ctx;
    struct registry *reg;
    struct idmap *jobs;    /* by id */
    struct idmap *by_wire; /* RUNNING jobs by wire id */
    struct dispatch_list all;
    struct dispatch_list queue[PROTO_ROLE_COUNT];
    uint32_t n_queued[PROTO_ROLE_COUNT];
    uint32_t n_running;
    uint32_t n_running_role[PROTO_ROLE_COUNT];
    struct dispatch_list failed;
    bool reporting;
    uint64_t next_id;
    uint64_t last_heartbeat_ms;
    struct dispatch_counters counters;
};

int dispatch_new(const struct dispatch_config *cfg, const struct dispatch_ops *ops, void *ctx,
                 struct dispatch **out)
{
    *out = NULL;
    struct dispatch *d = calloc(1, sizeof *d);
    if (!d)
        return PROTO_ERR_NO_MEMORY;
    d->cfg = *cfg;
    d->ops = *ops;
    d->ctx = ctx;
    d->next_id = 1;
    TAILQ_INIT(&d->all);
    TAILQ_INIT(&d->failed);
    for (int r = 0; r < PROTO_ROLE_COUNT; r++)
        TAILQ_INIT(&d->queue[r]);
    if (registry_new(cfg->max_workers, &d->reg) != 0 || idmap_new(&d->jobs) != 0 ||
        idmap_new(&d->by_wire) != 0)
        goto fail;
    *out = d;
    return 0;
fail:
    dispatch_destroy(&d);
    return PROTO_ERR_NO_MEMORY;
}

void dispatch_reconfigure(struct dispatch *d, const struct dispatch_config *cfg)
{
    d->cfg = *cfg;
    registry_set_max_workers(d->reg, cfg->max_workers);
    /* a larger queue may take what was refused a moment ago: nothing to do; a smaller one
     * keeps the jobs it holds (they were accepted) and refuses new ones until it drains */
}

static void dispatch_job_free(struct dispatch_job *j)
{
    proto_msg_free(&j->msg);
    free(j);
}

void dispatch_destroy(struct dispatch **dp)
{
    if (!dp || !*dp)
        return;
    struct dispatch *d = *dp;
    struct dispatch_job *j;
    while ((j = TAILQ_FIRST(&d->all)) != NULL) {
        TAILQ_REMOVE(&d->all, j, all_link);
        dispatch_job_free(j);
    }
    idmap_destroy(&d->jobs);
    idmap_destroy(&d->by_wire);
    registry_destroy(&d->reg);
    free(d);
    *dp = NULL;
}

/* ---- job state changes ------------------------------------------------------------------- */

static void dispatch_release(struct dispatch *d, struct dispatch_job *j)
{
    struct registry_worker *w = j->worker;
    if (w) {
        w->used_seqs = w->used_seqs >= j->cost ? w->used_seqs - j->cost : 0;
        if (w->n_jobs > 0)
            w->n_jobs--;
        j->worker = NULL;
        d->n_running--;
        d->n_running_role[j->role]--;
    }
    if (j->wire) {
        idmap_del(d->by_wire, j->wire);
        j->wire = 0;
    }
}

/* Takes j out of whatever list its state puts it in (not `all`, not the map). */
static void dispatch_unlink(struct dispatch *d, struct dispatch_job *j)
{
    switch (j->state) {
    case DISPATCH_QUEUED:
        TAILQ_REMOVE(&d->queue[j->role], j, q_link);
        d->n_queued[j->role]--;
        break;
    case DISPATCH_RUNNING:
        dispatch_release(d, j);
        break;
    case DISPATCH_FAILED:
        TAILQ_REMOVE(&d->failed, j, q_link);
        break;
    }
}

static void dispatch_forget(struct dispatch *d, struct dispatch_job *j)
{
    dispatch_unlink(d, j);
    TAILQ_REMOVE(&d->all, j, all_link);
    idmap_del(d->jobs, j->id);
    dispatch_job_free(j);
}

static void dispatch_enqueue(struct dispatch *d, struct dispatch_job *j, bool at_head,
                             uint64_t now_ms)
{
    j->state = DISPATCH_QUEUED;
    j->queued_ms = now_ms;
    if (at_head)
        TAILQ_INSERT_HEAD(&d->queue[j->role], j, q_link);
    else
        TAILQ_INSERT_TAIL(&d->queue[j->role], j, q_link);
    d->n_queued[j->role]++;
}

static void dispatch_fail(struct dispatch *d, struct dispatch_job *j, int code, const char *fmt,
                          ...) __attribute__((format(printf, 4, 5)));
static void dispatch_fail(struct dispatch *d, struct dispatch_job *j, int code, const char *fmt,
                          ...)
{
    dispatch_unlink(d, j);
    j->state = DISPATCH_FAILED;
    j->fail_code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(j->fail_msg, sizeof j->fail_msg, fmt, ap);
    va_end(ap);
    TAILQ_INSERT_TAIL(&d->failed, j, q_link);
}

/* Reports failed jobs, one at a time, re-reading the list after each callback because the
 * callback may cancel (and so remove) other failed jobs. */
static void dispatch_report(struct dispatch *d)
{
    if (d->reporting)
        return;
    d->reporting = true;
    struct dispatch_job *j;
    while ((j = TAILQ_FIRST(&d->failed)) != NULL) {
        void *owner = j->owner;
        const char *label = j->label;
        uint64_t id = j->id;
        enum proto_role role = j->role;
        int code = j->fail_code;
        char msg[sizeof j->fail_msg];
        memcpy(msg, j->fail_msg, sizeof msg);
        dispatch_forget(d, j);
        d->counters.jobs_failed++;
        ITSD_WARN("%s job %llu (%s) failed: %s: %s", label, (unsigned long long)id,
                  proto_role_name(role), proto_err_name(code), msg);
        d->ops.job_failed(d->ctx, owner, id, role, code, msg);
    }
    d->reporting = false;
}

/* Sends queued jobs of `role` to workers while some worker has room. */
static void dispatch_assign(struct dispatch *d, enum proto_role role)
{
    struct dispatch_job *j;
    while ((j = TAILQ_FIRST(&d->queue[role])) != NULL) {
        struct registry_worker *w = NULL;
        if (j->avoid_serial) {
            /* try every other worker first; fall back to the one that failed it */
            for (size_t i = 0; i < registry_size(d->reg); i++) {
                struct registry_worker *x = registry_at(d->reg, i);
                if (x->serial == j->avoid_serial && !x->unreachable) {
                    x->unreachable = true; /* hide it from registry_pick for one pick */
                    w = registry_pick(d->reg, role, j->cost);
                    x->unreachable = false;
                    break;
                }
            }
        }
        if (!w)
            w = registry_pick(d->reg, role, j->cost);
        if (!w)
            return;
        uint64_t wire = j->sends == 0 ? j->id : d->next_id++;
        if (idmap_put(d->by_wire, wire, j) != 0)
            return; /* out of memory: it stays queued, the next tick tries again */
        if (role == PROTO_ROLE_SELECT)
            j->msg.score.job = wire;
        else
            j->msg.generate.job = wire;
        j->sends++;
        if (d->ops.send(d->ctx, w->rid, w->rid_len, &j->msg) != 0) {
            idmap_del(d->by_wire, wire);
            d->counters.send_failures++;
            ITSD_WARN("%s job %llu stays queued: worker %s unreachable", j->label,
                      (unsigned long long)j->id, w->name);
            w->unreachable = true; /* dropped, with its jobs re-dispatched, at the next tick */
            continue;
        }
        j->wire = wire;
        TAILQ_REMOVE(&d->queue[role], j, q_link);
        d->n_queued[role]--;
        j->state = DISPATCH_RUNNING;
        j->worker = w;
        w->used_seqs += j->cost;
        w->n_jobs++;
        d->n_running++;
        d->n_running_role[role]++;
        ITSD_DEBUG("%s job %llu (%s, %u seqs) -> worker %s as job %llu", j->label,
                   (unsigned long long)j->id, proto_role_name(role), j->cost, w->name,
                   (unsigned long long)wire);
    }
}

static void dispatch_assign_all(struct dispatch *d)
{
    for (int r = 0; r < PROTO_ROLE_COUNT; r++)
        dispatch_assign(d, (enum proto_role)r);
}

/* Puts a job whose worker failed or vanished back in its queue, or fails it when its retries
 * are spent. */
static void dispatch_retry(struct dispatch *d, struct dispatch_job *j, const char *why,
                           uint64_t now_ms)
{
    if (j->attempts >= d->cfg.job_retries) {
        dispatch_fail(d, j, PROTO_ERR_WORKER_LOST, "%s job %llu: %s; gave up after %u retries",
                      proto_role_name(j->role), (unsigned long long)j->id, why, j->attempts);
        return;
    }
    uint64_t serial = j->worker ? j->worker->serial : 0;
    dispatch_unlink(d, j);
    j->attempts++;
    j->avoid_serial = serial;
    d->counters.jobs_retried++;
    ITSD_INFO("%s job %llu (%s): %s; retry %u of %u", j->label, (unsigned long long)j->id,
              proto_role_name(j->role), why, j->attempts, d->cfg.job_retries);
    dispatch_enqueue(d, j, true, now_ms);
}

/* Removes a worker, re-dispatching what it was running. `tell` sends it cancel_job for those
 * jobs first (a worker that is slow rather than dead then stops wasting its time). */
static void dispatch_drop_worker(struct dispatch *d, struct registry_worker *w, const char *why,
                                 bool tell, uint64_t now_ms)
{
    char reason[400];
    snprintf(reason, sizeof reason, "worker %s %s", w->name, why);
    struct dispatch_job *j, *next;
    for (j = TAILQ_FIRST(&d->all); j; j = next) {
        next = TAILQ_NEXT(j, all_link);
        if (j->state != DISPATCH_RUNNING || j->worker != w)
            continue;
        if (tell && !w->unreachable) {
            struct proto_msg c = {.type = PROTO_CANCEL_JOB, .cancel_job = {.job = j->wire}};
            (void)d->ops.send(d->ctx, w->rid, w->rid_len, &c);
        }
        dispatch_retry(d, j, reason, now_ms);
    }
    registry_remove(d->reg, w);
}

/* ---- public: jobs ----------------------------------------------------------------------- */

int dispatch_submit(struct dispatch *d, void *owner, const char *label, enum proto_role role,
                    struct proto_msg *job, uint64_t now_ms, uint64_t *job_id)
{
    *job_id = 0;
    if ((unsigned)role >= PROTO_ROLE_COUNT)
        return PROTO_ERR_BAD_FIELD;
    uint32_t cost;
    if (role == PROTO_ROLE_SELECT) {
        if (job->type != PROTO_SCORE)
            return PROTO_ERR_BAD_FIELD;
        cost = job->score.n_conversations;
    } else {
        if (job->type != PROTO_GENERATE)
            return PROTO_ERR_BAD_FIELD;
        cost = job->generate.n;
    }
    if (cost == 0)
        cost = 1;
    if (d->n_queued[role] >= d->cfg.max_queued_jobs)
        return PROTO_ERR_BUSY;
    struct dispatch_job *j = calloc(1, sizeof *j);
    if (!j)
        return PROTO_ERR_NO_MEMORY;
    j->id = d->next_id;
    if (idmap_put(d->jobs, j->id, j) != 0) {
        free(j);
        return PROTO_ERR_NO_MEMORY;
    }
    d->next_id++;
    j->role = role;
    j->cost = cost;
    j->owner = owner;
    j->label = label ? label : "-";
    j->msg = *job;
    memset(job, 0, sizeof *job);
    TAILQ_INSERT_TAIL(&d->all, j, all_link);
    dispatch_enqueue(d, j, false, now_ms);
    d->counters.jobs_started++;
    *job_id = j->id;
    dispatch_assign(d, role);
    dispatch_report(d);
    return 0;
}

/* Drops one job, telling its worker when it runs; reports nothing. Returns whether it was
 * running (its capacity is free now). */
static bool dispatch_cancel_one(struct dispatch *d, struct dispatch_job *j)
{
    bool was_running = j->state == DISPATCH_RUNNING && j->worker;
    if (was_running) {
        struct registry_worker *w = j->worker;
        struct proto_msg c = {.type = PROTO_CANCEL_JOB, .cancel_job = {.job = j->wire}};
        if (d->ops.send(d->ctx, w->rid, w->rid_len, &c) != 0)
            d->counters.send_failures++;
        ITSD_DEBUG("%s job %llu cancelled on worker %s", j->label, (unsigned long long)j->id,
                   w->name);
    }
    dispatch_forget(d, j);
    d->counters.jobs_cancelled++;
    return was_running;
}

int dispatch_cancel(struct dispatch *d, uint64_t job_id)
{
    struct dispatch_job *j = idmap_get(d->jobs, job_id);
    if (!j)
        return PROTO_ERR_NOT_FOUND;
    enum proto_role role = j->role;
    if (dispatch_cancel_one(d, j))
        dispatch_assign(d, role);
    dispatch_report(d);
    return 0;
}

size_t dispatch_cancel_owner(struct dispatch *d, const void *owner)
{
    size_t n = 0;
    bool freed[PROTO_ROLE_COUNT] = {false};
    struct dispatch_job *j, *next;
    for (j = TAILQ_FIRST(&d->all); j; j = next) {
        next = TAILQ_NEXT(j, all_link);
        if (j->owner != owner)
            continue;
        enum proto_role role = j->role;
        if (dispatch_cancel_one(d, j))
            freed[role] = true;
        n++;
    }
    for (int r = 0; r < PROTO_ROLE_COUNT; r++)
        if (freed[r])
            dispatch_assign(d, (enum proto_role)r);
    dispatch_report(d);
    return n;
}

/* ---- public: workers --------------------------------------------------------------------- */

int dispatch_on_ready(struct dispatch *d, const uint8_t *rid, size_t rid_len,
                      const struct proto_ready *ready, uint64_t now_ms, char *err,
                      size_t err_len)
{
    struct registry_worker *old = registry_find(d->reg, rid, rid_len);
    if (old) {
        ITSD_INFO("worker %s registered again: its previous jobs are re-dispatched", old->name);
        dispatch_drop_worker(d, old, "restarted", false, now_ms);
    }
    struct registry_worker *w;
    int rc = registry_add(d->reg, rid, rid_len, ready, now_ms, &w);
    if (rc != 0) {
        if (rc == PROTO_ERR_BUSY)
            snprintf(err, err_len, "ready: %u workers are registered (max_workers)",
                     d->cfg.max_workers);
        else if (rc == PROTO_ERR_BAD_FIELD)
            snprintf(err, err_len, "ready: routing id of %zu bytes", rid_len);
        else
            snprintf(err, err_len, "ready: out of memory");
        dispatch_report(d);
        return rc;
    }
    d->counters.workers_registered++;
    ITSD_INFO("worker %s registered: role %s, model %s, backend %s, max_seqs %u, max_ctx %u",
              w->name, proto_role_name(w->role), w->model, w->backend, w->capacity.max_seqs,
              w->capacity.max_ctx);
    /* greet it at once: the worker learns it is registered without waiting an interval */
    struct proto_msg hb = {.type = PROTO_HEARTBEAT};
    if (d->ops.send(d->ctx, w->rid, w->rid_len, &hb) != 0) {
        d->counters.send_failures++;
        w->unreachable = true;
    }
    dispatch_assign_all(d);
    dispatch_report(d);
    return 0;
}

struct registry_worker *dispatch_touch(struct dispatch *d, const uint8_t *rid, size_t rid_len,
                                       uint64_t now_ms)
{
    struct registry_worker *w = registry_find(d->reg, rid, rid_len);
    if (w)
        w->last_seen_ms = now_ms;
    return w;
}

void dispatch_on_heartbeat(struct dispatch *d, struct registry_worker *w,
                           const struct proto_heartbeat *hb)
{
    (void)d;
    if (hb->has_load) {
        w->load = hb->load;
        w->has_load = true;
    }
}

void dispatch_on_disconnect(struct dispatch *d, struct registry_worker *w, const char *reason,
                            uint64_t now_ms)
{
    /* docs/protocol.md: the receiver of a disconnect forgets the peer's jobs; the worker will
     * not answer them, so they go to other workers now rather than at heartbeat expiry */
    ITSD_INFO("worker %s disconnected (%s): %u jobs re-dispatched", w->name,
              reason && *reason ? reason : "no reason given", w->n_jobs);
    dispatch_drop_worker(d, w, "disconnected", false, now_ms);
    dispatch_assign_all(d);
    dispatch_report(d);
}

int dispatch_on_job_message(struct dispatch *d, struct registry_worker *w, uint64_t wire,
                            bool final, void **owner, uint64_t *job_id)
{
    *owner = NULL;
    *job_id = 0;
    struct dispatch_job *j = idmap_get(d->by_wire, wire);
    if (!j || j->state != DISPATCH_RUNNING || j->worker != w) {
        d->counters.stale_results++;
        return PROTO_ERR_NOT_FOUND;
    }
    *owner = j->owner;
    *job_id = j->id;
    if (final) {
        enum proto_role role = j->role;
        dispatch_forget(d, j);
        d->counters.jobs_done++;
        dispatch_assign(d, role);
        dispatch_report(d);
    }
    return 0;
}

static bool dispatch_retryable(int code)
{
    return code == PROTO_ERR_BUSY || code == PROTO_ERR_NO_MEMORY || code == PROTO_ERR_INTERNAL ||
           code == PROTO_ERR_SHUTTING_DOWN || code == PROTO_ERR_WORKER_LOST;
}

int dispatch_on_job_error(struct dispatch *d, struct registry_worker *w,
                          const struct proto_job_error *e, uint64_t now_ms)
{
    struct dispatch_job *j = idmap_get(d->by_wire, e->job);
    if (!j || j->state != DISPATCH_RUNNING || j->worker != w) {
        d->counters.stale_results++;
        return PROTO_ERR_NOT_FOUND;
    }
    if (dispatch_retryable(e->code)) {
        char why[400];
        snprintf(why, sizeof why, "worker %s: %s: %.300s", w->name, proto_err_name(e->code),
                 e->message ? e->message : "");
        dispatch_retry(d, j, why, now_ms);
    } else {
        dispatch_fail(d, j, e->code, "worker %s: %.280s", w->name,
                      e->message ? e->message : "");
    }
    dispatch_assign_all(d);
    dispatch_report(d);
    return 0;
}

void dispatch_tick(struct dispatch *d, uint64_t now_ms)
{
    uint64_t expiry = (uint64_t)d->cfg.heartbeat_ms * d->cfg.liveness;
    /* backwards: registry_remove moves the last record into the hole */
    for (size_t i = registry_size(d->reg); i-- > 0;) {
        struct registry_worker *w = registry_at(d->reg, i);
        if (w->unreachable) {
            d->counters.workers_lost++;
            ITSD_WARN("worker %s (%s) unreachable: dropped, %u jobs re-dispatched", w->name,
                      proto_role_name(w->role), w->n_jobs);
            dispatch_drop_worker(d, w, "unreachable", false, now_ms);
        } else if (now_ms > w->last_seen_ms && now_ms - w->last_seen_ms > expiry) {
            d->counters.workers_lost++;
            d->counters.heartbeat_expiries++;
            ITSD_WARN("worker %s (%s) silent for %llu ms: dropped, %u jobs re-dispatched",
                      w->name, proto_role_name(w->role),
                      (unsigned long long)(now_ms - w->last_seen_ms), w->n_jobs);
            dispatch_drop_worker(d, w, "stopped heartbeating", true, now_ms);
        } else if (w->draining && w->n_jobs == 0) {
            ITSD_INFO("worker %s drained and forgotten", w->name);
            registry_remove(d->reg, w);
        }
    }
    if (now_ms - d->last_heartbeat_ms >= d->cfg.heartbeat_ms || d->last_heartbeat_ms == 0) {
        d->last_heartbeat_ms = now_ms;
        struct proto_msg hb = {.type = PROTO_HEARTBEAT};
        for (size_t i = 0; i < registry_size(d->reg); i++) {
            struct registry_worker *w = registry_at(d->reg, i);
            if (w->unreachable)
                continue;
            if (d->ops.send(d->ctx, w->rid, w->rid_len, &hb) != 0) {
                d->counters.send_failures++;
                w->unreachable = true;
            }
        }
    }
    for (int r = 0; r < PROTO_ROLE_COUNT; r++) {
        if (registry_count_live(d->reg, (enum proto_role)r) > 0)
            continue;
        struct dispatch_job *j, *next;
        for (j = TAILQ_FIRST(&d->queue[r]); j; j = next) {
            next = TAILQ_NEXT(j, q_link);
            if (now_ms - j->queued_ms >= d->cfg.no_worker_grace_ms)
                dispatch_fail(d, j, PROTO_ERR_NO_WORKER,
                              "no %s worker registered within %u ms (no_worker_grace_ms)",
                              proto_role_name((enum proto_role)r), d->cfg.no_worker_grace_ms);
        }
    }
    dispatch_assign_all(d);
    dispatch_report(d);
}

/* ---- public: status ---------------------------------------------------------------------- */

static enum proto_worker_state dispatch_worker_state(const struct registry_worker *w)
{
    if (w->unreachable)
        return PROTO_WORKER_LOST;
    if (w->draining)
        return PROTO_WORKER_DRAINING;
    if (w->used_seqs >= w->capacity.max_seqs)
        return PROTO_WORKER_BUSY;
    return PROTO_WORKER_READY;
}

void dispatch_worker_states(const struct dispatch *d,
                            uint32_t out[PROTO_ROLE_COUNT][PROTO_WORKER_STATE_COUNT])
{
    memset(out, 0, sizeof(uint32_t[PROTO_ROLE_COUNT][PROTO_WORKER_STATE_COUNT]));
    for (size_t i = 0; i < registry_size(d->reg); i++) {
        const struct registry_worker *w = registry_at(d->reg, i);
        if ((unsigned)w->role < PROTO_ROLE_COUNT)
            out[w->role][dispatch_worker_state(w)]++;
    }
}

int dispatch_status(const struct dispatch *d, struct proto_status_reply *out)
{
    out->roles.instruct = registry_count_live(d->reg, PROTO_ROLE_INSTRUCT);
    out->roles.feedback = registry_count_live(d->reg, PROTO_ROLE_FEEDBACK);
    out->roles.edit = registry_count_live(d->reg, PROTO_ROLE_EDIT);
    out->roles.select = registry_count_live(d->reg, PROTO_ROLE_SELECT);
    size_t n = registry_size(d->reg);
    if (n > PROTO_MAX_WORKERS)
        n = PROTO_MAX_WORKERS;
    out->workers = NULL;
    out->n_workers = 0;
    if (n == 0)
        return 0;
    out->workers = calloc(n, sizeof *out->workers);
    if (!out->workers)
        return PROTO_ERR_NO_MEMORY;
    for (size_t i = 0; i < n; i++) {
        const struct registry_worker *w = registry_at(d->reg, i);
        struct proto_worker_info *wi = &out->workers[i];
        out->n_workers = (uint32_t)(i + 1);
        wi->id = strdup(w->name);
        wi->model = strdup(w->model);
        wi->backend = strdup(w->backend);
        if (!wi->id || !wi->model || !wi->backend)
            return PROTO_ERR_NO_MEMORY; /* the caller frees what was made */
        wi->role = w->role;
        wi->state = dispatch_worker_state(w);
        wi->capacity = w->capacity;
        wi->jobs = w->n_jobs;
        wi->load = w->load;
        wi->has_load = w->has_load;
    }
    return 0;
}

uint32_t dispatch_queued(const struct dispatch *d, enum proto_role role)
{
    return (unsigned)role < PROTO_ROLE_COUNT ? d->n_queued[role] : 0;
}

uint32_t dispatch_running(const struct dispatch *d)
{
    return d->n_running;
}

uint32_t dispatch_running_role(const struct dispatch *d, enum proto_role role)
{
    return (unsigned)role < PROTO_ROLE_COUNT ? d->n_running_role[role] : 0;
}

const struct dispatch_counters *dispatch_counters(const struct dispatch *d)
{
    return &d->counters;
}
