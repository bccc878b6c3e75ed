/* its.c — libits: the client side of itsd's frontend protocol (see its.h for the API and
 * docs/client.md for the guide).
 *
 * Owns: per handle, one ZeroMQ DEALER socket (and its context unless shared), the table of
 * requests waiting for a reply (struct its_req) and the FIFO of events for asynchronous
 * requests. Every reply the socket delivers goes through one dispatcher, whether a blocking
 * call or its_next_event read it, so a synchronous call never loses an asynchronous request's
 * events and vice versa.
 *
 * Must never: print, exit, raise signals, block without a caller's timeout, trust a byte from
 * the socket (everything is decoded by proto_decode, and undecodable input becomes an error),
 * or expose protocol/ or ZeroMQ types through its.h.
 */
#include "its.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "keyfile.h"
#include "proto.h"

#define ITS_ERRSTR_MAX 1200
/* Requests whose blocking call gave up before itsd accepted them are remembered so that a late
 * `accepted` can be answered with a cancel; beyond this many the oldest is forgotten, so a
 * long-lived handle facing a dead daemon cannot grow without bound. */
#define ITS_MAX_ABANDONED 256

enum its_req_kind { ITS_REQ_SUBMIT, ITS_REQ_GET, ITS_REQ_CANCEL, ITS_REQ_STATUS };

enum its_req_mode {
    ITS_MODE_ASYNC,     /* what happens to it becomes events in the queue */
    ITS_MODE_SYNC,      /* a blocking call waits on it: the completion is stored here */
    ITS_MODE_ABANDONED, /* its blocking call timed out before `accepted`: cancel it if it comes */
};

/* One message sent that still waits for its answer. */
struct its_req {
    struct its_req *next;
    enum its_req_kind kind;
    enum its_req_mode mode;
    uint64_t tag;            /* SUBMIT and STATUS; 0 for GET and CANCEL (no tag on the wire) */
    char id[ITS_ID_MAX + 1]; /* SUBMIT once accepted; GET and CANCEL: the id asked about */
    /* completion, SYNC mode only */
    bool done;
    int rc;
    char code[ITS_CODE_MAX + 1];
    char *message;
    struct its_result *result;
    struct its_progress progress;
    struct its_status *status;
};

/* An event with its queue link; its_event_free frees the whole node (the event is the first
 * member, so the two pointers are the same). */
struct its_evnode {
    struct its_event ev;
    struct its_evnode *next;
};

/* What the socket monitor said about the security handshake. */
enum its_sec_state {
    ITS_SEC_UNKNOWN,  /* no handshake finished yet */
    ITS_SEC_OK,       /* the last one succeeded */
    ITS_SEC_REFUSED,  /* the last one failed: sec_msg says how */
};

struct its_client {
    void *ctx;
    bool own_ctx;
    void *sock;
    void *mon;  /* PAIR reading the socket monitor's handshake events */
    bool curve; /* CURVE client */
    enum its_sec_state sec;
    char sec_msg[400];
    char *endpoint;
    uint64_t next_tag;
    struct its_req *reqs; /* in sending order */
    struct its_evnode *ev_head, *ev_tail;
    size_t n_events;
    int err;
    char errstr[ITS_ERRSTR_MAX];
    char daemon_code[ITS_CODE_MAX + 1];
};

/* ---- errors --------------------------------------------------------------------------------- */

static void its_clear(its_client_t *c)
{
    c->err = 0;
    c->errstr[0] = '\0';
    c->daemon_code[0] = '\0';
}

__attribute__((format(printf, 3, 4))) static int its_fail(its_client_t *c, int rc,
                                                          const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->errstr, sizeof c->errstr, fmt, ap);
    va_end(ap);
    c->err = rc;
    return rc;
}

static void its_copy(char *dst, size_t cap, const char *src)
{
    snprintf(dst, cap, "%s", src ? src : "");
}

static int64_t its_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t its_deadline(int timeout_ms)
{
    return timeout_ms < 0 ? -1 : its_now_ms() + timeout_ms;
}

/* ---- names ---------------------------------------------------------------------------------- */

const char *its_strerror(int err)
{
    switch (err) {
    case ITS_OK: return "ok";
    case ITS_ERR_INVALID: return "invalid";
    case ITS_ERR_NO_MEMORY: return "no_memory";
    case ITS_ERR_IO: return "io";
    case ITS_ERR_TIMEOUT: return "timeout";
    case ITS_ERR_DAEMON: return "daemon";
    case ITS_ERR_PROTOCOL: return "protocol";
    case ITS_ERR_AUTH: return "auth";
    }
    return "?";
}

const char *its_role_name(enum its_role role)
{
    switch (role) {
    case ITS_ROLE_INSTRUCT: return "instruct";
    case ITS_ROLE_FEEDBACK: return "feedback";
    case ITS_ROLE_EDIT: return "edit";
    case ITS_ROLE_SELECT: return "select";
    }
    return "?";
}

const char *its_chat_role_name(enum its_chat_role role)
{
    switch (role) {
    case ITS_CHAT_SYSTEM: return "system";
    case ITS_CHAT_USER: return "user";
    case ITS_CHAT_ASSISTANT: return "assistant";
    }
    return "?";
}

const char *its_worker_state_name(enum its_worker_state state)
{
    switch (state) {
    case ITS_WORKER_READY: return "ready";
    case ITS_WORKER_BUSY: return "busy";
    case ITS_WORKER_DRAINING: return "draining";
    case ITS_WORKER_LOST: return "lost";
    }
    return "?";
}

int its_chat_role_from_name(const char *name, enum its_chat_role *out)
{
    static const enum its_chat_role all[] = {ITS_CHAT_SYSTEM, ITS_CHAT_USER, ITS_CHAT_ASSISTANT};
    if (!name || !out)
        return ITS_ERR_INVALID;
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) {
        if (strcmp(name, its_chat_role_name(all[i])) == 0) {
            *out = all[i];
            return 0;
        }
    }
    return ITS_ERR_INVALID;
}

/* ---- freeing -------------------------------------------------------------------------------- */

void its_result_free(struct its_result **r)
{
    if (!r || !*r)
        return;
    struct its_result *p = *r;
    for (size_t i = 0; i < p->n_candidates; i++) {
        struct its_candidate *cand = &p->candidates[i];
        free(cand->draft);
        for (size_t j = 0; j < cand->n_feedbacks; j++)
            free(cand->feedbacks[j]);
        free(cand->feedbacks);
        free(cand->edit);
    }
    free(p->candidates);
    free(p->answer);
    free(p);
    *r = NULL;
}

void its_status_free(struct its_status **s)
{
    if (!s || !*s)
        return;
    struct its_status *p = *s;
    for (size_t i = 0; i < p->n_workers; i++) {
        free(p->workers[i].id);
        free(p->workers[i].model);
        free(p->workers[i].backend);
    }
    free(p->workers);
    free(p);
    *s = NULL;
}

void its_event_free(struct its_event **ev)
{
    if (!ev || !*ev)
        return;
    struct its_event *e = *ev;
    its_result_free(&e->result);
    free(e->message);
    free((struct its_evnode *)e);
    *ev = NULL;
}

static void its_req_free(struct its_req *r)
{
    if (!r)
        return;
    free(r->message);
    its_result_free(&r->result);
    its_status_free(&r->status);
    free(r);
}

/* ---- conversions from the wire structs ------------------------------------------------------ */

/* strdup that treats NULL as NULL; *ok turns false when a non-NULL copy failed. */
static char *its_dup(const char *s, bool *ok)
{
    if (!s)
        return NULL;
    char *d = strdup(s);
    if (!d)
        *ok = false;
    return d;
}

