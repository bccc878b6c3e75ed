/* frontend.c — see frontend.h.
 *
 * A request is in exactly one of three lists: queued (accepted, waiting for a slot), running
 * (has a pipeline) or done (only its encoded final message is kept, for `get`). It is found
 * by id through an id map: the id a client sees is "r" + 16 hex digits of a 64-bit key that
 * is a bijective scramble of a counter, so ids are unique and hard to guess.
 *
 * Reloads: a running request's settings are its own copy (merged when it started), and its
 * pipeline renders every later job with the templates it started with, so a reload can never
 * change a request half-way. The templates are held by a `frontend_tpl`, which counts the
 * running requests using it; a set replaced by a reload is freed when its last user ends. A
 * queued request keeps the submit's own settings and is merged again with the defaults of
 * the day when it starts, if a reload came in between.
 *
 * Re-entrancy: a request ends (frontend_end) only from frontend code that is not itself
 * called by the pipeline (pipeline ops never end anything), so a pipeline is never freed
 * under its own feet. Vanished clients are reaped from an ev_idle callback, not from the
 * socket callback that noticed them.
 */
#include "frontend.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <sys/random.h>

#include "idmap.h"
#include "itsd_log.h"
#include "metrics.h"
#include "pipeline.h"
#include "registry.h"
#include "templates.h"

enum frontend_state { FRONTEND_QUEUED, FRONTEND_RUNNING, FRONTEND_DONE };

/* One loaded set of templates and the running requests whose pipelines render with it. */
struct frontend_tpl {
    struct templates *tpl; /* owned */
    uint32_t users;        /* running requests holding it */
    bool retired;          /* replaced by a reload: freed when users reaches 0 */
};

struct frontend_client;

struct frontend_request {
    uint64_t key;
    char id[20]; /* "r" + 16 hex digits */
    struct frontend *fe;
    struct frontend_client *client; /* while live and the client is known */
    uint64_t tag;
    enum frontend_state state;
    struct pipeline_settings settings;
    struct proto_submit asked;    /* the submit's own settings (no messages): a reload re-merges */
    uint64_t config_gen;          /* of the configuration `settings` was merged with */
    struct frontend_tpl *tpl;     /* while running: the templates its pipeline renders with */
    struct proto_chat_msg *messages; /* while queued */
    uint32_t n_messages;
    struct pipeline *pipe; /* while running */
    bool want_progress;
    bool progress_dirty;
    struct pipeline_progress last_progress;
    uint64_t last_progress_ms;
    uint64_t accepted_ms;
    uint32_t deadline_ms;
    ev_timer deadline;
    void *final; /* DONE: the encoded result or error */
    size_t final_len;
    uint64_t finished_ms;
    TAILQ_ENTRY(frontend_request) link;        /* queued / running / done list */
    TAILQ_ENTRY(frontend_request) client_link; /* the client's live requests */
};

TAILQ_HEAD(frontend_request_list, frontend_request);

struct frontend_client {
    uint8_t rid[REGISTRY_MAX_RID_BYTES];
    size_t rid_len;
    int fd;    /* the connection its last message came over, -1 unknown */
    bool gone; /* disconnected: reaped soon */
    struct frontend_request_list reqs;
    TAILQ_ENTRY(frontend_client) link;
};

TAILQ_HEAD(frontend_client_list, frontend_client);

struct frontend {
    struct ev_loop *loop;
    const struct itsd_config *cfg;
    struct frontend_tpl *tpl; /* the current templates (owned); retired ones live on in requests */
    uint64_t config_gen;      /* bumped by frontend_reconfigured */
    struct dispatch *d;
    struct frontend_ops ops;
    void *ctx;
    struct idmap *by_key;
    struct frontend_request_list queued, running, done;
    uint32_t n_queued, n_running, n_done;
    size_t done_bytes;
    struct frontend_client_list clients;
    ev_idle reaper;
    bool accepting;
    bool pumping; /* frontend_pump is on the stack: nested calls leave the work to it */
    uint64_t counter, salt;
    struct frontend_counters counters;
    struct metrics *metrics; /* the owner's; NULL: not counted */
};

/* ---- small helpers ------------------------------------------------------------------------- */

