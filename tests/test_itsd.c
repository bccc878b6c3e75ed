/* test_itsd.c — itsd as its users see it: the real build/bin/itsd on ipc:// endpoints in a
 * scratch directory, with the test acting as fake workers and a fake client over raw ZeroMQ
 * DEALER sockets speaking the protocol (proto_encode / proto_decode). No model is involved,
 * so every scenario is fast and deterministic: registration and status, a whole request and
 * its result tree, pipelining, a worker that stops heartbeating, a role that disappears,
 * deadlines, cancel, a client that vanishes, busy, malformed frames, `itsd -t`, and SIGHUP
 * reloads (live keys applied, bad files refused whole, restart-only keys kept, running
 * requests finishing with the settings and templates they started with).
 *
 * Each test is bounded in time (Criterion .timeout) and kills the daemon on failure (the
 * suite's fini, and PR_SET_PDEATHSIG should the test process die).
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <msgpack.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "idmap.h"
#include "itsd_config.h"
#include "proto.h"
#include "testutil.h"

#define HB_MS 100 /* heartbeat of the test daemons; liveness 3 -> a worker is dropped at 300 ms */
#define DIR_BYTES 1024
#define PATH_BYTES 1200
#define ARGS_BYTES 4300

/* ---- the daemon ------------------------------------------------------------------------------ */

static char g_dir[DIR_BYTES];   /* scratch directory of this test */
static char g_front[PATH_BYTES]; /* endpoints */
static char g_back[PATH_BYTES];
static char g_log[PATH_BYTES];   /* itsd's stderr */
static pid_t g_pid = -1;
static void *g_zctx;

/* The last lines of the daemon's log, for failure messages. */
static const char *log_tail(void)
{
    return tu_file_tail(g_log, 3000);
}

/* Minimal templates of the shape templates.h asks for; the test does not depend on the
 * wording of the shipped ones. */
static void write_templates(const char *dir)
{
    mkdir(dir, 0700);
    tu_write_in(dir, "instruct.tmpl", "# drafts: the conversation as it is\n@conversation\n");
    tu_write_in(dir, "feedback.tmpl",
               "@conversation\n@assistant\n{response}\n@user\nEvaluate the response.\n");
    tu_write_in(dir, "edit.tmpl",
               "@conversation\n@assistant\n{response}\n@user\nEdit the response using:\n"
               "{feedback}\n");
    tu_write_in(dir, "select.tmpl", "@user\n{prompt}\n@assistant\n{response}\n");
}

static void daemon_exec(char **argv);

/* Splits `extra` on spaces into argv after the fixed arguments. */
static void daemon_start(const char *extra)
{
    char tpl[PATH_BYTES], tpl_arg[PATH_BYTES], hb[32];
    snprintf(tpl, sizeof tpl, "%s/tpl", g_dir);
    write_templates(tpl);
    snprintf(tpl_arg, sizeof tpl_arg, "%s", tpl);
    snprintf(hb, sizeof hb, "%d", HB_MS);
    char extra_buf[2048];
    snprintf(extra_buf, sizeof extra_buf, "%s", extra ? extra : "");
    char *argv[64];
    int argc = 0;
    argv[argc++] = (char *)tu_build("bin/itsd");
    argv[argc++] = "--frontend";
    argv[argc++] = g_front;
    argv[argc++] = "--backend";
    argv[argc++] = g_back;
    argv[argc++] = "--templates";
    argv[argc++] = tpl_arg;
    argv[argc++] = "--heartbeat-ms";
    argv[argc++] = hb;
    argv[argc++] = "--liveness";
    argv[argc++] = "3";
    argv[argc++] = "--log-level";
    argv[argc++] = "debug";
    argv[argc++] = "--shutdown-ms";
    argv[argc++] = "1000";
    for (char *save = NULL, *tok = strtok_r(extra_buf, " ", &save); tok && argc < 62;
         tok = strtok_r(NULL, " ", &save))
        argv[argc++] = tok;
    argv[argc] = NULL;
    daemon_exec(argv);
}

/* Starts argv (argv[0] = the itsd binary) with stderr to g_log; returns once it has bound
 * g_front and g_back (ipc sockets in g_dir). */
static void daemon_exec(char **argv)
{
    char bin[PATH_BYTES];
    snprintf(bin, sizeof bin, "%s", argv[0]);
    argv[0] = bin;
    cr_assert_eq(access(bin, X_OK), 0, "%s is not built", bin);

    pid_t parent = getpid();
    pid_t pid = fork();
    cr_assert_neq(pid, -1, "fork: %s", strerror(errno));
    if (pid == 0) {
        /* the daemon must not outlive a test process that crashed or timed out */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        int fd = open(g_log, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (fd >= 0) {
            dup2(fd, STDERR_FILENO);
            close(fd);
        }
        int null = open("/dev/null", O_RDWR);
        if (null >= 0) {
            dup2(null, STDIN_FILENO);
            dup2(null, STDOUT_FILENO);
            close(null);
        }
        execv(bin, argv);
        _exit(127);
    }
    g_pid = pid;
    /* ready once both ipc sockets exist */
    char fpath[PATH_BYTES], bpath[PATH_BYTES];
    snprintf(fpath, sizeof fpath, "%s/front.sock", g_dir);
    snprintf(bpath, sizeof bpath, "%s/back.sock", g_dir);
    uint64_t end = tu_now_ms() + 10000;
    struct stat st;
    while (tu_now_ms() < end) {
        int status;
        if (waitpid(g_pid, &status, WNOHANG) == g_pid) {
            g_pid = -1;
            cr_assert_fail("itsd exited at start (status %d): %s", status, log_tail());
        }
        if (stat(fpath, &st) == 0 && stat(bpath, &st) == 0)
            return;
        usleep(5000);
    }
    cr_assert_fail("itsd did not bind within 10 s: %s", log_tail());
}

/* SIGTERM and wait; the daemon must exit 0 within 5 s. */
static void daemon_stop(void)
{
    if (g_pid <= 0)
        return;
    kill(g_pid, SIGTERM);
    uint64_t end = tu_now_ms() + 5000;
    int status = 0;
    pid_t got = 0;
    while (tu_now_ms() < end && (got = waitpid(g_pid, &status, WNOHANG)) == 0)
        usleep(5000);
    if (got != g_pid) {
        kill(g_pid, SIGKILL);
        waitpid(g_pid, &status, 0);
        g_pid = -1;
        cr_assert_fail("itsd did not exit within 5 s of SIGTERM: %s", log_tail());
    }
    g_pid = -1;
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0,
              "itsd exited with status %d after SIGTERM: %s", status, log_tail());
}

/* ---- sockets --------------------------------------------------------------------------------- */

#define MAX_SOCKS 32
static void *g_socks[MAX_SOCKS];

static void *sock_new(const char *ep, const char *rid)
{
    void *s = zmq_socket(g_zctx, ZMQ_DEALER);
    cr_assert_not_null(s);
    int zero = 0;
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    if (rid)
        zmq_setsockopt(s, ZMQ_ROUTING_ID, rid, strlen(rid));
    cr_assert_eq(zmq_connect(s, ep), 0, "connect %s: %s", ep, zmq_strerror(errno));
    for (int i = 0; i < MAX_SOCKS; i++) {
        if (!g_socks[i]) {
            g_socks[i] = s;
            return s;
        }
    }
    cr_assert_fail("too many sockets");
    return NULL;
}

static void sock_close(void *s)
{
    for (int i = 0; i < MAX_SOCKS; i++)
        if (g_socks[i] == s)
            g_socks[i] = NULL;
    zmq_close(s);
}

static void send_raw(void *s, const void *buf, size_t len, int flags)
{
    cr_assert(zmq_send(s, buf, len, flags) >= 0, "send: %s", zmq_strerror(errno));
}

static void send_msg(void *s, const struct proto_msg *m)
{
    void *buf = NULL;
    size_t len = 0;
    char err[512];
    cr_assert_eq(proto_encode(m, &buf, &len, err, sizeof err), 0, "encode %s: %s",
                 proto_type_name(m->type), err);
    send_raw(s, buf, len, 0);
    free(buf);
}

/* Receives one message if there is one (no waiting). Returns 1, 0 when none, and fails the
 * test for anything itsd sends that does not decode with `accept`. */
