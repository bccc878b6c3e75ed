/* itsw_serve.c — `itsw serve`, the worker daemon (see itsw_serve.h).
 *
 * One thread, one ZeroMQ DEALER connected to itsd's backend ROUTER. The loop: wait for
 * messages (no wait while the engine has work), take every message that arrived, run one
 * engine step, send what finished, heartbeat. Jobs therefore join and leave the running batch
 * between decode steps (continuous batching), and a cancel takes effect before the next step.
 * Paranoid Pirate: itsd and the worker heartbeat each other; when itsd falls silent for
 * `liveness` intervals the worker drops its jobs (itsd re-dispatches them), reconnects with a
 * fresh socket and registers again.
 *
 * With CURVE keys (server_key, key) the socket is a CURVE client, and a monitor on it turns a
 * refused key into a log line (once per connection attempt series) instead of silence.
 *
 * The model is a checkpoint directory, or with `model = random:SHAPE` random weights of a named
 * shape: on the cpu backend an in-memory random checkpoint, on cuda weights the backend makes
 * on its device (backend_open_random). At log level debug every finished job is logged with its
 * timing (queue + prefill to the first token, decode time per step), which benchmarks read.
 *
 * Owns the model (checkpoint, tokenizer, engine), the socket and the table of running jobs.
 * Never exits from inside a job: a bad job gets a job_error, the daemon goes on.
 */
#include "itsw_serve.h"

#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "backend.h"
#include "chat.h"
#include "checkpoint.h"
#include "engine.h"
#include "itsw_config.h"
#include "proto.h"
#include "tokenizer.h"

#define SERVE_ERR_LEN 512

enum serve_log_level { SERVE_LOG_ERROR, SERVE_LOG_WARN, SERVE_LOG_INFO, SERVE_LOG_DEBUG };
static int serve_log_level = SERVE_LOG_INFO;

static void serve_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void serve_log(int level, const char *fmt, ...)
{
    static const char *const names[] = {"error", "warn", "info", "debug"};
    if (level > serve_log_level)
        return;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "itsw[%d] %s: ", (int)getpid(), names[level]);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static volatile sig_atomic_t serve_stop;

static void serve_on_signal(int sig)
{
    (void)sig;
    serve_stop = 1;
}

static uint64_t serve_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static uint64_t serve_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* A generate or score job the engine is running for itsd. */
struct serve_job {
    uint64_t id;
    enum proto_type kind;        /* PROTO_GENERATE or PROTO_SCORE */
    int n_samples;               /* generate */
    struct tokenizer_ids *drawn; /* generate: ids drawn per sample so far (n_samples) */
    enum engine_finish *finish;  /* generate: why sample i ended, once done[i] */
    bool *done;                  /* generate: sample i drew its last id */
    bool *sample_sent;           /* generate: its `sample` message went out */
    /* timing, for the debug line at the end (microseconds, CLOCK_MONOTONIC) */
    uint64_t added_us;           /* accepted into the engine */
    uint64_t first_us, last_us;  /* generate: the steps that drew its first and last ids */
    uint64_t last_step;          /* generate: serve.step_no of the last step that drew an id */
    int steps;                   /* generate: engine steps that drew ids for it */
};

struct serve {
    struct itsw_config cfg;
    struct tokenizer *tok;
    enum chat_format format;
    struct checkpoint *ck;
    /* the shape of a random: model; lives as long as the engine, since a backend may borrow
     * its config (backend.h: struct backend.cfg) */
    struct model_config random_cfg;
    struct engine *eng;
    void *zctx;
    void *sock;
    void *mon;         /* PAIR reading the socket's handshake events */
    int mon_seq;       /* makes each connection's monitor endpoint unique */
    bool auth_logged;  /* a refusal was logged since the last good handshake */
    struct serve_job *jobs; /* n_jobs live jobs */
    size_t n_jobs, cap_jobs;
    uint64_t last_heard_ms; /* last message from itsd */
    uint64_t next_beat_ms;  /* next heartbeat we owe itsd */
    uint64_t step_no;       /* engine steps run so far (tells one step's ids from the next) */
};

/* ---- sending ------------------------------------------------------------------------------- */

/* Encodes and sends `m`. A failure is logged and returned; the caller carries on (itsd sees
 * the silence through heartbeats). */
static int serve_send(struct serve *s, const struct proto_msg *m)
{
    void *buf = NULL;
    size_t len = 0;
    char err[SERVE_ERR_LEN];
    if (proto_encode(m, &buf, &len, err, sizeof err) != 0) {
        serve_log(SERVE_LOG_ERROR, "cannot encode %s: %s", proto_type_name(m->type), err);
        return -1;
    }
    int rc = zmq_send(s->sock, buf, len, ZMQ_DONTWAIT);
    free(buf);
    if (rc < 0) {
        serve_log(SERVE_LOG_WARN, "send %s: %s", proto_type_name(m->type), zmq_strerror(errno));
        return -1;
    }
    return 0;
}