static uint64_t frontend_mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* Parses "r" + 16 lowercase hex digits; 0 when `id` is not of that form. */
static uint64_t frontend_parse_id(const char *id)
{
    if (!id || id[0] != 'r' || strlen(id) != 17)
        return 0;
    uint64_t v = 0;
    for (int i = 1; i <= 16; i++) {
        char c = id[i];
        unsigned d;
        if (c >= '0' && c <= '9')
            d = (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            d = (unsigned)(c - 'a' + 10);
        else
            return 0;
        v = v << 4 | d;
    }
    return v;
}

static uint64_t frontend_now(const struct frontend *fe)
{
    return fe->ops.now_ms(fe->ctx);
}

/* Encodes and sends m to rid; a failure to reach the client is counted and returned. */
static int frontend_send(struct frontend *fe, const uint8_t *rid, size_t rid_len,
                         const struct proto_msg *m)
{
    void *buf = NULL;
    size_t len = 0;
    char err[256];
    int rc = proto_encode(m, &buf, &len, err, sizeof err);
    if (rc != 0) {
        ITSD_ERROR("cannot encode %s for a client: %s", proto_type_name(m->type), err);
        return rc;
    }
    rc = fe->ops.send(fe->ctx, rid, rid_len, buf, len);
    free(buf);
    if (rc != 0)
        fe->counters.unreachable_clients++;
    return rc;
}

static void frontend_reply_error(struct frontend *fe, const uint8_t *rid, size_t rid_len,
                                 bool has_tag, uint64_t tag, const char *id, int code,
                                 const char *fmt, ...) __attribute__((format(printf, 8, 9)));
static void frontend_reply_error(struct frontend *fe, const uint8_t *rid, size_t rid_len,
                                 bool has_tag, uint64_t tag, const char *id, int code,
                                 const char *fmt, ...)
{
    char text[PROTO_MAX_ERROR_BYTES];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    struct proto_msg m = {.type = PROTO_ERROR};
    m.error = (struct proto_error){.tag = tag, .has_tag = has_tag, .id = (char *)id,
                                   .code = (enum proto_err)code, .message = text};
    (void)frontend_send(fe, rid, rid_len, &m);
}

/* ---- clients ------------------------------------------------------------------------------- */

static struct frontend_client *frontend_client_find(struct frontend *fe, const uint8_t *rid,
                                                    size_t rid_len)
{
    struct frontend_client *c;
    TAILQ_FOREACH(c, &fe->clients, link) {
        if (c->rid_len == rid_len && memcmp(c->rid, rid, rid_len) == 0)
            return c;
    }
    return NULL;
}

static void frontend_schedule_reap(struct frontend *fe)
{
    ev_idle_start(fe->loop, &fe->reaper);
}

/* Forgets the request's client (freeing the record with its last request). */
static void frontend_detach(struct frontend *fe, struct frontend_request *r)
{
    struct frontend_client *c = r->client;
    if (!c)
        return;
    TAILQ_REMOVE(&c->reqs, r, client_link);
    r->client = NULL;
    if (TAILQ_EMPTY(&c->reqs) && !c->gone) {
        TAILQ_REMOVE(&fe->clients, c, link);
        free(c);
    }
    /* a gone client with no requests is freed by the reaper */
}

/* ---- kept results -------------------------------------------------------------------------- */

static void frontend_tpl_free(struct frontend_tpl **h)
{
    if (!*h)
        return;
    templates_destroy(&(*h)->tpl);
    free(*h);
    *h = NULL;
}

/* Ends a request's pipeline (cancel_job for whatever still runs) and lets go of its
 * templates: the last user of a set a reload replaced frees it. */
static void frontend_pipeline_end(struct frontend_request *r)
{
    pipeline_destroy(&r->pipe);
    struct frontend_tpl *h = r->tpl;
    r->tpl = NULL;
    if (!h)
        return;
    h->users--;
    if (h->retired && h->users == 0) {
        ITSD_DEBUG("templates %s (and the others replaced with it) freed: no running request "
                   "uses them any more",
                   templates_path(h->tpl, PROTO_ROLE_INSTRUCT));
        frontend_tpl_free(&h);
    }
}

static void frontend_request_free(struct frontend *fe, struct frontend_request *r)
{
    if (fe->by_key)
        idmap_del(fe->by_key, r->key);
    ev_timer_stop(fe->loop, &r->deadline);
    frontend_pipeline_end(r);
    for (uint32_t i = 0; i < r->n_messages; i++)
        free(r->messages[i].content);
    free(r->messages);
    free(r->final);
    free(r);
}

static void frontend_drop_done(struct frontend *fe, struct frontend_request *r)
{
    TAILQ_REMOVE(&fe->done, r, link);
    fe->n_done--;
    fe->done_bytes -= r->final_len;
    frontend_request_free(fe, r);
}

/* Drops the oldest kept results beyond the count, byte and age bounds. */
static void frontend_trim_done(struct frontend *fe, uint64_t now)
{
    size_t max_bytes = (size_t)fe->cfg->keep_results_mib << 20;
    struct frontend_request *r;
    while ((r = TAILQ_FIRST(&fe->done)) != NULL) {
        bool old = now - r->finished_ms >= fe->cfg->result_ttl_ms;
        if (fe->n_done > fe->cfg->keep_results || fe->done_bytes > max_bytes || old)
            frontend_drop_done(fe, r);
        else
            break;
    }
}

/* ---- ending a request ----------------------------------------------------------------------- */

/* Ends a live request with `final` (a PROTO_RESULT or PROTO_ERROR built by the caller, freed
 * here): sends it to the client when `notify` and the client is there, cancels whatever
 * still runs, and keeps the encoded message for `get`. */
static void frontend_pump(struct frontend *fe);

static void frontend_end(struct frontend *fe, struct frontend_request *r, struct proto_msg *final,
                         bool notify)
{
    if (r->state == FRONTEND_DONE) {
        proto_msg_free(final);
        return;
    }
    void *buf = NULL;
    size_t len = 0;
    char err[256];
    int rc = proto_encode(final, &buf, &len, err, sizeof err);
    if (rc != 0) {
        /* e.g. a result over PROTO_MAX_MESSAGE_BYTES: the client still hears of the end */
        ITSD_ERROR("%s: cannot encode the %s: %s", r->id, proto_type_name(final->type), err);
        proto_msg_free(final);
        char text[PROTO_MAX_ERROR_BYTES];
        snprintf(text, sizeof text, "the %s could not be encoded: %s",
                 rc == PROTO_ERR_TOO_LARGE ? "result is too large and" : "result", err);
        final->type = PROTO_ERROR;
        final->error = (struct proto_error){.tag = r->tag, .has_tag = true, .id = strdup(r->id),
                                            .code = (enum proto_err)rc,
                                            .message = strdup(text)};
        if (!final->error.id || !final->error.message ||
            proto_encode(final, &buf, &len, err, sizeof err) != 0) {
            buf = NULL;
            len = 0;
        }
    }
    uint64_t ended_ms = frontend_now(fe);
    double seconds = (double)(ended_ms - r->accepted_ms) / 1000.0;
    if (final->type == PROTO_RESULT)
        metrics_request_end(fe->metrics, 0, final->result.partial, seconds);
    else
        metrics_request_end(fe->metrics, final->error.code, false, seconds);
    if (final->type == PROTO_RESULT) {
        fe->counters.completed++;
        ITSD_INFO("%s %s: answer from candidate %u of %u, score %.4f, %" PRIu64 " ms", r->id,
                  final->result.partial ? "partial result" : "done", final->result.best,
                  final->result.n_candidates, final->result.score,
                  final->result.timings.total_ms);
    } else {
        if (final->error.code == PROTO_ERR_CANCELLED)
            fe->counters.cancelled++;
        else
            fe->counters.failed++;
        ITSD_INFO("%s failed: %s: %s", r->id, proto_err_name(final->error.code),
                  final->error.message ? final->error.message : "");
    }
    proto_msg_free(final);
    if (notify && buf && r->client && !r->client->gone) {
        if (fe->ops.send(fe->ctx, r->client->rid, r->client->rid_len, buf, len) != 0) {
            fe->counters.unreachable_clients++;
            r->client->gone = true;
            frontend_schedule_reap(fe);
        }
    }
    ev_timer_stop(fe->loop, &r->deadline);
    frontend_pipeline_end(r); /* cancel_job for whatever still runs */
    dispatch_cancel_owner(fe->d, r);
    for (uint32_t i = 0; i < r->n_messages; i++)
        free(r->messages[i].content);
    free(r->messages);
    r->messages = NULL;
    r->n_messages = 0;
    if (r->state == FRONTEND_QUEUED) {
        TAILQ_REMOVE(&fe->queued, r, link);
        fe->n_queued--;
    } else {
        TAILQ_REMOVE(&fe->running, r, link);
        fe->n_running--;
    }
    frontend_detach(fe, r);
    r->state = FRONTEND_DONE;
    r->final = buf;
    r->final_len = len;
    r->finished_ms = ended_ms;
    TAILQ_INSERT_TAIL(&fe->done, r, link);
    fe->n_done++;
    fe->done_bytes += len;
    frontend_trim_done(fe, r->finished_ms);
    frontend_pump(fe);
}

static void frontend_end_error(struct frontend *fe, struct frontend_request *r, int code,
                               bool notify, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static void frontend_end_error(struct frontend *fe, struct frontend_request *r, int code,
                               bool notify, const char *fmt, ...)
{
    char text[PROTO_MAX_ERROR_BYTES];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    struct proto_msg m = {.type = PROTO_ERROR};
    m.error = (struct proto_error){.tag = r->tag, .has_tag = true, .id = strdup(r->id),
                                   .code = (enum proto_err)code, .message = strdup(text)};
    if (!m.error.id || !m.error.message) {
        /* out of memory: end it all the same, with what can be said without allocating */
        proto_msg_free(&m);
        m.type = PROTO_ERROR;
        m.error = (struct proto_error){.tag = r->tag, .has_tag = true,
                                       .code = PROTO_ERR_NO_MEMORY};
    }
    frontend_end(fe, r, &m, notify);
}

/* Ends a request with what it has: a (partial) result when some candidate is scored,
 * otherwise an error with `code`. */
static void frontend_end_with_best(struct frontend *fe, struct frontend_request *r, bool partial,
                                   int code, const char *why)
{
    if (r->pipe) {
        struct proto_msg m = {.type = PROTO_RESULT};
        char err[512];
        if (pipeline_result(r->pipe, r->id, partial, &m.result, err, sizeof err) == 0) {
            frontend_end(fe, r, &m, true);
            return;
        }
    }
    frontend_end_error(fe, r, code, true, "%s", why);
}

static void frontend_send_progress(struct frontend *fe, struct frontend_request *r,
                                   uint64_t now);

/* After every pipeline event: end the request when its pipeline is done, else note progress. */
static void frontend_settle(struct frontend *fe, struct frontend_request *r)
{
    if (r->state != FRONTEND_RUNNING || !r->pipe)
        return;
    if (pipeline_done(r->pipe)) {
        const char *msg = NULL;
        int code = pipeline_error(r->pipe, &msg);
        if (code != 0) {
            frontend_end_error(fe, r, code, true, "%s", msg ? msg : "the request failed");
            return;
        }
        struct proto_msg m = {.type = PROTO_RESULT};
        char err[512];
        int rc = pipeline_result(r->pipe, r->id, false, &m.result, err, sizeof err);
        if (rc != 0)
            frontend_end_error(fe, r, rc, true, "%s", err);
        else
            frontend_end(fe, r, &m, true);
        return;
    }
    if (!r->want_progress)
        return;
    struct pipeline_progress pr;
    pipeline_progress(r->pipe, &pr);
    if (memcmp(&pr, &r->last_progress, sizeof pr) == 0)
        return;
    r->progress_dirty = true;
    uint64_t now = frontend_now(fe);
    if (now - r->last_progress_ms >= fe->cfg->progress_interval_ms)
        frontend_send_progress(fe, r, now); /* else frontend_tick sends it when due */
}

static void frontend_send_progress(struct frontend *fe, struct frontend_request *r, uint64_t now)
{
    struct pipeline_progress pr;
    if (r->pipe)
        pipeline_progress(r->pipe, &pr);
    else
        memset(&pr, 0, sizeof pr);
    struct proto_msg m = {.type = PROTO_PROGRESS};
    m.progress = (struct proto_progress){
        .id = r->id, .drafts = pr.drafts, .feedbacks = pr.feedbacks, .edits = pr.edits,
        .scores = pr.scores, .elapsed_ms = now - r->accepted_ms};
    if (r->client && !r->client->gone &&
        frontend_send(fe, r->client->rid, r->client->rid_len, &m) != 0) {
        r->client->gone = true;
        frontend_schedule_reap(fe);
    }
    r->last_progress = pr;
    r->last_progress_ms = now;
    r->progress_dirty = false;
}

/* ---- pipeline ops ---------------------------------------------------------------------------- */

static int frontend_op_start_job(void *ctx, enum proto_role role, struct proto_msg *job,
                                 uint64_t *job_id)
{
    struct frontend_request *r = ctx;
    struct frontend *fe = r->fe;
    int rc = dispatch_submit(fe->d, r, r->id, role, job, frontend_now(fe), job_id);
    if (rc == PROTO_ERR_BUSY)
        fe->counters.busy++;
    return rc;
}

static void frontend_op_cancel_job(void *ctx, uint64_t job_id)
{
    struct frontend_request *r = ctx;
    (void)dispatch_cancel(r->fe->d, job_id);
}

static uint64_t frontend_op_now_ms(void *ctx)
{
    struct frontend_request *r = ctx;
    return frontend_now(r->fe);
}

static const struct pipeline_ops frontend_pipeline_ops = {
    .start_job = frontend_op_start_job,
    .cancel_job = frontend_op_cancel_job,
    .now_ms = frontend_op_now_ms,
};

static int frontend_settings(const struct frontend *fe, const struct proto_submit *s,
                             struct pipeline_settings *out, uint32_t *deadline_ms, char *err,
                             size_t err_len);

/* Creates the pipeline of a request (queued -> running), merging its settings again first
 * when a reload came since they were merged. Returns 0, or the pipeline's (or the merge's)
 * error with err set; the caller ends the request then. */

static int frontend_start(struct frontend *fe, struct frontend_request *r, char *err,
                          size_t err_len)
{
    if (r->config_gen != fe->config_gen) {
        /* queued across a reload: the new defaults and limits apply (its deadline runs on) */
        struct pipeline_settings s;
        uint32_t unused_deadline_ms;
        char why[PROTO_MAX_ERROR_BYTES - 64];
        int rc = frontend_settings(fe, &r->asked, &s, &unused_deadline_ms, why, sizeof why);
        if (rc != 0) {
            snprintf(err, err_len, "after a configuration reload: %s", why);
            return rc;
        }
        if (!r->asked.has_seed && !fe->cfg->seed)
            s.seed = r->settings.seed; /* the random seed drawn at acceptance stays */
        r->settings = s;
        r->config_gen = fe->config_gen;
        ITSD_DEBUG("%s: settings merged again with the reloaded defaults: drafts %u, "
                   "feedbacks %u, edits %u x %u",
                   r->id, s.drafts, s.feedbacks, s.edits, s.feedbacks_per_edit);
    }
    int rc = pipeline_new(r->messages, r->n_messages, &r->settings, fe->tpl->tpl,
                          &frontend_pipeline_ops, r, &r->pipe, err, err_len);
    if (rc != 0)
        return rc;
    r->tpl = fe->tpl;
    r->tpl->users++;
    for (uint32_t i = 0; i < r->n_messages; i++)
        free(r->messages[i].content);
    free(r->messages);
    r->messages = NULL;
    r->n_messages = 0;
    return 0;
}

/* Starts queued requests while running slots are free. */
static void frontend_pump(struct frontend *fe)
{
    if (fe->pumping)
        return;
    fe->pumping = true;
    struct frontend_request *r;
    while (fe->n_running < fe->cfg->max_inflight && (r = TAILQ_FIRST(&fe->queued)) != NULL) {
        TAILQ_REMOVE(&fe->queued, r, link);
        fe->n_queued--;
        TAILQ_INSERT_TAIL(&fe->running, r, link);
        fe->n_running++;
        r->state = FRONTEND_RUNNING;
        char err[PROTO_MAX_ERROR_BYTES];
        int rc = frontend_start(fe, r, err, sizeof err);
        if (rc != 0) {
            frontend_end_error(fe, r, rc, true, "%s", err);
            continue;
        }
        ITSD_INFO("%s started after waiting %" PRIu64 " ms", r->id,
                  frontend_now(fe) - r->accepted_ms);
        frontend_settle(fe, r);
    }
    fe->pumping = false;
}

/* ---- deadline ------------------------------------------------------------------------------- */

static void frontend_on_deadline(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    struct frontend_request *r = w->data;
    struct frontend *fe = r->fe;
    fe->counters.deadlines++;
    if (r->state == FRONTEND_QUEUED) {
        frontend_end_error(fe, r, PROTO_ERR_DEADLINE, true,
                           "deadline of %u ms passed while the request waited to start "
                           "(%u running)",
                           r->deadline_ms, fe->n_running);
        return;
    }
    char why[256];
    snprintf(why, sizeof why, "deadline of %u ms passed before any candidate was scored",
             r->deadline_ms);
    frontend_end_with_best(fe, r, true, PROTO_ERR_DEADLINE, why);
}

/* ---- client messages ------------------------------------------------------------------------- */

static void frontend_sampling(struct pipeline_sampling *dst, const struct itsd_config_sampling *def,
                              bool has, const struct proto_sampling_opt *o)
{
    dst->temperature = def->temperature;
    dst->top_p = def->top_p;
    dst->top_k = def->top_k;
    dst->max_tokens = def->max_tokens;
    if (!has)
        return;
    if (o->has_temperature)
        dst->temperature = o->temperature;
    if (o->has_top_p)
        dst->top_p = o->top_p;
    if (o->has_max_tokens)
        dst->max_tokens = o->max_tokens;
}

/* Merges a submit with the defaults and checks the limits. Returns 0, or a negative code
 * with err naming the field. */
static int frontend_settings(const struct frontend *fe, const struct proto_submit *s,
                             struct pipeline_settings *out, uint32_t *deadline_ms, char *err,
                             size_t err_len)
{
    const struct itsd_config *c = fe->cfg;
    memset(out, 0, sizeof *out);
    out->drafts = s->has_drafts ? s->drafts : c->drafts;
    out->feedbacks = s->has_feedbacks ? s->feedbacks : c->feedbacks;
    out->edits = s->has_edits ? s->edits : c->edits;
    out->feedbacks_per_edit = s->has_feedbacks_per_edit ? s->feedbacks_per_edit
                                                        : c->feedbacks_per_edit;
    out->include_drafts = s->has_include_drafts ? s->include_drafts : c->include_drafts;
    const struct proto_submit_sampling *sm = &s->sampling;
    frontend_sampling(&out->instruct, &c->instruct, s->has_sampling && sm->has_instruct,
                      &sm->instruct);
    frontend_sampling(&out->feedback, &c->feedback, s->has_sampling && sm->has_feedback,
                      &sm->feedback);
    frontend_sampling(&out->edit, &c->edit, s->has_sampling && sm->has_edit, &sm->edit);
    if (s->has_seed) {
        out->seed = s->seed;
    } else if (c->seed) {
        out->seed = c->seed;
    } else if (getrandom(&out->seed, sizeof out->seed, GRND_NONBLOCK) != sizeof out->seed) {
        out->seed = frontend_mix((uint64_t)(uintptr_t)out ^ fe->counter ^ fe->salt);
    }
    *deadline_ms = s->has_deadline_ms ? s->deadline_ms : c->default_deadline_ms;
    if (*deadline_ms > c->max_deadline_ms)
        *deadline_ms = c->max_deadline_ms;
    if (out->drafts < 1 || out->drafts > PROTO_MAX_DRAFTS) {
        snprintf(err, err_len, "submit.drafts: %u is outside 1..%u", out->drafts,
                 PROTO_MAX_DRAFTS);
        return PROTO_ERR_BAD_FIELD;
    }
    uint64_t edits = out->feedbacks > 0 ? out->edits : 0;
    uint64_t cands = (uint64_t)out->drafts * (edits + (out->include_drafts || edits == 0));
    if (cands > c->max_candidates) {
        snprintf(err, err_len,
                 "submit.drafts x submit.edits: %u x %u makes %" PRIu64
                 " candidates, over this daemon's max_candidates (%u)",
                 out->drafts, out->edits, cands, c->max_candidates);
        return PROTO_ERR_TOO_LARGE;
    }
    uint64_t seqs = (uint64_t)out->drafts * (1 + (uint64_t)out->feedbacks + edits);
    if (seqs > c->max_sequences) {
        snprintf(err, err_len,
                 "submit.drafts x (1 + submit.feedbacks + submit.edits): %u x (1 + %u + %u) "
                 "makes %" PRIu64 " sequences, over this daemon's max_sequences (%u)",
                 out->drafts, out->feedbacks, out->edits, seqs, c->max_sequences);
        return PROTO_ERR_TOO_LARGE;
    }
    return 0;
}

static void frontend_submit(struct frontend *fe, const uint8_t *rid, size_t rid_len, int fd,
                            struct proto_submit *s)
{
    fe->counters.submitted++;
    if (!fe->accepting) {
        fe->counters.rejected++;
        metrics_request_rejected(fe->metrics, PROTO_ERR_SHUTTING_DOWN);
        frontend_reply_error(fe, rid, rid_len, true, s->tag, NULL, PROTO_ERR_SHUTTING_DOWN,
                             "itsd is shutting down");
        return;
    }
    struct pipeline_settings settings;
    uint32_t deadline_ms;
    char err[PROTO_MAX_ERROR_BYTES];
    int rc = frontend_settings(fe, s, &settings, &deadline_ms, err, sizeof err);
    if (rc != 0) {
        fe->counters.rejected++;
        metrics_request_rejected(fe->metrics, rc);
        frontend_reply_error(fe, rid, rid_len, true, s->tag, NULL, rc, "%s", err);
        return;
    }
    bool run_now = fe->n_running < fe->cfg->max_inflight && TAILQ_EMPTY(&fe->queued);
    if (!run_now && fe->n_queued >= fe->cfg->max_queued) {
        fe->counters.rejected++;
        fe->counters.busy++;
        metrics_request_rejected(fe->metrics, PROTO_ERR_BUSY);
        frontend_reply_error(fe, rid, rid_len, true, s->tag, NULL, PROTO_ERR_BUSY,
                             "busy: %u requests running and %u queued (max_queued %u); retry "
                             "later",
                             fe->n_running, fe->n_queued, fe->cfg->max_queued);
        return;
    }
    struct frontend_request *r = calloc(1, sizeof *r);
    if (r)
        ev_timer_init(&r->deadline, frontend_on_deadline, deadline_ms / 1000.0, 0.0);
    struct frontend_client *c = frontend_client_find(fe, rid, rid_len);
    bool new_client = false;
    if (r && !c) {
        c = calloc(1, sizeof *c);
        if (c) {
            new_client = true;
            memcpy(c->rid, rid, rid_len);
            c->rid_len = rid_len;
            c->fd = fd;
            TAILQ_INIT(&c->reqs);
        }
    }
    if (!r || !c)
        goto nomem;
    do {
        r->key = frontend_mix(++fe->counter ^ fe->salt);
    } while (r->key == 0 || idmap_get(fe->by_key, r->key));
    if (idmap_put(fe->by_key, r->key, r) != 0)
        goto nomem;
    snprintf(r->id, sizeof r->id, "r%016" PRIx64, r->key);
    r->fe = fe;
    r->tag = s->tag;
    r->settings = settings;
    r->asked = *s;
    r->asked.messages = NULL; /* moved below, owned by the request until it starts */
    r->asked.n_messages = 0;
    r->config_gen = fe->config_gen;
    r->want_progress = s->has_progress && s->progress;
    r->deadline_ms = deadline_ms;
    r->accepted_ms = frontend_now(fe);
    /* the conversation moves out of the decoded message */
    r->messages = s->messages;
    r->n_messages = s->n_messages;
    s->messages = NULL;
    s->n_messages = 0;
    if (run_now) {
        rc = frontend_start(fe, r, err, sizeof err);
        if (rc != 0) {
            fe->counters.rejected++;
            metrics_request_rejected(fe->metrics, rc);
            frontend_reply_error(fe, rid, rid_len, true, s->tag, NULL, rc, "%s", err);
            frontend_request_free(fe, r);
            if (new_client)
                free(c);
            return;
        }
        r->state = FRONTEND_RUNNING;
        TAILQ_INSERT_TAIL(&fe->running, r, link);
        fe->n_running++;
    } else {
        r->state = FRONTEND_QUEUED;
        TAILQ_INSERT_TAIL(&fe->queued, r, link);
        fe->n_queued++;
    }
    if (new_client)
        TAILQ_INSERT_TAIL(&fe->clients, c, link);
    if (fd >= 0)
        c->fd = fd;
    r->client = c;
    TAILQ_INSERT_TAIL(&c->reqs, r, client_link);
    r->deadline.data = r;
    ev_timer_start(fe->loop, &r->deadline);
    fe->counters.accepted++;
    ITSD_INFO("%s accepted (tag %" PRIu64 "): drafts %u, feedbacks %u, edits %u x %u, "
              "deadline %u ms%s",
              r->id, r->tag, settings.drafts, settings.feedbacks, settings.edits,
              settings.feedbacks_per_edit, deadline_ms, run_now ? "" : ", queued");
    struct proto_msg m = {.type = PROTO_ACCEPTED};
    m.accepted = (struct proto_accepted){.tag = r->tag, .id = r->id};
    if (frontend_send(fe, rid, rid_len, &m) != 0) {
        c->gone = true;
        frontend_schedule_reap(fe);
    }
    if (r->want_progress)
        frontend_send_progress(fe, r, r->accepted_ms);
    return;
nomem:
    fe->counters.rejected++;
    metrics_request_rejected(fe->metrics, PROTO_ERR_NO_MEMORY);
    if (r) {
        idmap_del(fe->by_key, r->key);
        free(r);
    }
    if (new_client)
        free(c);
    frontend_reply_error(fe, rid, rid_len, true, s->tag, NULL, PROTO_ERR_NO_MEMORY,
                         "out of memory");
}

static struct frontend_request *frontend_lookup(struct frontend *fe, const char *id)
{
    uint64_t key = frontend_parse_id(id);
    return key ? idmap_get(fe->by_key, key) : NULL;
}

static void frontend_cancel(struct frontend *fe, const uint8_t *rid, size_t rid_len,
                            const struct proto_cancel *cm)
{
    struct frontend_request *r = frontend_lookup(fe, cm->id);
    if (!r) {
        frontend_reply_error(fe, rid, rid_len, false, 0, cm->id, PROTO_ERR_NOT_FOUND,
                             "cancel: no request %s (finished results are kept %u ms)", cm->id,
                             fe->cfg->result_ttl_ms);
        return;
    }
    if (r->state == FRONTEND_DONE) {
        /* too late: the canceller gets what the request ended with */
        if (r->final && fe->ops.send(fe->ctx, rid, rid_len, r->final, r->final_len) != 0)
            fe->counters.unreachable_clients++;
        return;
    }
    bool owner_is_canceller = r->client && r->client->rid_len == rid_len &&
                              memcmp(r->client->rid, rid, rid_len) == 0;
    ITSD_INFO("%s cancel asked by a client", r->id);
    uint64_t tag = r->tag;
    char id[sizeof r->id];
    memcpy(id, r->id, sizeof id);
    frontend_end_error(fe, r, PROTO_ERR_CANCELLED, true, "cancelled by a client");
    if (!owner_is_canceller)
        frontend_reply_error(fe, rid, rid_len, true, tag, id, PROTO_ERR_CANCELLED,
                             "cancelled by a client");
}

static void frontend_get(struct frontend *fe, const uint8_t *rid, size_t rid_len,
                         const struct proto_get *g)
{
    struct frontend_request *r = frontend_lookup(fe, g->id);
    if (!r) {
        frontend_reply_error(fe, rid, rid_len, false, 0, g->id, PROTO_ERR_NOT_FOUND,
                             "get: no request %s (finished results are kept %u ms)", g->id,
                             fe->cfg->result_ttl_ms);
        return;
    }
    if (r->state == FRONTEND_DONE) {
        if (r->final && fe->ops.send(fe->ctx, rid, rid_len, r->final, r->final_len) != 0)
            fe->counters.unreachable_clients++;
        return;
    }
    struct pipeline_progress pr;
    if (r->pipe)
        pipeline_progress(r->pipe, &pr);
    else
        memset(&pr, 0, sizeof pr);
    struct proto_msg m = {.type = PROTO_PROGRESS};
    m.progress = (struct proto_progress){
        .id = r->id, .drafts = pr.drafts, .feedbacks = pr.feedbacks, .edits = pr.edits,
        .scores = pr.scores, .elapsed_ms = frontend_now(fe) - r->accepted_ms};
    (void)frontend_send(fe, rid, rid_len, &m);
}

static void frontend_status(struct frontend *fe, const uint8_t *rid, size_t rid_len,
                            const struct proto_status *st)
{
    struct proto_msg m = {.type = PROTO_STATUS_REPLY};
    m.status_reply.tag = st->tag;
    m.status_reply.has_tag = st->has_tag;
    m.status_reply.queue_depth = fe->n_queued;
    m.status_reply.in_flight = fe->n_running;
    if (st->has_metrics && st->metrics && fe->ops.metrics) {
        fe->ops.metrics(fe->ctx, &m.status_reply.metrics);
        m.status_reply.has_metrics = true;
    }
    if (dispatch_status(fe->d, &m.status_reply) != 0) {
        proto_msg_free(&m);
        frontend_reply_error(fe, rid, rid_len, st->has_tag, st->tag, NULL, PROTO_ERR_NO_MEMORY,
                             "status: out of memory");
        return;
    }
    (void)frontend_send(fe, rid, rid_len, &m);
    proto_msg_free(&m);
}

void frontend_on_message(struct frontend *fe, const uint8_t *rid, size_t rid_len, int fd,
                         struct proto_msg *m)
{
    struct frontend_client *c = frontend_client_find(fe, rid, rid_len);
    if (c && fd >= 0 && !c->gone)
        c->fd = fd; /* a client that reconnected under the same routing id */
    switch (m->type) {
    case PROTO_SUBMIT:
        frontend_submit(fe, rid, rid_len, fd, &m->submit);
        break;
    case PROTO_CANCEL:
        frontend_cancel(fe, rid, rid_len, &m->cancel);
        break;
    case PROTO_GET:
        frontend_get(fe, rid, rid_len, &m->get);
        break;
    case PROTO_STATUS:
        frontend_status(fe, rid, rid_len, &m->status);
        break;
    case PROTO_ERROR:
        fe->counters.bad_messages++;
        ITSD_WARN("a client reported an error: %s: %s", proto_err_name(m->error.code),
                  m->error.message ? m->error.message : "");
        break;
    default:
        fe->counters.bad_messages++;
        frontend_reply_error(fe, rid, rid_len, false, 0, NULL, PROTO_ERR_BAD_MESSAGE,
                             "%s is not a message a client may send",
                             proto_type_name(m->type));
        break;
    }
}

/* ---- vanished clients ------------------------------------------------------------------------ */

void frontend_on_disconnect(struct frontend *fe, int fd)
{
    struct frontend_client *c;
    bool any = false;
    TAILQ_FOREACH(c, &fe->clients, link) {
        if (c->fd == fd && !c->gone) {
            c->gone = true;
            any = true;
        }
    }
    if (any)
        frontend_schedule_reap(fe);
}

static void frontend_on_reap(struct ev_loop *loop, ev_idle *w, int revents)
{
    (void)revents;
    struct frontend *fe = w->data;
    ev_idle_stop(loop, w);
    /* Ending a request may start queued ones, and a start that fails frees that client's
     * record: look for the next gone client from the head each time. */
    for (;;) {
        struct frontend_client *c;
        TAILQ_FOREACH(c, &fe->clients, link) {
            if (c->gone)
                break;
        }
        if (!c)
            break;
        struct frontend_request *r;
        while ((r = TAILQ_FIRST(&c->reqs)) != NULL) {
            fe->counters.clients_gone++;
            ITSD_INFO("%s: its client went away", r->id);
            frontend_end_error(fe, r, PROTO_ERR_CANCELLED, false,
                               "cancelled: the client disconnected");
        }
        TAILQ_REMOVE(&fe->clients, c, link);
        free(c);
    }
}

/* ---- job messages ---------------------------------------------------------------------------- */

void frontend_on_sample(struct frontend *fe, void *owner, uint64_t job, uint32_t index,
                        const struct proto_output *output)
{
    struct frontend_request *r = owner;
    if (!r || r->state != FRONTEND_RUNNING || !r->pipe)
        return;
    if (pipeline_on_sample(r->pipe, job, index, output) != 0)
        fe->counters.stale_job_messages++;
    frontend_settle(fe, r);
}

void frontend_on_generate_result(struct frontend *fe, void *owner,
                                 const struct proto_generate_result *res)
{
    struct frontend_request *r = owner;
    if (!r || r->state != FRONTEND_RUNNING || !r->pipe)
        return;
    if (pipeline_on_generate_result(r->pipe, res) != 0)
        fe->counters.stale_job_messages++;
    frontend_settle(fe, r);
}

void frontend_on_score_result(struct frontend *fe, void *owner,
                              const struct proto_score_result *res)
{
    struct frontend_request *r = owner;
    if (!r || r->state != FRONTEND_RUNNING || !r->pipe)
        return;
    if (pipeline_on_score_result(r->pipe, res) != 0)
        fe->counters.stale_job_messages++;
    frontend_settle(fe, r);
}

void frontend_on_job_failed(void *fe_ctx, void *owner, uint64_t job_id, enum proto_role role,
                            int code, const char *message)
{
    struct frontend *fe = fe_ctx;
    struct frontend_request *r = owner;
    if (!r || r->state != FRONTEND_RUNNING || !r->pipe)
        return;
    if (code == PROTO_ERR_NO_WORKER) {
        /* the method cannot run without the role: say which, rather than a thinner answer */
        frontend_end_error(fe, r, PROTO_ERR_NO_WORKER, true, "no %s worker: %s",
                           proto_role_name(role), message);
        return;
    }
    if (pipeline_on_job_failed(r->pipe, job_id, (enum proto_err)code, message) != 0)
        fe->counters.stale_job_messages++;
    frontend_settle(fe, r);
}

/* ---- periodic, shutdown --------------------------------------------------------------------- */

void frontend_tick(struct frontend *fe)
{
    uint64_t now = frontend_now(fe);
    struct frontend_request *r;
    TAILQ_FOREACH(r, &fe->running, link) {
        if (r->want_progress && r->progress_dirty &&
            now - r->last_progress_ms >= fe->cfg->progress_interval_ms)
            frontend_send_progress(fe, r, now);
    }
    frontend_trim_done(fe, now);
}

void frontend_stop_accepting(struct frontend *fe)
{
    fe->accepting = false;
    struct frontend_request *r;
    while ((r = TAILQ_FIRST(&fe->queued)) != NULL)
        frontend_end_error(fe, r, PROTO_ERR_SHUTTING_DOWN, true,
                           "itsd is shutting down; the request had not started");
}

void frontend_finish_all(struct frontend *fe, int code, const char *message)
{
    fe->accepting = false;
    struct frontend_request *r;
    while ((r = TAILQ_FIRST(&fe->queued)) != NULL)
        frontend_end_error(fe, r, code, true, "%s", message);
    while ((r = TAILQ_FIRST(&fe->running)) != NULL)
        frontend_end_with_best(fe, r, true, code, message);
}

const struct templates *frontend_templates(const struct frontend *fe)
{
    return fe->tpl->tpl;
}

int frontend_set_templates(struct frontend *fe, struct templates **tpl)
{
    struct frontend_tpl *h = calloc(1, sizeof *h);
    if (!h)
        return PROTO_ERR_NO_MEMORY;
    h->tpl = *tpl;
    *tpl = NULL;
    struct frontend_tpl *old = fe->tpl;
    fe->tpl = h;
    if (old->users == 0) {
        frontend_tpl_free(&old);
    } else {
        old->retired = true;
        ITSD_DEBUG("the replaced templates stay while %u running requests use them", old->users);
    }
    return 0;
}

void frontend_reconfigured(struct frontend *fe)
{
    fe->config_gen++;
    /* a larger max_inflight starts queued requests now; fewer kept results go now */
    frontend_pump(fe);
    frontend_trim_done(fe, frontend_now(fe));
}

uint32_t frontend_running(const struct frontend *fe)
{
    return fe->n_running;
}

uint32_t frontend_queued(const struct frontend *fe)
{
    return fe->n_queued;
}

const struct frontend_counters *frontend_counters(const struct frontend *fe)
{
    return &fe->counters;
}

/* ---- lifecycle ------------------------------------------------------------------------------- */

int frontend_new(struct ev_loop *loop, const struct itsd_config *cfg, struct templates **tpl,
                 struct dispatch *d, const struct frontend_ops *ops, void *ctx,
                 struct metrics *m, struct frontend **out, char *err, size_t err_len)
{
    *out = NULL;
    struct frontend *fe = calloc(1, sizeof *fe);
    if (!fe)
        goto nomem;
    fe->loop = loop;
    fe->cfg = cfg;
    fe->tpl = calloc(1, sizeof *fe->tpl);
    if (!fe->tpl)
        goto nomem;
    fe->d = d;
    fe->ops = *ops;
    fe->ctx = ctx;
    fe->metrics = m;
    fe->accepting = true;
    TAILQ_INIT(&fe->queued);
    TAILQ_INIT(&fe->running);
    TAILQ_INIT(&fe->done);
    TAILQ_INIT(&fe->clients);
    ev_idle_init(&fe->reaper, frontend_on_reap);
    fe->reaper.data = fe;
    if (getrandom(&fe->salt, sizeof fe->salt, GRND_NONBLOCK) != sizeof fe->salt)
        fe->salt = frontend_mix((uint64_t)(uintptr_t)fe ^ (uint64_t)ops->now_ms(ctx));
    if (idmap_new(&fe->by_key) != 0)
        goto nomem;
    fe->tpl->tpl = *tpl; /* taken only now: on error the caller keeps it */
    *tpl = NULL;
    *out = fe;
    return 0;
nomem:
    snprintf(err, err_len, "frontend: out of memory");
    frontend_destroy(&fe);
    return PROTO_ERR_NO_MEMORY;
}

void frontend_destroy(struct frontend **fep)
{
    if (!fep || !*fep)
        return;
    struct frontend *fe = *fep;
    struct frontend_request *r;
    struct frontend_request_list *lists[] = {&fe->queued, &fe->running, &fe->done};
    for (size_t i = 0; i < 3; i++) {
        while ((r = TAILQ_FIRST(lists[i])) != NULL) {
            TAILQ_REMOVE(lists[i], r, link);
            frontend_pipeline_end(r);
            dispatch_cancel_owner(fe->d, r);
            frontend_request_free(fe, r);
        }
    }
    struct frontend_client *c;
    while ((c = TAILQ_FIRST(&fe->clients)) != NULL) {
        TAILQ_REMOVE(&fe->clients, c, link);
        free(c);
    }
    if (fe->loop)
        ev_idle_stop(fe->loop, &fe->reaper);
    frontend_tpl_free(&fe->tpl); /* retired sets went with their last request above */
    idmap_destroy(&fe->by_key);
    free(fe);
    *fep = NULL;
}