static int recv_now(void *s, uint32_t accept, struct proto_msg *out)
{
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    if (zmq_msg_recv(&msg, s, ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(&msg);
        return 0;
    }
    cr_assert(!zmq_msg_more(&msg), "itsd sent a multipart message");
    char err[512];
    int rc = proto_decode(zmq_msg_data(&msg), zmq_msg_size(&msg), accept, out, err, sizeof err);
    zmq_msg_close(&msg);
    cr_assert_eq(rc, 0, "itsd sent a message that does not decode: %s", err);
    return 1;
}

/* ---- fake workers ---------------------------------------------------------------------------- */

#define MAX_JOBS 64

struct worker {
    void *s;
    enum proto_role role;
    char name[32];
    bool silent;       /* neither heartbeats nor answers (a hung or dead process) */
    bool manual;       /* jobs are recorded, not answered */
    bool samples;      /* generate: send each sample before the result */
    bool silent_on_job;/* goes silent on its first job (others with the flag then lose it) */
    int answer_limit;  /* answer this many jobs, record the rest (-1: all) */
    uint64_t next_hb_ms;
    struct proto_msg jobs[MAX_JOBS]; /* every generate/score received */
    int n_jobs;
    uint64_t cancelled[MAX_JOBS];
    int n_cancelled;
    int n_errors;      /* error messages from itsd */
    int last_error_code;
    char last_error[512];
    int answered;
};

#define MAX_WORKERS 8
static struct worker g_w[MAX_WORKERS];
static int g_n_workers;

/* The client's inbox */
#define MAX_INBOX 64
static void *g_client;
static struct proto_msg g_inbox[MAX_INBOX];
static int g_n_inbox;

static struct worker *worker_new(enum proto_role role, const char *name, uint32_t max_seqs)
{
    cr_assert(g_n_workers < MAX_WORKERS);
    struct worker *w = &g_w[g_n_workers++];
    memset(w, 0, sizeof *w);
    w->role = role;
    w->answer_limit = -1;
    snprintf(w->name, sizeof w->name, "%s", name);
    w->s = sock_new(g_back, name);
    struct proto_msg m = {.type = PROTO_READY};
    m.ready = (struct proto_ready){
        .worker = w->name, .role = role, .model = "fake-model", .backend = "cpu",
        .capacity = {.max_seqs = max_seqs, .max_ctx = 8192, .kv_tokens = 65536}};
    send_msg(w->s, &m);
    w->next_hb_ms = tu_now_ms() + HB_MS;
    return w;
}

/* The score a fake select model gives a response: a hash of its text, so that the test can
 * recompute the argmax from the result alone. */
static double fake_score(const char *text)
{
    uint64_t h = 1469598103934665603ull;
    for (const char *p = text; *p; p++)
        h = (h ^ (uint8_t)*p) * 1099511628211ull;
    return (double)(h % 1000) / 10.0 - 50.0;
}

static const char *last_assistant(const struct proto_chat_msg *msgs, uint32_t n)
{
    for (uint32_t i = n; i-- > 0;)
        if (msgs[i].role == PROTO_CHAT_ASSISTANT)
            return msgs[i].content;
    return "";
}

static void worker_send_sample(struct worker *w, uint64_t job, uint32_t index, const char *text)
{
    struct proto_msg m = {.type = PROTO_SAMPLE};
    m.sample = (struct proto_sample){
        .job = job, .index = index,
        .output = {.text = (char *)text, .n_tokens = 3, .finish = PROTO_FINISH_STOP}};
    send_msg(w->s, &m);
}

/* The text a fake generating worker produces for sample i of a job. */
static void fake_text(const struct worker *w, const struct proto_generate *g, uint32_t i,
                      char *out, size_t out_len)
{
    switch (w->role) {
    case PROTO_ROLE_INSTRUCT:
        snprintf(out, out_len, "draft-%u", i);
        break;
    case PROTO_ROLE_FEEDBACK:
        snprintf(out, out_len, "The response is partially helpful. Critique %u of job %llu.", i,
                 (unsigned long long)g->job);
        break;
    default:
        snprintf(out, out_len, "edited(%s)", last_assistant(g->messages, g->n_messages) ?
                 last_assistant(g->messages, g->n_messages) : "");
        /* the draft is the assistant turn before the edit instruction */
        for (uint32_t k = 0; k < g->n_messages; k++)
            if (g->messages[k].role == PROTO_CHAT_ASSISTANT)
                snprintf(out, out_len, "edited(%s)", g->messages[k].content);
        break;
    }
}

static void worker_answer(struct worker *w, const struct proto_msg *job)
{
    if (job->type == PROTO_SCORE) {
        const struct proto_score *sc = &job->score;
        double scores[PROTO_MAX_CONVERSATIONS];
        for (uint32_t i = 0; i < sc->n_conversations; i++) {
            const struct proto_conversation *cv = &sc->conversations[i];
            scores[i] = fake_score(last_assistant(cv->messages, cv->n_messages));
        }
        struct proto_msg m = {.type = PROTO_SCORE_RESULT};
        m.score_result = (struct proto_score_result){
            .job = sc->job, .scores = scores, .n_scores = sc->n_conversations,
            .usage = {.prompt_tokens = 10, .completion_tokens = 0}};
        send_msg(w->s, &m);
        return;
    }
    const struct proto_generate *g = &job->generate;
    struct proto_output outs[PROTO_MAX_SAMPLES];
    static char texts[PROTO_MAX_SAMPLES][600];
    for (uint32_t i = 0; i < g->n; i++) {
        fake_text(w, g, i, texts[i], sizeof texts[i]);
        outs[i] = (struct proto_output){.text = texts[i], .n_tokens = 3,
                                        .finish = PROTO_FINISH_STOP};
        if (w->samples)
            worker_send_sample(w, g->job, i, texts[i]);
    }
    struct proto_msg m = {.type = PROTO_GENERATE_RESULT};
    m.generate_result = (struct proto_generate_result){
        .job = g->job, .outputs = outs, .n_outputs = g->n,
        .usage = {.prompt_tokens = 10, .completion_tokens = 3ull * g->n}};
    send_msg(w->s, &m);
}

static uint64_t job_id(const struct proto_msg *job)
{
    return job->type == PROTO_SCORE ? job->score.job : job->generate.job;
}

/* A re-dispatched job is the same work under a fresh job id (docs/protocol.md). */
static void assert_same_work(const struct proto_msg *again, const struct proto_msg *first)
{
    cr_assert_neq(job_id(again), job_id(first), "a re-dispatched job reused its job id");
    struct proto_msg a = *again;
    if (a.type == PROTO_SCORE)
        a.score.job = job_id(first);
    else
        a.generate.job = job_id(first);
    cr_assert(proto_msg_equal(&a, first), "the re-dispatched job is different work");
}

static void worker_handle(struct worker *w, struct proto_msg *m)
{
    switch (m->type) {
    case PROTO_GENERATE:
    case PROTO_SCORE: {
        cr_assert(w->n_jobs < MAX_JOBS);
        w->jobs[w->n_jobs++] = *m;
        memset(m, 0, sizeof *m);
        const struct proto_msg *job = &w->jobs[w->n_jobs - 1];
        if (w->silent_on_job) {
            w->silent = true;
            for (int i = 0; i < g_n_workers; i++)
                g_w[i].silent_on_job = false;
        }
        if (w->silent || w->manual)
            return;
        if (w->answer_limit >= 0 && w->answered >= w->answer_limit)
            return;
        w->answered++;
        worker_answer(w, job);
        return;
    }
    case PROTO_CANCEL_JOB:
        if (w->n_cancelled < MAX_JOBS)
            w->cancelled[w->n_cancelled++] = m->cancel_job.job;
        break;
    case PROTO_ERROR:
        w->n_errors++;
        w->last_error_code = m->error.code;
        snprintf(w->last_error, sizeof w->last_error, "%s", m->error.message);
        break;
    default:
        break;
    }
    proto_msg_free(m);
}

static bool worker_cancelled(const struct worker *w, uint64_t job)
{
    for (int i = 0; i < w->n_cancelled; i++)
        if (w->cancelled[i] == job)
            return true;
    return false;
}

/* Runs the fake cluster for up to `ms`: workers heartbeat and answer, the client's messages
 * go to the inbox. */
static void pump(int ms)
{
    uint64_t end = tu_now_ms() + (uint64_t)ms;
    for (;;) {
        uint64_t now = tu_now_ms();
        for (int i = 0; i < g_n_workers; i++) {
            struct worker *w = &g_w[i];
            if (w->s && !w->silent && now >= w->next_hb_ms) {
                struct proto_msg hb = {.type = PROTO_HEARTBEAT};
                send_msg(w->s, &hb);
                w->next_hb_ms = now + HB_MS;
            }
        }
        zmq_pollitem_t items[MAX_WORKERS + 1];
        int n = 0;
        for (int i = 0; i < g_n_workers; i++)
            items[n++] = (zmq_pollitem_t){.socket = g_w[i].s, .events = g_w[i].s ? ZMQ_POLLIN : 0};
        items[n++] = (zmq_pollitem_t){.socket = g_client, .events = g_client ? ZMQ_POLLIN : 0};
        long wait = now >= end ? 0 : (long)(end - now);
        if (wait > 10)
            wait = 10;
        zmq_poll(items, n, wait);
        for (int i = 0; i < g_n_workers; i++) {
            struct proto_msg m;
            while (g_w[i].s && recv_now(g_w[i].s, PROTO_TO_WORKER, &m))
                worker_handle(&g_w[i], &m);
        }
        if (g_client) {
            struct proto_msg m;
            while (recv_now(g_client, PROTO_TO_CLIENT, &m)) {
                cr_assert(g_n_inbox < MAX_INBOX, "client inbox overflow");
                g_inbox[g_n_inbox++] = m;
            }
        }
        if (tu_now_ms() >= end)
            return;
    }
}

#define PUMP_UNTIL(cond, ms)                                                                     \
    do {                                                                                         \
        uint64_t until_ = tu_now_ms() + (ms);                                                       \
        while (!(cond) && tu_now_ms() < until_)                                                     \
            pump(5);                                                                             \
    } while (0)

static int inbox_find(enum proto_type t)
{
    for (int i = 0; i < g_n_inbox; i++)
        if (g_inbox[i].type == t)
            return i;
    return -1;
}

/* Takes the first client message of type t, waiting up to ms; fails the test without it. */
static struct proto_msg expect(enum proto_type t, int ms)
{
    PUMP_UNTIL(inbox_find(t) >= 0, ms);
    int i = inbox_find(t);
    if (i < 0) {
        char seen[512] = "";
        for (int k = 0; k < g_n_inbox; k++) {
            strncat(seen, proto_type_name(g_inbox[k].type), sizeof seen - strlen(seen) - 2);
            if (g_inbox[k].type == PROTO_ERROR)
                strncat(seen, g_inbox[k].error.message, sizeof seen - strlen(seen) - 2);
            strncat(seen, " ", sizeof seen - strlen(seen) - 1);
        }
        cr_assert_fail("no %s within %d ms (inbox: %s); itsd log: %s", proto_type_name(t), ms, seen,
                 log_tail());
    }
    struct proto_msg m = g_inbox[i];
    memmove(&g_inbox[i], &g_inbox[i + 1], (size_t)(g_n_inbox - i - 1) * sizeof g_inbox[0]);
    g_n_inbox--;
    return m;
}

static struct proto_chat_msg g_question[] = {{PROTO_CHAT_USER, "What is two plus two?"}};

/* Submits a request; returns the accepted id (malloc'd). */
static char *submit(uint64_t tag, uint32_t drafts, uint32_t feedbacks, uint32_t edits,
                    uint32_t deadline_ms)
{
    struct proto_msg m = {.type = PROTO_SUBMIT};
    m.submit = (struct proto_submit){
        .tag = tag, .messages = g_question, .n_messages = 1,
        .drafts = drafts, .feedbacks = feedbacks, .edits = edits, .feedbacks_per_edit = 1,
        .include_drafts = false, .deadline_ms = deadline_ms, .seed = 42,
        .has_drafts = true, .has_feedbacks = true, .has_edits = true,
        .has_feedbacks_per_edit = true, .has_include_drafts = true,
        .has_deadline_ms = deadline_ms > 0, .has_seed = true};
    send_msg(g_client, &m);
    struct proto_msg a = expect(PROTO_ACCEPTED, 3000);
    cr_assert_eq(a.accepted.tag, tag, "accepted for tag %llu, not %llu",
                 (unsigned long long)a.accepted.tag, (unsigned long long)tag);
    char *id = strdup(a.accepted.id);
    proto_msg_free(&a);
    return id;
}

/* Checks a finished result as a user would: the answer is the best-scored candidate, every
 * score is the one the fake select worker gave that text. */
static void check_result(const struct proto_result *r, const char *id, uint32_t n_candidates)
{
    cr_assert_str_eq(r->id, id);
    cr_assert_eq(r->n_candidates, n_candidates, "%u candidates, expected %u", r->n_candidates,
                 n_candidates);
    cr_assert(r->has_best && r->has_score);
    double best = -1e300;
    uint32_t arg = 0;
    for (uint32_t i = 0; i < r->n_candidates; i++) {
        const struct proto_candidate *c = &r->candidates[i];
        const char *text = c->edit ? c->edit : c->draft;
        if (!c->has_score)
            continue;
        cr_assert_float_eq(c->score, fake_score(text), 1e-9, "candidate %u: score %g for '%s'",
                           i, c->score, text);
        if (c->score > best) {
            best = c->score;
            arg = i;
        }
    }
    cr_assert_eq(r->best, arg, "best is %u, the highest score is candidate %u", r->best, arg);
    cr_assert_float_eq(r->score, best, 1e-9);
    const struct proto_candidate *b = &r->candidates[r->best];
    cr_assert_str_eq(r->answer, b->edit ? b->edit : b->draft);
}

/* ---- suite ----------------------------------------------------------------------------------- */

static void setup(void)
{
    snprintf(g_dir, sizeof g_dir, "%s", tu_tmpdir());
    snprintf(g_front, sizeof g_front, "ipc://%s/front.sock", g_dir);
    snprintf(g_back, sizeof g_back, "ipc://%s/back.sock", g_dir);
    snprintf(g_log, sizeof g_log, "%s/itsd.log", g_dir);
    g_zctx = zmq_ctx_new();
    cr_assert_not_null(g_zctx);
    g_n_workers = 0;
    g_n_inbox = 0;
    g_client = NULL;
}

static void teardown(void)
{
    if (g_pid > 0) {
        kill(g_pid, SIGKILL);
        waitpid(g_pid, NULL, 0);
        g_pid = -1;
    }
    for (int i = 0; i < g_n_workers; i++)
        for (int k = 0; k < g_w[i].n_jobs; k++)
            proto_msg_free(&g_w[i].jobs[k]);
    for (int i = 0; i < g_n_inbox; i++)
        proto_msg_free(&g_inbox[i]);
    for (int i = 0; i < MAX_SOCKS; i++) {
        if (g_socks[i]) {
            zmq_close(g_socks[i]);
            g_socks[i] = NULL;
        }
    }
    if (g_zctx)
        zmq_ctx_term(g_zctx);
    g_zctx = NULL;
    if (getenv("ITS_TEST_KEEP"))
        fprintf(stderr, "kept %s\n", g_dir); /* the daemon's log is itsd.log there */
    else
        tu_rmtree(g_dir);
}

TestSuite(itsd, .init = setup, .fini = teardown, .timeout = 30);

/* One worker of each role, answering everything. */
static void full_cluster(void)
{
    worker_new(PROTO_ROLE_INSTRUCT, "w-instruct", 8);
    worker_new(PROTO_ROLE_FEEDBACK, "w-feedback", 8);
    worker_new(PROTO_ROLE_EDIT, "w-edit", 8);
    worker_new(PROTO_ROLE_SELECT, "w-select", 8);
}

static struct proto_msg status(uint64_t tag)
{
    struct proto_msg m = {.type = PROTO_STATUS};
    m.status = (struct proto_status){.tag = tag, .has_tag = true};
    send_msg(g_client, &m);
    return expect(PROTO_STATUS_REPLY, 3000);
}

Test(itsd, registration_and_status)
{
    daemon_start(NULL);
    g_client = sock_new(g_front, NULL);
    full_cluster();
    worker_new(PROTO_ROLE_EDIT, "w-edit-2", 4);
    pump(300);
    struct proto_msg st = status(77);
    struct proto_status_reply *s = &st.status_reply;
    cr_assert(s->has_tag && s->tag == 77);
    cr_assert_eq(s->roles.instruct, 1);
    cr_assert_eq(s->roles.feedback, 1);
    cr_assert_eq(s->roles.edit, 2);
    cr_assert_eq(s->roles.select, 1);
    cr_assert_eq(s->n_workers, 5);
    cr_assert_eq(s->in_flight, 0);
    cr_assert_eq(s->queue_depth, 0);
    bool seen = false;
    for (uint32_t i = 0; i < s->n_workers; i++) {
        if (strcmp(s->workers[i].id, "w-edit-2") == 0) {
            seen = true;
            cr_assert_eq(s->workers[i].role, PROTO_ROLE_EDIT);
            cr_assert_eq(s->workers[i].capacity.max_seqs, 4);
            cr_assert_str_eq(s->workers[i].model, "fake-model");
        }
    }
    cr_assert(seen, "w-edit-2 is not in the worker list");
    proto_msg_free(&st);

    /* a worker that says disconnect is forgotten at once; one that goes silent is dropped
     * after liveness x heartbeat */
    struct proto_msg dc = {.type = PROTO_DISCONNECT};
    dc.disconnect.reason = "test";
    send_msg(g_w[4].s, &dc);
    g_w[4].silent = true;
    g_w[1].silent = true;
    pump(HB_MS * 3 + 400);
    st = status(78);
    cr_assert_eq(st.status_reply.roles.edit, 1, "the draining edit worker still counts");
    cr_assert_eq(st.status_reply.roles.feedback, 0, "the silent feedback worker still counts");
    cr_assert_eq(st.status_reply.n_workers, 3, "%u workers listed", st.status_reply.n_workers);
    proto_msg_free(&st);

    /* itsd heartbeats its workers */
    struct proto_msg hb;
    int got = 0;
    uint64_t end = tu_now_ms() + 1000;
    while (!got && tu_now_ms() < end) {
        zmq_pollitem_t it = {.socket = g_w[0].s, .events = ZMQ_POLLIN};
        zmq_poll(&it, 1, 50);
        while (recv_now(g_w[0].s, PROTO_TO_WORKER, &hb)) {
            got += hb.type == PROTO_HEARTBEAT;
            proto_msg_free(&hb);
        }
    }
    cr_assert(got, "no heartbeat from itsd within 1 s");
    daemon_stop();
}

Test(itsd, full_request_2x2x1_and_get)
{
    daemon_start(NULL);
    g_client = sock_new(g_front, NULL);
    full_cluster();
    g_w[0].samples = true;
    pump(200);
    char *id = submit(1, 2, 2, 1, 20000);
    struct proto_msg res = expect(PROTO_RESULT, 10000);
    check_result(&res.result, id, 2);
    cr_assert(!res.result.partial);
    for (uint32_t i = 0; i < 2; i++) {
        const struct proto_candidate *c = &res.result.candidates[i];
        char want[64];
        snprintf(want, sizeof want, "edited(draft-%u)", c->draft_index);
        cr_assert_not_null(c->edit, "candidate %u is not edited", i);
        cr_assert_str_eq(c->edit, want);
        snprintf(want, sizeof want, "draft-%u", c->draft_index);
        cr_assert_str_eq(c->draft, want);
        cr_assert_eq(c->n_feedbacks, 1, "one feedback per edit");
        cr_assert(strncmp(c->feedbacks[0], "The response is partially helpful", 33) == 0);
    }
    cr_assert_neq(res.result.candidates[0].draft_index, res.result.candidates[1].draft_index);
    cr_assert_eq(res.result.usage.instruct.completion_tokens, 6);
    cr_assert_eq(g_w[0].n_jobs, 1, "one instruct job for both drafts");
    cr_assert_eq(g_w[0].jobs[0].generate.n, 2);
    cr_assert_eq(g_w[1].n_jobs, 2, "one feedback job per draft");
    cr_assert_eq(g_w[2].n_jobs, 2, "one edit job per draft");

    /* the result is kept for `get` */
    struct proto_msg g = {.type = PROTO_GET};
    g.get.id = id;
    send_msg(g_client, &g);
    struct proto_msg again = expect(PROTO_RESULT, 3000);
    cr_assert(proto_msg_equal(&res, &again), "get returned a different result");
    proto_msg_free(&again);
    proto_msg_free(&res);

    /* an unknown id is not_found, naming it */
    g.get.id = "r0123456789abcdef";
    send_msg(g_client, &g);
    struct proto_msg e = expect(PROTO_ERROR, 3000);
    cr_assert_eq(e.error.code, PROTO_ERR_NOT_FOUND);
    cr_assert_not_null(strstr(e.error.message, "r0123456789abcdef"));
    proto_msg_free(&e);
    free(id);
    daemon_stop();
}

Test(itsd, pipelined_feedback_starts_before_the_last_draft)
{
    daemon_start(NULL);
    g_client = sock_new(g_front, NULL);
    full_cluster();
    struct worker *ins = &g_w[0], *fb = &g_w[1];
    ins->manual = true;
    pump(200);
    char *id = submit(2, 2, 1, 1, 20000);
    PUMP_UNTIL(ins->n_jobs == 1, 3000);
    cr_assert_eq(ins->n_jobs, 1, "no instruct job: %s", log_tail());
    const struct proto_generate *g = &ins->jobs[0].generate;
    cr_assert_eq(g->n, 2);
    worker_send_sample(ins, g->job, 0, "draft-0");
    /* draft 1 is not sent: its feedback job must not wait for it */
    PUMP_UNTIL(fb->n_jobs >= 1, 3000);
    cr_assert_eq(fb->n_jobs, 1, "feedback did not start on the first sample: %s", log_tail());
    const char *response = last_assistant(fb->jobs[0].generate.messages,
                                          fb->jobs[0].generate.n_messages);
    cr_assert_str_eq(response, "draft-0");
    worker_send_sample(ins, g->job, 1, "draft-1");
    ins->manual = false;
    worker_answer(ins, &ins->jobs[0]);
    struct proto_msg res = expect(PROTO_RESULT, 10000);
    check_result(&res.result, id, 2);
    proto_msg_free(&res);
    free(id);
    daemon_stop();
}

Test(itsd, silent_worker_job_is_redispatched)
{
    daemon_start(NULL);
    g_client = sock_new(g_front, NULL);
    struct worker *a = worker_new(PROTO_ROLE_INSTRUCT, "w-instruct-a", 8);
    struct worker *b = worker_new(PROTO_ROLE_INSTRUCT, "w-instruct-b", 8);
    worker_new(PROTO_ROLE_FEEDBACK, "w-feedback", 8);
    worker_new(PROTO_ROLE_EDIT, "w-edit", 8);
    worker_new(PROTO_ROLE_SELECT, "w-select", 8);
    a->silent_on_job = b->silent_on_job = true;
    pump(200);
    uint64_t t0 = tu_now_ms();
    char *id = submit(3, 1, 1, 1, 20000);
    struct proto_msg res = expect(PROTO_RESULT, 10000);
    check_result(&res.result, id, 1);
    struct worker *dead = a->silent ? a : b, *alive = a->silent ? b : a;
    cr_assert(dead->silent && !alive->silent);
    cr_assert_eq(dead->n_jobs, 1);
    cr_assert_eq(alive->n_jobs, 1, "the job was not re-sent to the other instruct worker");
    assert_same_work(&alive->jobs[0], &dead->jobs[0]);
    /* its last heartbeat was at most one interval before the job: it expires at least
     * (liveness - 1) intervals after the submit */
    cr_assert_geq(tu_now_ms() - t0, HB_MS * 2, "re-dispatched before the worker could expire");
    proto_msg_free(&res);
    struct proto_msg st = status(9);
    cr_assert_eq(st.status_reply.roles.instruct, 1, "the silent worker is still listed");
    proto_msg_free(&st);
    free(id);
    daemon_stop();
}

Test(itsd, vanished_feedback_role_fails_naming_it)
{
    daemon_start("--no-worker-grace-ms 800");
    g_client = sock_new(g_front, NULL);
    full_cluster();
    pump(200);
    /* the only feedback worker dies (its socket closes, heartbeats stop) */
    sock_close(g_w[1].s);
    g_w[1].s = NULL;
    uint64_t t0 = tu_now_ms();
    char *id = submit(4, 1, 2, 1, 10000);
    struct proto_msg e = expect(PROTO_ERROR, 8000);
    uint64_t took = tu_now_ms() - t0;
    cr_assert_eq(e.error.code, PROTO_ERR_NO_WORKER, "code %s: %s", proto_err_name(e.error.code),
                 e.error.message);
    cr_assert_str_eq(e.error.id, id);
    cr_assert(e.error.has_tag && e.error.tag == 4);
    cr_assert_not_null(strstr(e.error.message, "feedback"), "message: %s", e.error.message);
    cr_assert_lt(took, 10000, "the error came only at the deadline");
    cr_assert_geq(took, 800, "failed before the grace period (%llu ms)",
                  (unsigned long long)took);
    proto_msg_free(&e);
    free(id);
    daemon_stop();
}

Test(itsd, deadline_returns_partial_result_and_cancels)
{
    daemon_start(NULL);
    g_client = sock_new(g_front, NULL);
    full_cluster();
    struct worker *ed = &g_w[2];
    ed->answer_limit = 1; /* the second edit never comes back */
    pump(200);
    uint64_t t0 = tu_now_ms();
    char *id = submit(5, 2, 1, 1, 1500);
    struct proto_msg res = expect(PROTO_RESULT, 6000);
    uint64_t took = tu_now_ms() - t0;
    cr_assert(res.result.partial, "a result before the deadline should not be partial");
    cr_assert_geq(took, 1400, "partial result after %llu ms, deadline 1500",
                  (unsigned long long)took);
    check_result(&res.result, id, 1);
    cr_assert_eq(ed->n_jobs, 2);
    uint64_t stalled = job_id(&ed->jobs[1]);
    PUMP_UNTIL(worker_cancelled(ed, stalled), 2000);
    cr_assert(worker_cancelled(ed, stalled), "the stalled edit job was not cancelled");
    proto_msg_free(&res);
    free(id);
    daemon_stop();
}

Test(itsd, deadline_with_nothing_scored_is_an_error)
{
    daemon_start(NULL);
    g_client = sock_new(g_front, NULL);
    full_cluster();
    g_w[0].manual = true;
    pump(200);
    char *id = submit(6, 1, 1, 1, 700);
    struct proto_msg e = expect(PROTO_ERROR, 5000);
    cr_assert_eq(e.error.code, PROTO_ERR_DEADLINE, "%s", e.error.message);
    cr_assert_str_eq(e.error.id, id);
    PUMP_UNTIL(worker_cancelled(&g_w[0], job_id(&g_w[0].jobs[0])), 2000);
    cr_assert(worker_cancelled(&g_w[0], job_id(&g_w[0].jobs[0])));
    proto_msg_free(&e);
    free(id);
    daemon_stop();
}

Test(itsd, cancel_reaches_the_workers)
{
    daemon_start(NULL);
    g_client = sock_new(g_front, NULL);
    full_cluster();
    g_w[0].manual = true;
    pump(200);
    char *id = submit(7, 2, 1, 1, 20000);
    PUMP_UNTIL(g_w[0].n_jobs == 1, 3000);
    cr_assert_eq(g_w[0].n_jobs, 1);
    struct proto_msg c = {.type = PROTO_CANCEL};
    c.cancel.id = id;
    send_msg(g_client, &c);
    struct proto_msg e = expect(PROTO_ERROR, 3000);
    cr_assert_eq(e.error.code, PROTO_ERR_CANCELLED);
    cr_assert_str_eq(e.error.id, id);
    uint64_t job = job_id(&g_w[0].jobs[0]);
    PUMP_UNTIL(worker_cancelled(&g_w[0], job), 2000);
    cr_assert(worker_cancelled(&g_w[0], job), "cancel_job did not reach the instruct worker");
    proto_msg_free(&e);
    /* afterwards `get` tells the same */
    struct proto_msg g = {.type = PROTO_GET};
    g.get.id = id;
    send_msg(g_client, &g);
    e = expect(PROTO_ERROR, 3000);
    cr_assert_eq(e.error.code, PROTO_ERR_CANCELLED);
    proto_msg_free(&e);
    free(id);
    daemon_stop();
}

Test(itsd, vanished_client_cancels_its_jobs)
{
    daemon_start(NULL);
    g_client = sock_new(g_front, NULL);
    full_cluster();
    g_w[0].manual = true;
    pump(200);
    char *id = submit(8, 2, 1, 1, 20000);
    PUMP_UNTIL(g_w[0].n_jobs == 1, 3000);
    cr_assert_eq(g_w[0].n_jobs, 1);
    sock_close(g_client);
    g_client = NULL;
    uint64_t job = job_id(&g_w[0].jobs[0]);
    PUMP_UNTIL(worker_cancelled(&g_w[0], job), 3000);
    cr_assert(worker_cancelled(&g_w[0], job),
              "cancel_job did not reach the worker after the client went away: %s", log_tail());
    free(id);
    daemon_stop();
}

/* A client that submits and closes at once: itsd reads the close (monitor) before the submit
 * frame still queued from that connection. Nobody waits for that request, so it must not stay
 * in flight until its deadline: itsd learns the client is gone when its `accepted` cannot be
 * sent (ROUTER_MANDATORY), and cancels the request. */
Test(itsd, submit_from_an_already_closed_connection_is_cancelled)
{
    daemon_start(NULL);
    g_client = sock_new(g_front, NULL);
    full_cluster();
    pump(200);
    struct proto_msg st = status(1);
    proto_msg_free(&st);

    void *orphan = sock_new(g_front, NULL);
    struct proto_msg ask = {.type = PROTO_STATUS};
    ask.status = (struct proto_status){.tag = 2, .has_tag = true};
    send_msg(orphan, &ask);
    struct proto_msg reply;
    int got = 0;
    for (uint64_t until = tu_now_ms() + 3000; !got && tu_now_ms() < until;) {
        pump(5);
        got = recv_now(orphan, PROTO_TO_CLIENT, &reply);
    }
    cr_assert(got, "the second client got no status reply (not connected): %s", log_tail());
    proto_msg_free(&reply);

    /* itsd is stopped while the client queues many status requests, then the submit, and
     * closes: on resuming, itsd's I/O thread reads all of it and the close at once, and the
     * close reaches the monitor while the daemon still answers the statuses, before it
     * reads the submit. */
    cr_assert_eq(kill(g_pid, SIGSTOP), 0);
    int send_timeout_ms = 2000; /* a stopped peer must not hang the test in a full queue */
    zmq_setsockopt(orphan, ZMQ_SNDTIMEO, &send_timeout_ms, sizeof send_timeout_ms);
    for (int i = 0; i < 200; i++)
        send_msg(orphan, &ask);
    struct proto_msg m = {.type = PROTO_SUBMIT};
    m.submit = (struct proto_submit){
        .tag = 3, .messages = g_question, .n_messages = 1, .drafts = 2, .feedbacks = 1,
        .edits = 1, .feedbacks_per_edit = 1, .deadline_ms = 20000, .seed = 1,
        .has_drafts = true, .has_feedbacks = true, .has_edits = true,
        .has_feedbacks_per_edit = true, .has_deadline_ms = true, .has_seed = true};
    send_msg(orphan, &m);
    int linger = 2000;
    zmq_setsockopt(orphan, ZMQ_LINGER, &linger, sizeof linger);
    sock_close(orphan); /* the submit goes out, then the connection closes */
    usleep(100 * 1000);
    cr_assert_eq(kill(g_pid, SIGCONT), 0);

    uint32_t in_flight = 1, queued = 1;
    for (uint64_t until = tu_now_ms() + 3000; (in_flight || queued) && tu_now_ms() < until;) {
        pump(50);
        st = status(4);
        in_flight = st.status_reply.in_flight;
        queued = st.status_reply.queue_depth;
        proto_msg_free(&st);
    }
    cr_assert_eq(in_flight + queued, 0,
                 "the orphaned request is still in flight (%u) or queued (%u): %s", in_flight,
                 queued, log_tail());
    daemon_stop();
}

Test(itsd, busy_beyond_the_queue)
{
    daemon_start("--max-inflight 1 --max-queued 1");
    g_client = sock_new(g_front, NULL);
    pump(100);
    char *a = submit(10, 1, 1, 1, 20000); /* runs (its draft waits for a worker) */
    char *b = submit(11, 1, 1, 1, 20000); /* waits in the queue */
    struct proto_msg m = {.type = PROTO_SUBMIT};
    m.submit = (struct proto_submit){.tag = 12, .messages = g_question, .n_messages = 1};
    send_msg(g_client, &m);
    struct proto_msg e = expect(PROTO_ERROR, 3000);
    cr_assert_eq(e.error.code, PROTO_ERR_BUSY, "%s", e.error.message);
    cr_assert(e.error.has_tag && e.error.tag == 12);
    proto_msg_free(&e);
    struct proto_msg st = status(13);
    cr_assert_eq(st.status_reply.in_flight, 1);
    cr_assert_eq(st.status_reply.queue_depth, 1);
    proto_msg_free(&st);
    /* a running request that is cancelled frees its slot for the queued one */
    full_cluster();
    struct proto_msg c = {.type = PROTO_CANCEL};
    c.cancel.id = a;
    send_msg(g_client, &c);
    e = expect(PROTO_ERROR, 3000);
    cr_assert_eq(e.error.code, PROTO_ERR_CANCELLED);
    proto_msg_free(&e);
    struct proto_msg res = expect(PROTO_RESULT, 10000);
    cr_assert_str_eq(res.result.id, b);
    proto_msg_free(&res);
    free(a);
    free(b);
    daemon_stop();
}

Test(itsd, restarted_worker_gets_its_job_again)
{
    daemon_start(NULL);
    g_client = sock_new(g_front, NULL);
    full_cluster();
    struct worker *ins = &g_w[0];
    ins->manual = true;
    pump(200);
    char *id = submit(30, 1, 1, 1, 20000);
    PUMP_UNTIL(ins->n_jobs == 1, 3000);
    cr_assert_eq(ins->n_jobs, 1);
    /* the same routing id says ready again: a restarted process that lost its jobs */
    struct proto_msg m = {.type = PROTO_READY};
    m.ready = (struct proto_ready){
        .worker = ins->name, .role = PROTO_ROLE_INSTRUCT, .model = "fake-model",
        .backend = "cpu", .capacity = {.max_seqs = 8, .max_ctx = 8192, .kv_tokens = 65536}};
    send_msg(ins->s, &m);
    PUMP_UNTIL(ins->n_jobs == 2, 3000);
    cr_assert_eq(ins->n_jobs, 2, "the job was not sent again after re-registration");
    assert_same_work(&ins->jobs[1], &ins->jobs[0]);
    worker_answer(ins, &ins->jobs[1]);
    struct proto_msg res = expect(PROTO_RESULT, 10000);
    check_result(&res.result, id, 1);
    proto_msg_free(&res);
    free(id);
    daemon_stop();
}

Test(itsd, disconnecting_worker_hands_its_job_on_at_once)
{
    daemon_start("--liveness 20"); /* expiry 2 s: only the disconnect can move the job */
    g_client = sock_new(g_front, NULL);
    struct worker *a = worker_new(PROTO_ROLE_INSTRUCT, "w-instruct-a", 8);
    struct worker *b = worker_new(PROTO_ROLE_INSTRUCT, "w-instruct-b", 8);
    worker_new(PROTO_ROLE_FEEDBACK, "w-feedback", 8);
    worker_new(PROTO_ROLE_EDIT, "w-edit", 8);
    worker_new(PROTO_ROLE_SELECT, "w-select", 8);
    a->manual = b->manual = true;
    pump(200);
    char *id = submit(32, 1, 1, 1, 20000);
    PUMP_UNTIL(a->n_jobs + b->n_jobs == 1, 3000);
    cr_assert_eq(a->n_jobs + b->n_jobs, 1);
    struct worker *leaving = a->n_jobs ? a : b, *staying = a->n_jobs ? b : a;
    struct proto_msg dc = {.type = PROTO_DISCONNECT};
    dc.disconnect.reason = "SIGTERM: draining";
    send_msg(leaving->s, &dc);
    leaving->silent = true;
    uint64_t t0 = tu_now_ms();
    PUMP_UNTIL(staying->n_jobs == 1, 1500);
    cr_assert_eq(staying->n_jobs, 1, "the job of the leaving worker was not handed on");
    cr_assert_lt(tu_now_ms() - t0, 1000, "handed on only at heartbeat expiry");
    assert_same_work(&staying->jobs[0], &leaving->jobs[0]);
    staying->manual = false;
    worker_answer(staying, &staying->jobs[0]);
    struct proto_msg res = expect(PROTO_RESULT, 10000);
    check_result(&res.result, id, 1);
    proto_msg_free(&res);
    free(id);
    daemon_stop();
}

Test(itsd, job_errors_retry_then_give_up)
{
    daemon_start("--job-retries 1");
    g_client = sock_new(g_front, NULL);
    full_cluster();
    struct worker *fb = &g_w[1];
    fb->manual = true;
    pump(200);
    char *id = submit(31, 1, 1, 1, 20000);
    /* a retryable failure: the job comes back (the only feedback worker gets it again) */
    PUMP_UNTIL(fb->n_jobs == 1, 3000);
    cr_assert_eq(fb->n_jobs, 1);
    struct proto_msg je = {.type = PROTO_JOB_ERROR};
    je.job_error = (struct proto_job_error){.job = job_id(&fb->jobs[0]),
                                            .code = PROTO_ERR_INTERNAL, .message = "oops"};
    send_msg(fb->s, &je);
    PUMP_UNTIL(fb->n_jobs == 2, 3000);
    cr_assert_eq(fb->n_jobs, 2, "a retryable job_error was not retried");
    assert_same_work(&fb->jobs[1], &fb->jobs[0]);
    /* retries spent: the request fails, saying so */
    je.job_error.job = job_id(&fb->jobs[1]);
    je.job_error.message = "oops again";
    send_msg(fb->s, &je);
    struct proto_msg e = expect(PROTO_ERROR, 3000);
    cr_assert_str_eq(e.error.id, id);
    cr_assert_eq(e.error.code, PROTO_ERR_WORKER_LOST, "%s: %s", proto_err_name(e.error.code),
                 e.error.message);
    cr_assert_not_null(strstr(e.error.message, "oops again"), "%s", e.error.message);
    proto_msg_free(&e);
    free(id);
    daemon_stop();
}

Test(itsd, sigterm_drains_then_ends_running_requests)
{
    daemon_start(NULL); /* --shutdown-ms 1000 */
    g_client = sock_new(g_front, NULL);
    full_cluster();
    g_w[0].manual = true;
    pump(200);
    char *id = submit(40, 1, 1, 1, 20000);
    PUMP_UNTIL(g_w[0].n_jobs == 1, 3000);
    cr_assert_eq(g_w[0].n_jobs, 1);
    uint64_t t0 = tu_now_ms();
    kill(g_pid, SIGTERM);
    pump(100);
    /* no new work while draining */
    struct proto_msg m = {.type = PROTO_SUBMIT};
    m.submit = (struct proto_submit){.tag = 41, .messages = g_question, .n_messages = 1};
    send_msg(g_client, &m);
    struct proto_msg e = expect(PROTO_ERROR, 3000);
    cr_assert_eq(e.error.code, PROTO_ERR_SHUTTING_DOWN, "%s", e.error.message);
    cr_assert_eq(e.error.tag, 41);
    proto_msg_free(&e);
    /* the running request gets its end when the drain time is over, its job is cancelled */
    e = expect(PROTO_ERROR, 4000);
    cr_assert_eq(e.error.code, PROTO_ERR_SHUTTING_DOWN, "%s", e.error.message);
    cr_assert_str_eq(e.error.id, id);
    cr_assert_geq(tu_now_ms() - t0, 900, "ended before the drain time");
    uint64_t job = job_id(&g_w[0].jobs[0]);
    PUMP_UNTIL(worker_cancelled(&g_w[0], job), 2000);
    cr_assert(worker_cancelled(&g_w[0], job), "cancel_job was lost at exit");
    proto_msg_free(&e);
    int status = 0;
    uint64_t end = tu_now_ms() + 5000;
    pid_t got = 0;
    while (tu_now_ms() < end && (got = waitpid(g_pid, &status, WNOHANG)) == 0)
        usleep(5000);
    cr_assert_eq(got, g_pid, "itsd did not exit: %s", log_tail());
    g_pid = -1;
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "exit status %d: %s", status,
              log_tail());
    free(id);
}