static void serve_send_job_error(struct serve *s, uint64_t job, enum proto_err code,
                                 const char *message)
{
    struct proto_msg m = {.type = PROTO_JOB_ERROR};
    m.job_error.job = job;
    m.job_error.code = code;
    /* proto strings are owned char *; the encoder only reads them. */
    m.job_error.message = (char *)message;
    serve_send(s, &m);
    serve_log(SERVE_LOG_INFO, "job %llu failed: %s: %s", (unsigned long long)job,
              proto_err_name(code), message);
}

static void serve_send_ready(struct serve *s)
{
    struct proto_msg m = {.type = PROTO_READY};
    m.ready.worker = s->cfg.name;
    m.ready.role = s->cfg.role;
    m.ready.model = s->cfg.model_name;
    m.ready.backend = (char *)engine_backend_name(s->eng);
    m.ready.capacity.max_seqs = (uint32_t)engine_max_seqs(s->eng);
    m.ready.capacity.max_ctx = (uint32_t)engine_max_context(s->eng);
    m.ready.capacity.kv_tokens = (uint64_t)engine_kv_tokens(s->eng);
    serve_send(s, &m);
}

static void serve_send_heartbeat(struct serve *s)
{
    struct proto_msg m = {.type = PROTO_HEARTBEAT};
    int running = 0;
    for (size_t i = 0; i < s->n_jobs; i++)
        running += s->jobs[i].kind == PROTO_GENERATE ? s->jobs[i].n_samples : 1;
    m.heartbeat.has_load = true;
    m.heartbeat.load.running = (uint32_t)running;
    m.heartbeat.load.queued = 0;
    m.heartbeat.load.kv_used = (uint64_t)(engine_kv_blocks_total(s->eng) -
                                          engine_kv_blocks_free(s->eng)) *
                               BACKEND_BLOCK_TOKENS;
    serve_send(s, &m);
}

/* ---- the job table ------------------------------------------------------------------------- */

static struct serve_job *serve_job_find(struct serve *s, uint64_t id)
{
    for (size_t i = 0; i < s->n_jobs; i++)
        if (s->jobs[i].id == id)
            return &s->jobs[i];
    return NULL;
}

static void serve_job_clear(struct serve_job *j)
{
    for (int i = 0; j->drawn && i < j->n_samples; i++)
        tokenizer_ids_free(&j->drawn[i]);
    free(j->drawn);
    free(j->finish);
    free(j->done);
    free(j->sample_sent);
    memset(j, 0, sizeof *j);
}

static void serve_job_remove(struct serve *s, uint64_t id)
{
    struct serve_job *j = serve_job_find(s, id);
    if (!j)
        return;
    serve_job_clear(j);
    *j = s->jobs[--s->n_jobs];
}

static struct serve_job *serve_job_add(struct serve *s, uint64_t id, enum proto_type kind,
                                       int n_samples)
{
    if (s->n_jobs == s->cap_jobs) {
        size_t cap = s->cap_jobs ? s->cap_jobs * 2 : 16;
        struct serve_job *nj = realloc(s->jobs, cap * sizeof *nj);
        if (!nj)
            return NULL;
        s->jobs = nj;
        s->cap_jobs = cap;
    }
    struct serve_job *j = &s->jobs[s->n_jobs];
    memset(j, 0, sizeof *j);
    j->id = id;
    j->kind = kind;
    j->added_us = serve_now_us();
    if (kind == PROTO_GENERATE) {
        j->n_samples = n_samples;
        j->drawn = calloc((size_t)n_samples, sizeof *j->drawn);
        j->finish = calloc((size_t)n_samples, sizeof *j->finish);
        j->done = calloc((size_t)n_samples, sizeof *j->done);
        j->sample_sent = calloc((size_t)n_samples, sizeof *j->sample_sent);
        if (!j->drawn || !j->finish || !j->done || !j->sample_sent) {
            serve_job_clear(j);
            return NULL;
        }
    }
    s->n_jobs++;
    return j;
}

/* ---- jobs in -------------------------------------------------------------------------------- */

/* Renders a protocol conversation in the model's chat format. */
static int serve_render(struct serve *s, const struct proto_chat_msg *msgs, uint32_t n,
                        bool generation_prompt, struct tokenizer_ids *ids, char *err,
                        size_t err_len)
{
    struct chat_message *cm = calloc(n ? n : 1, sizeof *cm);
    if (!cm) {
        snprintf(err, err_len, "out of memory");
        return PROTO_ERR_NO_MEMORY;
    }
    for (uint32_t i = 0; i < n; i++) {
        const char *role = proto_chat_role_name(msgs[i].role);
        cm[i].role = role;
        cm[i].role_len = strlen(role);
        cm[i].content = msgs[i].content;
        cm[i].content_len = msgs[i].content ? strlen(msgs[i].content) : 0;
    }
    int rc = chat_render_ids(s->format, s->tok, cm, n, generation_prompt, ids, err, err_len);
    free(cm);
    return rc == 0 ? 0 : PROTO_ERR_BAD_FIELD;
}