static int its_result_from_proto(const struct proto_result *p, struct its_result **out)
{
    *out = NULL;
    struct its_result *r = calloc(1, sizeof *r);
    if (!r)
        return ITS_ERR_NO_MEMORY;
    bool ok = true;
    its_copy(r->id, sizeof r->id, p->id);
    r->answer = its_dup(p->answer ? p->answer : "", &ok);
    r->score = p->score;
    r->has_score = p->has_score;
    r->best = p->best;
    r->has_best = p->has_best;
    r->partial = p->partial;
    r->timings = (struct its_timings){
        .drafts_ms = p->timings.drafts_ms,
        .feedbacks_ms = p->timings.feedbacks_ms,
        .edits_ms = p->timings.edits_ms,
        .scores_ms = p->timings.scores_ms,
        .total_ms = p->timings.total_ms,
    };
    const struct proto_usage *u[ITS_ROLE_COUNT] = {
        [ITS_ROLE_INSTRUCT] = &p->usage.instruct,
        [ITS_ROLE_FEEDBACK] = &p->usage.feedback,
        [ITS_ROLE_EDIT] = &p->usage.edit,
        [ITS_ROLE_SELECT] = &p->usage.select,
    };
    for (int i = 0; i < ITS_ROLE_COUNT; i++)
        r->usage[i] = (struct its_usage){u[i]->prompt_tokens, u[i]->completion_tokens};
    if (ok && p->n_candidates > 0) {
        r->candidates = calloc(p->n_candidates, sizeof *r->candidates);
        if (r->candidates)
            r->n_candidates = p->n_candidates;
        else
            ok = false;
    }
    for (size_t i = 0; ok && i < r->n_candidates; i++) {
        const struct proto_candidate *pc = &p->candidates[i];
        struct its_candidate *cand = &r->candidates[i];
        cand->draft_index = pc->draft_index;
        cand->draft = its_dup(pc->draft ? pc->draft : "", &ok);
        cand->edit = its_dup(pc->edit, &ok);
        cand->score = pc->score;
        cand->has_score = pc->has_score;
        if (ok && pc->n_feedbacks > 0) {
            cand->feedbacks = calloc(pc->n_feedbacks, sizeof *cand->feedbacks);
            if (cand->feedbacks)
                cand->n_feedbacks = pc->n_feedbacks;
            else
                ok = false;
        }
        for (size_t j = 0; ok && j < cand->n_feedbacks; j++)
            cand->feedbacks[j] = its_dup(pc->feedbacks[j] ? pc->feedbacks[j] : "", &ok);
    }
    if (!ok) {
        its_result_free(&r);
        return ITS_ERR_NO_MEMORY;
    }
    *out = r;
    return 0;
}

static int its_status_from_proto(const struct proto_status_reply *p, struct its_status **out)
{
    *out = NULL;
    struct its_status *s = calloc(1, sizeof *s);
    if (!s)
        return ITS_ERR_NO_MEMORY;
    s->workers_per_role[ITS_ROLE_INSTRUCT] = p->roles.instruct;
    s->workers_per_role[ITS_ROLE_FEEDBACK] = p->roles.feedback;
    s->workers_per_role[ITS_ROLE_EDIT] = p->roles.edit;
    s->workers_per_role[ITS_ROLE_SELECT] = p->roles.select;
    s->queue_depth = p->queue_depth;
    s->in_flight = p->in_flight;
    s->has_metrics = p->has_metrics;
    if (p->has_metrics) {
        const struct proto_metrics *pm = &p->metrics;
        struct its_metrics *m = &s->metrics;
        m->requests_ok = pm->requests.ok;
        m->requests_partial = pm->requests.partial;
        m->requests_cancelled = pm->requests.cancelled;
        m->requests_deadline = pm->requests.deadline;
        m->requests_failed = pm->requests.failed;
        m->requests_rejected = pm->requests.rejected;
        m->latency_count = pm->latency.count;
        m->latency_sum_s = pm->latency.sum_s;
        m->has_latency_p = pm->latency.has_p50_s && pm->latency.has_p95_s;
        m->latency_p50_s = m->has_latency_p ? pm->latency.p50_s : 0.0;
        m->latency_p95_s = m->has_latency_p ? pm->latency.p95_s : 0.0;
        const struct proto_role_counts *q = &pm->queue_depth, *f = &pm->jobs_in_flight;
        const struct proto_role_totals *t = &pm->tokens_generated;
        uint32_t jq[ITS_ROLE_COUNT] = {q->instruct, q->feedback, q->edit, q->select};
        uint32_t jf[ITS_ROLE_COUNT] = {f->instruct, f->feedback, f->edit, f->select};
        uint64_t tg[ITS_ROLE_COUNT] = {t->instruct, t->feedback, t->edit, t->select};
        memcpy(m->jobs_queued, jq, sizeof jq);
        memcpy(m->jobs_in_flight, jf, sizeof jf);
        memcpy(m->tokens_generated, tg, sizeof tg);
        m->heartbeat_misses = pm->heartbeat_misses;
        m->job_retries = pm->job_retries;
        m->protocol_errors_frontend = pm->protocol_errors.frontend;
        m->protocol_errors_backend = pm->protocol_errors.backend;
    }
    bool ok = true;
    if (p->n_workers > 0) {
        s->workers = calloc(p->n_workers, sizeof *s->workers);
        if (s->workers)
            s->n_workers = p->n_workers;
        else
            ok = false;
    }
    for (size_t i = 0; ok && i < s->n_workers; i++) {
        const struct proto_worker_info *pw = &p->workers[i];
        struct its_worker *w = &s->workers[i];
        w->id = its_dup(pw->id, &ok);
        w->model = its_dup(pw->model, &ok);
        w->backend = its_dup(pw->backend, &ok);
        /* The enums are listed in the same order on both sides; the switch keeps it so. */
        switch (pw->role) {
        case PROTO_ROLE_INSTRUCT: w->role = ITS_ROLE_INSTRUCT; break;
        case PROTO_ROLE_FEEDBACK: w->role = ITS_ROLE_FEEDBACK; break;
        case PROTO_ROLE_EDIT: w->role = ITS_ROLE_EDIT; break;
        case PROTO_ROLE_SELECT: w->role = ITS_ROLE_SELECT; break;
        }
        switch (pw->state) {
        case PROTO_WORKER_READY: w->state = ITS_WORKER_READY; break;
        case PROTO_WORKER_BUSY: w->state = ITS_WORKER_BUSY; break;
        case PROTO_WORKER_DRAINING: w->state = ITS_WORKER_DRAINING; break;
        case PROTO_WORKER_LOST: w->state = ITS_WORKER_LOST; break;
        }
        w->max_seqs = pw->capacity.max_seqs;
        w->max_ctx = pw->capacity.max_ctx;
        w->kv_tokens = pw->capacity.kv_tokens;
        w->jobs = pw->jobs;
        w->has_load = pw->has_load;
        w->running = pw->load.running;
        w->queued = pw->load.queued;
        w->kv_used = pw->load.kv_used;
    }
    if (!ok) {
        its_status_free(&s);
        return ITS_ERR_NO_MEMORY;
    }
    *out = s;
    return 0;
}

static void its_progress_from_proto(const struct proto_progress *p, struct its_progress *out)
{
    memset(out, 0, sizeof *out);
    its_copy(out->id, sizeof out->id, p->id);
    out->drafts = (struct its_stage){p->drafts.done, p->drafts.total};
    out->feedbacks = (struct its_stage){p->feedbacks.done, p->feedbacks.total};
    out->edits = (struct its_stage){p->edits.done, p->edits.total};
    out->scores = (struct its_stage){p->scores.done, p->scores.total};
    out->elapsed_ms = p->elapsed_ms;
}

/* ---- the request table and the event queue -------------------------------------------------- */

static struct its_req *its_req_add(its_client_t *c, enum its_req_kind kind,
                                   enum its_req_mode mode)
{
    struct its_req *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->kind = kind;
    r->mode = mode;
    struct its_req **pp = &c->reqs;
    while (*pp)
        pp = &(*pp)->next;
    *pp = r;
    return r;
}

static void its_req_unlink(its_client_t *c, struct its_req *r)
{
    for (struct its_req **pp = &c->reqs; *pp; pp = &(*pp)->next) {
        if (*pp == r) {
            *pp = r->next;
            r->next = NULL;
            return;
        }
    }
}

static void its_req_drop(its_client_t *c, struct its_req *r)
{
    its_req_unlink(c, r);
    its_req_free(r);
}

/* Keeps at most ITS_MAX_ABANDONED abandoned requests, forgetting the oldest. */
static void its_req_prune_abandoned(its_client_t *c)
{
    size_t n = 0;
    for (struct its_req *r = c->reqs; r; r = r->next)
        n += r->mode == ITS_MODE_ABANDONED;
    for (struct its_req *r = c->reqs, *next; r && n > ITS_MAX_ABANDONED; r = next) {
        next = r->next;
        if (r->mode == ITS_MODE_ABANDONED) {
            its_req_drop(c, r);
            n--;
        }
    }
}