/* Packs {"v": 1, "type": type, extra...} with msgpack-c. */
static void pack_header(msgpack_packer *pk, size_t n_extra, const char *type)
{
    msgpack_pack_map(pk, 2 + n_extra);
    msgpack_pack_str(pk, 1);
    msgpack_pack_str_body(pk, "v", 1);
    msgpack_pack_int(pk, PROTO_VERSION);
    msgpack_pack_str(pk, 4);
    msgpack_pack_str_body(pk, "type", 4);
    msgpack_pack_str(pk, strlen(type));
    msgpack_pack_str_body(pk, type, strlen(type));
}

static void pack_key(msgpack_packer *pk, const char *k)
{
    msgpack_pack_str(pk, strlen(k));
    msgpack_pack_str_body(pk, k, strlen(k));
}

Test(itsd, malformed_frames_are_answered_and_service_goes_on)
{
    daemon_start(NULL);
    g_client = sock_new(g_front, NULL);
    pump(100);
    /* not msgpack at all */
    send_raw(g_client, "\xc1\xff garbage", 10, 0);
    struct proto_msg e = expect(PROTO_ERROR, 3000);
    cr_assert_eq(e.error.code, PROTO_ERR_BAD_MESSAGE, "%s", e.error.message);
    proto_msg_free(&e);
    /* two frames: a wrong envelope */
    send_raw(g_client, "a", 1, ZMQ_SNDMORE);
    send_raw(g_client, "b", 1, 0);
    e = expect(PROTO_ERROR, 3000);
    cr_assert_not_null(strstr(e.error.message, "envelope"), "%s", e.error.message);
    proto_msg_free(&e);
    /* a submit whose messages are a string: bad_field naming it, the tag echoed */
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    pack_header(&pk, 2, "submit");
    pack_key(&pk, "tag");
    msgpack_pack_uint64(&pk, 99);
    pack_key(&pk, "messages");
    msgpack_pack_str(&pk, 5);
    msgpack_pack_str_body(&pk, "hello", 5);
    send_raw(g_client, sb.data, sb.size, 0);
    msgpack_sbuffer_clear(&sb);
    e = expect(PROTO_ERROR, 3000);
    cr_assert_eq(e.error.code, PROTO_ERR_BAD_FIELD, "%s", e.error.message);
    cr_assert(e.error.has_tag && e.error.tag == 99, "the tag was not echoed");
    cr_assert_not_null(strstr(e.error.message, "messages"), "%s", e.error.message);
    proto_msg_free(&e);
    /* drafts = 10^6 cannot even decode: the error names the field */
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    pack_header(&pk, 3, "submit");
    pack_key(&pk, "tag");
    msgpack_pack_uint64(&pk, 100);
    pack_key(&pk, "messages");
    msgpack_pack_array(&pk, 1);
    msgpack_pack_map(&pk, 2);
    pack_key(&pk, "role");
    pack_key(&pk, "user");
    pack_key(&pk, "content");
    pack_key(&pk, "hi");
    pack_key(&pk, "drafts");
    msgpack_pack_uint32(&pk, 1000000);
    send_raw(g_client, sb.data, sb.size, 0);
    msgpack_sbuffer_clear(&sb);
    e = expect(PROTO_ERROR, 3000);
    cr_assert_not_null(strstr(e.error.message, "drafts"), "%s", e.error.message);
    cr_assert(e.error.has_tag && e.error.tag == 100);
    proto_msg_free(&e);
    /* a valid submit over max_candidates: too_large naming the product */
    struct proto_msg big = {.type = PROTO_SUBMIT};
    big.submit = (struct proto_submit){
        .tag = 101, .messages = g_question, .n_messages = 1, .drafts = 32, .feedbacks = 64,
        .edits = 64, .has_drafts = true, .has_feedbacks = true, .has_edits = true};
    send_msg(g_client, &big);
    e = expect(PROTO_ERROR, 3000);
    cr_assert_eq(e.error.code, PROTO_ERR_TOO_LARGE, "%s", e.error.message);
    cr_assert_not_null(strstr(e.error.message, "max_candidates"), "%s", e.error.message);
    proto_msg_free(&e);

    /* on the backend: garbage, then a heartbeat before ready */
    void *rogue = sock_new(g_back, "rogue");
    send_raw(rogue, "\x93\x01\x02", 3, 0);
    struct proto_msg we;
    bool got = false;
    uint64_t end = tu_now_ms() + 3000;
    while (!got && tu_now_ms() < end) {
        zmq_pollitem_t it = {.socket = rogue, .events = ZMQ_POLLIN};
        zmq_poll(&it, 1, 20);
        got = recv_now(rogue, PROTO_TO_WORKER, &we);
    }
    cr_assert(got, "no error for garbage on the backend");
    cr_assert_eq(we.type, PROTO_ERROR);
    proto_msg_free(&we);
    struct proto_msg hb = {.type = PROTO_HEARTBEAT};
    send_msg(rogue, &hb);
    got = false;
    end = tu_now_ms() + 3000;
    while (!got && tu_now_ms() < end) {
        zmq_pollitem_t it = {.socket = rogue, .events = ZMQ_POLLIN};
        zmq_poll(&it, 1, 20);
        got = recv_now(rogue, PROTO_TO_WORKER, &we);
    }
    cr_assert(got && we.type == PROTO_DISCONNECT,
              "a heartbeat before ready is not answered with disconnect");
    proto_msg_free(&we);
    msgpack_sbuffer_destroy(&sb);

    /* ... and a registered worker's garbage does not hurt it either */
    full_cluster();
    pump(200);
    send_raw(g_w[3].s, "\xa3" "abc", 4, 0);
    char *id = submit(102, 2, 1, 1, 20000);
    struct proto_msg res = expect(PROTO_RESULT, 10000);
    check_result(&res.result, id, 2);
    cr_assert_geq(g_w[3].n_errors, 1, "the select worker's garbage was not answered");
    proto_msg_free(&res);
    free(id);
    daemon_stop();
}