static void serve_on_generate(struct serve *s, const struct proto_generate *g)
{
    char err[SERVE_ERR_LEN];
    if (serve_job_find(s, g->job)) {
        serve_send_job_error(s, g->job, PROTO_ERR_BAD_FIELD, "generate.job: id already running");
        return;
    }
    if (g->n > (uint32_t)engine_max_seqs(s->eng)) {
        snprintf(err, sizeof err, "generate.n: %u samples exceed this worker's max_seqs %d",
                 g->n, engine_max_seqs(s->eng));
        serve_send_job_error(s, g->job, PROTO_ERR_TOO_LARGE, err);
        return;
    }
    struct tokenizer_ids ids = {0};
    int rc = serve_render(s, g->messages, g->n_messages, g->add_generation_prompt, &ids, err,
                          sizeof err);
    if (rc != 0) {
        serve_send_job_error(s, g->job, rc, err);
        return;
    }
    struct engine_sampling es = {
        .temperature = (float)g->sampling.temperature,
        .top_p = (float)g->sampling.top_p,
        .top_k = (int)g->sampling.top_k,
        .seed = g->sampling.seed,
        .max_tokens = (int)g->sampling.max_tokens,
        .ignore_eos = g->sampling.ignore_eos || s->cfg.ignore_eos,
    };
    struct serve_job *j = serve_job_add(s, g->job, PROTO_GENERATE, (int)g->n);
    if (!j) {
        tokenizer_ids_free(&ids);
        serve_send_job_error(s, g->job, PROTO_ERR_NO_MEMORY, "out of memory");
        return;
    }
    if (engine_add_generate(s->eng, g->job, ids.ids, (int)ids.n, (int)g->n, &es, err,
                            sizeof err) != 0) {
        serve_job_remove(s, g->job);
        serve_send_job_error(s, g->job, PROTO_ERR_BAD_FIELD, err);
    } else {
        serve_log(SERVE_LOG_DEBUG, "job %llu: generate n=%u, prompt %zu tokens",
                  (unsigned long long)g->job, g->n, ids.n);
    }
    tokenizer_ids_free(&ids);
}

static void serve_on_score(struct serve *s, const struct proto_score *sc)
{
    char err[SERVE_ERR_LEN];
    if (serve_job_find(s, sc->job)) {
        serve_send_job_error(s, sc->job, PROTO_ERR_BAD_FIELD, "score.job: id already running");
        return;
    }
    uint32_t n = sc->n_conversations;
    struct tokenizer_ids *ids = calloc(n ? n : 1, sizeof *ids);
    const int32_t **convs = calloc(n ? n : 1, sizeof *convs);
    int *lens = calloc(n ? n : 1, sizeof *lens);
    int code = 0;
    if (!ids || !convs || !lens) {
        code = PROTO_ERR_NO_MEMORY;
        snprintf(err, sizeof err, "out of memory");
        goto out;
    }
    for (uint32_t i = 0; i < n; i++) {
        char why[SERVE_ERR_LEN - 64];
        /* Select/Reward convention: [user, assistant=candidate] with no generation prompt. */
        code = serve_render(s, sc->conversations[i].messages, sc->conversations[i].n_messages,
                            false, &ids[i], why, sizeof why);
        if (code != 0) {
            snprintf(err, sizeof err, "score.conversations[%u]: %s", i, why);
            goto out;
        }
        convs[i] = ids[i].ids;
        lens[i] = (int)ids[i].n;
    }
    if (!serve_job_add(s, sc->job, PROTO_SCORE, 0)) {
        code = PROTO_ERR_NO_MEMORY;
        snprintf(err, sizeof err, "out of memory");
        goto out;
    }
    if (engine_add_score(s->eng, sc->job, convs, lens, (int)n, err, sizeof err) != 0) {
        serve_job_remove(s, sc->job);
        code = PROTO_ERR_BAD_FIELD;
    }
out:
    if (code != 0)
        serve_send_job_error(s, sc->job, code, err);
    for (uint32_t i = 0; ids && i < n; i++)
        tokenizer_ids_free(&ids[i]);
    free(ids);
    free(convs);
    free(lens);
}

static void serve_on_cancel(struct serve *s, uint64_t job)
{
    if (!serve_job_find(s, job))
        return; /* finished already, or never ours: nothing to do */
    engine_cancel(s->eng, job);
    serve_log(SERVE_LOG_DEBUG, "job %llu cancelled", (unsigned long long)job);
}

