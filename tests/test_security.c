/* test_security.c — CurveZMQ on itsd's sockets as its users meet it: the real build/bin/itsd
 * and itsctl on loopback TCP, fake workers (DEALER sockets speaking the protocol, with or
 * without keys) and libits in the test process. Keys come from its_keygen; allow-lists are
 * directories of NAME.pub files in a scratch directory.
 *
 * Checked: a worker or client whose key is not listed gets nowhere (and itsd's log says so,
 * once per key per interval), a listed one works end to end; the bytes on the wire hold
 * neither question nor answer with curve on, and do with curve off (so the check can fail);
 * plain text on a non-loopback endpoint is refused unless forced; SIGHUP adds and removes
 * keys without a restart and keeps the old lists when the new ones are broken; the
 * per-client request limit; keygen's files and modes; the ZAP handler's answers.
 *
 * Every test is bounded (Criterion .timeout) and kills what it started (fini, and
 * PR_SET_PDEATHSIG should the test process die).
 */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "its.h"
#include "itsd_config.h"
#include "itsd_log.h"
#include "proto.h"
#include "testutil.h"
#include "zap.h"

#define PATH_BYTES 1200
#define SECRET "ZEBRA-7fq3-CONFIDENTIAL-QUESTION"

static char g_dir[1024];
static char g_log[PATH_BYTES];
static char g_front[128], g_back[128];
static int g_front_port;
static pid_t g_pid = -1;
static void *g_zctx;

static const char *path_in(const char *rel)
{
    static char buf[8][PATH_BYTES];
    static int next;
    char *p = buf[next++ % 8];
    snprintf(p, PATH_BYTES, "%s/%s", g_dir, rel);
    return p;
}

static char *log_text(void)
{
    char *t = tu_read_file(g_log, NULL);
    return t ? t : strdup("");
}

static const char *log_tail(void)
{
    return tu_file_tail(g_log, 2500);
}

static int log_count(const char *needle)
{
    char *all = log_text();
    int n = 0;
    for (const char *p = all; (p = strstr(p, needle)) != NULL; p += strlen(needle))
        n++;
    free(all);
    return n;
}

static bool wait_log(const char *needle, int at_least, int ms)
{
    uint64_t end = tu_now_ms() + (uint64_t)ms;
    while (tu_now_ms() < end) {
        if (log_count(needle) >= at_least)
            return true;
        usleep(10000);
    }
    return false;
}

static void write_text(const char *path, const char *text)
{
    cr_assert_eq(tu_write_file(path, text, strlen(text)), 0, "cannot write %s", path);
}

static void copy_file(const char *from, const char *to)
{
    size_t len = 0;
    char *t = tu_read_file(from, &len);
    cr_assert_not_null(t, "cannot read %s", from);
    cr_assert_eq(tu_write_file(to, t, len), 0, "cannot write %s", to);
    free(t);
}

/* ---- keys ------------------------------------------------------------------------------------ */

/* keys/NAME.key and keys/NAME.pub for each name; clients/ lists alice and bob, workers/ lists
 * wgood. mallory and wbad have keys nobody listed. */
static void make_keys(void)
{
    mkdir(path_in("keys"), 0700);
    mkdir(path_in("clients"), 0700);
    mkdir(path_in("workers"), 0700);
    const char *names[] = {"srv", "alice", "bob", "mallory", "wgood", "wbad"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        char prefix[PATH_BYTES], err[512];
        snprintf(prefix, sizeof prefix, "%s/keys/%s", g_dir, names[i]);
        cr_assert_eq(its_keygen(prefix, NULL, err, sizeof err), 0, "keygen: %s", err);
    }
    copy_file(path_in("keys/alice.pub"), path_in("clients/alice.pub"));
    copy_file(path_in("keys/bob.pub"), path_in("clients/bob.pub"));
    copy_file(path_in("keys/wgood.pub"), path_in("workers/wgood.pub"));
}

static void key_z85(const char *name, char pub[ITS_KEY_Z85_LEN + 1],
                    char sec[ITS_KEY_Z85_LEN + 1])
{
    char rel[64], err[512];
    snprintf(rel, sizeof rel, "keys/%s.key", name);
    cr_assert_eq(its_key_load(path_in(rel), pub, sec, err, sizeof err), 0, "%s", err);
}

/* ---- processes -------------------------------------------------------------------------------- */

static void write_templates(void)
{
    mkdir(path_in("tpl"), 0700);
    write_text(path_in("tpl/instruct.tmpl"), "@conversation\n");
    write_text(path_in("tpl/feedback.tmpl"),
               "@conversation\n@assistant\n{response}\n@user\nEvaluate the response.\n");
    write_text(path_in("tpl/edit.tmpl"), "@conversation\n@assistant\n{response}\n@user\n"
                                         "Edit the response using:\n{feedback}\n");
    write_text(path_in("tpl/select.tmpl"), "@user\n{prompt}\n@assistant\n{response}\n");
}

/* Forks argv[0] with stdout/stderr into files; the child dies with the test. */
static pid_t spawn(char **argv, const char *out_path, const char *err_path, char **env_set)
{
    pid_t parent = getpid();
    pid_t pid = fork();
    cr_assert_neq(pid, -1, "fork: %s", strerror(errno));
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        int null = open("/dev/null", O_RDWR);
        int out = open(out_path ? out_path : "/dev/null", O_WRONLY | O_CREAT | O_TRUNC, 0600);
        int err = open(err_path ? err_path : "/dev/null", O_WRONLY | O_CREAT | O_TRUNC, 0600);
        dup2(null, STDIN_FILENO);
        dup2(out, STDOUT_FILENO);
        dup2(err, STDERR_FILENO);
        for (int i = 0; env_set && env_set[i]; i += 2)
            setenv(env_set[i], env_set[i + 1], 1);
        execv(argv[0], argv);
        _exit(127);
    }
    return pid;
}

struct run {
    int status; /* exit status, or -1 */
    char *out, *err;
};

