/* test_client.c — libits and itsctl against a FAKE itsd: a ZeroMQ ROUTER in a thread of the
 * test that speaks the frontend protocol (accepted, progress, result, status_reply, errors),
 * or misbehaves on purpose (busy, silence, garbage, late replies). No daemon, model or worker
 * is needed, so these tests are fast and deterministic.
 *
 * The fake records what it received (under a mutex) so the tests can check what libits put on
 * the wire; the test thread never touches the fake's socket.
 */
#include <criterion/criterion.h>
#include <jansson.h>
#include <msgpack.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "its.h"
#include "proto.h"
#include "testutil.h"

TestSuite(client, .timeout = 30);

/* ---- the fake daemon ------------------------------------------------------------------------ */

enum fake_mode {
    FAKE_NORMAL,       /* accepted, progress (if asked), result */
    FAKE_HOLD,         /* accepted, progress (if asked), then nothing until cancelled */
    FAKE_BUSY,         /* submit -> error busy */
    FAKE_SILENT,       /* never answers */
    FAKE_GARBAGE,      /* submit -> bytes that are not msgpack; status -> a bad field;
                          get -> a 2-frame message; cancel -> an error with an unknown key */
    FAKE_LATE_ACCEPT,  /* accepted only after FAKE_LATE_MS, then nothing */
    FAKE_PARTIAL,      /* like NORMAL with partial = true */
};

#define FAKE_LATE_MS 500
#define FAKE_IDS 64

struct fake {
    void *ctx, *sock;
    char endpoint[256];
    pthread_t thread;
    atomic_int mode;
    atomic_bool stop;
    pthread_mutex_t mu;
    /* under mu: what came in */
    int n_submits, n_cancels, n_gets, n_status, n_errors, n_undecodable, n_failures;
    struct proto_msg last_submit; /* decoded, owned */
    char last_cancel[PROTO_MAX_ID_BYTES + 1];
    char last_error[PROTO_MAX_ERROR_BYTES + 1];
    /* the fake's own state (thread only) */
    int next_id;
    char answers[FAKE_IDS][512]; /* answer of req-N */
    uint64_t tags[FAKE_IDS];     /* the submit tag of req-N (its owner's tag space) */
};

static void fake_note_failure(struct fake *f)
{
    pthread_mutex_lock(&f->mu);
    f->n_failures++;
    pthread_mutex_unlock(&f->mu);
}

static void fake_send_raw(struct fake *f, const void *ident, size_t ident_len, const void *buf,
                          size_t len)
{
    if (zmq_send(f->sock, ident, ident_len, ZMQ_SNDMORE) < 0 || zmq_send(f->sock, buf, len, 0) < 0)
        fake_note_failure(f);
}

static void fake_send(struct fake *f, const void *ident, size_t ident_len,
                      const struct proto_msg *m)
{
    void *buf = NULL;
    size_t len = 0;
    char err[256];
    if (proto_encode(m, &buf, &len, err, sizeof err) != 0) {
        fprintf(stderr, "fake: encode %s: %s\n", proto_type_name(m->type), err);
        fake_note_failure(f);
        return;
    }
    fake_send_raw(f, ident, ident_len, buf, len);
    free(buf);
}

static void fake_send_error(struct fake *f, const void *ident, size_t ident_len, bool has_tag,
                            uint64_t tag, const char *id, enum proto_err code, const char *text)
{
    struct proto_msg m = {.type = PROTO_ERROR};
    m.error.has_tag = has_tag;
    m.error.tag = tag;
    m.error.id = (char *)id;
    m.error.code = code;
    m.error.message = (char *)text;
    fake_send(f, ident, ident_len, &m);
}

/* The result the fake returns for request `id`: two candidates, the first edited and scored,
 * the second unedited and unscored; fixed timings and usage. */
static void fake_send_result(struct fake *f, const void *ident, size_t ident_len, const char *id,
                             const char *answer, bool partial)
{
    static char *feedbacks0[] = {"The response is mostly helpful.",
                                 "The response is partially helpful."};
    struct proto_candidate cands[2] = {
        {.draft_index = 0, .draft = "draft zero", .feedbacks = feedbacks0, .n_feedbacks = 2,
         .edit = (char *)answer, .score = 1.5, .has_score = true},
        {.draft_index = 1, .draft = "draft one", .feedbacks = NULL, .n_feedbacks = 0,
         .edit = NULL, .has_score = false},
    };
    struct proto_msg m = {.type = PROTO_RESULT};
    struct proto_result *r = &m.result;
    r->id = (char *)id;
    r->answer = (char *)answer;
    r->score = 1.5;
    r->has_score = true;
    r->best = 0;
    r->has_best = true;
    r->partial = partial;
    r->candidates = cands;
    r->n_candidates = 2;
    r->timings = (struct proto_timings){10, 20, 30, 40, 50};
    r->usage.instruct = (struct proto_usage){11, 12};
    r->usage.feedback = (struct proto_usage){21, 22};
    r->usage.edit = (struct proto_usage){31, 32};
    r->usage.select = (struct proto_usage){41, 0};
    fake_send(f, ident, ident_len, &m);
}

static void fake_send_progress(struct fake *f, const void *ident, size_t ident_len,
                               const char *id)
{
    struct proto_msg m = {.type = PROTO_PROGRESS};
    m.progress.id = (char *)id;
    m.progress.drafts = (struct proto_stage){1, 2};
    m.progress.feedbacks = (struct proto_stage){0, 4};
    m.progress.edits = (struct proto_stage){0, 0};
    m.progress.scores = (struct proto_stage){0, 0};
    m.progress.elapsed_ms = 123;
    fake_send(f, ident, ident_len, &m);
}

/* A request id the fake handed out ("req-N"), or -1. */
static int fake_known(const struct fake *f, const char *id)
{
    int n;
    char tail;
    if (sscanf(id, "req-%d%c", &n, &tail) != 1 || n < 0 || n >= f->next_id || n >= FAKE_IDS)
        return -1;
    return n;
}

static void fake_on_submit(struct fake *f, const void *ident, size_t ident_len,
                           struct proto_msg *m, int mode)
{
    const struct proto_submit *s = &m->submit;
    if (mode == FAKE_BUSY) {
        fake_send_error(f, ident, ident_len, true, s->tag, NULL, PROTO_ERR_BUSY,
                        "queue full (2 requests waiting)");
        return;
    }
    if (mode == FAKE_GARBAGE) {
        static const unsigned char junk[] = {0xc1, 'j', 'u', 'n', 'k'};
        fake_send_raw(f, ident, ident_len, junk, sizeof junk);
        return;
    }
    if (mode == FAKE_LATE_ACCEPT)
        usleep(FAKE_LATE_MS * 1000);
    int n = f->next_id++;
    char id[32];
    snprintf(id, sizeof id, "req-%d", n);
    if (n < FAKE_IDS) {
        snprintf(f->answers[n], sizeof f->answers[n], "echo: %s",
                 s->messages[s->n_messages - 1].content);
        f->tags[n] = s->tag;
    }
    struct proto_msg a = {.type = PROTO_ACCEPTED};
    a.accepted.tag = s->tag;
    a.accepted.id = id;
    fake_send(f, ident, ident_len, &a);
    if (mode == FAKE_LATE_ACCEPT)
        return;
    if (s->has_progress && s->progress)
        fake_send_progress(f, ident, ident_len, id);
    if (mode == FAKE_HOLD)
        return;
    fake_send_result(f, ident, ident_len, id, n < FAKE_IDS ? f->answers[n] : "echo",
                     mode == FAKE_PARTIAL);
}

/* A status_reply whose queue_depth is a string: valid msgpack, invalid message. */
static void fake_send_bad_status(struct fake *f, const void *ident, size_t ident_len,
                                 uint64_t tag)
{
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 4);
    msgpack_pack_str_with_body(&pk, "v", 1);
    msgpack_pack_uint32(&pk, PROTO_VERSION);
    msgpack_pack_str_with_body(&pk, "type", 4);
    msgpack_pack_str_with_body(&pk, "status_reply", 12);
    msgpack_pack_str_with_body(&pk, "tag", 3);
    msgpack_pack_uint64(&pk, tag);
    msgpack_pack_str_with_body(&pk, "queue_depth", 11);
    msgpack_pack_str_with_body(&pk, "deep", 4);
    fake_send_raw(f, ident, ident_len, sb.data, sb.size);
    msgpack_sbuffer_destroy(&sb);
}