/* Reads every message waiting on the socket. Returns -1 when itsd sent disconnect. */
static int serve_drain(struct serve *s)
{
    for (;;) {
        zmq_msg_t frame;
        zmq_msg_init(&frame);
        int got = zmq_msg_recv(&frame, s->sock, ZMQ_DONTWAIT);
        if (got < 0) {
            zmq_msg_close(&frame);
            return 0; /* EAGAIN: drained */
        }
        /* A DEALER from a ROUTER gets exactly one frame per message; extra frames mean a
         * confused peer: drop the whole message. */
        int more = zmq_msg_more(&frame);
        s->last_heard_ms = serve_now_ms();
        struct proto_msg m;
        char err[SERVE_ERR_LEN];
        int rc = more ? PROTO_ERR_BAD_MESSAGE
                      : proto_decode(zmq_msg_data(&frame), zmq_msg_size(&frame), PROTO_TO_WORKER,
                                     &m, err, sizeof err);
        zmq_msg_close(&frame);
        while (more) {
            zmq_msg_t rest;
            zmq_msg_init(&rest);
            if (zmq_msg_recv(&rest, s->sock, ZMQ_DONTWAIT) < 0)
                more = 0;
            else
                more = zmq_msg_more(&rest);
            zmq_msg_close(&rest);
        }
        if (rc != 0) {
            serve_log(SERVE_LOG_WARN, "dropped a bad message from itsd: %s",
                      more ? "multi-frame" : err);
            continue;
        }
        int stop = 0;
        switch (m.type) {
        case PROTO_HEARTBEAT: break;
        case PROTO_GENERATE: serve_on_generate(s, &m.generate); break;
        case PROTO_SCORE: serve_on_score(s, &m.score); break;
        case PROTO_CANCEL_JOB: serve_on_cancel(s, m.cancel_job.job); break;
        case PROTO_DISCONNECT:
            /* The protocol: after any disconnect a worker starts over with `ready` (itsd has
             * forgotten our jobs and re-dispatched them; it may be restarting). */
            serve_log(SERVE_LOG_INFO, "itsd sent disconnect (%s): starting over",
                      m.disconnect.reason ? m.disconnect.reason : "");
            stop = 1;
            break;
        case PROTO_ERROR:
            serve_log(SERVE_LOG_WARN, "itsd reports %s: %s", proto_err_name(m.error.code),
                      m.error.message ? m.error.message : "");
            break;
        default: break;
        }
        proto_msg_free(&m);
        if (stop)
            return -1;
    }
}

/* ---- results out ---------------------------------------------------------------------------- */

/* Engine callback: records each drawn id (the EOS that stops a sample is left out). */
static void serve_on_token(void *ud, uint64_t job_id, int sample, int32_t token, int finished,
                           enum engine_finish finish)
{
    struct serve *s = ud;
    struct serve_job *j = serve_job_find(s, job_id);
    if (!j || j->kind != PROTO_GENERATE || sample < 0 || sample >= j->n_samples)
        return;
    if (j->steps == 0 || j->last_step != s->step_no) {
        uint64_t now = serve_now_us();
        if (j->steps == 0)
            j->first_us = now;
        j->last_us = now;
        j->last_step = s->step_no;
        j->steps++;
    }
    if (!(finished && finish == ENGINE_FINISH_STOP))
        tokenizer_ids_push(&j->drawn[sample], token); /* on OOM the final result still has all */
    if (finished) {
        j->done[sample] = true;
        j->finish[sample] = finish;
    }
}

static enum proto_finish serve_finish(enum engine_finish f)
{
    switch (f) {
    case ENGINE_FINISH_STOP: return PROTO_FINISH_STOP;
    case ENGINE_FINISH_LENGTH: return PROTO_FINISH_LENGTH;
    default: return PROTO_FINISH_CANCELLED;
    }
}

static char *serve_text(struct serve *s, const int32_t *ids, int n)
{
    char *text = NULL;
    size_t len = 0;
    char err[SERVE_ERR_LEN];
    if (tokenizer_decode(s->tok, ids, (size_t)n, TOKENIZER_SKIP_SPECIAL | TOKENIZER_LOSSY_UTF8,
                         &text, &len, err, sizeof err) != 0) {
        serve_log(SERVE_LOG_ERROR, "decode: %s", err);
        return NULL;
    }
    /* The wire forbids NUL in text; a model can emit the byte. */
    for (size_t i = 0; i < len; i++)
        if (text[i] == '\0')
            text[i] = ' ';
    return text;
}

/* Sends a `sample` for every sample that finished during the last step, so itsd can start
 * the next stage of that candidate while the other samples still decode. The job's
 * generate_result later repeats every output: itsd takes whichever it sees first. */