static struct its_event *its_event_new(enum its_event_type type, const struct its_req *r)
{
    struct its_evnode *n = calloc(1, sizeof *n);
    if (!n)
        return NULL;
    n->ev.type = type;
    if (r) {
        n->ev.tag = r->tag;
        its_copy(n->ev.id, sizeof n->ev.id, r->id);
    }
    return &n->ev;
}

static void its_event_push(its_client_t *c, struct its_event *ev)
{
    struct its_evnode *n = (struct its_evnode *)ev;
    n->next = NULL;
    if (c->ev_tail)
        c->ev_tail->next = n;
    else
        c->ev_head = n;
    c->ev_tail = n;
    c->n_events++;
}

static struct its_event *its_event_pop(its_client_t *c)
{
    struct its_evnode *n = c->ev_head;
    if (!n)
        return NULL;
    c->ev_head = n->next;
    if (!c->ev_head)
        c->ev_tail = NULL;
    n->next = NULL;
    c->n_events--;
    return &n->ev;
}

/* Ends request r with an error: stored for its blocking call, queued as an ITS_EVENT_ERROR, or
 * forgotten when nobody waits any more. r (unless SYNC) is freed. */
static int its_req_fail(its_client_t *c, struct its_req *r, int rc, const char *code,
                        const char *message)
{
    switch (r->mode) {
    case ITS_MODE_SYNC:
        if (r->done)
            return 0;
        r->done = true;
        r->rc = rc;
        its_copy(r->code, sizeof r->code, code);
        free(r->message);
        r->message = strdup(message ? message : "");
        return r->message ? 0 : ITS_ERR_NO_MEMORY;
    case ITS_MODE_ASYNC: {
        struct its_event *ev = its_event_new(ITS_EVENT_ERROR, r);
        char *msg = strdup(message ? message : "");
        its_req_drop(c, r);
        if (!ev || !msg) {
            free(msg);
            its_event_free(&ev);
            return ITS_ERR_NO_MEMORY;
        }
        ev->err = rc;
        its_copy(ev->code, sizeof ev->code, code);
        ev->message = msg;
        its_event_push(c, ev);
        return 0;
    }
    case ITS_MODE_ABANDONED:
        its_req_drop(c, r);
        return 0;
    }
    return 0;
}

/* Queues an ITS_EVENT_ERROR that belongs to no request (tag 0). */
static int its_push_unaddressed(its_client_t *c, int rc, const char *code, const char *message)
{
    struct its_event *ev = its_event_new(ITS_EVENT_ERROR, NULL);
    char *msg = strdup(message ? message : "");
    if (!ev || !msg) {
        free(msg);
        its_event_free(&ev);
        return ITS_ERR_NO_MEMORY;
    }
    ev->err = rc;
    its_copy(ev->code, sizeof ev->code, code);
    ev->message = msg;
    its_event_push(c, ev);
    return 0;
}

static struct its_req *its_req_sync(its_client_t *c)
{
    for (struct its_req *r = c->reqs; r; r = r->next)
        if (r->mode == ITS_MODE_SYNC && !r->done)
            return r;
    return NULL;
}

/* ---- sending -------------------------------------------------------------------------------- */

static int its_send(its_client_t *c, const struct proto_msg *m)
{
    void *buf = NULL;
    size_t len = 0;
    char perr[512];
    int rc = proto_encode(m, &buf, &len, perr, sizeof perr);
    if (rc == PROTO_ERR_NO_MEMORY)
        return its_fail(c, ITS_ERR_NO_MEMORY, "out of memory encoding %s",
                        proto_type_name(m->type));
    if (rc < 0)
        return its_fail(c, ITS_ERR_INVALID, "invalid %s", perr);
    /* Never block: with itsd away the DEALER queues up to its high-water mark, then EAGAIN. */
    int n = zmq_send(c->sock, buf, len, ZMQ_DONTWAIT);
    int e = errno;
    free(buf);
    if (n < 0 && e == EAGAIN)
        return its_fail(c, ITS_ERR_IO, "cannot send to %s: outgoing queue full (is itsd running?)",
                        c->endpoint);
    if (n < 0)
        return its_fail(c, ITS_ERR_IO, "send to %s: %s", c->endpoint, zmq_strerror(e));
    return 0;
}

/* Best-effort messages the caller does not wait on (a cancel after a timeout, an error about a
 * bad reply): a failure leaves the handle's error as it was. */
static void its_send_quiet(its_client_t *c, const struct proto_msg *m)
{
    int err = c->err;
    char saved[ITS_ERRSTR_MAX];
    memcpy(saved, c->errstr, sizeof saved);
    (void)its_send(c, m);
    c->err = err;
    memcpy(c->errstr, saved, sizeof saved);
}

static void its_send_cancel_quiet(its_client_t *c, const char *id)
{
    struct proto_msg m = {.type = PROTO_CANCEL};
    m.cancel.id = (char *)id; /* only read by proto_encode, never freed */
    its_send_quiet(c, &m);
}

/* ---- dispatching replies -------------------------------------------------------------------- */

static bool its_req_has_id(const struct its_req *r, const char *id)
{
    return id && r->id[0] && strcmp(r->id, id) == 0;
}

static int its_on_accepted(its_client_t *c, const struct proto_accepted *a)
{
    for (struct its_req *r = c->reqs; r; r = r->next) {
        if (r->kind != ITS_REQ_SUBMIT || r->tag != a->tag || r->id[0])
            continue;
        its_copy(r->id, sizeof r->id, a->id);
        if (r->mode == ITS_MODE_ABANDONED) {
            /* Its caller gave up: don't let the daemon spend a cluster on nobody. */
            its_send_cancel_quiet(c, r->id);
            its_req_drop(c, r);
        } else if (r->mode == ITS_MODE_ASYNC) {
            struct its_event *ev = its_event_new(ITS_EVENT_ACCEPTED, r);
            if (!ev)
                return ITS_ERR_NO_MEMORY;
            its_event_push(c, ev);
        }
        return 0;
    }
    return 0; /* a duplicate or a stray: nobody asked */
}

static int its_on_progress(its_client_t *c, const struct proto_progress *p)
{
    for (struct its_req *r = c->reqs; r; r = r->next) {
        if (!its_req_has_id(r, p->id))
            continue;
        if (r->kind == ITS_REQ_SUBMIT && r->mode == ITS_MODE_ASYNC) {
            struct its_event *ev = its_event_new(ITS_EVENT_PROGRESS, r);
            if (!ev)
                return ITS_ERR_NO_MEMORY;
            its_progress_from_proto(p, &ev->progress);
            its_event_push(c, ev);
        } else if (r->kind == ITS_REQ_GET && r->mode == ITS_MODE_SYNC && !r->done) {
            its_progress_from_proto(p, &r->progress);
            r->done = true;
        }
    }
    return 0;
}

static int its_on_result(its_client_t *c, const struct proto_result *p)
{
    int rc = 0;
    for (struct its_req *r = c->reqs, *next; r; r = next) {
        next = r->next;
        if (!its_req_has_id(r, p->id))
            continue;
        if (r->kind == ITS_REQ_CANCEL && r->mode == ITS_MODE_SYNC) {
            r->done = true; /* it finished before the cancel reached it */
            continue;
        }
        if (r->kind != ITS_REQ_SUBMIT && r->kind != ITS_REQ_GET)
            continue;
        if (r->mode == ITS_MODE_ABANDONED) {
            its_req_drop(c, r);
        } else if (r->mode == ITS_MODE_SYNC && !r->done) {
            r->done = true;
            r->rc = its_result_from_proto(p, &r->result);
        } else if (r->mode == ITS_MODE_ASYNC) {
            struct its_event *ev = its_event_new(ITS_EVENT_RESULT, r);
            its_req_drop(c, r);
            if (!ev || its_result_from_proto(p, &ev->result) < 0) {
                its_event_free(&ev);
                rc = ITS_ERR_NO_MEMORY;
                continue;
            }
            its_event_push(c, ev);
        }
    }
    return rc;
}

/* Codes with which a request ends on its own: in answer to a cancel they mean "it is not
 * running any more", which is what the canceller wanted. Anything else (not_found, a
 * rejected cancel message, ...) is a failure of the cancel itself. */
static bool its_err_ends_request(enum proto_err code)
{
    return code == PROTO_ERR_CANCELLED || code == PROTO_ERR_DEADLINE ||
           code == PROTO_ERR_NO_WORKER || code == PROTO_ERR_WORKER_LOST;
}