static void fake_on_status(struct fake *f, const void *ident, size_t ident_len,
                           const struct proto_status *st, int mode)
{
    if (mode == FAKE_GARBAGE) {
        fake_send_bad_status(f, ident, ident_len, st->tag);
        return;
    }
    struct proto_worker_info w[2] = {
        {.id = "w-instruct-0", .role = PROTO_ROLE_INSTRUCT, .model = "tiny-llama31",
         .backend = "cpu", .state = PROTO_WORKER_READY,
         .capacity = {.max_seqs = 8, .max_ctx = 4096, .kv_tokens = 65536}, .jobs = 1,
         .load = {.running = 3, .queued = 1, .kv_used = 900}, .has_load = true},
        {.id = "w-select-0", .role = PROTO_ROLE_SELECT, .model = "tiny-reward",
         .backend = "cuda", .state = PROTO_WORKER_BUSY,
         .capacity = {.max_seqs = 2, .max_ctx = 2048, .kv_tokens = 4096}, .jobs = 2,
         .has_load = false},
    };
    struct proto_msg m = {.type = PROTO_STATUS_REPLY};
    struct proto_status_reply *r = &m.status_reply;
    r->tag = st->tag;
    r->has_tag = st->has_tag;
    r->roles = (struct proto_role_counts){1, 0, 0, 1};
    r->queue_depth = 5;
    r->in_flight = 7;
    r->workers = w;
    r->n_workers = 2;
    fake_send(f, ident, ident_len, &m);
}

static void fake_on_get(struct fake *f, const void *ident, size_t ident_len, const char *id,
                        int mode)
{
    if (mode == FAKE_GARBAGE) {
        if (zmq_send(f->sock, ident, ident_len, ZMQ_SNDMORE) < 0 ||
            zmq_send(f->sock, "a", 1, ZMQ_SNDMORE) < 0 || zmq_send(f->sock, "b", 1, 0) < 0)
            fake_note_failure(f);
        return;
    }
    if (strcmp(id, "running-1") == 0) {
        fake_send_progress(f, ident, ident_len, id);
        return;
    }
    int n = fake_known(f, id);
    if (n < 0) {
        fake_send_error(f, ident, ident_len, false, 0, id, PROTO_ERR_NOT_FOUND,
                        "no request with this id");
        return;
    }
    fake_send_result(f, ident, ident_len, id, f->answers[n], false);
}

static void fake_on_cancel(struct fake *f, const void *ident, size_t ident_len, const char *id,
                           int mode)
{
    if (mode == FAKE_GARBAGE) {
        /* An error with a key the protocol does not have: strict decoders reject it. */
        msgpack_sbuffer sb;
        msgpack_sbuffer_init(&sb);
        msgpack_packer pk;
        msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
        msgpack_pack_map(&pk, 5);
        msgpack_pack_str_with_body(&pk, "v", 1);
        msgpack_pack_uint32(&pk, PROTO_VERSION);
        msgpack_pack_str_with_body(&pk, "type", 4);
        msgpack_pack_str_with_body(&pk, "error", 5);
        msgpack_pack_str_with_body(&pk, "code", 4);
        msgpack_pack_str_with_body(&pk, "cancelled", 9);
        msgpack_pack_str_with_body(&pk, "message", 7);
        msgpack_pack_str_with_body(&pk, "", 0);
        msgpack_pack_str_with_body(&pk, "bogus", 5);
        msgpack_pack_true(&pk);
        fake_send_raw(f, ident, ident_len, sb.data, sb.size);
        msgpack_sbuffer_destroy(&sb);
        return;
    }
    if (mode == FAKE_SILENT || mode == FAKE_LATE_ACCEPT)
        return;
    int n = fake_known(f, id);
    if (n < 0) {
        fake_send_error(f, ident, ident_len, false, 0, id, PROTO_ERR_NOT_FOUND,
                        "no request with this id");
        return;
    }
    /* Like itsd: the confirmation carries the request's id AND its owner's submit tag, which
     * means nothing in the canceller's tag space when the canceller is another client. */
    fake_send_error(f, ident, ident_len, true, f->tags[n], id, PROTO_ERR_CANCELLED,
                    "cancelled by the client");
}

static void fake_on_frame(struct fake *f, const void *ident, size_t ident_len, const void *buf,
                          size_t len)
{
    struct proto_msg m;
    char err[512];
    int mode = atomic_load(&f->mode);
    if (proto_decode(buf, len, PROTO_FROM_CLIENT, &m, err, sizeof err) != 0) {
        pthread_mutex_lock(&f->mu);
        f->n_undecodable++;
        pthread_mutex_unlock(&f->mu);
        return;
    }
    pthread_mutex_lock(&f->mu);
    switch (m.type) {
    case PROTO_SUBMIT: f->n_submits++; break;
    case PROTO_CANCEL:
        f->n_cancels++;
        snprintf(f->last_cancel, sizeof f->last_cancel, "%s", m.cancel.id);
        break;
    case PROTO_GET: f->n_gets++; break;
    case PROTO_STATUS: f->n_status++; break;
    case PROTO_ERROR:
        f->n_errors++;
        snprintf(f->last_error, sizeof f->last_error, "%s", m.error.message);
        break;
    default: break;
    }
    /* Recorded before answering: a test reads it as soon as its reply arrives. Only this
     * thread replaces it, so reading it here without the lock is safe. */
    struct proto_msg *rec = &m;
    if (m.type == PROTO_SUBMIT) {
        proto_msg_free(&f->last_submit);
        f->last_submit = m; /* keeps the decoded strings */
        memset(&m, 0, sizeof m);
        rec = &f->last_submit;
    }
    pthread_mutex_unlock(&f->mu);
    if (mode != FAKE_SILENT) {
        switch (rec->type) {
        case PROTO_SUBMIT: fake_on_submit(f, ident, ident_len, rec, mode); break;
        case PROTO_STATUS: fake_on_status(f, ident, ident_len, &rec->status, mode); break;
        case PROTO_GET: fake_on_get(f, ident, ident_len, rec->get.id, mode); break;
        case PROTO_CANCEL: fake_on_cancel(f, ident, ident_len, rec->cancel.id, mode); break;
        default: break;
        }
    }
    proto_msg_free(&m);
}

static void *fake_main(void *arg)
{
    struct fake *f = arg;
    while (!atomic_load(&f->stop)) {
        zmq_pollitem_t it = {.socket = f->sock, .events = ZMQ_POLLIN};
        if (zmq_poll(&it, 1, 20) <= 0)
            continue;
        for (;;) {
            zmq_msg_t ident, body;
            zmq_msg_init(&ident);
            if (zmq_msg_recv(&ident, f->sock, ZMQ_DONTWAIT) < 0) {
                zmq_msg_close(&ident);
                break;
            }
            zmq_msg_init(&body);
            if (!zmq_msg_more(&ident) || zmq_msg_recv(&body, f->sock, 0) < 0) {
                fake_note_failure(f);
            } else {
                while (zmq_msg_more(&body)) { /* a client never sends more: drain, count */
                    fake_note_failure(f);
                    zmq_msg_close(&body);
                    zmq_msg_init(&body);
                    zmq_msg_recv(&body, f->sock, 0);
                }
                fake_on_frame(f, zmq_msg_data(&ident), zmq_msg_size(&ident),
                              zmq_msg_data(&body), zmq_msg_size(&body));
            }
            zmq_msg_close(&body);
            zmq_msg_close(&ident);
        }
    }
    return NULL;
}