static void serve_flush_samples(struct serve *s)
{
    for (size_t k = 0; k < s->n_jobs; k++) {
        struct serve_job *j = &s->jobs[k];
        for (int i = 0; j->kind == PROTO_GENERATE && i < j->n_samples; i++) {
            if (!j->done[i] || j->sample_sent[i])
                continue;
            j->sample_sent[i] = true;
            if (j->finish[i] == ENGINE_FINISH_CANCELLED)
                continue;
            struct proto_msg m = {.type = PROTO_SAMPLE};
            m.sample.job = j->id;
            m.sample.index = (uint32_t)i;
            m.sample.output.text = serve_text(s, j->drawn[i].ids, (int)j->drawn[i].n);
            m.sample.output.n_tokens = (uint32_t)j->drawn[i].n;
            m.sample.output.finish = serve_finish(j->finish[i]);
            if (m.sample.output.text)
                serve_send(s, &m);
            free(m.sample.output.text);
        }
    }
}

/* The debug line benchmarks read (deploy/gpu_service_bench.sh parses it: keep its words):
 * first_token_ms = from acceptance to the step that drew the first ids (queueing and
 * prefill); decode_ms_per_step = the time between that step and the last one over the steps
 * between them. */
static void serve_log_timing(const struct serve_job *j, const struct engine_result *r)
{
    if (serve_log_level < SERVE_LOG_DEBUG)
        return;
    uint64_t now = serve_now_us();
    if (j->kind == PROTO_GENERATE) {
        double first_ms = j->steps ? (double)(j->first_us - j->added_us) / 1e3 : 0;
        double per_step = j->steps > 1 ? (double)(j->last_us - j->first_us) / 1e3 /
                                             (double)(j->steps - 1) : 0;
        serve_log(SERVE_LOG_DEBUG, "job %llu done: generate n=%d prompt_tokens=%d "
                  "completion_tokens=%d steps=%d first_token_ms=%.3f decode_ms_per_step=%.4f "
                  "total_ms=%.3f", (unsigned long long)j->id, j->n_samples, r->prompt_tokens,
                  r->completion_tokens, j->steps, first_ms, per_step,
                  (double)(now - j->added_us) / 1e3);
    } else {
        serve_log(SERVE_LOG_DEBUG, "job %llu done: score n=%d prompt_tokens=%d total_ms=%.3f",
                  (unsigned long long)j->id, r->n_scores, r->prompt_tokens,
                  (double)(now - j->added_us) / 1e3);
    }
}

static void serve_send_result(struct serve *s, struct engine_result *r)
{
    struct serve_job *j = serve_job_find(s, r->job_id);
    if (!j)
        return; /* not a job of itsd's (cannot happen) */
    if (r->status == ENGINE_JOB_CANCELLED) {
        serve_send_job_error(s, r->job_id, PROTO_ERR_CANCELLED, "cancelled");
        serve_job_remove(s, r->job_id);
        return;
    }
    if (r->status == ENGINE_JOB_FAILED) {
        serve_send_job_error(s, r->job_id, PROTO_ERR_INTERNAL, r->error);
        serve_job_remove(s, r->job_id);
        return;
    }
    serve_log_timing(j, r);
    struct proto_msg m = {0};
    if (j->kind == PROTO_GENERATE) {
        m.type = PROTO_GENERATE_RESULT;
        m.generate_result.job = r->job_id;
        m.generate_result.n_outputs = (uint32_t)r->n_outputs;
        m.generate_result.outputs = calloc((size_t)r->n_outputs, sizeof(struct proto_output));
        if (!m.generate_result.outputs) {
            serve_send_job_error(s, r->job_id, PROTO_ERR_NO_MEMORY, "out of memory");
            serve_job_remove(s, r->job_id);
            return;
        }
        for (int i = 0; i < r->n_outputs; i++) {
            struct proto_output *o = &m.generate_result.outputs[i];
            o->text = serve_text(s, r->outputs[i].ids, r->outputs[i].n_ids);
            o->n_tokens = (uint32_t)r->outputs[i].n_ids;
            o->finish = serve_finish(r->outputs[i].finish);
            if (!o->text)
                o->text = strdup("");
        }
        m.generate_result.usage.prompt_tokens = (uint64_t)r->prompt_tokens;
        m.generate_result.usage.completion_tokens = (uint64_t)r->completion_tokens;
    } else {
        m.type = PROTO_SCORE_RESULT;
        m.score_result.job = r->job_id;
        m.score_result.n_scores = (uint32_t)r->n_scores;
        m.score_result.scores = calloc((size_t)(r->n_scores ? r->n_scores : 1), sizeof(double));
        if (!m.score_result.scores) {
            serve_send_job_error(s, r->job_id, PROTO_ERR_NO_MEMORY, "out of memory");
            serve_job_remove(s, r->job_id);
            return;
        }
        for (int i = 0; i < r->n_scores; i++)
            m.score_result.scores[i] = r->scores[i];
        m.score_result.usage.prompt_tokens = (uint64_t)r->prompt_tokens;
    }
    serve_send(s, &m);
    proto_msg_free(&m);
    serve_job_remove(s, r->job_id);
}

/* ---- connection ----------------------------------------------------------------------------- */