static int its_on_error(its_client_t *c, const struct proto_error *e)
{
    const char *code = proto_err_name(e->code);
    const char *msg = e->message ? e->message : "";
    bool matched = false;
    int rc = 0;
    for (struct its_req *r = c->reqs, *next; r; r = next) {
        next = r->next;
        /* An error naming a request id is about that request only. Its tag may come from
         * another client's tag space (itsd tells a canceller about someone else's request
         * with the owner's tag), so the tag matches only errors without an id: those about
         * a submit that was never accepted, or about a status request. */
        bool by_tag = !e->id && e->has_tag && r->tag != 0 && r->tag == e->tag;
        bool by_id = r->kind != ITS_REQ_STATUS && its_req_has_id(r, e->id);
        if (!by_tag && !by_id)
            continue;
        matched = true;
        if (r->kind == ITS_REQ_CANCEL && its_err_ends_request(e->code)) {
            r->done = true; /* confirmed, or it had already ended this way */
            continue;
        }
        if (r->mode == ITS_MODE_SYNC && r->done)
            continue;
        int frc = its_req_fail(c, r, ITS_ERR_DAEMON, code, msg);
        if (frc < 0)
            rc = frc;
    }
    if (matched || e->has_tag || e->id)
        return rc; /* addressed to a request nobody waits for any more: drop it */
    /* Addressed to nobody: itsd could not even read what it answers. A blocking call is the
     * likeliest sender; otherwise the application hears of it as an event. */
    struct its_req *s = its_req_sync(c);
    if (s)
        return its_req_fail(c, s, ITS_ERR_DAEMON, code, msg);
    return its_push_unaddressed(c, ITS_ERR_DAEMON, code, msg);
}

static int its_on_status_reply(its_client_t *c, const struct proto_status_reply *s)
{
    for (struct its_req *r = c->reqs; r; r = r->next) {
        if (r->kind != ITS_REQ_STATUS || r->mode != ITS_MODE_SYNC || r->done)
            continue;
        if (s->has_tag && s->tag != r->tag)
            continue;
        r->done = true;
        r->rc = its_status_from_proto(s, &r->status);
        return 0;
    }
    return 0;
}

/* A frame that does not decode: tell the daemon (unless it is an error itself: two peers must
 * never trade errors about errors), and fail whoever it was probably meant for. */
static int its_on_malformed(its_client_t *c, const void *buf, size_t len, int code,
                            const char *why)
{
    struct proto_peek pk;
    bool peeked = proto_peek(buf, len, &pk) == 0;
    if (!(peeked && pk.type == PROTO_ERROR)) {
        char text[PROTO_MAX_ERROR_BYTES];
        snprintf(text, sizeof text, "client could not decode a reply: %s", why);
        struct proto_msg m = {.type = PROTO_ERROR};
        m.error.code = code == PROTO_ERR_NO_MEMORY ? PROTO_ERR_INTERNAL : code;
        m.error.message = text;
        m.error.has_tag = peeked && pk.has_tag;
        m.error.tag = pk.has_tag ? pk.tag : 0;
        m.error.id = peeked && pk.id[0] ? pk.id : NULL;
        its_send_quiet(c, &m);
    }
    char msg[ITS_ERRSTR_MAX];
    snprintf(msg, sizeof msg, "malformed reply from %s: %s", c->endpoint, why);
    int rc = code == PROTO_ERR_NO_MEMORY ? ITS_ERR_NO_MEMORY : ITS_ERR_PROTOCOL;
    const char *name = proto_err_name(code);
    struct its_req *target = NULL;
    for (struct its_req *r = c->reqs; peeked && r && !target; r = r->next) {
        bool by_tag = !pk.id[0] && pk.has_tag && r->tag != 0 && r->tag == pk.tag;
        if (by_tag || its_req_has_id(r, pk.id))
            target = r;
    }
    if (!target)
        target = its_req_sync(c);
    if (target)
        return its_req_fail(c, target, rc, name, msg);
    return its_push_unaddressed(c, rc, name, msg);
}

static int its_on_frame(its_client_t *c, const void *buf, size_t len)
{
    struct proto_msg m;
    char perr[512];
    int rc = proto_decode(buf, len, PROTO_TO_CLIENT, &m, perr, sizeof perr);
    if (rc < 0)
        return its_on_malformed(c, buf, len, rc, perr);
    switch (m.type) {
    case PROTO_ACCEPTED: rc = its_on_accepted(c, &m.accepted); break;
    case PROTO_PROGRESS: rc = its_on_progress(c, &m.progress); break;
    case PROTO_RESULT: rc = its_on_result(c, &m.result); break;
    case PROTO_ERROR: rc = its_on_error(c, &m.error); break;
    case PROTO_STATUS_REPLY: rc = its_on_status_reply(c, &m.status_reply); break;
    default: rc = 0; break; /* PROTO_TO_CLIENT admits nothing else */
    }
    proto_msg_free(&m);
    return rc;
}

/* Fails every request waiting for a reply with the handshake failure: no reply can come while
 * itsd refuses the connection, and the caller deserves the precise reason now rather than a
 * timeout later. */
static int its_fail_all_auth(its_client_t *c)
{
    int rc = 0;
    struct its_req *r = c->reqs;
    while (r) {
        struct its_req *next = r->next; /* ASYNC and ABANDONED requests are unlinked */
        if (!(r->mode == ITS_MODE_SYNC && r->done)) {
            int frc = its_req_fail(c, r, ITS_ERR_AUTH, "unauthorized", c->sec_msg);
            if (frc < 0)
                rc = frc;
        }
        r = next;
    }
    return rc;
}

/* Reads the monitor's events: [uint16 event, uint32 value][endpoint]. */
static int its_read_monitor(its_client_t *c)
{
    if (!c->mon)
        return 0;
    int rc = 0;
    for (;;) {
        zmq_msg_t ev;
        zmq_msg_init(&ev);
        if (zmq_msg_recv(&ev, c->mon, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&ev);
            return rc;
        }
        uint16_t event = 0;
        uint32_t value = 0;
        if (zmq_msg_size(&ev) >= 6) {
            memcpy(&event, zmq_msg_data(&ev), sizeof event);
            memcpy(&value, (const uint8_t *)zmq_msg_data(&ev) + 2, sizeof value);
        }
        while (zmq_msg_more(&ev)) { /* the endpoint frame */
            zmq_msg_close(&ev);
            zmq_msg_init(&ev);
            if (zmq_msg_recv(&ev, c->mon, ZMQ_DONTWAIT) < 0)
                break;
        }
        zmq_msg_close(&ev);
        /* Only a definite answer fails the waiting requests: a ZAP refusal, or one side
         * using CURVE and the other not. Other failures can be passing (a daemon restarting
         * mid-handshake); they only sharpen a later timeout's message. */
        bool failed = false;
        switch (event) {
        case ZMQ_EVENT_HANDSHAKE_SUCCEEDED:
            c->sec = ITS_SEC_OK;
            c->sec_msg[0] = '\0';
            break;
        case ZMQ_EVENT_HANDSHAKE_FAILED_AUTH:
            failed = true;
            snprintf(c->sec_msg, sizeof c->sec_msg,
                     "itsd at %s refused this client's CURVE key (ZAP status %u): its public "
                     "key must be in itsd's [security] client_keys",
                     c->endpoint, value);
            break;
        case ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL:
        case ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            if (event == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL &&
                value == ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH) {
                failed = true;
                snprintf(c->sec_msg, sizeof c->sec_msg,
                         "security mismatch with itsd at %s: %s", c->endpoint,
                         c->curve ? "this client uses CURVE but itsd runs with curve = off"
                                  : "itsd requires CURVE: give the client itsd's public key "
                                    "and a key pair (itsctl --server-key FILE --key FILE)");
            } else {
                c->sec = ITS_SEC_REFUSED;
                snprintf(c->sec_msg, sizeof c->sec_msg, "the %s handshake failed%s",
                         c->curve ? "CURVE" : "ZMTP",
                         c->curve ? ": is the server key itsd's public key?"
                                  : ": if itsd runs with curve = on, give the client itsd's "
                                    "public key and a key pair (--server-key FILE --key FILE)");
            }
            break;
        default:
            break;
        }
        if (failed) {
            c->sec = ITS_SEC_REFUSED;
            int frc = its_fail_all_auth(c);
            if (frc < 0)
                rc = frc;
        }
    }
}