Test(itsd, progress_events_when_asked)
{
    daemon_start("--progress-interval-ms 0");
    g_client = sock_new(g_front, NULL);
    full_cluster();
    pump(200);
    struct proto_msg m = {.type = PROTO_SUBMIT};
    m.submit = (struct proto_submit){
        .tag = 20, .messages = g_question, .n_messages = 1, .drafts = 2, .feedbacks = 1,
        .edits = 1, .progress = true, .has_drafts = true, .has_feedbacks = true,
        .has_edits = true, .has_progress = true};
    send_msg(g_client, &m);
    struct proto_msg a = expect(PROTO_ACCEPTED, 3000);
    struct proto_msg res = expect(PROTO_RESULT, 10000);
    int n = 0;
    uint32_t last_scores = 0;
    struct proto_msg p;
    while (inbox_find(PROTO_PROGRESS) >= 0) {
        p = expect(PROTO_PROGRESS, 0);
        cr_assert_str_eq(p.progress.id, a.accepted.id);
        cr_assert_eq(p.progress.drafts.total, 2);
        cr_assert_geq(p.progress.scores.done, last_scores, "progress went backwards");
        last_scores = p.progress.scores.done;
        n++;
        proto_msg_free(&p);
    }
    cr_assert_geq(n, 2, "%d progress events", n);
    proto_msg_free(&a);
    proto_msg_free(&res);
    daemon_stop();
}