static void serve_close_socket(struct serve *s)
{
    if (s->sock && s->mon)
        zmq_socket_monitor(s->sock, NULL, 0);
    if (s->mon)
        zmq_close(s->mon);
    if (s->sock)
        zmq_close(s->sock);
    s->mon = NULL;
    s->sock = NULL;
}

/* Logs what the monitor saw of the security handshake. */
static void serve_read_monitor(struct serve *s)
{
    for (;;) {
        zmq_msg_t ev;
        zmq_msg_init(&ev);
        if (!s->mon || zmq_msg_recv(&ev, s->mon, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&ev);
            return;
        }
        uint16_t event = 0;
        uint32_t value = 0;
        if (zmq_msg_size(&ev) >= 6) {
            memcpy(&event, zmq_msg_data(&ev), sizeof event);
            memcpy(&value, (const uint8_t *)zmq_msg_data(&ev) + 2, sizeof value);
        }
        while (zmq_msg_more(&ev)) {
            zmq_msg_close(&ev);
            zmq_msg_init(&ev);
            if (zmq_msg_recv(&ev, s->mon, ZMQ_DONTWAIT) < 0)
                break;
        }
        zmq_msg_close(&ev);
        if (event == ZMQ_EVENT_HANDSHAKE_SUCCEEDED) {
            if (s->auth_logged)
                serve_log(SERVE_LOG_INFO, "handshake with %s succeeded", s->cfg.connect);
            s->auth_logged = false;
            continue;
        }
        if (s->auth_logged)
            continue; /* the same refusal every reconnect: said once */
        s->auth_logged = true;
        if (event == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH)
            serve_log(SERVE_LOG_ERROR, "itsd at %s refused this worker's CURVE key (ZAP "
                      "status %u): its public key must be in itsd's [security] worker_keys",
                      s->cfg.connect, value);
        else if (event == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL &&
                 value == ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH)
            serve_log(SERVE_LOG_ERROR, "security mismatch with itsd at %s: %s", s->cfg.connect,
                      s->cfg.curve ? "this worker uses CURVE but itsd runs with curve = off"
                                   : "itsd requires CURVE: set server_key and key");
        else
            serve_log(SERVE_LOG_ERROR, "handshake with itsd at %s failed (event 0x%x, 0x%x)%s",
                      s->cfg.connect, event, value,
                      s->cfg.curve ? ": is server_key itsd's public key?"
                                   : ": if itsd runs with curve = on, set server_key and key");
    }
}

static int serve_connect(struct serve *s)
{
    serve_close_socket(s);
    s->sock = zmq_socket(s->zctx, ZMQ_DEALER);
    if (!s->sock) {
        serve_log(SERVE_LOG_ERROR, "zmq_socket: %s", zmq_strerror(errno));
        return -1;
    }
    int linger = 0;
    zmq_setsockopt(s->sock, ZMQ_LINGER, &linger, sizeof linger);
    if (s->cfg.curve &&
        (zmq_setsockopt(s->sock, ZMQ_CURVE_SERVERKEY, s->cfg.curve_server, 32) != 0 ||
         zmq_setsockopt(s->sock, ZMQ_CURVE_PUBLICKEY, s->cfg.curve_public, 32) != 0 ||
         zmq_setsockopt(s->sock, ZMQ_CURVE_SECRETKEY, s->cfg.curve_secret, 32) != 0)) {
        serve_log(SERVE_LOG_ERROR, "CURVE keys: %s", zmq_strerror(errno));
        return -1;
    }
    char mon_ep[64];
    snprintf(mon_ep, sizeof mon_ep, "inproc://itsw-monitor-%d", ++s->mon_seq);
    if (zmq_socket_monitor(s->sock, mon_ep,
                           ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH |
                               ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL |
                               ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL) == 0) {
        s->mon = zmq_socket(s->zctx, ZMQ_PAIR);
        if (s->mon) {
            zmq_setsockopt(s->mon, ZMQ_LINGER, &linger, sizeof linger);
            if (zmq_connect(s->mon, mon_ep) != 0) {
                zmq_close(s->mon);
                s->mon = NULL;
            }
        }
    }
    if (!s->mon) /* only the log line is lost */
        serve_log(SERVE_LOG_WARN, "cannot monitor the socket: %s", zmq_strerror(errno));
    /* A stable routing id lets itsd recognise a worker that reconnects (DESIGN: re-register
     * as a fresh worker under the same name). */
    zmq_setsockopt(s->sock, ZMQ_ROUTING_ID, s->cfg.name, strlen(s->cfg.name));
    if (zmq_connect(s->sock, s->cfg.connect) != 0) {
        serve_log(SERVE_LOG_ERROR, "connect %s: %s", s->cfg.connect, zmq_strerror(errno));
        return -1;
    }
    serve_send_ready(s);
    uint64_t now = serve_now_ms();
    s->last_heard_ms = now;
    s->next_beat_ms = now + (uint64_t)s->cfg.heartbeat_ms;
    serve_log(SERVE_LOG_INFO, "registered with %s as %s (%s, model %s, max_seqs %d%s)",
              s->cfg.connect, s->cfg.name, proto_role_name(s->cfg.role), s->cfg.model_name,
              engine_max_seqs(s->eng), s->cfg.curve ? ", CURVE" : "");
    return 0;
}