static struct fake *fake_start(enum fake_mode mode)
{
    struct fake *f = calloc(1, sizeof *f);
    cr_assert_not_null(f);
    pthread_mutex_init(&f->mu, NULL);
    atomic_init(&f->mode, mode);
    atomic_init(&f->stop, false);
    f->ctx = zmq_ctx_new();
    f->sock = zmq_socket(f->ctx, ZMQ_ROUTER);
    cr_assert_not_null(f->sock);
    int linger = 0, mandatory = 1;
    zmq_setsockopt(f->sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(f->sock, ZMQ_ROUTER_MANDATORY, &mandatory, sizeof mandatory);
    cr_assert_eq(zmq_bind(f->sock, "tcp://127.0.0.1:*"), 0, "bind: %s", zmq_strerror(errno));
    size_t len = sizeof f->endpoint;
    cr_assert_eq(zmq_getsockopt(f->sock, ZMQ_LAST_ENDPOINT, f->endpoint, &len), 0);
    cr_assert_eq(pthread_create(&f->thread, NULL, fake_main, f), 0);
    return f;
}

static void fake_stop(struct fake **fp)
{
    struct fake *f = *fp;
    atomic_store(&f->stop, true);
    pthread_join(f->thread, NULL);
    zmq_close(f->sock);
    zmq_ctx_term(f->ctx);
    int failures = f->n_failures;
    proto_msg_free(&f->last_submit);
    pthread_mutex_destroy(&f->mu);
    free(f);
    *fp = NULL;
    cr_expect_eq(failures, 0, "the fake daemon itself failed %d times", failures);
}

/* Reads an int counter of the fake under its lock. */
static int fake_count(struct fake *f, const int *field)
{
    pthread_mutex_lock(&f->mu);
    int v = *field;
    pthread_mutex_unlock(&f->mu);
    return v;
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits up to `ms` for the fake's counter to reach `want`. */
static bool fake_wait_count(struct fake *f, const int *field, int want, int ms)
{
    int64_t end = now_ms() + ms;
    while (fake_count(f, field) < want) {
        if (now_ms() > end)
            return false;
        usleep(5000);
    }
    return true;
}

static its_client_t *client_for(const struct fake *f)
{
    its_client_t *c = NULL;
    char err[256];
    int rc = its_client_new(f ? f->endpoint : NULL, &c, err, sizeof err);
    cr_assert_eq(rc, 0, "its_client_new: %s", err);
    return c;
}

/* ---- synchronous calls ---------------------------------------------------------------------- */

Test(client, sync_submit_returns_every_result_field_and_sends_the_options)
{
    struct fake *f = fake_start(FAKE_NORMAL);
    its_client_t *c = client_for(f);
    struct its_options o = {0};
    o.drafts = 3, o.has_drafts = true;
    o.feedbacks = 2, o.has_feedbacks = true;
    o.edits = 1, o.has_edits = true;
    o.feedbacks_per_edit = 1, o.has_feedbacks_per_edit = true;
    o.include_drafts = true, o.has_include_drafts = true;
    o.deadline_ms = 5000, o.has_deadline_ms = true;
    o.seed = 42, o.has_seed = true;
    o.instruct.temperature = 0.5, o.instruct.has_temperature = true;
    o.edit.max_tokens = 77, o.edit.has_max_tokens = true;

    struct its_result *r = NULL;
    int rc = its_submit(c, "What is 2+2?", &o, 5000, &r);
    cr_assert_eq(rc, 0, "its_submit: %s", its_client_errstr(c));
    cr_assert_not_null(r);
    cr_expect_str_eq(r->id, "req-0");
    cr_expect_str_eq(r->answer, "echo: What is 2+2?");
    cr_expect(r->has_score);
    cr_expect_float_eq(r->score, 1.5, 1e-12);
    cr_expect(r->has_best);
    cr_expect_eq(r->best, 0);
    cr_expect_not(r->partial);
    cr_assert_eq(r->n_candidates, 2);
    cr_expect_eq(r->candidates[0].draft_index, 0);
    cr_expect_str_eq(r->candidates[0].draft, "draft zero");
    cr_assert_eq(r->candidates[0].n_feedbacks, 2);
    cr_expect_str_eq(r->candidates[0].feedbacks[1], "The response is partially helpful.");
    cr_expect_str_eq(r->candidates[0].edit, "echo: What is 2+2?");
    cr_expect(r->candidates[0].has_score);
    cr_expect_eq(r->candidates[1].draft_index, 1);
    cr_expect_null(r->candidates[1].edit, "an unedited candidate has no edit");
    cr_expect_not(r->candidates[1].has_score);
    cr_expect_eq(r->candidates[1].n_feedbacks, 0);
    cr_expect_eq(r->timings.drafts_ms, 10);
    cr_expect_eq(r->timings.scores_ms, 40);
    cr_expect_eq(r->timings.total_ms, 50);
    cr_expect_eq(r->usage[ITS_ROLE_INSTRUCT].prompt_tokens, 11);
    cr_expect_eq(r->usage[ITS_ROLE_FEEDBACK].completion_tokens, 22);
    cr_expect_eq(r->usage[ITS_ROLE_EDIT].prompt_tokens, 31);
    cr_expect_eq(r->usage[ITS_ROLE_SELECT].prompt_tokens, 41);
    cr_expect_eq(its_client_err(c), 0);
    cr_expect_str_eq(its_client_errstr(c), "");
    its_result_free(&r);
    cr_expect_null(r, "its_result_free clears the pointer");

    /* What the daemon saw. */
    pthread_mutex_lock(&f->mu);
    const struct proto_submit *s = &f->last_submit.submit;
    cr_expect_eq(f->last_submit.type, PROTO_SUBMIT);
    cr_expect_eq(s->n_messages, 1);
    cr_expect_eq(s->messages[0].role, PROTO_CHAT_USER);
    cr_expect_str_eq(s->messages[0].content, "What is 2+2?");
    cr_expect(s->has_drafts && s->drafts == 3);
    cr_expect(s->has_feedbacks && s->feedbacks == 2);
    cr_expect(s->has_edits && s->edits == 1);
    cr_expect(s->has_feedbacks_per_edit && s->feedbacks_per_edit == 1);
    cr_expect(s->has_include_drafts && s->include_drafts);
    cr_expect(s->has_deadline_ms && s->deadline_ms == 5000);
    cr_expect(s->has_seed && s->seed == 42);
    cr_expect(s->has_sampling && s->sampling.has_instruct && s->sampling.has_edit);
    cr_expect_not(s->sampling.has_feedback, "untouched roles are left to the daemon");
    cr_expect(s->sampling.instruct.has_temperature && s->sampling.instruct.temperature == 0.5);
    cr_expect_not(s->sampling.instruct.has_top_p);
    cr_expect(s->sampling.edit.has_max_tokens && s->sampling.edit.max_tokens == 77);
    cr_expect(s->has_progress && !s->progress, "a blocking submit asks for no progress");
    pthread_mutex_unlock(&f->mu);

    its_client_destroy(&c);
    cr_expect_null(c);
    fake_stop(&f);
}

Test(client, zeroed_options_leave_every_setting_to_the_daemon)
{
    struct fake *f = fake_start(FAKE_NORMAL);
    its_client_t *c = client_for(f);
    struct its_message conv[] = {
        {ITS_CHAT_SYSTEM, "Be brief."},
        {ITS_CHAT_USER, "Hi"},
        {ITS_CHAT_ASSISTANT, "Hello!"},
        {ITS_CHAT_USER, "Name a prime."},
    };
    struct its_options o = {0};
    struct its_result *r = NULL;
    cr_assert_eq(its_submit_messages(c, conv, 4, &o, 5000, &r), 0, "%s", its_client_errstr(c));
    cr_expect_str_eq(r->answer, "echo: Name a prime.");
    its_result_free(&r);
    cr_assert_eq(its_submit_messages(c, conv, 2, NULL, 5000, &r), 0, "NULL options");
    cr_expect_str_eq(r->answer, "echo: Hi");
    its_result_free(&r);

    pthread_mutex_lock(&f->mu);
    const struct proto_submit *s = &f->last_submit.submit;
    cr_expect_eq(s->n_messages, 2);
    cr_expect_eq(s->messages[0].role, PROTO_CHAT_SYSTEM);
    cr_expect_str_eq(s->messages[0].content, "Be brief.");
    cr_expect_not(s->has_drafts || s->has_feedbacks || s->has_edits ||
                  s->has_feedbacks_per_edit || s->has_sampling || s->has_include_drafts ||
                  s->has_deadline_ms || s->has_seed);
    cr_expect_eq(f->n_submits, 2);
    pthread_mutex_unlock(&f->mu);
    its_client_destroy(&c);
    fake_stop(&f);
}

Test(client, invalid_input_is_refused_before_sending_and_names_the_field)
{
    struct fake *f = fake_start(FAKE_NORMAL);
    its_client_t *c = client_for(f);
    struct its_result *r = NULL;
    struct its_options o = {0};
    o.drafts = 0, o.has_drafts = true;
    cr_expect_eq(its_submit(c, "q", &o, 2000, &r), ITS_ERR_INVALID);
    cr_expect(strstr(its_client_errstr(c), "drafts"), "errstr: %s", its_client_errstr(c));
    cr_expect_null(r);

    o = (struct its_options){0};
    o.feedbacks_per_edit = 4, o.has_feedbacks_per_edit = true;
    cr_expect_eq(its_submit(c, "q", &o, 2000, &r), ITS_ERR_INVALID);
    cr_expect(strstr(its_client_errstr(c), "feedbacks_per_edit"), "errstr: %s",
              its_client_errstr(c));

    o = (struct its_options){0};
    o.feedback.top_p = 1.5, o.feedback.has_top_p = true;
    cr_expect_eq(its_submit(c, "q", &o, 2000, &r), ITS_ERR_INVALID);
    cr_expect(strstr(its_client_errstr(c), "feedback.top_p"), "errstr: %s",
              its_client_errstr(c));

    cr_expect_eq(its_submit(c, "bad \xff utf-8", NULL, 2000, &r), ITS_ERR_INVALID);
    cr_expect(strstr(its_client_errstr(c), "content"), "errstr: %s", its_client_errstr(c));

    struct its_message m = {ITS_CHAT_USER, NULL};
    cr_expect_eq(its_submit_messages(c, &m, 1, NULL, 2000, &r), ITS_ERR_INVALID);
    cr_expect(strstr(its_client_errstr(c), "messages[0].content"), "errstr: %s",
              its_client_errstr(c));
    cr_expect_eq(its_submit_messages(c, &m, 0, NULL, 2000, &r), ITS_ERR_INVALID);
    cr_expect_eq(its_client_err(c), ITS_ERR_INVALID);

    uint64_t tag = 99;
    cr_expect_eq(its_submit_async(c, NULL, 0, NULL, &tag), ITS_ERR_INVALID);
    cr_expect_eq(tag, 0);
    cr_expect_eq(its_get(c, "", 100, &r, NULL), ITS_ERR_INVALID);
    char long_id[100];
    memset(long_id, 'x', sizeof long_id - 1);
    long_id[sizeof long_id - 1] = '\0';
    cr_expect_eq(its_cancel(c, long_id, 100), ITS_ERR_INVALID);

    /* Nothing invalid reached the daemon; a valid call still works afterwards. */
    cr_assert_eq(its_submit(c, "fine", NULL, 5000, &r), 0, "%s", its_client_errstr(c));
    its_result_free(&r);
    cr_expect_eq(fake_count(f, &f->n_submits), 1);
    its_client_destroy(&c);
    fake_stop(&f);

    char err[256];
    cr_expect_eq(its_client_new("nonsense://x", &c, err, sizeof err), ITS_ERR_INVALID);
    cr_expect_null(c);
    cr_expect(strstr(err, "nonsense://x"), "err: %s", err);
}

Test(client, endpoint_defaults_to_env_then_builtin)
{
    its_client_t *c = NULL;
    unsetenv("ITS_ENDPOINT");
    cr_assert_eq(its_client_new(NULL, &c, NULL, 0), 0);
    cr_expect_str_eq(its_client_endpoint(c), ITS_DEFAULT_ENDPOINT);
    its_client_destroy(&c);
    setenv("ITS_ENDPOINT", "tcp://127.0.0.1:7799", 1);
    cr_assert_eq(its_client_new(NULL, &c, NULL, 0), 0);
    cr_expect_str_eq(its_client_endpoint(c), "tcp://127.0.0.1:7799");
    its_client_destroy(&c);
    its_client_destroy(&c); /* NULL-safe */
    unsetenv("ITS_ENDPOINT");
}

Test(client, daemon_error_names_its_code_sync_and_async)
{
    struct fake *f = fake_start(FAKE_BUSY);
    its_client_t *c = client_for(f);
    struct its_result *r = NULL;
    cr_expect_eq(its_submit(c, "q", NULL, 5000, &r), ITS_ERR_DAEMON);
    cr_expect_null(r);
    cr_expect_str_eq(its_client_daemon_code(c), "busy");
    cr_expect(strstr(its_client_errstr(c), "busy"), "errstr: %s", its_client_errstr(c));
    cr_expect(strstr(its_client_errstr(c), "queue full (2 requests waiting)"), "errstr: %s",
              its_client_errstr(c));

    struct its_message m = {ITS_CHAT_USER, "q"};
    uint64_t tag = 0;
    cr_assert_eq(its_submit_async(c, &m, 1, NULL, &tag), 0);
    cr_expect_neq(tag, 0);
    struct its_event *ev = NULL;
    cr_assert_eq(its_next_event(c, &ev, 5000), 1, "%s", its_client_errstr(c));
    cr_expect_eq(ev->type, ITS_EVENT_ERROR);
    cr_expect_eq(ev->tag, tag);
    cr_expect_eq(ev->err, ITS_ERR_DAEMON);
    cr_expect_str_eq(ev->code, "busy");
    cr_expect_str_eq(ev->message, "queue full (2 requests waiting)");
    cr_expect_str_eq(ev->id, "", "never accepted, so no id");
    its_event_free(&ev);
    cr_expect_null(ev);
    cr_expect_eq(its_next_event(c, &ev, 100), 0, "the error was the request's last event");
    its_client_destroy(&c);
    fake_stop(&f);
}

Test(client, silent_daemon_times_out_with_a_hint)
{
    struct fake *f = fake_start(FAKE_SILENT);
    its_client_t *c = client_for(f);
    struct its_result *r = NULL;
    int64_t t0 = now_ms();
    cr_expect_eq(its_submit(c, "q", NULL, 300, &r), ITS_ERR_TIMEOUT);
    int64_t waited = now_ms() - t0;
    cr_expect_geq(waited, 290, "returned after %lld ms", (long long)waited);
    cr_expect_lt(waited, 3000, "returned after %lld ms", (long long)waited);
    char want[400];
    snprintf(want, sizeof want, "no reply from %s within 300 ms (is itsd running?)", f->endpoint);
    cr_expect_str_eq(its_client_errstr(c), want);
    struct its_status *s = NULL;
    cr_expect_eq(its_status(c, 200, &s), ITS_ERR_TIMEOUT);
    cr_expect_null(s);
    cr_expect(fake_wait_count(f, &f->n_status, 1, 2000), "the status request was sent");
    its_client_destroy(&c);
    fake_stop(&f);
}

Test(client, unreachable_daemon_is_a_timeout_not_a_hang)
{
    const char *dir = tu_tmpdir();
    char ep[4200];
    snprintf(ep, sizeof ep, "ipc://%s/nobody-listens", dir);
    its_client_t *c = NULL;
    cr_assert_eq(its_client_new(ep, &c, NULL, 0), 0, "ZeroMQ connects lazily: no error yet");
    struct its_status *s = NULL;
    cr_expect_eq(its_status(c, 200, &s), ITS_ERR_TIMEOUT);
    cr_expect(strstr(its_client_errstr(c), "is itsd running?"), "errstr: %s",
              its_client_errstr(c));
    cr_expect(strstr(its_client_errstr(c), ep), "errstr names the endpoint: %s",
              its_client_errstr(c));
    int64_t t0 = now_ms();
    its_client_destroy(&c); /* must not linger on the queued message */
    cr_expect_lt(now_ms() - t0, 1000);
    tu_rmtree(dir);
}

Test(client, timeout_after_acceptance_cancels_the_request)
{
    struct fake *f = fake_start(FAKE_HOLD);
    its_client_t *c = client_for(f);
    struct its_result *r = NULL;
    cr_expect_eq(its_submit(c, "q", NULL, 300, &r), ITS_ERR_TIMEOUT);
    cr_expect(strstr(its_client_errstr(c), "req-0"), "errstr: %s", its_client_errstr(c));
    cr_expect(fake_wait_count(f, &f->n_cancels, 1, 2000), "a cancel reached the daemon");
    pthread_mutex_lock(&f->mu);
    cr_expect_str_eq(f->last_cancel, "req-0");
    pthread_mutex_unlock(&f->mu);
    its_client_destroy(&c);
    fake_stop(&f);
}

Test(client, late_acceptance_after_a_timeout_is_cancelled)
{
    struct fake *f = fake_start(FAKE_LATE_ACCEPT);
    its_client_t *c = client_for(f);
    struct its_result *r = NULL;
    cr_expect_eq(its_submit(c, "q", NULL, 150, &r), ITS_ERR_TIMEOUT);
    cr_expect(strstr(its_client_errstr(c), "no reply from"), "errstr: %s",
              its_client_errstr(c));
    /* The acceptance arrives later; reading the socket answers it with a cancel and
     * produces no event (nobody waits for that request any more). */
    struct its_event *ev = NULL;
    int64_t end = now_ms() + 3000;
    while (fake_count(f, &f->n_cancels) == 0 && now_ms() < end) {
        cr_assert_eq(its_next_event(c, &ev, 50), 0, "no event for an abandoned request");
    }
    cr_expect_eq(fake_count(f, &f->n_cancels), 1);
    pthread_mutex_lock(&f->mu);
    cr_expect_str_eq(f->last_cancel, "req-0");
    pthread_mutex_unlock(&f->mu);
    its_client_destroy(&c);
    fake_stop(&f);
}

Test(client, get_returns_result_progress_or_not_found)
{
    struct fake *f = fake_start(FAKE_NORMAL);
    its_client_t *c = client_for(f);
    struct its_result *r = NULL;
    cr_assert_eq(its_submit(c, "first question", NULL, 5000, &r), 0, "%s",
                 its_client_errstr(c));
    char id[ITS_ID_MAX + 1];
    snprintf(id, sizeof id, "%s", r->id);
    its_result_free(&r);

    struct its_progress p;
    cr_assert_eq(its_get(c, id, 5000, &r, &p), 0, "%s", its_client_errstr(c));
    cr_assert_not_null(r, "a finished request returns its result");
    cr_expect_str_eq(r->id, id);
    cr_expect_str_eq(r->answer, "echo: first question");
    its_result_free(&r);

    cr_assert_eq(its_get(c, "running-1", 5000, &r, &p), 0, "%s", its_client_errstr(c));
    cr_expect_null(r, "a running request has no result yet");
    cr_expect_str_eq(p.id, "running-1");
    cr_expect_eq(p.drafts.done, 1);
    cr_expect_eq(p.drafts.total, 2);
    cr_expect_eq(p.feedbacks.total, 4);
    cr_expect_eq(p.elapsed_ms, 123);

    cr_expect_eq(its_get(c, "req-999", 5000, &r, &p), ITS_ERR_DAEMON);
    cr_expect_str_eq(its_client_daemon_code(c), "not_found");
    cr_expect(strstr(its_client_errstr(c), "not_found"), "errstr: %s", its_client_errstr(c));
    cr_expect_null(r);
    its_client_destroy(&c);
    fake_stop(&f);
}

Test(client, status_lists_roles_queue_and_workers)
{
    struct fake *f = fake_start(FAKE_NORMAL);
    its_client_t *c = client_for(f);
    struct its_status *s = NULL;
    cr_assert_eq(its_status(c, 5000, &s), 0, "%s", its_client_errstr(c));
    cr_expect_eq(s->workers_per_role[ITS_ROLE_INSTRUCT], 1);
    cr_expect_eq(s->workers_per_role[ITS_ROLE_FEEDBACK], 0);
    cr_expect_eq(s->workers_per_role[ITS_ROLE_SELECT], 1);
    cr_expect_eq(s->queue_depth, 5);
    cr_expect_eq(s->in_flight, 7);
    cr_assert_eq(s->n_workers, 2);
    const struct its_worker *w = &s->workers[0];
    cr_expect_str_eq(w->id, "w-instruct-0");
    cr_expect_eq(w->role, ITS_ROLE_INSTRUCT);
    cr_expect_str_eq(w->model, "tiny-llama31");
    cr_expect_str_eq(w->backend, "cpu");
    cr_expect_eq(w->state, ITS_WORKER_READY);
    cr_expect_eq(w->max_seqs, 8);
    cr_expect_eq(w->max_ctx, 4096);
    cr_expect_eq(w->kv_tokens, 65536);
    cr_expect_eq(w->jobs, 1);
    cr_expect(w->has_load);
    cr_expect_eq(w->running, 3);
    cr_expect_eq(w->queued, 1);
    cr_expect_eq(w->kv_used, 900);
    cr_expect_eq(s->workers[1].role, ITS_ROLE_SELECT);
    cr_expect_eq(s->workers[1].state, ITS_WORKER_BUSY);
    cr_expect_not(s->workers[1].has_load);
    its_status_free(&s);
    cr_expect_null(s);
    its_client_destroy(&c);
    fake_stop(&f);
}

/* ---- asynchronous use ----------------------------------------------------------------------- */

Test(client, async_requests_through_a_poll_loop_on_the_fd)
{
    struct fake *f = fake_start(FAKE_NORMAL);
    its_client_t *c = client_for(f);
    enum { N = 3 };
    const char *questions[N] = {"alpha", "beta", "gamma"};
    uint64_t tags[N];
    struct its_options o = {0};
    o.progress = true;
    for (int i = 0; i < N; i++) {
        struct its_message m = {ITS_CHAT_USER, questions[i]};
        cr_assert_eq(its_submit_async(c, &m, 1, &o, &tags[i]), 0, "%s", its_client_errstr(c));
        for (int j = 0; j < i; j++)
            cr_expect_neq(tags[i], tags[j], "tags are unique");
    }
    int fd = -1;
    cr_assert_eq(its_client_fd(c, &fd), 0);
    cr_assert_geq(fd, 0);

    /* Per request: the order of the event types seen, and the ids. */
    int seen[N][3] = {{0}};
    int n_seen[N] = {0};
    char ids[N][ITS_ID_MAX + 1] = {{0}};
    int done = 0;
    int64_t end = now_ms() + 10000;
    while (done < N && now_ms() < end) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        poll(&p, 1, 100);
        struct its_event *ev;
        int rc;
        while ((rc = its_next_event(c, &ev, 0)) > 0) {
            int i = 0;
            while (i < N && tags[i] != ev->tag)
                i++;
            cr_assert_lt(i, N, "event for unknown tag %llu", (unsigned long long)ev->tag);
            if (n_seen[i] < 3)
                seen[i][n_seen[i]] = ev->type;
            n_seen[i]++;
            if (ev->type == ITS_EVENT_ACCEPTED)
                snprintf(ids[i], sizeof ids[i], "%s", ev->id);
            if (ev->type == ITS_EVENT_PROGRESS) {
                cr_expect_str_eq(ev->progress.id, ids[i]);
                cr_expect_eq(ev->progress.drafts.total, 2);
            }
            if (ev->type == ITS_EVENT_RESULT) {
                cr_assert_not_null(ev->result);
                cr_expect_str_eq(ev->result->id, ids[i]);
                char want[64];
                snprintf(want, sizeof want, "echo: %s", questions[i]);
                cr_expect_str_eq(ev->result->answer, want);
                done++;
            }
            if (ev->type == ITS_EVENT_ERROR)
                cr_expect_fail("unexpected error event: %s %s", ev->code, ev->message);
            its_event_free(&ev);
        }
        cr_assert_eq(rc, 0, "its_next_event: %s", its_client_errstr(c));
    }
    cr_assert_eq(done, N, "every request finished through the fd loop");
    for (int i = 0; i < N; i++) {
        cr_expect_eq(n_seen[i], 3, "request %d: %d events", i, n_seen[i]);
        cr_expect_eq(seen[i][0], ITS_EVENT_ACCEPTED);
        cr_expect_eq(seen[i][1], ITS_EVENT_PROGRESS);
        cr_expect_eq(seen[i][2], ITS_EVENT_RESULT);
        for (int j = 0; j < i; j++)
            cr_expect_str_neq(ids[i], ids[j]);
    }
    pthread_mutex_lock(&f->mu);
    cr_expect(f->last_submit.submit.has_progress && f->last_submit.submit.progress,
              "options.progress asks the daemon for progress");
    pthread_mutex_unlock(&f->mu);
    its_client_destroy(&c);
    fake_stop(&f);
}

Test(client, events_arriving_during_a_blocking_call_are_kept)
{
    struct fake *f = fake_start(FAKE_NORMAL);
    its_client_t *c = client_for(f);
    struct its_message m = {ITS_CHAT_USER, "async one"};
    uint64_t tag = 0;
    cr_assert_eq(its_submit_async(c, &m, 1, NULL, &tag), 0);
    /* The blocking call reads the async request's replies off the socket too. */
    struct its_result *r = NULL;
    cr_assert_eq(its_submit(c, "sync one", NULL, 5000, &r), 0, "%s", its_client_errstr(c));
    cr_expect_str_eq(r->answer, "echo: sync one");
    its_result_free(&r);
    cr_expect_eq(its_client_process(c), 2, "accepted and result queued");
    struct its_event *ev = NULL;
    cr_assert_eq(its_next_event(c, &ev, 0), 1);
    cr_expect_eq(ev->type, ITS_EVENT_ACCEPTED);
    cr_expect_eq(ev->tag, tag);
    its_event_free(&ev);
    cr_assert_eq(its_next_event(c, &ev, 0), 1);
    cr_expect_eq(ev->type, ITS_EVENT_RESULT);
    cr_expect_str_eq(ev->result->answer, "echo: async one");
    struct its_result *kept = ev->result;
    ev->result = NULL; /* taking the result out of the event */
    its_event_free(&ev);
    cr_expect_str_eq(kept->answer, "echo: async one");
    its_result_free(&kept);
    cr_expect_eq(its_next_event(c, &ev, 0), 0);
    its_client_destroy(&c);
    fake_stop(&f);
}

Test(client, cancel_confirms_and_ends_the_async_request)
{
    struct fake *f = fake_start(FAKE_HOLD);
    its_client_t *c = client_for(f);
    struct its_message m = {ITS_CHAT_USER, "long question"};
    uint64_t tag = 0;
    cr_assert_eq(its_submit_async(c, &m, 1, NULL, &tag), 0);
    struct its_event *ev = NULL;
    cr_assert_eq(its_next_event(c, &ev, 5000), 1, "%s", its_client_errstr(c));
    cr_assert_eq(ev->type, ITS_EVENT_ACCEPTED);
    char id[ITS_ID_MAX + 1];
    snprintf(id, sizeof id, "%s", ev->id);
    its_event_free(&ev);

    cr_assert_eq(its_cancel(c, id, 5000), 0, "%s", its_client_errstr(c));
    pthread_mutex_lock(&f->mu);
    cr_expect_str_eq(f->last_cancel, id);
    pthread_mutex_unlock(&f->mu);
    cr_assert_eq(its_next_event(c, &ev, 1000), 1, "the request's final event");
    cr_expect_eq(ev->type, ITS_EVENT_ERROR);
    cr_expect_eq(ev->tag, tag);
    cr_expect_str_eq(ev->id, id);
    cr_expect_str_eq(ev->code, "cancelled");
    its_event_free(&ev);

    cr_expect_eq(its_cancel(c, "req-77", 5000), ITS_ERR_DAEMON);
    cr_expect_str_eq(its_client_daemon_code(c), "not_found");
    its_client_destroy(&c);
    fake_stop(&f);
}

Test(client, cancelling_another_clients_request_leaves_own_requests_alone)
{
    struct fake *f = fake_start(FAKE_HOLD);
    its_client_t *a = client_for(f), *b = client_for(f);
    struct its_message m = {ITS_CHAT_USER, "q"};
    uint64_t tag_a = 0, tag_b = 0;
    struct its_event *ev = NULL;
    cr_assert_eq(its_submit_async(a, &m, 1, NULL, &tag_a), 0);
    cr_assert_eq(its_next_event(a, &ev, 5000), 1);
    cr_assert_eq(ev->type, ITS_EVENT_ACCEPTED);
    char id_a[ITS_ID_MAX + 1];
    snprintf(id_a, sizeof id_a, "%s", ev->id);
    its_event_free(&ev);
    cr_assert_eq(its_submit_async(b, &m, 1, NULL, &tag_b), 0);
    cr_assert_eq(its_next_event(b, &ev, 5000), 1);
    cr_assert_eq(ev->type, ITS_EVENT_ACCEPTED);
    its_event_free(&ev);
    cr_assert_eq(tag_a, tag_b, "both handles numbered their first request alike");

    /* b cancels a's request; the confirmation carries a's tag, which is also b's. */
    cr_assert_eq(its_cancel(b, id_a, 5000), 0, "%s", its_client_errstr(b));
    cr_expect_eq(its_next_event(b, &ev, 200), 0, "b's own request is still running");
    cr_expect_null(ev);
    its_client_destroy(&a);
    its_client_destroy(&b);
    fake_stop(&f);
}

/* ---- a misbehaving daemon ------------------------------------------------------------------- */

Test(client, malformed_replies_are_errors_and_the_handle_survives)
{
    struct fake *f = fake_start(FAKE_GARBAGE);
    its_client_t *c = client_for(f);
    struct its_result *r = NULL;
    int64_t t0 = now_ms();
    cr_expect_eq(its_submit(c, "q", NULL, 5000, &r), ITS_ERR_PROTOCOL);
    cr_expect_lt(now_ms() - t0, 4000, "an error at once, not a timeout");
    cr_expect(strstr(its_client_errstr(c), "malformed reply"), "errstr: %s",
              its_client_errstr(c));
    cr_expect_null(r);

    struct its_status *s = NULL;
    cr_expect_eq(its_status(c, 5000, &s), ITS_ERR_PROTOCOL);
    cr_expect(strstr(its_client_errstr(c), "status_reply"), "names the message: %s",
              its_client_errstr(c));
    cr_expect_null(s);

    cr_expect_eq(its_get(c, "req-0", 5000, &r, NULL), ITS_ERR_PROTOCOL);
    cr_expect(strstr(its_client_errstr(c), "frames"), "errstr: %s", its_client_errstr(c));

    cr_expect_eq(its_cancel(c, "req-0", 5000), ITS_ERR_PROTOCOL);
    cr_expect(strstr(its_client_errstr(c), "bogus"), "names the unknown key: %s",
              its_client_errstr(c));

    /* The client told the daemon about the bad replies it got (except the bad error). */
    cr_expect(fake_wait_count(f, &f->n_errors, 3, 2000), "%d error reports",
              fake_count(f, &f->n_errors));
    cr_expect_eq(fake_count(f, &f->n_undecodable), 0, "and what it sent was valid");

    atomic_store(&f->mode, FAKE_NORMAL);
    cr_assert_eq(its_submit(c, "after the garbage", NULL, 5000, &r), 0, "%s",
                 its_client_errstr(c));
    cr_expect_str_eq(r->answer, "echo: after the garbage");
    its_result_free(&r);
    struct its_event *ev = NULL;
    cr_expect_eq(its_next_event(c, &ev, 0), 0, "no stray events were left behind");
    its_client_destroy(&c);
    fake_stop(&f);
}

Test(client, unaddressed_garbage_becomes_an_event_when_nobody_waits)
{
    struct fake *f = fake_start(FAKE_GARBAGE);
    its_client_t *c = client_for(f);
    struct its_message m = {ITS_CHAT_USER, "q"};
    uint64_t tag = 0;
    cr_assert_eq(its_submit_async(c, &m, 1, NULL, &tag), 0);
    struct its_event *ev = NULL;
    cr_assert_eq(its_next_event(c, &ev, 5000), 1, "%s", its_client_errstr(c));
    cr_expect_eq(ev->type, ITS_EVENT_ERROR);
    cr_expect_eq(ev->tag, 0, "bytes that are not msgpack name no request");
    cr_expect_eq(ev->err, ITS_ERR_PROTOCOL);
    cr_expect_str_eq(ev->code, "bad_message");
    cr_expect(strstr(ev->message, "malformed reply"), "message: %s", ev->message);
    its_event_free(&ev);
    its_client_destroy(&c);
    fake_stop(&f);
}

/* ---- itsctl ------------------------------------------------------------------------------- */

struct run {
    int status; /* exit code, or -1 when killed / not run */
    char *out, *err;
};

/* Runs itsctl with `args` (shell-quoted by the caller) and `env` prepended, stdin from `in`
 * ("" = /dev/null), bounded to 30 s. */
static struct run itsctl_run(const char *env, const char *in, const char *args)
{
    const char *bin = tu_build("bin/itsctl");
    struct stat st;
    cr_assert_eq(stat(bin, &st), 0,
                 "%s is missing: build it (make BUILD=... ITS_INNER=1 .../bin/itsctl)", bin);
    const char *dir = tu_tmpdir();
    char out_path[4200], err_path[4200], in_path[4200], cmd[16384];
    snprintf(out_path, sizeof out_path, "%s/out", dir);
    snprintf(err_path, sizeof err_path, "%s/err", dir);
    snprintf(in_path, sizeof in_path, "%s/in", dir);
    cr_assert_eq(tu_write_file(in_path, in, strlen(in)), 0);
    snprintf(cmd, sizeof cmd, "%s timeout 30 '%s' %s <'%s' >'%s' 2>'%s'", env, bin, args,
             in_path, out_path, err_path);
    int rc = system(cmd);
    struct run r = {.status = -1};
    if (rc != -1 && WIFEXITED(rc))
        r.status = WEXITSTATUS(rc);
    r.out = tu_read_file(out_path, NULL);
    r.err = tu_read_file(err_path, NULL);
    if (!r.out)
        r.out = strdup("");
    if (!r.err)
        r.err = strdup("");
    tu_rmtree(dir);
    return r;
}

static void run_free(struct run *r)
{
    free(r->out);
    free(r->err);
}

static json_t *parse_json(const struct run *r)
{
    json_error_t e;
    json_t *j = json_loads(r->out, 0, &e);
    cr_assert_not_null(j, "stdout is not JSON (%s): %.400s\nstderr: %.400s", e.text, r->out,
                       r->err);
    return j;
}

static int count_lines(const char *s)
{
    int n = 0;
    for (; *s; s++)
        n += *s == '\n';
    return n;
}

Test(client, itsctl_submit_json_prints_the_whole_result)
{
    struct fake *f = fake_start(FAKE_NORMAL);
    char args[1024];
    snprintf(args, sizeof args,
             "--endpoint %s submit --json --drafts 2 --feedbacks 3 --edits 1 "
             "--feedbacks-per-edit 1 --include-drafts --seed 7 --timeout 20 "
             "--max-tokens instruct=256,feedback=128,edit=255 --temperature 0.5 "
             "--top-p edit=0.9 'What is 2+2?'",
             f->endpoint);
    struct run r = itsctl_run("", "", args);
    cr_assert_eq(r.status, 0, "exit %d, stderr: %s", r.status, r.err);
    json_t *j = parse_json(&r);
    cr_expect_str_eq(json_string_value(json_object_get(j, "id")), "req-0");
    cr_expect_str_eq(json_string_value(json_object_get(j, "answer")), "echo: What is 2+2?");
    cr_expect_float_eq(json_number_value(json_object_get(j, "score")), 1.5, 1e-9);
    cr_expect(json_is_false(json_object_get(j, "partial")));
    json_t *cands = json_object_get(j, "candidates");
    cr_assert_eq(json_array_size(cands), 2);
    json_t *c0 = json_array_get(cands, 0), *c1 = json_array_get(cands, 1);
    cr_expect_eq(json_integer_value(json_object_get(c0, "draft_index")), 0);
    cr_expect_str_eq(json_string_value(json_object_get(c0, "draft")), "draft zero");
    cr_expect_eq(json_array_size(json_object_get(c0, "feedbacks")), 2);
    cr_expect_str_eq(json_string_value(json_object_get(c0, "edit")), "echo: What is 2+2?");
    cr_expect_float_eq(json_number_value(json_object_get(c0, "score")), 1.5, 1e-9);
    cr_expect_eq(json_integer_value(json_object_get(c1, "draft_index")), 1);
    cr_expect(json_is_null(json_object_get(c1, "edit")), "unedited: edit is null");
    cr_expect(json_is_null(json_object_get(c1, "score")), "unscored: score is null");
    cr_expect(json_is_array(json_object_get(c1, "feedbacks")));
    json_t *t = json_object_get(j, "timings");
    cr_expect_eq(json_integer_value(json_object_get(t, "total_ms")), 50);
    cr_expect_eq(json_integer_value(json_object_get(t, "edits_ms")), 30);
    json_t *u = json_object_get(j, "usage");
    cr_expect_eq(json_integer_value(json_object_get(json_object_get(u, "instruct"),
                                                    "prompt_tokens")), 11);
    cr_expect_eq(json_integer_value(json_object_get(json_object_get(u, "select"),
                                                    "prompt_tokens")), 41);
    json_decref(j);
    cr_expect_str_eq(r.err, "", "no progress when stderr is not a terminal");
    run_free(&r);

    pthread_mutex_lock(&f->mu);
    const struct proto_submit *s = &f->last_submit.submit;
    cr_expect(s->has_drafts && s->drafts == 2);
    cr_expect(s->has_feedbacks && s->feedbacks == 3);
    cr_expect(s->has_edits && s->edits == 1);
    cr_expect(s->has_feedbacks_per_edit && s->feedbacks_per_edit == 1);
    cr_expect(s->has_include_drafts && s->include_drafts);
    cr_expect(s->has_seed && s->seed == 7);
    cr_expect(s->has_deadline_ms && s->deadline_ms == 20000, "--timeout sets the deadline");
    const struct proto_submit_sampling *sp = &s->sampling;
    cr_expect(sp->has_instruct && sp->instruct.has_max_tokens && sp->instruct.max_tokens == 256);
    cr_expect(sp->has_feedback && sp->feedback.has_max_tokens && sp->feedback.max_tokens == 128);
    cr_expect(sp->has_edit && sp->edit.has_max_tokens && sp->edit.max_tokens == 255);
    cr_expect(sp->instruct.has_temperature && sp->instruct.temperature == 0.5 &&
                  sp->feedback.has_temperature && sp->edit.has_temperature,
              "a bare value applies to all three stages");
    cr_expect(sp->edit.has_top_p && sp->edit.top_p == 0.9 && !sp->instruct.has_top_p &&
                  !sp->feedback.has_top_p,
              "STAGE=VALUE applies to that stage only");
    pthread_mutex_unlock(&f->mu);
    fake_stop(&f);
}

Test(client, itsctl_submit_reads_stdin_and_messages_files)
{
    struct fake *f = fake_start(FAKE_NORMAL);
    char env[512], args[4400];
    snprintf(env, sizeof env, "ITS_ENDPOINT='%s'", f->endpoint);
    struct run r = itsctl_run(env, "question from stdin\n", "submit");
    cr_assert_eq(r.status, 0, "exit %d, stderr: %s", r.status, r.err);
    cr_expect_str_eq(r.out, "echo: question from stdin\n",
                     "the answer and a newline (the question lost its trailing newline)");
    run_free(&r);

    const char *dir = tu_tmpdir();
    char path[4200];
    snprintf(path, sizeof path, "%s/conv.json", dir);
    const char *conv = "[{\"role\":\"system\",\"content\":\"Be brief.\"},"
                       "{\"role\":\"user\",\"content\":\"Name a colour.\"}]";
    cr_assert_eq(tu_write_file(path, conv, strlen(conv)), 0);
    snprintf(args, sizeof args, "submit --messages '%s'", path);
    r = itsctl_run(env, "", args);
    cr_assert_eq(r.status, 0, "exit %d, stderr: %s", r.status, r.err);
    cr_expect_str_eq(r.out, "echo: Name a colour.\n");
    run_free(&r);
    pthread_mutex_lock(&f->mu);
    cr_expect_eq(f->last_submit.submit.n_messages, 2);
    cr_expect_eq(f->last_submit.submit.messages[0].role, PROTO_CHAT_SYSTEM);
    pthread_mutex_unlock(&f->mu);

    const char *bad = "[{\"role\":\"robot\",\"content\":\"x\"}]";
    cr_assert_eq(tu_write_file(path, bad, strlen(bad)), 0);
    r = itsctl_run(env, "", args);
    cr_expect_eq(r.status, 1, "a bad messages file is a usage error (exit %d)", r.status);
    cr_expect(strstr(r.err, "[0].role"), "stderr names the entry: %s", r.err);
    cr_expect_eq(count_lines(r.err), 1, "one line: %s", r.err);
    run_free(&r);
    tu_rmtree(dir);
    fake_stop(&f);
}

Test(client, itsctl_exit_codes_name_the_problem)
{
    struct fake *f = fake_start(FAKE_BUSY);
    char args[1024];
    snprintf(args, sizeof args, "--endpoint %s submit 'q'", f->endpoint);
    struct run r = itsctl_run("", "", args);
    cr_expect_eq(r.status, 2, "daemon error: exit %d", r.status);
    cr_expect(strstr(r.err, "busy"), "stderr: %s", r.err);
    cr_expect_eq(count_lines(r.err), 1, "one line: %s", r.err);
    cr_expect_str_eq(r.out, "");
    run_free(&r);

    atomic_store(&f->mode, FAKE_SILENT);
    snprintf(args, sizeof args, "--endpoint %s submit --timeout 0.3 'q'", f->endpoint);
    r = itsctl_run("", "", args);
    cr_expect_eq(r.status, 3, "timeout: exit %d", r.status);
    cr_expect(strstr(r.err, "is itsd running?"), "stderr: %s", r.err);
    cr_expect_eq(count_lines(r.err), 1, "one line: %s", r.err);
    run_free(&r);

    atomic_store(&f->mode, FAKE_PARTIAL);
    snprintf(args, sizeof args, "--endpoint %s submit --json 'q'", f->endpoint);
    r = itsctl_run("", "", args);
    cr_expect_eq(r.status, 4, "partial result: exit %d", r.status);
    json_t *j = parse_json(&r);
    cr_expect(json_is_true(json_object_get(j, "partial")));
    json_decref(j);
    run_free(&r);

    atomic_store(&f->mode, FAKE_GARBAGE);
    snprintf(args, sizeof args, "--endpoint %s submit 'q'", f->endpoint);
    r = itsctl_run("", "", args);
    cr_expect_eq(r.status, 5, "malformed reply: exit %d", r.status);
    cr_expect(strstr(r.err, "malformed reply"), "stderr: %s", r.err);
    run_free(&r);

    r = itsctl_run("", "", "submit --max-tokens drafts=3 'q'");
    cr_expect_eq(r.status, 1, "bad stage: usage error, got %d", r.status);
    cr_expect(strstr(r.err, "STAGE=VALUE"), "stderr names the form: %s", r.err);
    run_free(&r);
    r = itsctl_run("", "", "submit --drafts lots 'q'");
    cr_expect_eq(r.status, 1, "usage: exit %d", r.status);
    cr_expect(strstr(r.err, "--drafts"), "stderr names the flag: %s", r.err);
    run_free(&r);
    r = itsctl_run("", "", "frobnicate");
    cr_expect_eq(r.status, 1, "unknown command: exit %d", r.status);
    cr_expect(strstr(r.err, "frobnicate"), "stderr: %s", r.err);
    run_free(&r);
    r = itsctl_run("", "", "--help");
    cr_expect_eq(r.status, 0);
    cr_expect(strstr(r.out, "exit status"), "--help documents the exit codes: %s", r.out);
    run_free(&r);
    fake_stop(&f);
}

Test(client, itsctl_status_workers_get_cancel)
{
    struct fake *f = fake_start(FAKE_NORMAL);
    char args[1024];
    snprintf(args, sizeof args, "--endpoint %s status --json", f->endpoint);
    struct run r = itsctl_run("", "", args);
    cr_assert_eq(r.status, 0, "exit %d, stderr: %s", r.status, r.err);
    json_t *j = parse_json(&r);
    json_t *roles = json_object_get(j, "roles");
    cr_expect_eq(json_integer_value(json_object_get(roles, "instruct")), 1);
    cr_expect_eq(json_integer_value(json_object_get(roles, "feedback")), 0);
    cr_expect_eq(json_integer_value(json_object_get(j, "queue_depth")), 5);
    cr_expect_eq(json_integer_value(json_object_get(j, "in_flight")), 7);
    cr_expect_eq(json_array_size(json_object_get(j, "workers")), 2);
    json_decref(j);
    run_free(&r);

    snprintf(args, sizeof args, "--endpoint %s status", f->endpoint);
    r = itsctl_run("", "", args);
    cr_assert_eq(r.status, 0, "exit %d, stderr: %s", r.status, r.err);
    cr_expect(strstr(r.out, "queue depth: 5"), "stdout: %s", r.out);
    cr_expect(strstr(r.out, "in flight: 7"), "stdout: %s", r.out);
    run_free(&r);

    snprintf(args, sizeof args, "--endpoint %s workers", f->endpoint);
    r = itsctl_run("", "", args);
    cr_assert_eq(r.status, 0, "exit %d, stderr: %s", r.status, r.err);
    cr_expect_eq(count_lines(r.out), 2, "one line per worker: %s", r.out);
    cr_expect(strstr(r.out, "w-instruct-0 instruct tiny-llama31 cpu ready"), "stdout: %s",
              r.out);
    cr_expect(strstr(r.out, "w-select-0 select tiny-reward cuda busy"), "stdout: %s", r.out);
    run_free(&r);

    snprintf(args, sizeof args, "--endpoint %s submit 'hello'", f->endpoint);
    r = itsctl_run("", "", args);
    cr_assert_eq(r.status, 0, "exit %d, stderr: %s", r.status, r.err);
    run_free(&r);
    snprintf(args, sizeof args, "--endpoint %s get --json req-0", f->endpoint);
    r = itsctl_run("", "", args);
    cr_assert_eq(r.status, 0, "exit %d, stderr: %s", r.status, r.err);
    j = parse_json(&r);
    cr_expect_str_eq(json_string_value(json_object_get(j, "answer")), "echo: hello");
    json_decref(j);
    run_free(&r);
    snprintf(args, sizeof args, "--endpoint %s get running-1", f->endpoint);
    r = itsctl_run("", "", args);
    cr_assert_eq(r.status, 0, "exit %d, stderr: %s", r.status, r.err);
    cr_expect(strstr(r.out, "running"), "stdout: %s", r.out);
    cr_expect(strstr(r.out, "drafts 1/2"), "stdout: %s", r.out);
    run_free(&r);
    snprintf(args, sizeof args, "--endpoint %s get req-42", f->endpoint);
    r = itsctl_run("", "", args);
    cr_expect_eq(r.status, 2, "exit %d", r.status);
    cr_expect(strstr(r.err, "not_found"), "stderr: %s", r.err);
    run_free(&r);

    snprintf(args, sizeof args, "--endpoint %s cancel req-0", f->endpoint);
    r = itsctl_run("", "", args);
    cr_expect_eq(r.status, 0, "exit %d, stderr: %s", r.status, r.err);
    run_free(&r);
    pthread_mutex_lock(&f->mu);
    cr_expect_str_eq(f->last_cancel, "req-0");
    pthread_mutex_unlock(&f->mu);
    snprintf(args, sizeof args, "--endpoint %s cancel nope", f->endpoint);
    r = itsctl_run("", "", args);
    cr_expect_eq(r.status, 2, "exit %d", r.status);
    run_free(&r);
    fake_stop(&f);
}