/* ---- itsd -t and the configuration ----------------------------------------------------------- */

struct run {
    int status;
    char *err;
    char *out;
};

static struct run run_itsd(const char *args)
{
    char out[PATH_BYTES], err[PATH_BYTES], cmd[16384];
    snprintf(out, sizeof out, "%s/out.txt", g_dir);
    snprintf(err, sizeof err, "%s/err.txt", g_dir);
    snprintf(cmd, sizeof cmd, "timeout 20 '%s' %s </dev/null >'%s' 2>'%s'", tu_build("bin/itsd"),
             args, out, err);
    int rc = system(cmd);
    struct run r = {.status = rc != -1 && WIFEXITED(rc) ? WEXITSTATUS(rc) : -1};
    r.out = tu_read_file(out, NULL);
    r.err = tu_read_file(err, NULL);
    if (!r.out)
        r.out = strdup("");
    if (!r.err)
        r.err = strdup("");
    return r;
}

static void run_free(struct run *r)
{
    free(r->out);
    free(r->err);
}

Test(itsd, check_config_good_and_bad)
{
    char tpl[PATH_BYTES];
    snprintf(tpl, sizeof tpl, "%s/prompts", g_dir);
    write_templates(tpl);
    /* relative paths in a file are relative to the file */
    tu_write_in(g_dir, "good.conf",
               "# a good file\n[itsd]\nfrontend = ipc:///tmp/x-front\ntemplates = prompts\n"
               "[pipeline]\ndrafts = 2 ; inline comment\n[instruct]\ntemperature = 0.5\n");
    char args[ARGS_BYTES];
    snprintf(args, sizeof args, "-t --config '%s/good.conf'", g_dir);
    struct run r = run_itsd(args);
    cr_assert_eq(r.status, 0, "itsd -t on a good file: %s", r.err);
    run_free(&r);

    tu_write_in(g_dir, "bad.conf",
               "[itsd]\n"                          /* 1 */
               "heartbeat_ms = 500\n"              /* 2 */
               "no_such_key = 1\n"                 /* 3: unknown key */
               "[pipeline]\n"                      /* 4 */
               "drafts = many\n"                   /* 5: bad value */
               "this line has no equals sign\n"    /* 6: syntax */
               "[limits]\n"                        /* 7 */
               "max_candidates = 0\n"              /* 8: out of range */
               "[nowhere]\n"                       /* 9 */
               "x = 1\n");                         /* 10: unknown section */
    snprintf(args, sizeof args, "-t --config '%s/bad.conf' --templates '%s'", g_dir, tpl);
    r = run_itsd(args);
    cr_assert_eq(r.status, 1, "itsd -t on a bad file exited %d: %s", r.status, r.err);
    const char *want[] = {"bad.conf:3:", "no_such_key", "bad.conf:5:", "drafts",
                          "bad.conf:6:", "bad.conf:8:", "max_candidates", "bad.conf:10:"};
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        cr_assert_not_null(strstr(r.err, want[i]), "'%s' missing from:\n%s", want[i], r.err);
    run_free(&r);

    /* flags: a bad value and an unknown flag, both reported */
    snprintf(args, sizeof args, "-t --templates '%s' --drafts 0 --no-such-flag 3", tpl);
    r = run_itsd(args);
    cr_assert_eq(r.status, 1);
    cr_assert_not_null(strstr(r.err, "--drafts"), "%s", r.err);
    cr_assert_not_null(strstr(r.err, "--no-such-flag"), "%s", r.err);
    run_free(&r);

    /* a grace period not below the deadline is refused */
    snprintf(args, sizeof args,
             "-t --templates '%s' --no-worker-grace-ms 5000 --default-deadline-ms 5000", tpl);
    r = run_itsd(args);
    cr_assert_eq(r.status, 1);
    cr_assert_not_null(strstr(r.err, "no_worker_grace_ms"), "%s", r.err);
    run_free(&r);

    /* missing templates are a configuration problem too */
    snprintf(args, sizeof args, "-t --templates '%s/nowhere'", g_dir);
    r = run_itsd(args);
    cr_assert_eq(r.status, 1, "missing templates passed -t");
    run_free(&r);
}