/* itsd went silent: its jobs are being re-dispatched elsewhere, so ours are dropped. */
static void serve_drop_all_jobs(struct serve *s)
{
    while (s->n_jobs) {
        uint64_t id = s->jobs[0].id;
        engine_cancel(s->eng, id);
        struct engine_result *r = NULL;
        if (engine_take_result(s->eng, id, &r) == 1)
            engine_result_free(&r);
        serve_job_remove(s, id);
    }
}

static void serve_close(struct serve *s)
{
    for (size_t i = 0; i < s->n_jobs; i++)
        serve_job_clear(&s->jobs[i]);
    free(s->jobs);
    serve_close_socket(s);
    if (s->zctx)
        zmq_ctx_term(s->zctx);
    engine_destroy(&s->eng);
    checkpoint_destroy(&s->ck);
    tokenizer_destroy(&s->tok);
    itsw_config_deinit(&s->cfg);
}

/* Random weights of c->random_shape (validated by the config): the cpu backend runs over an
 * in-memory random checkpoint (bf16, as `itsw bench`), any other backend makes them itself on
 * its device (backend_open_random), so no host copy of a big model is made. */
static int serve_open_random(struct serve *s, const struct model_config *mc,
                             const struct engine_params *p, char *err, size_t err_len)
{
    const struct itsw_config *c = &s->cfg;
    uint64_t seed = (uint64_t)c->random_seed;
    if (!c->backend || strcmp(c->backend, "cpu") == 0) {
        if (checkpoint_new_random(mc, DTYPE_BF16, seed, &s->ck, err, err_len) != 0)
            return -1;
        return engine_new(s->ck, p, &s->eng, err, err_len);
    }
    /* engine_new_with_backend takes the KV pool from the backend: size it here the way
     * engine_new would (its defaults, engine.h). */
    int max_seqs = p->max_seqs ? p->max_seqs : ENGINE_DEFAULT_MAX_SEQS;
    int max_batch = p->max_batch_tokens;
    if (!max_batch)
        max_batch = 2 * max_seqs > ENGINE_DEFAULT_MAX_BATCH_TOKENS
                        ? 2 * max_seqs : ENGINE_DEFAULT_MAX_BATCH_TOKENS;
    struct backend_params bp = {
        .kv_tokens = p->kv_tokens ? p->kv_tokens : ENGINE_DEFAULT_KV_TOKENS,
        .max_batch_tokens = max_batch,
        .max_batch_seqs = max_seqs,
        .n_threads = p->n_threads,
        .device = p->device,
    };
    struct backend *be = NULL;
    if (backend_open_random(c->backend, mc, seed, &bp, &be, err, err_len) != 0)
        return -1;
    return engine_new_with_backend(&be, p, &s->eng, err, err_len);
}

static int serve_open_model(struct serve *s)
{
    char err[SERVE_ERR_LEN], path[PATH_MAX];
    const struct itsw_config *c = &s->cfg;
    const char *tok_dir = c->tokenizer_dir && *c->tokenizer_dir ? c->tokenizer_dir : c->model_dir;
    if ((size_t)snprintf(path, sizeof path, "%s/tokenizer.json", tok_dir) >= sizeof path) {
        serve_log(SERVE_LOG_ERROR, "tokenizer: path too long");
        return -1;
    }
    if (tokenizer_open(path, &s->tok, err, sizeof err) != 0 ||
        chat_format_for_model(tok_dir, c->chat_format, &s->format, err, sizeof err) != 0) {
        serve_log(SERVE_LOG_ERROR, "%s", err);
        return -1;
    }
    const struct model_config *mc = &s->random_cfg;
    if (c->random_shape) {
        if (model_shape_by_name(c->random_shape, &s->random_cfg) != 0) { /* config checked it */
            serve_log(SERVE_LOG_ERROR, "model: unknown shape '%s'", c->random_shape);
            return -1;
        }
    } else {
        if (checkpoint_open(c->model_dir, &s->ck, err, sizeof err) != 0) {
            serve_log(SERVE_LOG_ERROR, "%s", err);
            return -1;
        }
        mc = checkpoint_config(s->ck);
    }
    /* An id past the model's vocabulary would only fail later, job by job. */
    if (tokenizer_vocab_size(s->tok) > mc->vocab_size) {
        serve_log(SERVE_LOG_ERROR, "tokenizer %s has ids up to %d, past the vocabulary of model "
                  "%s (vocab_size %d): use the model's own tokenizer", path,
                  tokenizer_vocab_size(s->tok) - 1, c->model_dir, mc->vocab_size);
        return -1;
    }
    struct engine_params p = {
        .backend = c->backend,
        .max_seqs = c->max_seqs,
        .kv_tokens = c->kv_tokens,
        .max_batch_tokens = c->max_batch_tokens,
        .n_threads = c->threads,
        .device = c->device,
    };
    uint64_t t0 = serve_now_ms();
    int rc = c->random_shape ? serve_open_random(s, mc, &p, err, sizeof err)
                             : engine_new(s->ck, &p, &s->eng, err, sizeof err);
    if (rc != 0) {
        serve_log(SERVE_LOG_ERROR, "%s", err);
        return -1;
    }
    if (c->random_shape)
        serve_log(SERVE_LOG_INFO, "model %s: random weights (seed %d) on %s in %llu ms",
                  c->random_shape, c->random_seed, engine_backend_name(s->eng),
                  (unsigned long long)(serve_now_ms() - t0));
    engine_set_token_callback(s->eng, serve_on_token, s);
    return 0;
}