/* Runs a program to completion (at most 15 s). */
static struct run run_prog(char **argv, char **env_set)
{
    char out[PATH_BYTES], err[PATH_BYTES];
    snprintf(out, sizeof out, "%s/run.out", g_dir);
    snprintf(err, sizeof err, "%s/run.err", g_dir);
    pid_t pid = spawn(argv, out, err, env_set);
    uint64_t end = tu_now_ms() + 15000;
    int st = 0;
    pid_t got = 0;
    while ((got = waitpid(pid, &st, WNOHANG)) == 0 && tu_now_ms() < end)
        usleep(5000);
    if (got != pid) {
        kill(pid, SIGKILL);
        waitpid(pid, &st, 0);
        cr_assert_fail("%s did not finish within 15 s", argv[0]);
    }
    struct run r = {.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1};
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

/* itsd with the test's templates and fast heartbeats, then `extra` split on spaces. */
static void itsd_start(const char *extra)
{
    g_front_port = tu_free_port();
    int back_port = tu_free_port();
    snprintf(g_front, sizeof g_front, "tcp://127.0.0.1:%d", g_front_port);
    snprintf(g_back, sizeof g_back, "tcp://127.0.0.1:%d", back_port);
    static char extra_buf[4096];
    snprintf(extra_buf, sizeof extra_buf, "%s", extra ? extra : "");
    char *argv[64];
    int argc = 0;
    static char bin[PATH_BYTES];
    snprintf(bin, sizeof bin, "%s", tu_build("bin/itsd"));
    cr_assert_eq(access(bin, X_OK), 0, "%s is not built", bin);
    argv[argc++] = bin;
    argv[argc++] = "--frontend";
    argv[argc++] = g_front;
    argv[argc++] = "--backend";
    argv[argc++] = g_back;
    argv[argc++] = "--templates";
    argv[argc++] = (char *)path_in("tpl");
    argv[argc++] = "--heartbeat-ms";
    argv[argc++] = "100";
    argv[argc++] = "--liveness";
    argv[argc++] = "30";
    argv[argc++] = "--shutdown-ms";
    argv[argc++] = "300";
    for (char *save = NULL, *tok = strtok_r(extra_buf, " ", &save); tok && argc < 62;
         tok = strtok_r(NULL, " ", &save))
        argv[argc++] = tok;
    argv[argc] = NULL;
    g_pid = spawn(argv, NULL, g_log, NULL);
    uint64_t end = tu_now_ms() + 10000;
    while (tu_now_ms() < end) {
        int st;
        if (waitpid(g_pid, &st, WNOHANG) == g_pid) {
            g_pid = -1;
            cr_assert_fail("itsd exited at start (status %d): %s", st, log_tail());
        }
        if (log_count("serving:") > 0)
            return;
        usleep(5000);
    }
    cr_assert_fail("itsd did not start within 10 s: %s", log_tail());
}

static void itsd_stop(void)
{
    if (g_pid <= 0)
        return;
    kill(g_pid, SIGTERM);
    uint64_t end = tu_now_ms() + 5000;
    int st = 0;
    pid_t got = 0;
    while ((got = waitpid(g_pid, &st, WNOHANG)) == 0 && tu_now_ms() < end)
        usleep(5000);
    bool in_time = got == g_pid;
    if (!in_time) {
        kill(g_pid, SIGKILL);
        waitpid(g_pid, &st, 0);
    }
    g_pid = -1;
    cr_assert(in_time, "itsd did not exit within 5 s of SIGTERM: %s", log_tail());
    /* under the sanitizers a leak or error makes this non-zero too */
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "itsd exited with status %d: %s", st,
              log_tail());
}

static const char *curve_args(void)
{
    static char args[4096];
    snprintf(args, sizeof args, "--curve on --secret-key %s --client-keys %s --worker-keys %s",
             path_in("keys/srv.key"), path_in("clients"), path_in("workers"));
    return args;
}

/* ---- fake workers ------------------------------------------------------------------------------- */

#define MAX_WORKERS 6

struct worker {
    void *s;
    enum proto_role role;
    uint64_t next_hb_ms;
};

static struct worker g_w[MAX_WORKERS];
static int g_n_workers;

static void send_msg(void *s, const struct proto_msg *m)
{
    void *buf = NULL;
    size_t len = 0;
    char err[512];
    cr_assert_eq(proto_encode(m, &buf, &len, err, sizeof err), 0, "encode: %s", err);
    zmq_send(s, buf, len, ZMQ_DONTWAIT);
    free(buf);
}