Test(itsd, shipped_config_documents_every_key)
{
    char tpl[PATH_BYTES];
    snprintf(tpl, sizeof tpl, "%s/prompts", g_dir);
    write_templates(tpl);
    char args[ARGS_BYTES];
    snprintf(args, sizeof args, "-t --config '%s' --templates '%s'", tu_src("configs/itsd.conf"),
             tpl);
    struct run r = run_itsd(args);
    cr_assert_eq(r.status, 0, "configs/itsd.conf fails -t: %s", r.err);
    run_free(&r);
    /* every key of --print-config appears in the shipped file, under its section */
    r = run_itsd("--print-config");
    cr_assert_eq(r.status, 0);
    char *conf = tu_read_file(tu_src("configs/itsd.conf"), NULL);
    cr_assert_not_null(conf);
    char section[64] = "";
    int keys = 0;
    for (char *save = NULL, *line = strtok_r(r.out, "\n", &save); line;
         line = strtok_r(NULL, "\n", &save)) {
        if (line[0] == '[') {
            snprintf(section, sizeof section, "%s", line);
            cr_assert_not_null(strstr(conf, section), "%s missing from configs/itsd.conf",
                               section);
            continue;
        }
        if (line[0] == '#' || !strchr(line, '='))
            continue;
        char key[128];
        sscanf(line, "%127s", key);
        const char *sec = strstr(conf, section);
        char needle[160];
        snprintf(needle, sizeof needle, "\n%s =", key);
        const char *at = strstr(sec, needle);
        if (!at) { /* documented but commented out is fine too */
            snprintf(needle, sizeof needle, "\n# %s =", key);
            at = strstr(sec, needle);
        }
        cr_assert_not_null(at, "%s %s is not in configs/itsd.conf", section, key);
        keys++;
    }
    cr_assert_geq(keys, 30);
    free(conf);
    run_free(&r);
}