int itsw_serve_main(int argc, char **argv)
{
    struct serve s;
    memset(&s, 0, sizeof s);
    char err[SERVE_ERR_LEN];
    int rc = itsw_config_from_args(argc, argv, &s.cfg, err, sizeof err);
    if (rc == 1) {
        fputs(itsw_config_usage(), stdout);
        itsw_config_deinit(&s.cfg);
        return 0;
    }
    if (rc != 0) {
        fprintf(stderr, "itsw serve: %s\n", err);
        itsw_config_deinit(&s.cfg);
        return 2;
    }
    serve_log_level = s.cfg.log_level;
    int exit_code = 1;
    if (serve_open_model(&s) != 0)
        goto out;

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = serve_on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    s.zctx = zmq_ctx_new();
    if (!s.zctx || serve_connect(&s) != 0)
        goto out;

    while (!serve_stop) {
        uint64_t now = serve_now_ms();
        long wait_ms = 0;
        if (!engine_pending(s.eng))
            wait_ms = s.next_beat_ms > now ? (long)(s.next_beat_ms - now) : 0;
        zmq_pollitem_t items[2] = {{.socket = s.sock, .events = ZMQ_POLLIN},
                                   {.socket = s.mon, .events = ZMQ_POLLIN}};
        if (zmq_poll(items, s.mon ? 2 : 1, wait_ms) < 0 && errno != EINTR) {
            serve_log(SERVE_LOG_ERROR, "zmq_poll: %s", zmq_strerror(errno));
            break;
        }
        serve_read_monitor(&s);
        if (serve_drain(&s) != 0) {
            serve_drop_all_jobs(&s);
            /* Back off one interval so that an itsd that keeps refusing us is not flooded
             * with registrations; a signal cuts the wait short. */
            usleep((useconds_t)s.cfg.heartbeat_ms * 1000u);
            if (serve_stop)
                break;
            if (serve_connect(&s) != 0)
                goto out;
            continue;
        }

        if (engine_pending(s.eng)) {
            s.step_no++;
            if (engine_step(s.eng, err, sizeof err) < 0)
                serve_log(SERVE_LOG_ERROR, "engine step: %s", err);
            serve_flush_samples(&s);
        }
        struct engine_result *r = NULL;
        while (engine_next_result(s.eng, &r) == 1) {
            serve_send_result(&s, r);
            engine_result_free(&r);
        }

        now = serve_now_ms();
        if (now >= s.next_beat_ms) {
            serve_send_heartbeat(&s);
            s.next_beat_ms = now + (uint64_t)s.cfg.heartbeat_ms;
        }
        if (now - s.last_heard_ms > (uint64_t)s.cfg.heartbeat_ms * (uint64_t)s.cfg.liveness) {
            serve_log(SERVE_LOG_WARN, "itsd silent for %llu ms: dropping %zu job(s), "
                      "reconnecting", (unsigned long long)(now - s.last_heard_ms), s.n_jobs);
            serve_drop_all_jobs(&s);
            if (serve_connect(&s) != 0)
                goto out;
        }
    }
    if (!serve_stop)
        goto out;
    /* Clean shutdown: tell itsd so it re-dispatches our jobs at once. */
    {
        struct proto_msg m = {.type = PROTO_DISCONNECT};
        m.disconnect.reason = "worker shutting down";
        serve_send(&s, &m);
        /* Give the goodbye a moment to leave (the socket otherwise lingers 0 ms), so that
         * itsd re-dispatches our jobs now rather than after liveness intervals. */
        int linger_ms = 500;
        zmq_setsockopt(s.sock, ZMQ_LINGER, &linger_ms, sizeof linger_ms);
    }
    serve_log(SERVE_LOG_INFO, "shut down");
    exit_code = 0;
out:
    serve_close(&s);
    return exit_code;
}