/* A worker connecting with key `key` (NULL: plain text). */
static struct worker *worker_new(enum proto_role role, const char *name, const char *key)
{
    cr_assert(g_n_workers < MAX_WORKERS);
    struct worker *w = &g_w[g_n_workers++];
    w->role = role;
    w->s = zmq_socket(g_zctx, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(w->s, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(w->s, ZMQ_ROUTING_ID, name, strlen(name));
    if (key) {
        char srv[41], unused[41], pub[41], sec[41];
        key_z85("srv", srv, unused);
        key_z85(key, pub, sec);
        zmq_setsockopt(w->s, ZMQ_CURVE_SERVERKEY, srv, 40);
        zmq_setsockopt(w->s, ZMQ_CURVE_PUBLICKEY, pub, 40);
        zmq_setsockopt(w->s, ZMQ_CURVE_SECRETKEY, sec, 40);
    }
    cr_assert_eq(zmq_connect(w->s, g_back), 0);
    struct proto_msg m = {.type = PROTO_READY};
    m.ready = (struct proto_ready){
        .worker = (char *)name, .role = role, .model = "fake", .backend = "cpu",
        .capacity = {.max_seqs = 8, .max_ctx = 4096, .kv_tokens = 65536}};
    send_msg(w->s, &m);
    w->next_hb_ms = tu_now_ms() + 100;
    return w;
}

static const char *first_of(const struct proto_chat_msg *m, uint32_t n, enum proto_chat_role r,
                            bool last)
{
    const char *found = "";
    for (uint32_t i = 0; i < n; i++) {
        if (m[i].role == r) {
            found = m[i].content;
            if (!last)
                break;
        }
    }
    return found;
}

/* Drafts repeat the question, edits the draft: the answer holds the question's text. */
static void worker_answer(struct worker *w, const struct proto_msg *job)
{
    if (job->type == PROTO_SCORE) {
        double scores[PROTO_MAX_CONVERSATIONS];
        for (uint32_t i = 0; i < job->score.n_conversations; i++)
            scores[i] = 1.0 + i;
        struct proto_msg m = {.type = PROTO_SCORE_RESULT};
        m.score_result = (struct proto_score_result){
            .job = job->score.job, .scores = scores, .n_scores = job->score.n_conversations};
        send_msg(w->s, &m);
        return;
    }
    const struct proto_generate *g = &job->generate;
    static char text[PROTO_MAX_SAMPLES][1024];
    struct proto_output outs[PROTO_MAX_SAMPLES];
    for (uint32_t i = 0; i < g->n; i++) {
        if (w->role == PROTO_ROLE_INSTRUCT)
            snprintf(text[i], sizeof text[i], "ANSWER<%s>",
                     first_of(g->messages, g->n_messages, PROTO_CHAT_USER, true));
        else if (w->role == PROTO_ROLE_FEEDBACK)
            snprintf(text[i], sizeof text[i], "The response is fine.");
        else
            snprintf(text[i], sizeof text[i], "EDITED<%s>",
                     first_of(g->messages, g->n_messages, PROTO_CHAT_ASSISTANT, false));
        outs[i] = (struct proto_output){.text = text[i], .n_tokens = 3,
                                        .finish = PROTO_FINISH_STOP};
    }
    struct proto_msg m = {.type = PROTO_GENERATE_RESULT};
    m.generate_result = (struct proto_generate_result){.job = g->job, .outputs = outs,
                                                       .n_outputs = g->n};
    send_msg(w->s, &m);
}

/* Workers heartbeat and answer for `ms`. */
static void pump(int ms)
{
    uint64_t end = tu_now_ms() + (uint64_t)ms;
    do {
        zmq_pollitem_t items[MAX_WORKERS];
        for (int i = 0; i < g_n_workers; i++)
            items[i] = (zmq_pollitem_t){.socket = g_w[i].s, .events = ZMQ_POLLIN};
        zmq_poll(items, g_n_workers, 2);
        uint64_t now = tu_now_ms();
        for (int i = 0; i < g_n_workers; i++) {
            struct worker *w = &g_w[i];
            if (now >= w->next_hb_ms) {
                struct proto_msg hb = {.type = PROTO_HEARTBEAT};
                send_msg(w->s, &hb);
                w->next_hb_ms = now + 100;
            }
            zmq_msg_t f;
            zmq_msg_init(&f);
            while (zmq_msg_recv(&f, w->s, ZMQ_DONTWAIT) >= 0) {
                struct proto_msg m;
                char err[256];
                if (proto_decode(zmq_msg_data(&f), zmq_msg_size(&f), PROTO_TO_WORKER, &m, err,
                                 sizeof err) == 0) {
                    if (m.type == PROTO_GENERATE || m.type == PROTO_SCORE)
                        worker_answer(w, &m);
                    proto_msg_free(&m);
                }
                zmq_msg_close(&f);
                zmq_msg_init(&f);
            }
            zmq_msg_close(&f);
        }
    } while (tu_now_ms() < end);
}

static void full_cluster(const char *key)
{
    worker_new(PROTO_ROLE_INSTRUCT, "w-instruct", key);
    worker_new(PROTO_ROLE_FEEDBACK, "w-feedback", key);
    worker_new(PROTO_ROLE_EDIT, "w-edit", key);
    worker_new(PROTO_ROLE_SELECT, "w-select", key);
}

/* ---- clients ------------------------------------------------------------------------------------ */

/* A libits handle on `endpoint` with client key `key` (NULL: plain text). */
static its_client_t *client_new(const char *endpoint, const char *key)
{
    struct its_client_opts o = {.endpoint = endpoint};
    char keyfile[PATH_BYTES];
    if (key) {
        snprintf(keyfile, sizeof keyfile, "%s/keys/%s.key", g_dir, key);
        o.server_key_file = path_in("keys/srv.pub");
        o.key_file = keyfile;
    }
    its_client_t *c = NULL;
    char err[1024];
    cr_assert_eq(its_client_new_opts(&o, &c, err, sizeof err), 0, "client: %s", err);
    return c;
}

static uint32_t live_workers(its_client_t *c)
{
    struct its_status *st = NULL;
    int rc = its_status(c, 3000, &st);
    cr_assert_eq(rc, 0, "status: %s; itsd: %s", its_client_errstr(c), log_tail());
    uint32_t n = 0;
    for (int r = 0; r < ITS_ROLE_COUNT; r++)
        n += st->workers_per_role[r];
    its_status_free(&st);
    return n;
}

/* Submits `question` (1 draft, 1 feedback, 1 edit) and pumps the workers until its final
 * event; returns that event (caller frees). */
static struct its_event *submit_and_wait(its_client_t *c, const char *question, int ms)
{
    struct its_options o = {.drafts = 1, .feedbacks = 1, .edits = 1, .has_drafts = true,
                            .has_feedbacks = true, .has_edits = true};
    struct its_message m = {.role = ITS_CHAT_USER, .content = question};
    uint64_t tag;
    cr_assert_eq(its_submit_async(c, &m, 1, &o, &tag), 0, "%s", its_client_errstr(c));
    uint64_t end = tu_now_ms() + (uint64_t)ms;
    while (tu_now_ms() < end) {
        pump(5);
        struct its_event *ev = NULL;
        int rc = its_next_event(c, &ev, 5);
        cr_assert_geq(rc, 0, "%s", its_client_errstr(c));
        if (rc == 0)
            continue;
        if (ev->tag == tag && (ev->type == ITS_EVENT_RESULT || ev->type == ITS_EVENT_ERROR))
            return ev;
        its_event_free(&ev);
    }
    cr_assert_fail("no result within %d ms; itsd: %s", ms, log_tail());
    return NULL;
}

/* ---- suite -------------------------------------------------------------------------------------- */

static void setup(void)
{
    snprintf(g_dir, sizeof g_dir, "%s", tu_tmpdir());
    snprintf(g_log, sizeof g_log, "%s/itsd.log", g_dir);
    g_zctx = zmq_ctx_new();
    g_n_workers = 0;
    make_keys();
    write_templates();
}

static void teardown(void)
{
    if (g_pid > 0) {
        kill(g_pid, SIGKILL);
        waitpid(g_pid, NULL, 0);
        g_pid = -1;
    }
    for (int i = 0; i < g_n_workers; i++)
        zmq_close(g_w[i].s);
    g_n_workers = 0;
    if (g_zctx)
        zmq_ctx_term(g_zctx);
    g_zctx = NULL;
    if (getenv("ITS_TEST_KEEP"))
        fprintf(stderr, "kept %s\n", g_dir);
    else
        tu_rmtree(g_dir);
}

TestSuite(security, .init = setup, .fini = teardown, .timeout = 40);

Test(security, unlisted_worker_and_client_are_refused_listed_ones_served)
{
    itsd_start(curve_args());
    full_cluster("wgood");
    struct worker *bad = worker_new(PROTO_ROLE_INSTRUCT, "w-intruder", "wbad");
    (void)bad;
    pump(400);

    /* a listed client sees exactly the four listed workers */
    its_client_t *alice = client_new(g_front, "alice");
    uint32_t n = live_workers(alice);
    cr_assert_eq(n, 4, "%u workers registered, expected the 4 listed ones; itsd: %s", n,
                 log_tail());
    cr_assert_eq(log_count("w-intruder"), 0, "the unlisted worker got through: %s", log_tail());
    char wbad[41], unused[41];
    key_z85("wbad", wbad, unused);
    char needle[128];
    snprintf(needle, sizeof needle, "refused worker key %s", wbad);
    cr_assert(wait_log(needle, 1, 2000), "no refusal of the worker key in the log: %s",
              log_tail());
    /* the intruder retries its handshake every 100 ms: still one line */
    pump(600);
    cr_assert_eq(log_count(needle), 1, "refusals of one key were not rate-limited: %s",
                 log_tail());

    /* the listed client gets an answer */
    struct its_event *ev = submit_and_wait(alice, "What is " SECRET "?", 10000);
    cr_assert_eq(ev->type, ITS_EVENT_RESULT, "error %s: %s", ev->code, ev->message);
    cr_assert_not_null(strstr(ev->result->answer, SECRET), "answer: %s", ev->result->answer);
    its_event_free(&ev);
    its_client_destroy(&alice);

    /* an unlisted client: itsctl says precisely what happened, with its own exit status */
    char *argv[] = {(char *)tu_build("bin/itsctl"), "--endpoint", g_front, "--server-key",
                    (char *)path_in("keys/srv.pub"), "--key", (char *)path_in("keys/mallory.key"),
                    "status", "--timeout", "5", NULL};
    struct run r = run_prog(argv, NULL);
    cr_assert_eq(r.status, 6, "itsctl with an unlisted key exited %d: %s", r.status, r.err);
    cr_assert_not_null(strstr(r.err, "refused this client's CURVE key"), "stderr: %s", r.err);
    run_free(&r);
    char mallory[41];
    key_z85("mallory", mallory, unused);
    snprintf(needle, sizeof needle, "refused client key %s", mallory);
    cr_assert(wait_log(needle, 1, 2000), "no refusal of the client key in the log: %s",
              log_tail());

    /* the same with keys from the environment, and a listed key: it works */
    char *argv2[] = {(char *)tu_build("bin/itsctl"), "--endpoint", g_front, "workers", "--json",
                     NULL};
    char *env[] = {"ITS_SERVER_KEY", (char *)path_in("keys/srv.pub"), "ITS_KEY",
                   (char *)path_in("keys/bob.key"), NULL};
    r = run_prog(argv2, env);
    cr_assert_eq(r.status, 0, "itsctl workers with $ITS_KEY: %d: %s", r.status, r.err);
    cr_assert_not_null(strstr(r.out, "w-instruct"), "%s", r.out);
    cr_assert_null(strstr(r.out, "w-intruder"), "%s", r.out);
    run_free(&r);

    /* a plain-text client against a CURVE itsd: told so, not left to time out */
    its_client_t *plain = client_new(g_front, NULL);
    struct its_status *st = NULL;
    int rc = its_status(plain, 5000, &st);
    cr_assert_eq(rc, ITS_ERR_AUTH, "plain client: rc %d: %s", rc, its_client_errstr(plain));
    cr_assert_not_null(strstr(its_client_errstr(plain), "requires CURVE"), "%s",
                       its_client_errstr(plain));
    its_client_destroy(&plain);

    /* a bad key file is named */
    char *argv3[] = {(char *)tu_build("bin/itsctl"), "--endpoint", g_front, "--server-key",
                     (char *)path_in("keys/srv.pub"), "--key", (char *)path_in("keys/alice.pub"),
                     "status", NULL};
    r = run_prog(argv3, NULL);
    cr_assert_eq(r.status, 1, "a .pub as --key: exit %d: %s", r.status, r.err);
    cr_assert_not_null(strstr(r.err, "alice.pub"), "%s", r.err);
    cr_assert_not_null(strstr(r.err, "secret-key"), "%s", r.err);
    run_free(&r);
    itsd_stop();
}

/* ---- the wire ------------------------------------------------------------------------------------ */

#define RELAY_PAIRS 8

struct relay {
    int lfd, port, target_port;
    atomic_bool stop;
    pthread_t th;
    pthread_mutex_t mu;
    char *seen; /* every byte, both directions */
    size_t len, cap;
};

static void relay_keep(struct relay *r, const char *buf, size_t n)
{
    pthread_mutex_lock(&r->mu);
    if (r->len + n > r->cap) {
        size_t ncap = (r->len + n) * 2;
        char *nb = realloc(r->seen, ncap);
        if (nb) {
            r->seen = nb;
            r->cap = ncap;
        }
    }
    if (r->len + n <= r->cap) {
        memcpy(r->seen + r->len, buf, n);
        r->len += n;
    }
    pthread_mutex_unlock(&r->mu);
}

static bool relay_write_all(int fd, const char *buf, size_t n)
{
    while (n > 0) {
        ssize_t k = write(fd, buf, n);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return false;
        buf += k;
        n -= (size_t)k;
    }
    return true;
}

static void *relay_main(void *arg)
{
    struct relay *r = arg;
    int pair[RELAY_PAIRS][2];
    int n_pairs = 0;
    static char buf[65536];
    while (!atomic_load(&r->stop)) {
        struct pollfd pf[1 + 2 * RELAY_PAIRS];
        int n = 0;
        pf[n++] = (struct pollfd){.fd = r->lfd, .events = POLLIN};
        for (int i = 0; i < n_pairs; i++) {
            pf[n++] = (struct pollfd){.fd = pair[i][0], .events = POLLIN};
            pf[n++] = (struct pollfd){.fd = pair[i][1], .events = POLLIN};
        }
        if (poll(pf, (nfds_t)n, 50) <= 0)
            continue;
        if ((pf[0].revents & POLLIN) && n_pairs < RELAY_PAIRS) {
            int c = accept(r->lfd, NULL, NULL);
            if (c >= 0) {
                int t = socket(AF_INET, SOCK_STREAM, 0);
                struct sockaddr_in a = {.sin_family = AF_INET,
                                        .sin_port = htons((uint16_t)r->target_port),
                                        .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
                if (t >= 0 && connect(t, (struct sockaddr *)&a, sizeof a) == 0) {
                    pair[n_pairs][0] = c;
                    pair[n_pairs][1] = t;
                    n_pairs++;
                } else {
                    close(c);
                    if (t >= 0)
                        close(t);
                }
            }
        }
        for (int i = 0; i < n_pairs; i++) {
            for (int side = 0; side < 2; side++) {
                if (!(pf[1 + 2 * i + side].revents & (POLLIN | POLLHUP | POLLERR)))
                    continue;
                ssize_t k = read(pair[i][side], buf, sizeof buf);
                if (k <= 0 || !relay_write_all(pair[i][!side], buf, (size_t)k)) {
                    close(pair[i][0]);
                    close(pair[i][1]);
                    pair[i][0] = pair[n_pairs - 1][0];
                    pair[i][1] = pair[n_pairs - 1][1];
                    n_pairs--;
                    goto next_round; /* the pollfd indices moved */
                }
                relay_keep(r, buf, (size_t)k);
            }
        }
    next_round:;
    }
    for (int i = 0; i < n_pairs; i++) {
        close(pair[i][0]);
        close(pair[i][1]);
    }
    return NULL;
}

static void relay_start(struct relay *r, int target_port)
{
    memset(r, 0, sizeof *r);
    r->target_port = target_port;
    pthread_mutex_init(&r->mu, NULL);
    r->lfd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(r->lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    cr_assert_eq(bind(r->lfd, (struct sockaddr *)&a, sizeof a), 0);
    socklen_t len = sizeof a;
    getsockname(r->lfd, (struct sockaddr *)&a, &len);
    r->port = ntohs(a.sin_port);
    cr_assert_eq(listen(r->lfd, 8), 0);
    cr_assert_eq(pthread_create(&r->th, NULL, relay_main, r), 0);
}

static void relay_stop(struct relay *r)
{
    atomic_store(&r->stop, true);
    pthread_join(r->th, NULL);
    close(r->lfd);
    pthread_mutex_destroy(&r->mu);
}

static bool seen(const struct relay *r, const char *needle)
{
    return memmem(r->seen, r->len, needle, strlen(needle)) != NULL;
}

/* One request through the relay; returns the relay with everything it saw. */
static void request_through_relay(bool curve, struct relay *r)
{
    itsd_start(curve ? curve_args() : NULL);
    full_cluster(curve ? "wgood" : NULL);
    pump(300);
    relay_start(r, g_front_port);
    char ep[64];
    snprintf(ep, sizeof ep, "tcp://127.0.0.1:%d", r->port);
    its_client_t *c = client_new(ep, curve ? "alice" : NULL);
    struct its_event *ev = submit_and_wait(c, "Please keep " SECRET " between us.", 10000);
    cr_assert_eq(ev->type, ITS_EVENT_RESULT, "error %s: %s", ev->code, ev->message);
    cr_assert_not_null(strstr(ev->result->answer, "EDITED<ANSWER<"), "answer: %s",
                       ev->result->answer);
    cr_assert_not_null(strstr(ev->result->answer, SECRET));
    its_event_free(&ev);
    its_client_destroy(&c);
    relay_stop(r);
    for (int i = 0; i < g_n_workers; i++)
        zmq_close(g_w[i].s);
    g_n_workers = 0;
    itsd_stop();
}

Test(security, traffic_is_encrypted_with_curve_and_readable_without)
{
    struct relay r;
    request_through_relay(true, &r);
    cr_assert_gt(r.len, 500, "the relay saw only %zu bytes: did the client use it?", r.len);
    cr_assert(!seen(&r, SECRET), "the question crossed the wire in plain text with curve on");
    cr_assert(!seen(&r, "EDITED<"), "the answer crossed the wire in plain text with curve on");
    cr_assert(!seen(&r, "submit"), "a message type is readable on the wire with curve on");
    free(r.seen);

    /* the same with curve off: the check above is one that can fail */
    request_through_relay(false, &r);
    cr_assert(seen(&r, SECRET), "the relay did not see the plain-text question");
    cr_assert(seen(&r, "EDITED<ANSWER<"), "the relay did not see the plain-text answer");
    free(r.seen);
}

/* ---- configuration ----------------------------------------------------------------------------- */

static struct run itsd_check(const char *extra)
{
    static char buf[4096];
    snprintf(buf, sizeof buf, "%s", extra);
    char *argv[40];
    int argc = 0;
    static char bin[PATH_BYTES];
    snprintf(bin, sizeof bin, "%s", tu_build("bin/itsd"));
    argv[argc++] = bin;
    argv[argc++] = "-t";
    argv[argc++] = "--templates";
    argv[argc++] = (char *)path_in("tpl");
    for (char *save = NULL, *tok = strtok_r(buf, " ", &save); tok && argc < 38;
         tok = strtok_r(NULL, " ", &save))
        argv[argc++] = tok;
    argv[argc] = NULL;
    return run_prog(argv, NULL);
}

Test(security, plain_text_off_loopback_is_refused_unless_forced)
{
    struct run r = itsd_check("--frontend tcp://0.0.0.0:7700");
    cr_assert_eq(r.status, 1, "plain text on 0.0.0.0 passed -t: %s", r.err);
    cr_assert_not_null(strstr(r.err, "[itsd] frontend tcp://0.0.0.0:7700"), "%s", r.err);
    cr_assert_not_null(strstr(r.err, "plaintext_nonloopback = force"), "%s", r.err);
    run_free(&r);
    r = itsd_check("--backend tcp://*:7701 --plaintext-nonloopback refuse");
    cr_assert_eq(r.status, 1, "plain text on * passed -t: %s", r.err);
    cr_assert_not_null(strstr(r.err, "[itsd] backend tcp://*:7701"), "%s", r.err);
    run_free(&r);
    r = itsd_check("--frontend tcp://0.0.0.0:7700 --plaintext-nonloopback force");
    cr_assert_eq(r.status, 0, "forced plain text failed -t: %s", r.err);
    run_free(&r);
    r = itsd_check("--frontend tcp://[::1]:7700 --backend ipc:///tmp/its-back.sock");
    cr_assert_eq(r.status, 0, "loopback endpoints failed -t: %s", r.err);
    run_free(&r);
    r = itsd_check("--plaintext-nonloopback maybe");
    cr_assert_eq(r.status, 1);
    cr_assert_not_null(strstr(r.err, "--plaintext-nonloopback: 'maybe' is not one of refuse, "
                                     "force"), "%s", r.err);
    run_free(&r);

    /* curve on anywhere is fine, given keys that load; each missing piece is named */
    char args[4096];
    snprintf(args, sizeof args, "--frontend tcp://0.0.0.0:7700 %s", curve_args());
    r = itsd_check(args);
    cr_assert_eq(r.status, 0, "curve on 0.0.0.0 failed -t: %s", r.err);
    run_free(&r);
    r = itsd_check("--curve on");
    cr_assert_eq(r.status, 1);
    cr_assert_not_null(strstr(r.err, "[security] secret_key: required"), "%s", r.err);
    cr_assert_not_null(strstr(r.err, "[security] client_keys: required"), "%s", r.err);
    cr_assert_not_null(strstr(r.err, "[security] worker_keys: required"), "%s", r.err);
    run_free(&r);
    write_text(path_in("workers/broken.pub"), "public-key = not-a-key\n");
    snprintf(args, sizeof args, "--curve on --secret-key %s --client-keys %s --worker-keys %s",
             path_in("keys/srv.pub"), path_in("nowhere"), path_in("workers"));
    r = itsd_check(args);
    cr_assert_eq(r.status, 1);
    cr_assert_not_null(strstr(r.err, "srv.pub: no secret-key line"), "%s", r.err);
    cr_assert_not_null(strstr(r.err, "nowhere: No such file"), "%s", r.err);
    cr_assert_not_null(strstr(r.err, "broken.pub:1: public-key is not 40 characters"), "%s",
                       r.err);
    run_free(&r);

    /* without -t the daemon does not start either */
    char *argv[] = {(char *)tu_build("bin/itsd"), "--templates", (char *)path_in("tpl"),
                    "--frontend", "tcp://0.0.0.0:0", NULL};
    r = run_prog(argv, NULL);
    cr_assert_eq(r.status, 1, "itsd started with plain text on 0.0.0.0: %s", r.err);
    run_free(&r);
}

Test(security, loopback_endpoints)
{
    const char *yes[] = {"ipc:///run/its/front", "tcp://127.0.0.1:7700", "tcp://127.1.2.3:1",
                         "tcp://localhost:7700", "tcp://[::1]:7700", "tcp://LOCALHOST:1"};
    const char *no[] = {"tcp://0.0.0.0:7700", "tcp://*:7700",   "tcp://10.0.0.5:7700",
                        "tcp://eth0:7700",    "tcp://[::]:7700", "tcp://128.0.0.1:7700",
                        "tcp://localhost.example.com:1"};
    for (size_t i = 0; i < sizeof yes / sizeof *yes; i++)
        cr_assert(itsd_config_endpoint_is_loopback(yes[i]), "%s should be loopback", yes[i]);
    for (size_t i = 0; i < sizeof no / sizeof *no; i++)
        cr_assert(!itsd_config_endpoint_is_loopback(no[i]), "%s is not loopback", no[i]);
}

/* ---- reload ------------------------------------------------------------------------------------ */

Test(security, sighup_adds_and_removes_keys_and_keeps_old_lists_when_broken)
{
    itsd_start(curve_args());
    its_client_t *alice = client_new(g_front, "alice");
    cr_assert_eq(live_workers(alice), 0);
    its_client_t *mallory = client_new(g_front, "mallory");
    struct its_status *st = NULL;
    cr_assert_eq(its_status(mallory, 3000, &st), ITS_ERR_AUTH, "%s",
                 its_client_errstr(mallory));
    its_client_destroy(&mallory);

    /* add mallory, reload, and she is in (a fresh handle: libzmq retries the handshake on
     * reconnect anyway, but a new handle makes the test independent of the retry timing) */
    copy_file(path_in("keys/mallory.pub"), path_in("clients/mallory.pub"));
    kill(g_pid, SIGHUP);
    cr_assert(wait_log("allow-lists reloaded: 3 client keys, 1 worker keys", 1, 3000), "%s",
              log_tail());
    mallory = client_new(g_front, "mallory");
    cr_assert_eq(its_status(mallory, 3000, &st), 0, "after reload: %s",
                 its_client_errstr(mallory));
    its_status_free(&st);

    /* a broken list: the old ones stay, and the log says why */
    write_text(path_in("clients/zz.pub"), "this is not a key\n");
    kill(g_pid, SIGHUP);
    cr_assert(wait_log("keeping the old allow-lists", 1, 3000), "%s", log_tail());
    cr_assert_eq(log_count("zz.pub:1"), 1, "the reason is not in the log: %s", log_tail());
    cr_assert_eq(its_status(alice, 3000, &st), 0, "%s", its_client_errstr(alice));
    its_status_free(&st);
    unlink(path_in("clients/zz.pub"));

    /* removing a key cuts off its open connection too */
    unlink(path_in("clients/alice.pub"));
    kill(g_pid, SIGHUP);
    cr_assert(wait_log("allow-lists reloaded: 2 client keys", 1, 3000), "%s", log_tail());
    int rc = its_status(alice, 3000, &st);
    cr_assert_eq(rc, ITS_ERR_DAEMON, "a removed key still works: %d %s", rc,
                 its_client_errstr(alice));
    cr_assert_str_eq(its_client_daemon_code(alice), "unauthorized");
    cr_assert_eq(its_status(mallory, 3000, &st), 0, "%s", its_client_errstr(mallory));
    its_status_free(&st);
    its_client_destroy(&alice);
    its_client_destroy(&mallory);
    itsd_stop();
}

/* ---- limits ------------------------------------------------------------------------------------ */

static struct its_event *next_event_of(its_client_t *c, uint64_t tag, int ms)
{
    uint64_t end = tu_now_ms() + (uint64_t)ms;
    while (tu_now_ms() < end) {
        struct its_event *ev = NULL;
        int rc = its_next_event(c, &ev, 20);
        cr_assert_geq(rc, 0, "%s", its_client_errstr(c));
        if (rc == 1 && ev->tag == tag)
            return ev;
        its_event_free(&ev);
    }
    cr_assert_fail("no event for tag %llu in %d ms: %s", (unsigned long long)tag, ms,
                   log_tail());
    return NULL;
}

static uint64_t submit_async(its_client_t *c)
{
    struct its_message m = {.role = ITS_CHAT_USER, .content = "Hello?"};
    uint64_t tag;
    cr_assert_eq(its_submit_async(c, &m, 1, NULL, &tag), 0, "%s", its_client_errstr(c));
    return tag;
}

Test(security, requests_per_client_are_limited_by_key)
{
    char args[4200];
    snprintf(args, sizeof args, "%s --max-requests-per-client 1", curve_args());
    itsd_start(args); /* no workers: an accepted request stays live */
    its_client_t *alice = client_new(g_front, "alice");
    its_client_t *alice2 = client_new(g_front, "alice"); /* same key, another connection */
    its_client_t *bob = client_new(g_front, "bob");

    uint64_t t1 = submit_async(alice);
    struct its_event *ev = next_event_of(alice, t1, 3000);
    cr_assert_eq(ev->type, ITS_EVENT_ACCEPTED, "first submit: %s", ev->message);
    char id[ITS_ID_MAX + 1];
    snprintf(id, sizeof id, "%s", ev->id);
    its_event_free(&ev);

    uint64_t t2 = submit_async(alice2);
    ev = next_event_of(alice2, t2, 3000);
    cr_assert_eq(ev->type, ITS_EVENT_ERROR, "a second live request of alice was accepted");
    cr_assert_str_eq(ev->code, "busy");
    cr_assert_not_null(strstr(ev->message, "max_requests_per_client 1"), "%s", ev->message);
    cr_assert_not_null(strstr(ev->message, "'alice'"), "%s", ev->message);
    its_event_free(&ev);

    uint64_t t3 = submit_async(bob);
    ev = next_event_of(bob, t3, 3000);
    cr_assert_eq(ev->type, ITS_EVENT_ACCEPTED, "bob was held to alice's limit: %s", ev->message);
    its_event_free(&ev);

    /* once alice's request has ended she may submit again */
    cr_assert_eq(its_cancel(alice, id, 3000), 0, "%s", its_client_errstr(alice));
    uint64_t t4 = submit_async(alice2);
    ev = next_event_of(alice2, t4, 3000);
    cr_assert_eq(ev->type, ITS_EVENT_ACCEPTED, "after the cancel: %s %s", ev->code,
                 ev->message ? ev->message : "");
    its_event_free(&ev);

    /* a client that goes away gives its requests back */
    its_client_destroy(&alice2);
    its_client_t *alice3 = client_new(g_front, "alice");
    uint64_t end = tu_now_ms() + 5000;
    for (;;) { /* itsd notices the closed connection within moments, not at once */
        uint64_t t5 = submit_async(alice3);
        ev = next_event_of(alice3, t5, 3000);
        if (ev->type == ITS_EVENT_ACCEPTED || tu_now_ms() > end)
            break;
        its_event_free(&ev);
        usleep(50000);
    }
    cr_assert_eq(ev->type, ITS_EVENT_ACCEPTED, "after the disconnect: %s %s", ev->code,
                 ev->message ? ev->message : "");
    its_event_free(&ev);
    its_client_destroy(&alice3);
    its_client_destroy(&alice);
    its_client_destroy(&bob);
    itsd_stop();
}

/* ---- keys and the ZAP handler ------------------------------------------------------------------ */

Test(security, keygen_writes_modes_and_refuses_to_overwrite)
{
    char prefix[PATH_BYTES];
    snprintf(prefix, sizeof prefix, "%s/new", g_dir);
    char *argv[] = {(char *)tu_build("bin/itsctl"), "keygen", "--out", prefix, NULL};
    struct run r = run_prog(argv, NULL);
    cr_assert_eq(r.status, 0, "keygen: %s", r.err);
    char printed[64] = "";
    sscanf(r.out, "%63s", printed);
    cr_assert_eq(strlen(printed), ITS_KEY_Z85_LEN, "printed '%s'", r.out);
    run_free(&r);

    struct stat st;
    cr_assert_eq(stat(path_in("new.key"), &st), 0);
    cr_assert_eq(st.st_mode & 0777, 0600, "PREFIX.key has mode %o", st.st_mode & 0777);
    cr_assert_eq(stat(path_in("new.pub"), &st), 0);
    cr_assert_eq(st.st_mode & 0777, 0644, "PREFIX.pub has mode %o", st.st_mode & 0777);

    char pub[41], sec[41], pub2[41], err[512];
    cr_assert_eq(its_key_load(path_in("new.key"), pub, sec, err, sizeof err), 0, "%s", err);
    cr_assert_str_eq(pub, printed);
    cr_assert_eq(its_key_load(path_in("new.pub"), pub2, NULL, err, sizeof err), 0, "%s", err);
    cr_assert_str_eq(pub2, printed);
    char *pub_text = tu_read_file(path_in("new.pub"), NULL);
    cr_assert_null(strstr(pub_text, sec), "the secret key is in the .pub file");
    free(pub_text);
    /* the pair is a real CURVE pair */
    char derived[41];
    cr_assert_eq(zmq_curve_public(derived, sec), 0);
    cr_assert_str_eq(derived, pub);

    /* a second run refuses, names the file and leaves the key as it was */
    r = run_prog(argv, NULL);
    cr_assert_eq(r.status, 1, "keygen overwrote: %s", r.err);
    cr_assert_not_null(strstr(r.err, "new.key: already exists"), "%s", r.err);
    run_free(&r);
    cr_assert_eq(its_key_load(path_in("new.key"), pub2, NULL, err, sizeof err), 0);
    cr_assert_str_eq(pub2, printed);
}

/* Sends one ZAP request for `key` in `domain` and returns the status code frame. */
static void zap_ask(void *req, struct zap *z, const char *domain, const uint8_t *key,
                    char code[8], char user[ZAP_NAME_MAX])
{
    const char *frames[] = {"1.0", "42", domain, "127.0.0.1", "", "CURVE"};
    for (int i = 0; i < 6; i++)
        zmq_send(req, frames[i], strlen(frames[i]), ZMQ_SNDMORE);
    zmq_send(req, key, ZAP_KEY_BYTES, 0);
    zmq_pollitem_t it = {.socket = zap_socket(z), .events = ZMQ_POLLIN};
    cr_assert_eq(zmq_poll(&it, 1, 2000), 1, "the handler got no request");
    zap_on_request(z);
    char f[6][ZAP_NAME_MAX];
    for (int i = 0; i < 6; i++) {
        int n = zmq_recv(req, f[i], sizeof f[i] - 1, 0);
        cr_assert_geq(n, 0);
        f[i][n] = '\0';
    }
    cr_assert_str_eq(f[0], "1.0");
    cr_assert_str_eq(f[1], "42", "the reply lost the request id");
    snprintf(code, 8, "%.7s", f[2]);
    snprintf(user, ZAP_NAME_MAX, "%s", f[4]);
}

Test(security, zap_handler_answers_and_rate_limits_its_log)
{
    itsd_log_level = ITSD_LOG_ERROR; /* the refusals below are expected */
    void *ctx = zmq_ctx_new();
    struct zap *z = NULL;
    char err[1024];
    cr_assert_eq(zap_new(ctx, path_in("clients"), path_in("workers"), &z, err, sizeof err), 0,
                 "%s", err);
    cr_assert_eq(zap_client_keys(z), 2);
    cr_assert_eq(zap_worker_keys(z), 1);
    void *req = zmq_socket(ctx, ZMQ_REQ);
    int zero = 0;
    zmq_setsockopt(req, ZMQ_LINGER, &zero, sizeof zero);
    cr_assert_eq(zmq_connect(req, ZAP_ENDPOINT), 0);

    char pub[41], sec[41], code[8], user[ZAP_NAME_MAX];
    uint8_t alice[32], wgood[32], mallory[32];
    key_z85("alice", pub, sec);
    zmq_z85_decode(alice, pub);
    key_z85("wgood", pub, sec);
    zmq_z85_decode(wgood, pub);
    key_z85("mallory", pub, sec);
    zmq_z85_decode(mallory, pub);

    zap_ask(req, z, ZAP_DOMAIN_CLIENTS, alice, code, user);
    cr_assert_str_eq(code, "200");
    cr_assert_str_eq(user, "alice", "the user id is the key's name");
    /* lists are per socket: a client key does not admit a worker, nor the reverse */
    zap_ask(req, z, ZAP_DOMAIN_WORKERS, alice, code, user);
    cr_assert_str_eq(code, "400");
    zap_ask(req, z, ZAP_DOMAIN_CLIENTS, wgood, code, user);
    cr_assert_str_eq(code, "400");
    zap_ask(req, z, ZAP_DOMAIN_WORKERS, wgood, code, user);
    cr_assert_str_eq(code, "200");
    cr_assert_str_eq(user, "wgood");
    zap_ask(req, z, "elsewhere", alice, code, user);
    cr_assert_str_eq(code, "400", "an unknown domain was admitted");

    uint64_t logged = zap_counters(z)->refusals_logged;
    for (int i = 0; i < 5; i++) {
        zap_ask(req, z, ZAP_DOMAIN_CLIENTS, mallory, code, user);
        cr_assert_str_eq(code, "400");
    }
    cr_assert_eq(zap_counters(z)->refusals_logged, logged + 1,
                 "5 refusals of one key in a row logged %llu lines",
                 (unsigned long long)(zap_counters(z)->refusals_logged - logged));
    cr_assert_eq(zap_counters(z)->refusals_suppressed, 4);

    /* reload: a key added is admitted at once, and its old refusals do not mute it */
    copy_file(path_in("keys/mallory.pub"), path_in("clients/mallory.pub"));
    cr_assert_eq(zap_reload(z, err, sizeof err), 0, "%s", err);
    zap_ask(req, z, ZAP_DOMAIN_CLIENTS, mallory, code, user);
    cr_assert_str_eq(code, "200");
    cr_assert(zap_allows(z, false, "mallory"));
    cr_assert(!zap_allows(z, false, "wgood"));

    /* a malformed request is answered (a REP socket that does not answer is stuck) */
    zmq_send(req, "1.0", 3, ZMQ_SNDMORE);
    zmq_send(req, "7", 1, 0);
    zmq_pollitem_t it = {.socket = zap_socket(z), .events = ZMQ_POLLIN};
    cr_assert_eq(zmq_poll(&it, 1, 2000), 1);
    zap_on_request(z);
    char f[64];
    zmq_recv(req, f, sizeof f, 0);
    zmq_recv(req, f, sizeof f, 0);
    int n = zmq_recv(req, f, sizeof f - 1, 0);
    f[n > 0 ? n : 0] = '\0';
    cr_assert_str_eq(f, "500");
    int more = 1;
    size_t len = sizeof more;
    while (zmq_getsockopt(req, ZMQ_RCVMORE, &more, &len) == 0 && more)
        zmq_recv(req, f, sizeof f, 0);

    zmq_close(req);
    zap_destroy(&z);
    cr_assert_null(z);
    zmq_ctx_term(ctx);
}

/* ---- itsw serve with keys ---------------------------------------------------------------------- */

static pid_t itsw_start(const char *name, const char *key, const char *err_path)
{
    static char bin[PATH_BYTES], model[PATH_BYTES], keyfile[PATH_BYTES], srv[PATH_BYTES];
    snprintf(bin, sizeof bin, "%s", tu_build("bin/itsw"));
    snprintf(model, sizeof model, "%s", tu_shared("hf-reference/tiny-llama31"));
    snprintf(keyfile, sizeof keyfile, "%s/keys/%s.key", g_dir, key);
    snprintf(srv, sizeof srv, "%s/keys/srv.pub", g_dir);
    char *argv[] = {bin, "serve", "--connect", g_back, "--role", "select", "--model", model,
                    "--name", (char *)name, "--heartbeat-ms", "100", "--threads", "1",
                    "--server-key", srv, "--key", keyfile, NULL};
    return spawn(argv, NULL, err_path, NULL);
}

Test(security, itsw_serve_registers_only_with_a_listed_key)
{
    /* key settings are checked before the model is loaded */
    char *argv[] = {(char *)tu_build("bin/itsw"), "serve", "--role", "edit", "--model", "/m",
                    "--server-key", (char *)path_in("keys/srv.pub"), NULL};
    struct run r = run_prog(argv, NULL);
    cr_assert_eq(r.status, 2, "itsw serve with server_key only: %d %s", r.status, r.err);
    cr_assert_not_null(strstr(r.err, "server_key is set but not key"), "%s", r.err);
    run_free(&r);
    char *argv2[] = {(char *)tu_build("bin/itsw"), "serve", "--role", "edit", "--model", "/m",
                     "--server-key", (char *)path_in("keys/srv.pub"), "--key",
                     (char *)path_in("keys/wgood.pub"), NULL};
    r = run_prog(argv2, NULL);
    cr_assert_eq(r.status, 2);
    cr_assert_not_null(strstr(r.err, "wgood.pub: no secret-key line"), "%s", r.err);
    run_free(&r);

    itsd_start(curve_args());
    char good_log[PATH_BYTES], bad_log[PATH_BYTES];
    snprintf(good_log, sizeof good_log, "%s/good.log", g_dir);
    snprintf(bad_log, sizeof bad_log, "%s/bad.log", g_dir);
    pid_t good = itsw_start("real-good", "wgood", good_log);
    pid_t bad = itsw_start("real-bad", "wbad", bad_log);
    bool registered = wait_log("worker real-good registered", 1, 15000);
    bool refused = false;
    uint64_t end = tu_now_ms() + 5000;
    while (!refused && tu_now_ms() < end) {
        char *t = tu_read_file(bad_log, NULL);
        refused = t && strstr(t, "refused this worker's CURVE key");
        free(t);
        if (!refused)
            usleep(20000);
    }
    its_client_t *alice = client_new(g_front, "alice");
    uint32_t n = live_workers(alice);
    its_client_destroy(&alice);
    kill(good, SIGTERM);
    kill(bad, SIGTERM);
    waitpid(good, NULL, 0);
    waitpid(bad, NULL, 0);
    cr_assert(registered, "the listed itsw did not register: %s", log_tail());
    cr_assert(refused, "the unlisted itsw did not log its refusal");
    cr_assert_eq(n, 1, "%u workers registered, expected only the listed one", n);
    cr_assert_eq(log_count("worker real-bad"), 0, "%s", log_tail());
    itsd_stop();
}