Test(itsd, config_round_trip_and_override_order)
{
    struct itsd_config a, b;
    char err[4096] = "";
    cr_assert_eq(itsd_config_defaults(&a, err, sizeof err), 0, "%s", err);
    cr_assert_eq(a.feedback.max_tokens, 512);
    cr_assert_float_eq(a.instruct.temperature, 0.7, 1e-12);
    cr_assert_float_eq(a.edit.temperature, 0.0, 1e-12);
    /* write, read back: the same values */
    a.drafts = 3;
    a.instruct.top_p = 0.95;
    char path[PATH_BYTES];
    snprintf(path, sizeof path, "%s/rt.conf", g_dir);
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    cr_assert_eq(itsd_config_write_ini(&a, f), 0);
    fclose(f);
    cr_assert_eq(itsd_config_defaults(&b, err, sizeof err), 0);
    cr_assert_eq(itsd_config_load_file(&b, path, err, sizeof err), 0, "%s", err);
    cr_assert_eq(memcmp(&a, &b, sizeof a), 0, "INI round trip changed the configuration");
    /* flags override the file whatever their order on the command line */
    char *argv[] = {"itsd", "--drafts", "5", "--config", path, "--instruct-top-p=0.5", NULL};
    struct itsd_args args;
    cr_assert_eq(itsd_config_from_args(6, argv, &b, &args, err, sizeof err), 0, "%s", err);
    cr_assert_eq(b.drafts, 5);
    cr_assert_float_eq(b.instruct.top_p, 0.5, 1e-12);
    cr_assert_str_eq(args.config_path, path);
}

Test(itsd, idmap_keeps_every_key_under_churn)
{
    struct idmap *m;
    cr_assert_eq(idmap_new(&m), 0);
    static int vals[5000];
    for (uint64_t k = 1; k <= 5000; k++)
        cr_assert_eq(idmap_put(m, k * 7919, &vals[k - 1]), 0);
    for (uint64_t k = 1; k <= 5000; k += 2)
        cr_assert_eq(idmap_del(m, k * 7919), &vals[k - 1]);
    cr_assert_eq(idmap_count(m), 2500);
    for (uint64_t k = 1; k <= 5000; k++)
        cr_assert_eq(idmap_get(m, k * 7919), k % 2 ? NULL : &vals[k - 1], "key %llu",
                     (unsigned long long)k);
    cr_assert_eq(idmap_put(m, 0, &vals[0]), -1);
    idmap_destroy(&m);
    cr_assert_null(m);
}

/* ---- SIGHUP: reloading the configuration ----------------------------------------------------- */

/* Occurrences of `text` in the daemon's log. */
static int log_count(const char *text)
{
    char *all = tu_read_file(g_log, NULL);
    int n = 0;
    for (const char *p = all ? strstr(all, text) : NULL; p; p = strstr(p + 1, text))
        n++;
    free(all);
    return n;
}

/* Writes g_dir/itsd.conf: the daemon's sockets, templates and heartbeats, log_level, then
 * `rest` (more sections, as INI text). */
static void write_conf(const char *log_level, const char *rest)
{
    char text[8192];
    snprintf(text, sizeof text,
             "[itsd]\nfrontend = %s\nbackend = %s\ntemplates = tpl\nheartbeat_ms = %d\n"
             "liveness = 3\nshutdown_ms = 1000\nlog_level = %s\n%s",
             g_front, g_back, HB_MS, log_level, rest);
    tu_write_in(g_dir, "itsd.conf", text);
}

/* Starts itsd with --config g_dir/itsd.conf and nothing else, so that every setting comes from
 * the file a reload reads again. */
static void daemon_start_conf(void)
{
    char tpl[PATH_BYTES], conf[PATH_BYTES];
    snprintf(tpl, sizeof tpl, "%s/tpl", g_dir);
    write_templates(tpl);
    snprintf(conf, sizeof conf, "%s/itsd.conf", g_dir);
    char *argv[] = {(char *)tu_build("bin/itsd"), "--config", conf, NULL};
    daemon_exec(argv);
}

/* SIGHUP, and waits (serving the fake cluster meanwhile) for the daemon to say how it ended.
 * Returns true when the configuration was applied, false when it was refused. */
static bool reload(void)
{
    int ok = log_count("configuration reloaded from"), refused = log_count("reload refused");
    kill(g_pid, SIGHUP);
    PUMP_UNTIL(log_count("configuration reloaded from") > ok ||
                   log_count("reload refused") > refused,
               5000);
    bool applied = log_count("configuration reloaded from") > ok;
    cr_assert(applied || log_count("reload refused") > refused,
              "no reload line within 5 s of SIGHUP: %s", log_tail());
    return applied;
}

/* A submit with no settings of its own: the daemon's [pipeline] defaults apply. */
static char *submit_defaults(uint64_t tag)
{
    struct proto_msg m = {.type = PROTO_SUBMIT};
    m.submit = (struct proto_submit){.tag = tag, .messages = g_question, .n_messages = 1};
    send_msg(g_client, &m);
    struct proto_msg a = expect(PROTO_ACCEPTED, 3000);
    cr_assert_eq(a.accepted.tag, tag);
    char *id = strdup(a.accepted.id);
    proto_msg_free(&a);
    return id;
}

/* Sends a default submit and returns the error code it got (0: accepted; the id is freed). */
static int submit_code(uint64_t tag)
{
    struct proto_msg m = {.type = PROTO_SUBMIT};
    m.submit = (struct proto_submit){.tag = tag, .messages = g_question, .n_messages = 1};
    send_msg(g_client, &m);
    PUMP_UNTIL(inbox_find(PROTO_ACCEPTED) >= 0 || inbox_find(PROTO_ERROR) >= 0, 3000);
    if (inbox_find(PROTO_ACCEPTED) >= 0) {
        struct proto_msg a = expect(PROTO_ACCEPTED, 0);
        cr_assert_eq(a.accepted.tag, tag);
        proto_msg_free(&a);
        return 0;
    }
    struct proto_msg e = expect(PROTO_ERROR, 3000);
    cr_assert(e.error.has_tag && e.error.tag == tag);
    int code = e.error.code;
    proto_msg_free(&e);
    return code;
}

Test(itsd, reload_applies_log_level_and_limits)
{
    write_conf("debug", "[limits]\nmax_inflight = 1\nmax_queued = 0\n");
    daemon_start_conf();
    g_client = sock_new(g_front, NULL);
    pump(100);
    /* no worker: the first request runs (its draft waits), the queue holds none */
    cr_assert_eq(submit_code(1), 0);
    cr_assert_eq(submit_code(2), PROTO_ERR_BUSY, "max_queued 0 took a second request");
    int traced = log_count("client message status");
    struct proto_msg st = status(3);
    proto_msg_free(&st);
    PUMP_UNTIL(log_count("client message status") > traced, 2000);
    cr_assert_gt(log_count("client message status"), traced, "log_level debug does not trace");

    write_conf("info", "[limits]\nmax_inflight = 1\nmax_queued = 1\n");
    cr_assert(reload(), "%s", log_tail());
    cr_assert_eq(log_count("changed [itsd] log_level, [limits] max_queued;"), 1, "%s",
                 log_tail());
    cr_assert_eq(submit_code(4), 0, "max_queued 1 after the reload still refused a request");
    cr_assert_eq(submit_code(5), PROTO_ERR_BUSY);
    st = status(6);
    cr_assert_eq(st.status_reply.in_flight, 1, "the running request was dropped");
    cr_assert_eq(st.status_reply.queue_depth, 1);
    proto_msg_free(&st);
    traced = log_count("client message status");
    st = status(7);
    proto_msg_free(&st);
    pump(100);
    cr_assert_eq(log_count("client message status"), traced, "log_level info still traces");

    /* the same file again: nothing changes, and the log says so */
    cr_assert(reload());
    cr_assert_eq(log_count("no change;"), 1, "%s", log_tail());
    daemon_stop();
}

/* The role a template's last user message names: what a feedback job was rendered with. */
static const char *last_user(const struct proto_msg *job)
{
    const struct proto_generate *g = &job->generate;
    for (uint32_t i = g->n_messages; i-- > 0;)
        if (g->messages[i].role == PROTO_CHAT_USER)
            return g->messages[i].content;
    return "";
}

Test(itsd, reload_keeps_running_requests_on_their_settings_and_templates)
{
    write_conf("debug", "[limits]\nmax_inflight = 1\n[pipeline]\ndrafts = 2\nfeedbacks = 1\n"
                        "edits = 1\n");
    daemon_start_conf();
    g_client = sock_new(g_front, NULL);
    full_cluster();
    struct worker *inst = &g_w[0], *fb = &g_w[1];
    inst->manual = true; /* drafts wait until the test answers them */
    pump(200);
    char *a = submit_defaults(1); /* runs: 2 drafts */
    char *b = submit_defaults(2); /* queued behind it */
    PUMP_UNTIL(inst->n_jobs == 1, 3000);
    cr_assert_eq(inst->n_jobs, 1);
    cr_assert_eq(inst->jobs[0].generate.n, 2);

    /* new defaults and a new feedback template while `a` runs and `b` waits */
    write_conf("debug", "[limits]\nmax_inflight = 1\n[pipeline]\ndrafts = 3\nfeedbacks = 1\n"
                        "edits = 1\n");
    char tpl[PATH_BYTES];
    snprintf(tpl, sizeof tpl, "%s/tpl", g_dir);
    tu_write_in(tpl, "feedback.tmpl",
               "@conversation\n@assistant\n{response}\n@user\nCritique it, reloaded.\n");
    cr_assert(reload(), "%s", log_tail());
    cr_assert_eq(log_count("changed [pipeline] drafts, feedback template;"), 1, "%s",
                 log_tail());
    cr_assert_eq(log_count("no running request uses them any more"), 0,
                 "the templates of a running request were freed: %s", log_tail());

    /* `a` goes on with what it started with */
    inst->manual = false;
    worker_answer(inst, &inst->jobs[0]);
    struct proto_msg ra = expect(PROTO_RESULT, 10000);
    cr_assert_str_eq(ra.result.id, a, "the first result is not the running request's");
    check_result(&ra.result, a, 2);
    proto_msg_free(&ra);
    cr_assert_geq(fb->n_jobs, 2);
    for (int i = 0; i < 2; i++)
        cr_assert_str_eq(last_user(&fb->jobs[i]), "Evaluate the response.",
                         "feedback job %d of the request started before the reload used the "
                         "new template",
                         i);
    /* `b`, queued across the reload, starts with the new defaults and templates */
    struct proto_msg rb = expect(PROTO_RESULT, 10000);
    check_result(&rb.result, b, 3);
    proto_msg_free(&rb);
    cr_assert_eq(inst->n_jobs, 2);
    cr_assert_eq(inst->jobs[1].generate.n, 3, "the queued request kept the old drafts");
    cr_assert_eq(fb->n_jobs, 5);
    for (int i = 2; i < 5; i++)
        cr_assert_str_eq(last_user(&fb->jobs[i]), "Critique it, reloaded.");
    /* the replaced templates went with the last request that used them */
    cr_assert_eq(log_count("no running request uses them any more"), 1, "%s", log_tail());
    free(a);
    free(b);
    daemon_stop();
}