/* Reads and dispatches one message. Returns 1 when one was read, 0 when none was waiting, or a
 * negative its_err (socket failure; out of memory while dispatching, the message is lost). */
static int its_recv_one(its_client_t *c)
{
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    int n;
    do {
        n = zmq_msg_recv(&msg, c->sock, ZMQ_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        int e = errno;
        zmq_msg_close(&msg);
        if (e == EAGAIN)
            return 0;
        return its_fail(c, ITS_ERR_IO, "receive from %s: %s", c->endpoint, zmq_strerror(e));
    }
    int rc;
    if (zmq_msg_more(&msg)) {
        /* The protocol is one frame per message: read the rest away so the next message
         * starts clean, then report this one as malformed. */
        int parts = 1;
        while (zmq_msg_more(&msg)) {
            zmq_msg_close(&msg);
            zmq_msg_init(&msg);
            if (zmq_msg_recv(&msg, c->sock, ZMQ_DONTWAIT) < 0)
                break;
            parts++;
        }
        char why[96];
        snprintf(why, sizeof why, "a message of %d frames (the protocol sends 1)", parts);
        rc = its_on_malformed(c, "", 0, PROTO_ERR_BAD_MESSAGE, why);
    } else {
        rc = its_on_frame(c, zmq_msg_data(&msg), zmq_msg_size(&msg));
    }
    zmq_msg_close(&msg);
    if (rc == ITS_ERR_NO_MEMORY)
        return its_fail(c, rc, "out of memory handling a reply from %s", c->endpoint);
    return rc < 0 ? rc : 1;
}

/* Reads until the socket has nothing more: only then is the edge-triggered ZMQ_FD re-armed. */
static int its_drain(its_client_t *c)
{
    int mrc = its_read_monitor(c);
    if (mrc < 0)
        return its_fail(c, mrc, "out of memory handling a handshake failure");
    for (;;) {
        int rc = its_recv_one(c);
        if (rc <= 0)
            return rc;
    }
}

/* Waits until r completes, reading and dispatching everything that arrives, or until
 * `deadline` (its_now_ms() clock; < 0: none) passes: ITS_ERR_TIMEOUT with no message set (the
 * caller knows what waited). */
static int its_wait(its_client_t *c, struct its_req *r, int64_t deadline)
{
    for (;;) {
        int rc = its_drain(c);
        if (rc < 0)
            return rc;
        if (r->done)
            return 0;
        long wait = -1;
        if (deadline >= 0) {
            int64_t left = deadline - its_now_ms();
            if (left <= 0)
                return ITS_ERR_TIMEOUT;
            wait = left > INT_MAX ? INT_MAX : (long)left;
        }
        zmq_pollitem_t items[2] = {{.socket = c->sock, .events = ZMQ_POLLIN},
                                   {.socket = c->mon, .events = ZMQ_POLLIN}};
        if (zmq_poll(items, c->mon ? 2 : 1, wait) < 0 && errno != EINTR)
            return its_fail(c, ITS_ERR_IO, "poll on %s: %s", c->endpoint,
                            zmq_strerror(errno));
    }
}

/* Hands a SYNC request's stored error to the handle. */
static int its_req_error(its_client_t *c, const struct its_req *r)
{
    if (r->rc == ITS_ERR_DAEMON) {
        its_copy(c->daemon_code, sizeof c->daemon_code, r->code);
        return its_fail(c, r->rc, "itsd error %s: %s", r->code, r->message ? r->message : "");
    }
    if (r->rc == ITS_ERR_NO_MEMORY)
        return its_fail(c, r->rc, "out of memory reading the reply from %s", c->endpoint);
    return its_fail(c, r->rc, "%s", r->message ? r->message : its_strerror(r->rc));
}

static int its_timeout_no_reply(its_client_t *c, int timeout_ms)
{
    if (c->sec == ITS_SEC_REFUSED && c->sec_msg[0])
        return its_fail(c, ITS_ERR_TIMEOUT, "no reply from %s within %d ms: %s", c->endpoint,
                        timeout_ms, c->sec_msg);
    if (c->curve && c->sec != ITS_SEC_OK)
        return its_fail(c, ITS_ERR_TIMEOUT,
                        "no reply from %s within %d ms (is itsd running? no CURVE handshake "
                        "completed: authentication may have failed; check that the server key "
                        "is itsd's public key and that itsd runs with curve = on)",
                        c->endpoint, timeout_ms);
    return its_fail(c, ITS_ERR_TIMEOUT, "no reply from %s within %d ms (is itsd running?)",
                    c->endpoint, timeout_ms);
}

/* ---- the handle ----------------------------------------------------------------------------- */

/* A client's CURVE material, binary, resolved from its_client_opts. */
struct its_curve {
    uint8_t server[32], public_key[32], secret_key[32];
};

/* Watches the socket's security handshakes (see its_read_monitor). Returns 0 or -1. */
static int its_monitor_open(its_client_t *c)
{
    char ep[64];
    snprintf(ep, sizeof ep, "inproc://its-client-monitor-%p", (void *)c);
    if (zmq_socket_monitor(c->sock, ep,
                           ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH |
                               ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |
                               ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL) != 0)
        return -1;
    c->mon = zmq_socket(c->ctx, ZMQ_PAIR);
    int linger = 0;
    if (!c->mon || zmq_setsockopt(c->mon, ZMQ_LINGER, &linger, sizeof linger) != 0 ||
        zmq_connect(c->mon, ep) != 0)
        return -1;
    return 0;
}

static int its_client_open(void *ctx, bool own_ctx, const char *endpoint,
                           const struct its_curve *curve, its_client_t **out, char *err,
                           size_t err_len)
{
    if (err && err_len)
        err[0] = '\0';
    if (!out) {
        if (err && err_len)
            snprintf(err, err_len, "its_client_new: out is NULL");
        if (own_ctx && ctx)
            zmq_ctx_term(ctx);
        return ITS_ERR_INVALID;
    }
    *out = NULL;
    if (!endpoint) {
        endpoint = getenv("ITS_ENDPOINT");
        if (!endpoint || !*endpoint)
            endpoint = ITS_DEFAULT_ENDPOINT;
    }
    int rc = ITS_ERR_NO_MEMORY;
    const char *what = "out of memory";
    char detail[256] = "";
    its_client_t *c = calloc(1, sizeof *c);
    if (!c)
        goto fail;
    c->ctx = ctx;
    c->own_ctx = own_ctx;
    c->next_tag = 1;
    c->endpoint = strdup(endpoint);
    if (!c->endpoint || !ctx)
        goto fail;
    c->sock = zmq_socket(ctx, ZMQ_DEALER);
    if (!c->sock) {
        rc = ITS_ERR_IO;
        what = "cannot create a ZeroMQ socket";
        its_copy(detail, sizeof detail, zmq_strerror(errno));
        goto fail;
    }
    /* Closing must never wait for an absent daemon to take queued messages. */
    int linger = 0;
    zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof linger);
    /* A frame over the protocol's limit cannot be valid: let ZeroMQ refuse it before it is
     * buffered (it drops the connection, which then reconnects). */
    int64_t max_msg = (int64_t)PROTO_MAX_MESSAGE_BYTES;
    zmq_setsockopt(c->sock, ZMQ_MAXMSGSIZE, &max_msg, sizeof max_msg);
    if (curve) {
        c->curve = true;
        if (zmq_setsockopt(c->sock, ZMQ_CURVE_SERVERKEY, curve->server, 32) != 0 ||
            zmq_setsockopt(c->sock, ZMQ_CURVE_PUBLICKEY, curve->public_key, 32) != 0 ||
            zmq_setsockopt(c->sock, ZMQ_CURVE_SECRETKEY, curve->secret_key, 32) != 0) {
            rc = ITS_ERR_IO;
            what = "cannot set the CURVE keys";
            its_copy(detail, sizeof detail, zmq_strerror(errno));
            goto fail;
        }
    }
    /* before connecting, so that not even the first handshake goes unseen */
    if (its_monitor_open(c) != 0) {
        rc = ITS_ERR_IO;
        what = "cannot monitor the socket";
        its_copy(detail, sizeof detail, zmq_strerror(errno));
        goto fail;
    }
    if (zmq_connect(c->sock, endpoint) != 0) {
        rc = errno == ENOMEM ? ITS_ERR_NO_MEMORY : ITS_ERR_INVALID;
        what = "invalid endpoint";
        snprintf(detail, sizeof detail, "'%s': %s", endpoint, zmq_strerror(errno));
        goto fail;
    }
    *out = c;
    return 0;
fail:
    if (err && err_len)
        snprintf(err, err_len, "%s%s%s", what, detail[0] ? " " : "", detail);
    if (c) {
        c->own_ctx = own_ctx; /* the context is freed with the handle only when it is ours */
        its_client_destroy(&c);
    } else if (own_ctx && ctx) {
        zmq_ctx_term(ctx);
    }
    return rc;
}