Test(itsd, reload_refuses_a_bad_configuration_whole)
{
    write_conf("info", "[limits]\nmax_inflight = 1\nmax_queued = 0\n");
    daemon_start_conf();
    g_client = sock_new(g_front, NULL);
    pump(100);
    cr_assert_eq(submit_code(1), 0);
    cr_assert_eq(submit_code(2), PROTO_ERR_BUSY);

    /* a good change beside a bad value: neither applies */
    write_conf("info", "[limits]\nmax_inflight = 1\nmax_queued = 5\n" /* lines 9-11 */
                       "[pipeline]\ndrafts = many\n");              /* line 13 */
    cr_assert(!reload(), "a bad file was applied: %s", log_tail());
    cr_assert_eq(log_count("itsd.conf:13: [pipeline] drafts"), 1, "%s", log_tail());
    cr_assert_eq(log_count("reload refused: 1 problem, old configuration kept"), 1, "%s",
                 log_tail());
    cr_assert_eq(submit_code(3), PROTO_ERR_BUSY, "max_queued changed by a refused reload");

    /* a good file with a broken template: refused too */
    write_conf("info", "[limits]\nmax_inflight = 1\nmax_queued = 5\n");
    char tpl[PATH_BYTES];
    snprintf(tpl, sizeof tpl, "%s/tpl", g_dir);
    tu_write_in(tpl, "edit.tmpl", "@conversation\n@user\n{response} but no feedback\n");
    cr_assert(!reload(), "a broken template was applied: %s", log_tail());
    cr_assert_eq(log_count("reload: templates:"), 1, "%s", log_tail());
    cr_assert_eq(log_count("edit.tmpl"), 1, "the template problem is not named: %s",
                 log_tail());
    cr_assert_eq(submit_code(4), PROTO_ERR_BUSY);

    /* fixed: applied, and the request accepted before every reload is still running */
    write_templates(tpl);
    cr_assert(reload(), "%s", log_tail());
    cr_assert_eq(submit_code(5), 0);
    struct proto_msg st = status(6);
    cr_assert_eq(st.status_reply.in_flight, 1);
    cr_assert_eq(st.status_reply.queue_depth, 1);
    proto_msg_free(&st);
    daemon_stop();
}

Test(itsd, reload_warns_about_restart_only_keys_and_keeps_them)
{
    write_conf("info", "[limits]\nmax_queued = 0\nmax_inflight = 1\n");
    daemon_start_conf();
    g_client = sock_new(g_front, NULL);
    pump(100);
    cr_assert_eq(submit_code(1), 0);
    cr_assert_eq(submit_code(2), PROTO_ERR_BUSY);
    /* a new frontend endpoint and hwm need a restart; max_queued does not */
    char moved[PATH_BYTES], rest[3000];
    snprintf(moved, sizeof moved, "ipc://%s/moved.sock", g_dir);
    snprintf(rest, sizeof rest, "[limits]\nmax_queued = 2\nmax_inflight = 1\n");
    char text[8192];
    snprintf(text, sizeof text,
             "[itsd]\nfrontend = %s\nbackend = %s\ntemplates = tpl\nheartbeat_ms = %d\n"
             "liveness = 3\nshutdown_ms = 1000\nlog_level = info\nhwm = 77\n%s",
             moved, g_back, HB_MS, rest);
    tu_write_in(g_dir, "itsd.conf", text);
    cr_assert(reload(), "%s", log_tail());
    char want[2 * PATH_BYTES + 100];
    snprintf(want, sizeof want, "reload: [itsd] frontend = %s needs a restart; it stays %s",
             moved, g_front);
    cr_assert_eq(log_count(want), 1, "%s", log_tail());
    cr_assert_eq(log_count("reload: [itsd] hwm = 77 needs a restart; it stays 10000"), 1, "%s",
                 log_tail());
    cr_assert_eq(log_count("changed [limits] max_queued;"), 1, "%s", log_tail());
    /* the old endpoint still serves, the new one was never bound, max_queued applies */
    cr_assert_eq(submit_code(3), 0, "max_queued 2 did not apply");
    char moved_path[PATH_BYTES];
    snprintf(moved_path, sizeof moved_path, "%s/moved.sock", g_dir);
    struct stat sb;
    cr_assert_neq(stat(moved_path, &sb), 0, "a reload bound the new frontend endpoint");
    struct proto_msg st = status(4);
    cr_assert_eq(st.status_reply.in_flight, 1);
    proto_msg_free(&st);
    daemon_stop();
}

Test(itsd, reload_below_the_running_count_starts_nothing_until_under)
{
    write_conf("info", "[limits]\nmax_inflight = 2\nmax_queued = 4\n[pipeline]\ndrafts = 1\n"
                       "feedbacks = 1\nedits = 1\n");
    daemon_start_conf();
    g_client = sock_new(g_front, NULL);
    full_cluster();
    struct worker *inst = &g_w[0];
    inst->manual = true;
    pump(200);
    char *a = submit_defaults(1), *b = submit_defaults(2);
    PUMP_UNTIL(inst->n_jobs == 2, 3000);
    write_conf("info", "[limits]\nmax_inflight = 1\nmax_queued = 4\n[pipeline]\ndrafts = 1\n"
                       "feedbacks = 1\nedits = 1\n");
    cr_assert(reload(), "%s", log_tail());
    char *c = submit_defaults(3);
    struct proto_msg st = status(4);
    cr_assert_eq(st.status_reply.in_flight, 2, "a running request was dropped by the reload");
    cr_assert_eq(st.status_reply.queue_depth, 1);
    proto_msg_free(&st);
    /* one finishes: still one running, at the new limit, so `c` waits */
    worker_answer(inst, &inst->jobs[0]);
    struct proto_msg r = expect(PROTO_RESULT, 10000);
    cr_assert_str_eq(r.result.id, a);
    proto_msg_free(&r);
    st = status(5);
    cr_assert_eq(st.status_reply.in_flight, 1);
    cr_assert_eq(st.status_reply.queue_depth, 1, "a request started over max_inflight");
    proto_msg_free(&st);
    cr_assert_eq(inst->n_jobs, 2);
    /* the other finishes: `c` starts */
    inst->manual = false;
    worker_answer(inst, &inst->jobs[1]);
    r = expect(PROTO_RESULT, 10000);
    cr_assert_str_eq(r.result.id, b);
    proto_msg_free(&r);
    r = expect(PROTO_RESULT, 10000);
    cr_assert_str_eq(r.result.id, c);
    proto_msg_free(&r);
    free(a);
    free(b);
    free(c);
    daemon_stop();
}

/* Reads every datagram waiting on `fd` into buf (NUL-separated messages appended). */
static void notify_drain(int fd, char *buf, size_t len)
{
    for (;;) {
        size_t used = strlen(buf);
        if (used + 2 >= len)
            return;
        ssize_t n = recv(fd, buf + used, len - used - 2, MSG_DONTWAIT);
        if (n <= 0)
            return;
        buf[used + (size_t)n] = '\n';
        buf[used + (size_t)n + 1] = '\0';
    }
}

Test(itsd, reload_tells_systemd_reloading_then_ready)
{
    char sock_path[PATH_BYTES];
    snprintf(sock_path, sizeof sock_path, "%s/notify.sock", g_dir);
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    cr_assert_geq(fd, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    cr_assert_lt(strlen(sock_path), sizeof sa.sun_path, "scratch path too long for a socket");
    memcpy(sa.sun_path, sock_path, strlen(sock_path) + 1);
    cr_assert_eq(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0, "bind: %s", strerror(errno));
    write_conf("info", "[limits]\nmax_queued = 3\n");
    setenv("NOTIFY_SOCKET", sock_path, 1);
    daemon_start_conf();
    unsetenv("NOTIFY_SOCKET");
    static char got[8192];
    got[0] = '\0';
    uint64_t end = tu_now_ms() + 3000;
    while (!strstr(got, "READY=1") && tu_now_ms() < end) {
        notify_drain(fd, got, sizeof got);
        usleep(5000);
    }
    if (!strstr(got, "READY=1")) {
        close(fd);
        daemon_stop();
        cr_skip_test("itsd sent no READY=1: built without libsystemd");
    }
    got[0] = '\0';
    write_conf("info", "[limits]\nmax_queued = 4\n");
    cr_assert(reload(), "%s", log_tail());
    end = tu_now_ms() + 3000;
    while (!strstr(got, "READY=1") && tu_now_ms() < end) {
        notify_drain(fd, got, sizeof got);
        usleep(5000);
    }
    close(fd);
    const char *reloading = strstr(got, "RELOADING=1\nMONOTONIC_USEC=");
    cr_assert_not_null(reloading, "no RELOADING=1 with MONOTONIC_USEC: '%s'", got);
    const char *ready = strstr(got, "READY=1");
    cr_assert(ready && ready > reloading, "no READY=1 after RELOADING=1: '%s'", got);
    /* MONOTONIC_USEC is CLOCK_MONOTONIC in microseconds, taken during the reload */
    unsigned long long usec = strtoull(reloading + strlen("RELOADING=1\nMONOTONIC_USEC="), NULL,
                                       10);
    cr_assert_gt(usec, 0ull);
    cr_assert_leq(usec, tu_now_ms() * 1000ull, "MONOTONIC_USEC %llu is in the future", usec);
    daemon_stop();
}