int its_client_new(const char *endpoint, its_client_t **out, char *err, size_t err_len)
{
    void *ctx = zmq_ctx_new();
    if (!ctx) {
        if (out)
            *out = NULL;
        if (err && err_len)
            snprintf(err, err_len, "cannot create a ZeroMQ context: %s", zmq_strerror(errno));
        return ITS_ERR_IO;
    }
    return its_client_open(ctx, true, endpoint, NULL, out, err, err_len);
}

int its_client_new_ctx(void *zmq_ctx, const char *endpoint, its_client_t **out, char *err,
                       size_t err_len)
{
    if (!zmq_ctx) {
        if (out)
            *out = NULL;
        if (err && err_len)
            snprintf(err, err_len, "its_client_new_ctx: zmq_ctx is NULL");
        return ITS_ERR_INVALID;
    }
    return its_client_open(zmq_ctx, false, endpoint, NULL, out, err, err_len);
}

/* ---- keys ------------------------------------------------------------------------------------ */

int its_key_load(const char *path, char *public_z85, char *secret_z85, char *err,
                 size_t err_len)
{
    char dummy[8];
    if (!err || err_len == 0) {
        err = dummy;
        err_len = sizeof dummy;
    }
    err[0] = '\0';
    if (!public_z85) {
        snprintf(err, err_len, "its_key_load: public_z85 is NULL");
        return ITS_ERR_INVALID;
    }
    uint8_t pub[32], sec[32];
    if (keyfile_read(path, pub, secret_z85 ? sec : NULL, err, err_len) != 0)
        return ITS_ERR_INVALID;
    zmq_z85_encode(public_z85, pub, 32);
    if (secret_z85)
        zmq_z85_encode(secret_z85, sec, 32);
    explicit_bzero(sec, sizeof sec);
    return 0;
}

/* Creates `path` with `mode` (never over an existing file) and writes `text`. */
static int its_write_new(const char *path, mode_t mode, const char *text, char *err,
                         size_t err_len)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
    if (fd < 0) {
        snprintf(err, err_len, "%s: %s", path,
                 errno == EEXIST ? "already exists (refusing to overwrite a key)"
                                 : strerror(errno));
        return ITS_ERR_INVALID;
    }
    /* the umask may have taken bits away from a .pub: the modes are part of the contract */
    size_t len = strlen(text), done = 0;
    int e = fchmod(fd, mode) == 0 ? 0 : errno;
    while (!e && done < len) {
        ssize_t n = write(fd, text + done, len - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            e = n < 0 ? errno : EIO;
        else
            done += (size_t)n;
    }
    if (!e && fsync(fd) != 0)
        e = errno;
    if (close(fd) != 0 && !e)
        e = errno;
    if (e) {
        unlink(path);
        snprintf(err, err_len, "%s: cannot write: %s", path, strerror(e));
        return ITS_ERR_IO;
    }
    return 0;
}

int its_keygen(const char *prefix, char *public_z85, char *err, size_t err_len)
{
    char dummy[8];
    if (!err || err_len == 0) {
        err = dummy;
        err_len = sizeof dummy;
    }
    err[0] = '\0';
    if (!prefix || !*prefix) {
        snprintf(err, err_len, "keygen: empty output prefix");
        return ITS_ERR_INVALID;
    }
    char key_path[4096], pub_path[4096];
    if ((size_t)snprintf(key_path, sizeof key_path, "%s.key", prefix) >= sizeof key_path ||
        (size_t)snprintf(pub_path, sizeof pub_path, "%s.pub", prefix) >= sizeof pub_path) {
        snprintf(err, err_len, "keygen: output prefix too long");
        return ITS_ERR_INVALID;
    }
    struct stat st;
    const char *exists = stat(key_path, &st) == 0 ? key_path
                         : stat(pub_path, &st) == 0 ? pub_path : NULL;
    if (exists) {
        snprintf(err, err_len, "%s: already exists (refusing to overwrite a key)", exists);
        return ITS_ERR_INVALID;
    }
    char pub[ITS_KEY_Z85_LEN + 1], sec[ITS_KEY_Z85_LEN + 1];
    if (zmq_curve_keypair(pub, sec) != 0) {
        snprintf(err, err_len, "keygen: zmq_curve_keypair: %s (libzmq without CURVE?)",
                 zmq_strerror(errno));
        return ITS_ERR_IO;
    }
    char text[512];
    snprintf(text, sizeof text,
             "# its CURVE key pair (itsctl keygen). Keep this file secret; give others the\n"
             "# .pub file beside it.\n"
             "public-key = %s\n"
             "secret-key = %s\n",
             pub, sec);
    memset(sec, 0, sizeof sec);
    int rc = its_write_new(key_path, 0600, text, err, err_len);
    memset(text, 0, sizeof text);
    if (rc != 0)
        return rc;
    snprintf(text, sizeof text, "# its CURVE public key (itsctl keygen)\npublic-key = %s\n",
             pub);
    rc = its_write_new(pub_path, 0644, text, err, err_len);
    if (rc != 0) {
        unlink(key_path);
        return rc;
    }
    if (public_z85)
        memcpy(public_z85, pub, sizeof pub);
    return 0;
}

/* Resolves one key given as Z85 text or as a file; `label` names the option in errors. */
static int its_opt_public(const char *z85, const char *file, const char *label, uint8_t out[32],
                          char *err, size_t err_len)
{
    if (z85 && file) {
        snprintf(err, err_len, "%s: give the key as text or as a file, not both", label);
        return ITS_ERR_INVALID;
    }
    if (file) {
        char why[600];
        if (keyfile_read(file, out, NULL, why, sizeof why) != 0) {
            snprintf(err, err_len, "%s file %s", label, why);
            return ITS_ERR_INVALID;
        }
        return 0;
    }
    if (!z85 || keyfile_z85_decode(z85, strlen(z85), out) != 0) {
        snprintf(err, err_len, "%s: not %d characters of Z85 text", label, ITS_KEY_Z85_LEN);
        return ITS_ERR_INVALID;
    }
    return 0;
}

/* Fills *k from opts; returns 1 when opts ask for CURVE, 0 for plain text, or an error. */
static int its_opts_curve(const struct its_client_opts *o, struct its_curve *k, char *err,
                          size_t err_len)
{
    bool any_server = o->server_key || o->server_key_file;
    bool any_own = o->public_key || o->secret_key || o->key_file;
    if (!any_server && !any_own)
        return 0;
    if (!any_server) {
        snprintf(err, err_len, "CURVE: the client's key pair is set but not itsd's public key "
                 "(server_key or server_key_file)");
        return ITS_ERR_INVALID;
    }
    if (!any_own) {
        snprintf(err, err_len, "CURVE: itsd's public key is set but not the client's key pair "
                 "(key_file, or public_key and secret_key)");
        return ITS_ERR_INVALID;
    }
    int rc = its_opt_public(o->server_key, o->server_key_file, "server key", k->server, err,
                            err_len);
    if (rc != 0)
        return rc;
    if (o->key_file) {
        if (o->public_key || o->secret_key) {
            snprintf(err, err_len, "key_file: give the key pair as text or as a file, not both");
            return ITS_ERR_INVALID;
        }
        char why[600];
        if (keyfile_read(o->key_file, k->public_key, k->secret_key, why, sizeof why) != 0) {
            snprintf(err, err_len, "key file %s", why);
            return ITS_ERR_INVALID;
        }
        return 1;
    }
    if (!o->public_key || !o->secret_key ||
        keyfile_z85_decode(o->public_key, strlen(o->public_key), k->public_key) != 0 ||
        keyfile_z85_decode(o->secret_key, strlen(o->secret_key), k->secret_key) != 0) {
        snprintf(err, err_len, "public_key, secret_key: both must be %d characters of Z85 text",
                 ITS_KEY_Z85_LEN);
        return ITS_ERR_INVALID;
    }
    uint8_t derived[32];
    if (keyfile_derive_public(k->secret_key, derived) != 0 ||
        memcmp(derived, k->public_key, 32) != 0) {
        snprintf(err, err_len, "public_key does not belong to secret_key");
        return ITS_ERR_INVALID;
    }
    return 1;
}

int its_client_new_opts(const struct its_client_opts *opts, its_client_t **out, char *err,
                        size_t err_len)
{
    static const struct its_client_opts none;
    const struct its_client_opts *o = opts ? opts : &none;
    char dummy[8];
    char *e = err && err_len ? err : dummy;
    size_t e_len = err && err_len ? err_len : sizeof dummy;
    e[0] = '\0';
    if (out)
        *out = NULL;
    struct its_curve keys;
    int want = its_opts_curve(o, &keys, e, e_len);
    if (want < 0)
        return want;
    if (want && !zmq_has("curve")) {
        snprintf(e, e_len, "CURVE keys given, but this libzmq was built without CURVE");
        return ITS_ERR_INVALID;
    }
    void *ctx = o->zmq_ctx;
    bool own = !ctx;
    if (own && !(ctx = zmq_ctx_new())) {
        snprintf(e, e_len, "cannot create a ZeroMQ context: %s", zmq_strerror(errno));
        return ITS_ERR_IO;
    }
    int rc = its_client_open(ctx, own, o->endpoint, want ? &keys : NULL, out, err, err_len);
    memset(&keys, 0, sizeof keys);
    return rc;
}

void its_client_destroy(its_client_t **cp)
{
    if (!cp || !*cp)
        return;
    its_client_t *c = *cp;
    if (c->sock) {
        if (c->mon)
            zmq_socket_monitor(c->sock, NULL, 0);
        zmq_close(c->sock);
    }
    if (c->mon)
        zmq_close(c->mon);
    if (c->own_ctx && c->ctx)
        zmq_ctx_term(c->ctx);
    while (c->reqs) {
        struct its_req *r = c->reqs;
        c->reqs = r->next;
        its_req_free(r);
    }
    struct its_event *ev;
    while ((ev = its_event_pop(c)))
        its_event_free(&ev);
    free(c->endpoint);
    free(c);
    *cp = NULL;
}

int its_client_err(const its_client_t *c)
{
    return c ? c->err : ITS_ERR_INVALID;
}

const char *its_client_errstr(const its_client_t *c)
{
    return c ? c->errstr : "no client handle";
}

const char *its_client_daemon_code(const its_client_t *c)
{
    return c ? c->daemon_code : "";
}

const char *its_client_endpoint(const its_client_t *c)
{
    return c ? c->endpoint : "";
}

/* ---- submit --------------------------------------------------------------------------------- */

static void its_sampling_to_proto(const struct its_sampling_options *o,
                                  struct proto_sampling_opt *p, bool *has)
{
    p->temperature = o->temperature;
    p->top_p = o->top_p;
    p->max_tokens = o->max_tokens;
    p->has_temperature = o->has_temperature;
    p->has_top_p = o->has_top_p;
    p->has_max_tokens = o->has_max_tokens;
    *has = o->has_temperature || o->has_top_p || o->has_max_tokens;
}

/* Builds a submit message that borrows the caller's strings; only m->submit.messages is
 * allocated (free it, never proto_msg_free the message). */
static int its_build_submit(its_client_t *c, const struct its_message *messages, size_t n,
                            const struct its_options *opt, bool progress, uint64_t tag,
                            struct proto_msg *m)
{
    memset(m, 0, sizeof *m);
    if (!messages || n == 0)
        return its_fail(c, ITS_ERR_INVALID, "no messages: a submit needs at least one");
    if (n > PROTO_MAX_MESSAGES)
        return its_fail(c, ITS_ERR_INVALID, "%zu messages exceed the limit of %u", n,
                        (unsigned)PROTO_MAX_MESSAGES);
    for (size_t i = 0; i < n; i++) {
        if (!messages[i].content)
            return its_fail(c, ITS_ERR_INVALID, "messages[%zu].content is NULL", i);
        if (messages[i].role != ITS_CHAT_SYSTEM && messages[i].role != ITS_CHAT_USER &&
            messages[i].role != ITS_CHAT_ASSISTANT)
            return its_fail(c, ITS_ERR_INVALID, "messages[%zu].role: %d is not a chat role", i,
                            (int)messages[i].role);
    }
    struct proto_chat_msg *pm = calloc(n, sizeof *pm);
    if (!pm)
        return its_fail(c, ITS_ERR_NO_MEMORY, "out of memory for %zu messages", n);
    for (size_t i = 0; i < n; i++) {
        pm[i].role = messages[i].role == ITS_CHAT_SYSTEM ? PROTO_CHAT_SYSTEM
                     : messages[i].role == ITS_CHAT_USER ? PROTO_CHAT_USER
                                                         : PROTO_CHAT_ASSISTANT;
        pm[i].content = (char *)messages[i].content; /* borrowed: encoded, never freed */
    }
    m->type = PROTO_SUBMIT;
    struct proto_submit *s = &m->submit;
    s->tag = tag;
    s->messages = pm;
    s->n_messages = (uint32_t)n;
    s->progress = progress;
    s->has_progress = true;
    if (opt) {
        s->drafts = opt->drafts;
        s->has_drafts = opt->has_drafts;
        s->feedbacks = opt->feedbacks;
        s->has_feedbacks = opt->has_feedbacks;
        s->edits = opt->edits;
        s->has_edits = opt->has_edits;
        s->feedbacks_per_edit = opt->feedbacks_per_edit;
        s->has_feedbacks_per_edit = opt->has_feedbacks_per_edit;
        s->include_drafts = opt->include_drafts;
        s->has_include_drafts = opt->has_include_drafts;
        s->deadline_ms = opt->deadline_ms;
        s->has_deadline_ms = opt->has_deadline_ms;
        s->seed = opt->seed;
        s->has_seed = opt->has_seed;
        its_sampling_to_proto(&opt->instruct, &s->sampling.instruct, &s->sampling.has_instruct);
        its_sampling_to_proto(&opt->feedback, &s->sampling.feedback, &s->sampling.has_feedback);
        its_sampling_to_proto(&opt->edit, &s->sampling.edit, &s->sampling.has_edit);
        s->has_sampling =
            s->sampling.has_instruct || s->sampling.has_feedback || s->sampling.has_edit;
    }
    return 0;
}

/* Registers a submit request and sends it. On failure nothing stays registered. */
static int its_start_submit(its_client_t *c, const struct its_message *messages, size_t n,
                            const struct its_options *opt, enum its_req_mode mode,
                            struct its_req **out)
{
    *out = NULL;
    struct proto_msg m;
    uint64_t tag = c->next_tag++;
    bool progress = mode == ITS_MODE_ASYNC && opt && opt->progress;
    int rc = its_build_submit(c, messages, n, opt, progress, tag, &m);
    if (rc < 0)
        return rc;
    struct its_req *r = its_req_add(c, ITS_REQ_SUBMIT, mode);
    if (!r) {
        free(m.submit.messages);
        return its_fail(c, ITS_ERR_NO_MEMORY, "out of memory");
    }
    r->tag = tag;
    rc = its_send(c, &m);
    free(m.submit.messages);
    if (rc < 0) {
        its_req_drop(c, r);
        return rc;
    }
    *out = r;
    return 0;
}

int its_submit_messages(its_client_t *c, const struct its_message *messages, size_t n_messages,
                        const struct its_options *opt, int timeout_ms, struct its_result **out)
{
    if (!c)
        return ITS_ERR_INVALID;
    its_clear(c);
    if (!out)
        return its_fail(c, ITS_ERR_INVALID, "its_submit: out is NULL");
    *out = NULL;
    int64_t deadline = its_deadline(timeout_ms);
    struct its_req *r;
    int rc = its_start_submit(c, messages, n_messages, opt, ITS_MODE_SYNC, &r);
    if (rc < 0)
        return rc;
    rc = its_wait(c, r, deadline);
    if (rc == ITS_ERR_TIMEOUT) {
        if (r->id[0]) {
            char id[ITS_ID_MAX + 1];
            its_copy(id, sizeof id, r->id);
            its_req_drop(c, r);
            its_send_cancel_quiet(c, id);
            return its_fail(c, ITS_ERR_TIMEOUT,
                            "request %s: no result from %s within %d ms (cancelled)", id,
                            c->endpoint, timeout_ms);
        }
        /* Not even accepted: keep the tag, so a late acceptance is cancelled at once. */
        r->mode = ITS_MODE_ABANDONED;
        its_req_prune_abandoned(c);
        return its_timeout_no_reply(c, timeout_ms);
    }
    if (rc == 0 && r->rc == 0) {
        *out = r->result;
        r->result = NULL;
    } else if (rc == 0) {
        rc = its_req_error(c, r);
    }
    its_req_drop(c, r);
    return rc;
}

int its_submit(its_client_t *c, const char *question, const struct its_options *opt,
               int timeout_ms, struct its_result **out)
{
    if (!c)
        return ITS_ERR_INVALID;
    if (!question) {
        its_clear(c);
        if (out)
            *out = NULL;
        return its_fail(c, ITS_ERR_INVALID, "its_submit: question is NULL");
    }
    struct its_message m = {.role = ITS_CHAT_USER, .content = question};
    return its_submit_messages(c, &m, 1, opt, timeout_ms, out);
}

int its_submit_async(its_client_t *c, const struct its_message *messages, size_t n_messages,
                     const struct its_options *opt, uint64_t *tag)
{
    if (!c)
        return ITS_ERR_INVALID;
    its_clear(c);
    if (!tag)
        return its_fail(c, ITS_ERR_INVALID, "its_submit_async: tag is NULL");
    *tag = 0;
    struct its_req *r;
    int rc = its_start_submit(c, messages, n_messages, opt, ITS_MODE_ASYNC, &r);
    if (rc < 0)
        return rc;
    *tag = r->tag;
    return 0;
}

/* ---- get, cancel, status -------------------------------------------------------------------- */

static int its_check_id(its_client_t *c, const char *id)
{
    if (!id || !*id)
        return its_fail(c, ITS_ERR_INVALID, "request id is empty");
    if (strlen(id) > ITS_ID_MAX)
        return its_fail(c, ITS_ERR_INVALID, "request id is longer than %d bytes", ITS_ID_MAX);
    return 0;
}

/* Sends `m` as request r (registered SYNC) and waits for its completion; on return r is
 * either done (caller reads and drops it) or already dropped with the error set. */
static int its_roundtrip(its_client_t *c, struct its_req *r, const struct proto_msg *m,
                         int timeout_ms)
{
    int64_t deadline = its_deadline(timeout_ms);
    int rc = its_send(c, m);
    if (rc == 0)
        rc = its_wait(c, r, deadline);
    if (rc == ITS_ERR_TIMEOUT)
        its_timeout_no_reply(c, timeout_ms);
    if (rc == 0 && r->rc < 0)
        rc = its_req_error(c, r);
    if (rc < 0)
        its_req_drop(c, r);
    return rc;
}

int its_get(its_client_t *c, const char *id, int timeout_ms, struct its_result **result,
            struct its_progress *progress)
{
    if (!c)
        return ITS_ERR_INVALID;
    its_clear(c);
    if (!result)
        return its_fail(c, ITS_ERR_INVALID, "its_get: result is NULL");
    *result = NULL;
    if (progress)
        memset(progress, 0, sizeof *progress);
    int rc = its_check_id(c, id);
    if (rc < 0)
        return rc;
    struct its_req *r = its_req_add(c, ITS_REQ_GET, ITS_MODE_SYNC);
    if (!r)
        return its_fail(c, ITS_ERR_NO_MEMORY, "out of memory");
    its_copy(r->id, sizeof r->id, id);
    struct proto_msg m = {.type = PROTO_GET};
    m.get.id = (char *)id;
    rc = its_roundtrip(c, r, &m, timeout_ms);
    if (rc < 0)
        return rc;
    *result = r->result;
    r->result = NULL;
    if (progress && !*result)
        *progress = r->progress;
    its_req_drop(c, r);
    return 0;
}

int its_cancel(its_client_t *c, const char *id, int timeout_ms)
{
    if (!c)
        return ITS_ERR_INVALID;
    its_clear(c);
    int rc = its_check_id(c, id);
    if (rc < 0)
        return rc;
    struct its_req *r = its_req_add(c, ITS_REQ_CANCEL, ITS_MODE_SYNC);
    if (!r)
        return its_fail(c, ITS_ERR_NO_MEMORY, "out of memory");
    its_copy(r->id, sizeof r->id, id);
    struct proto_msg m = {.type = PROTO_CANCEL};
    m.cancel.id = (char *)id;
    rc = its_roundtrip(c, r, &m, timeout_ms);
    if (rc < 0)
        return rc;
    its_req_drop(c, r);
    return 0;
}

int its_status(its_client_t *c, int timeout_ms, struct its_status **out)
{
    if (!c)
        return ITS_ERR_INVALID;
    its_clear(c);
    if (!out)
        return its_fail(c, ITS_ERR_INVALID, "its_status: out is NULL");
    *out = NULL;
    int64_t start = its_now_ms();
    int rc = 0;
    /* first with the metrics; an itsd that predates them rejects the key (the protocol has no
     * unknown-key tolerance), and is asked again without it */
    for (int with_metrics = 1; with_metrics >= 0; with_metrics--) {
        int wait_ms = timeout_ms;
        if (timeout_ms >= 0 && !with_metrics) {
            int64_t left = (int64_t)timeout_ms - (its_now_ms() - start);
            wait_ms = left > 0 ? (int)left : 1;
        }
        struct its_req *r = its_req_add(c, ITS_REQ_STATUS, ITS_MODE_SYNC);
        if (!r)
            return its_fail(c, ITS_ERR_NO_MEMORY, "out of memory");
        r->tag = c->next_tag++;
        struct proto_msg m = {.type = PROTO_STATUS};
        m.status.tag = r->tag;
        m.status.has_tag = true;
        m.status.metrics = with_metrics;
        m.status.has_metrics = with_metrics;
        rc = its_roundtrip(c, r, &m, wait_ms);
        if (rc == ITS_ERR_DAEMON && with_metrics &&
            strcmp(c->daemon_code, "bad_field") == 0 &&
            strstr(its_client_errstr(c), "unknown key 'metrics'")) {
            its_clear(c);
            continue;
        }
        if (rc < 0)
            return rc;
        *out = r->status;
        r->status = NULL;
        its_req_drop(c, r);
        return 0;
    }
    return rc;
}

/* ---- asynchronous reading ------------------------------------------------------------------- */

int its_client_fd(its_client_t *c, int *fd)
{
    if (!c)
        return ITS_ERR_INVALID;
    its_clear(c);
    if (!fd)
        return its_fail(c, ITS_ERR_INVALID, "its_client_fd: fd is NULL");
    int v = -1;
    size_t len = sizeof v;
    if (zmq_getsockopt(c->sock, ZMQ_FD, &v, &len) != 0)
        return its_fail(c, ITS_ERR_IO, "ZMQ_FD: %s", zmq_strerror(errno));
    *fd = v;
    return 0;
}

int its_client_process(its_client_t *c)
{
    if (!c)
        return ITS_ERR_INVALID;
    its_clear(c);
    int rc = its_drain(c);
    if (rc < 0)
        return rc;
    return c->n_events > INT_MAX ? INT_MAX : (int)c->n_events;
}

int its_next_event(its_client_t *c, struct its_event **ev, int timeout_ms)
{
    if (!c)
        return ITS_ERR_INVALID;
    its_clear(c);
    if (!ev)
        return its_fail(c, ITS_ERR_INVALID, "its_next_event: ev is NULL");
    *ev = NULL;
    int64_t deadline = its_deadline(timeout_ms);
    for (;;) {
        *ev = its_event_pop(c);
        if (*ev)
            return 1;
        int rc = its_drain(c);
        if (rc < 0)
            return rc;
        if (c->ev_head)
            continue;
        long wait = -1;
        if (deadline >= 0) {
            int64_t left = deadline - its_now_ms();
            if (left <= 0)
                return 0;
            wait = left > INT_MAX ? INT_MAX : (long)left;
        }
        zmq_pollitem_t items[2] = {{.socket = c->sock, .events = ZMQ_POLLIN},
                                   {.socket = c->mon, .events = ZMQ_POLLIN}};
        if (zmq_poll(items, c->mon ? 2 : 1, wait) < 0) {
            /* A signal: return "nothing yet" so the caller can look at what it flagged. */
            if (errno == EINTR)
                return 0;
            return its_fail(c, ITS_ERR_IO, "poll on %s: %s", c->endpoint,
                            zmq_strerror(errno));
        }
    }
}
