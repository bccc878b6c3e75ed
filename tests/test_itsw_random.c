/* test_itsw_random.c — `itsw serve` with `model = random:SHAPE`: random weights of a named shape
 * and a real tokenizer, as the GPU service benchmark (deploy/gpu_service_bench.sh) runs it, here
 * on the cpu backend with the tiny shape. The test plays itsd: a ROUTER socket on an ipc://
 * endpoint in a scratch directory takes the worker's ready and sends it a generate, decoded
 * with the protocol library. Also: the refusals (no tokenizer, unknown shape, a tokenizer whose
 * ids do not fit the shape's vocabulary) and the itsw rows of docs/configuration.md.
 *
 * Owns the worker process it starts (PR_SET_PDEATHSIG, and SIGKILL in the suite's fini after a
 * failed assertion) and its scratch directory.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "proto.h"
#include "testutil.h"

#define RND_PATH_BYTES 4200
#define RND_WAIT_MS 60000 /* model start and a short generate, under ASan on a busy machine */

static pid_t rnd_pid;
static char rnd_log[RND_PATH_BYTES];

static uint64_t rnd_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void rnd_fini(void)
{
    if (rnd_pid > 0) {
        kill(rnd_pid, SIGKILL);
        waitpid(rnd_pid, NULL, 0);
        rnd_pid = 0;
    }
}

TestSuite(itsw_random, .fini = rnd_fini, .timeout = 180);

/* A directory holding the reference Llama 3 tokenizer (tokenizer.json, tokenizer_config.json)
 * under `dir`/`name`, as copies: `extra_id` >= 0 adds one added token with that id. */
static void rnd_tokenizer_dir(const char *dir, const char *name, long extra_id)
{
    char sub[RND_PATH_BYTES], path[RND_PATH_BYTES + 32];
    snprintf(sub, sizeof sub, "%s/%s", dir, name);
    cr_assert_eq(mkdir(sub, 0755), 0, "mkdir %s: %s", sub, strerror(errno));
    json_error_t je;
    json_t *tok = json_load_file(tu_shared("hf-reference/tokenizer/tokenizer.json"), 0, &je);
    cr_assert_not_null(tok, "tokenizer.json: %s", je.text);
    if (extra_id >= 0) {
        json_t *added = json_object_get(tok, "added_tokens");
        cr_assert(json_is_array(added));
        json_array_append_new(added, json_pack("{s:I, s:s, s:b, s:b, s:b, s:b, s:b}", "id",
                                               (json_int_t)extra_id, "content", "<|its_extra|>",
                                               "single_word", 0, "lstrip", 0, "rstrip", 0,
                                               "normalized", 0, "special", 1));
    }
    snprintf(path, sizeof path, "%s/tokenizer.json", sub);
    cr_assert_eq(json_dump_file(tok, path, JSON_COMPACT), 0, "write %s", path);
    json_decref(tok);
    size_t len = 0;
    char *cfg = tu_read_file(tu_shared("hf-reference/tokenizer/tokenizer_config.json"), &len);
    cr_assert_not_null(cfg);
    snprintf(path, sizeof path, "%s/tokenizer_config.json", sub);
    cr_assert_eq(tu_write_file(path, cfg, len), 0);
    free(cfg);
}

struct rnd_run {
    int status; /* exit code; -1 when killed or not run */
    char *err;  /* stderr */
};

/* Runs `itsw ARGS` (already shell-quoted) to its end, bounded to 120 s. */
static struct rnd_run rnd_itsw(const char *dir, const char *args)
{
    char err_path[RND_PATH_BYTES], cmd[16384];
    snprintf(err_path, sizeof err_path, "%s/run.err", dir);
    snprintf(cmd, sizeof cmd, "timeout 120 '%s' %s </dev/null >/dev/null 2>'%s'",
             tu_build("bin/itsw"), args, err_path);
    int rc = system(cmd);
    struct rnd_run r = {.status = -1};
    if (rc != -1 && WIFEXITED(rc))
        r.status = WEXITSTATUS(rc);
    r.err = tu_read_file(err_path, NULL);
    if (!r.err)
        r.err = strdup("");
    return r;
}

/* Starts `itsw serve --config CONF` with stderr (its log) to rnd_log. */
static void rnd_start_worker(const char *conf)
{
    const char *bin = tu_build("bin/itsw");
    cr_assert(access(bin, X_OK) == 0, "%s is missing: build first (make all)", bin);
    int log_fd = open(rnd_log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    int null_fd = open("/dev/null", O_RDWR | O_CLOEXEC);
    cr_assert(log_fd >= 0 && null_fd >= 0, "open %s: %s", rnd_log, strerror(errno));
    pid_t parent = getpid();
    pid_t pid = fork();
    cr_assert(pid >= 0, "fork: %s", strerror(errno));
    if (pid == 0) {
        /* Only async-signal-safe calls: the test process has ZeroMQ threads. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        dup2(null_fd, 0);
        dup2(null_fd, 1);
        dup2(log_fd, 2);
        execl(bin, bin, "serve", "--config", conf, (char *)NULL);
        _exit(127);
    }
    close(log_fd);
    close(null_fd);
    rnd_pid = pid;
}

static const char *rnd_log_text(void)
{
    static char text[8192];
    char *all = tu_read_file(rnd_log, NULL);
    snprintf(text, sizeof text, "%s", all ? all : "(no log)");
    free(all);
    return text;
}

/* Receives the next message from the worker within the deadline; fails the test otherwise.
 * Saves the worker's routing id in `peer`. */
static void rnd_recv(void *router, uint64_t until_ms, char *peer, size_t *peer_len,
                     struct proto_msg *m)
{
    for (;;) {
        int64_t left = (int64_t)(until_ms - rnd_now_ms());
        cr_assert(left > 0, "no message from the worker in time; its log:\n%s", rnd_log_text());
        zmq_pollitem_t it = {.socket = router, .events = ZMQ_POLLIN};
        int n = zmq_poll(&it, 1, left > 200 ? 200 : (long)left);
        if (n <= 0) {
            int st;
            cr_assert(waitpid(rnd_pid, &st, WNOHANG) == 0, "the worker exited; its log:\n%s",
                      rnd_log_text());
            continue;
        }
        char id[256], buf[1 << 16];
        int id_len = zmq_recv(router, id, sizeof id, 0);
        cr_assert(id_len > 0 && id_len <= (int)sizeof id);
        int more = 0;
        size_t more_len = sizeof more;
        zmq_getsockopt(router, ZMQ_RCVMORE, &more, &more_len);
        cr_assert(more, "a frame without payload");
        int len = zmq_recv(router, buf, sizeof buf, 0);
        cr_assert(len >= 0 && len <= (int)sizeof buf, "payload of %d bytes", len);
        char err[256];
        int rc = proto_decode(buf, (size_t)len, PROTO_FROM_WORKER, m, err, sizeof err);
        cr_assert_eq(rc, 0, "the worker sent a bad message: %s", err);
        memcpy(peer, id, (size_t)id_len);
        *peer_len = (size_t)id_len;
        return;
    }
}

static void rnd_send(void *router, const char *peer, size_t peer_len, const struct proto_msg *m)
{
    void *buf = NULL;
    size_t len = 0;
    char err[256];
    cr_assert_eq(proto_encode(m, &buf, &len, err, sizeof err), 0, "encode: %s", err);
    cr_assert(zmq_send(router, peer, peer_len, ZMQ_SNDMORE) == (int)peer_len);
    cr_assert(zmq_send(router, buf, len, 0) == (int)len);
    free(buf);
}

/* The worker serves random weights of the tiny shape on the cpu backend, with the tokenizer
 * named by a path relative to its config file: it registers under the shape's name, and a
 * generate of 2 samples comes back with 8 tokens each, since ignore_eos makes every sample run
 * to max_tokens. Its debug log carries the timing line the GPU benchmark reads. */
Test(itsw_random, serve_random_tiny_answers_generate)
{
    const char *dir = tu_tmpdir();
    rnd_tokenizer_dir(dir, "tok", -1);
    snprintf(rnd_log, sizeof rnd_log, "%s/worker.log", dir);
    char conf[RND_PATH_BYTES], endpoint[RND_PATH_BYTES + 32];
    snprintf(conf, sizeof conf, "%s/w.conf", dir);
    snprintf(endpoint, sizeof endpoint, "ipc://%s/back.sock", dir);
    char text[RND_PATH_BYTES * 2];
    int n = snprintf(text, sizeof text,
                     "[worker]\n"
                     "connect = %s\n"
                     "role = instruct\n"
                     "model = random:tiny-llama-3\n"
                     "tokenizer = tok\n"
                     "random_seed = 7\n"
                     "ignore_eos = true\n"
                     "name = rnd-0\n"
                     "threads = 1\n"
                     "max_seqs = 4\n"
                     "kv_tokens = 1024\n"
                     "heartbeat_ms = 200\n"
                     "liveness = 50\n"
                     "log_level = 3\n",
                     endpoint);
    cr_assert_eq(tu_write_file(conf, text, (size_t)n), 0);

    void *ctx = zmq_ctx_new();
    void *router = zmq_socket(ctx, ZMQ_ROUTER);
    int linger = 0;
    zmq_setsockopt(router, ZMQ_LINGER, &linger, sizeof linger);
    cr_assert_eq(zmq_bind(router, endpoint), 0, "bind %s: %s", endpoint, zmq_strerror(errno));
    rnd_start_worker(conf);

    uint64_t until = rnd_now_ms() + RND_WAIT_MS;
    char peer[256];
    size_t peer_len = 0;
    struct proto_msg m;
    do {
        rnd_recv(router, until, peer, &peer_len, &m);
        if (m.type != PROTO_READY)
            proto_msg_free(&m);
    } while (m.type != PROTO_READY);
    cr_assert_str_eq(m.ready.model, "random:tiny-llama-3");
    cr_assert_str_eq(m.ready.backend, "cpu");
    cr_assert_eq(m.ready.role, PROTO_ROLE_INSTRUCT);
    cr_assert_eq(m.ready.capacity.max_seqs, 4);
    proto_msg_free(&m);

    struct proto_chat_msg question = {.role = PROTO_CHAT_USER, .content = "Why is the sky blue?"};
    struct proto_msg g = {.type = PROTO_GENERATE};
    g.generate = (struct proto_generate){
        .job = 41,
        .messages = &question,
        .n_messages = 1,
        .add_generation_prompt = true,
        .n = 2,
        .sampling = {.temperature = 0.7, .top_p = 0.9, .seed = 3, .max_tokens = 8},
    };
    rnd_send(router, peer, peer_len, &g);

    int samples = 0;
    for (;;) {
        rnd_recv(router, until, peer, &peer_len, &m);
        cr_assert_neq(m.type, PROTO_JOB_ERROR, "job_error: %s", m.job_error.message);
        if (m.type == PROTO_SAMPLE) {
            cr_assert_eq(m.sample.job, 41);
            cr_assert_eq(m.sample.output.n_tokens, 8);
            samples++;
        }
        if (m.type == PROTO_GENERATE_RESULT)
            break;
        proto_msg_free(&m);
    }
    cr_assert_eq(m.generate_result.job, 41);
    cr_assert_eq(m.generate_result.n_outputs, 2);
    for (uint32_t i = 0; i < 2; i++) {
        cr_assert_eq(m.generate_result.outputs[i].n_tokens, 8, "sample %u", i);
        cr_assert_eq(m.generate_result.outputs[i].finish, PROTO_FINISH_LENGTH, "sample %u", i);
    }
    cr_assert_eq(m.generate_result.usage.completion_tokens, 16);
    cr_assert_gt(m.generate_result.usage.prompt_tokens, 5);
    cr_assert_eq(samples, 2, "a sample message per sample before the result");
    proto_msg_free(&m);

    /* A clean stop: the worker says goodbye and exits 0. */
    kill(rnd_pid, SIGTERM);
    int st = 0;
    uint64_t stop_until = rnd_now_ms() + 10000;
    while (waitpid(rnd_pid, &st, WNOHANG) == 0) {
        cr_assert(rnd_now_ms() < stop_until, "the worker did not stop on SIGTERM");
        usleep(10000);
    }
    rnd_pid = 0;
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "exit status %d; log:\n%s", st,
              rnd_log_text());
    const char *log = rnd_log_text();
    cr_assert_not_null(strstr(log, "model tiny-llama-3: random weights (seed 7) on cpu"),
                       "log: %s", log);
    cr_assert_not_null(strstr(log, "job 41 done: generate n=2 "), "log: %s", log);
    cr_assert_not_null(strstr(log, " completion_tokens=16 steps=8 first_token_ms="), "log: %s",
                       log);
    cr_assert_not_null(strstr(log, " decode_ms_per_step="), "log: %s", log);

    zmq_close(router);
    zmq_ctx_term(ctx);
    tu_rmtree(dir);
}

/* Refusals before any weights are made: no tokenizer, an unknown shape (the known ones are
 * listed), and a tokenizer with an id past the shape's vocabulary of 128256. */
Test(itsw_random, refusals_name_the_problem)
{
    const char *dir = tu_tmpdir();
    char args[RND_PATH_BYTES * 2];

    struct rnd_run r = rnd_itsw(dir, "serve --role edit --model random:tiny-llama-3");
    cr_assert_eq(r.status, 2, "exit %d: %s", r.status, r.err);
    cr_assert_not_null(strstr(r.err, "random weights need tokenizer = DIR"), "%s", r.err);
    free(r.err);

    snprintf(args, sizeof args, "serve --role edit --model random:llama-9b --tokenizer '%s'",
             tu_shared("hf-reference/tokenizer"));
    r = rnd_itsw(dir, args);
    cr_assert_eq(r.status, 2, "exit %d: %s", r.status, r.err);
    cr_assert_not_null(strstr(r.err, "unknown shape 'llama-9b'"), "%s", r.err);
    cr_assert_not_null(strstr(r.err, "tiny-llama-3"), "the known shapes are not listed: %s",
                       r.err);
    free(r.err);

    /* In a config file the shape is not taken for a relative path. */
    char conf[RND_PATH_BYTES];
    snprintf(conf, sizeof conf, "%s/bad.conf", dir);
    static const char bad[] = "[worker]\nrole = edit\nmodel = random:nope\n";
    cr_assert_eq(tu_write_file(conf, bad, sizeof bad - 1), 0);
    snprintf(args, sizeof args, "serve --config '%s'", conf);
    r = rnd_itsw(dir, args);
    cr_assert_eq(r.status, 2, "exit %d: %s", r.status, r.err);
    cr_assert_not_null(strstr(r.err, "model = 'random:nope': unknown shape 'nope'"), "%s", r.err);
    free(r.err);

    rnd_tokenizer_dir(dir, "big", 128300);
    snprintf(args, sizeof args,
             "serve --role edit --model random:tiny-llama-3 --tokenizer '%s/big' "
             "--connect 'ipc://%s/none.sock'", dir, dir);
    r = rnd_itsw(dir, args);
    cr_assert_eq(r.status, 1, "exit %d: %s", r.status, r.err);
    cr_assert_not_null(strstr(r.err, "has ids up to 128300, past the vocabulary"), "%s", r.err);
    cr_assert_not_null(strstr(r.err, "vocab_size 128256"), "%s", r.err);
    free(r.err);

    r = rnd_itsw(dir, "serve --role edit --model /m --ignore-eos maybe");
    cr_assert_eq(r.status, 2, "exit %d: %s", r.status, r.err);
    cr_assert_not_null(strstr(r.err, "--ignore-eos 'maybe': not true or false"), "%s", r.err);
    free(r.err);
    tu_rmtree(dir);
}

/* Every option of `itsw serve --help` has its row in the itsw section of
 * docs/configuration.md, so a key added to the table cannot go undocumented. */
Test(itsw_random, every_serve_option_is_documented)
{
    const char *dir = tu_tmpdir();
    char out_path[RND_PATH_BYTES], cmd[16384];
    snprintf(out_path, sizeof out_path, "%s/help", dir);
    snprintf(cmd, sizeof cmd, "'%s' serve --help >'%s' 2>&1", tu_build("bin/itsw"), out_path);
    cr_assert_eq(system(cmd), 0);
    char *help = tu_read_file(out_path, NULL);
    char *doc = tu_read_file(tu_src("docs/configuration.md"), NULL);
    cr_assert(help && doc);
    const char *section = strstr(doc, "\n## itsw");
    cr_assert_not_null(section, "docs/configuration.md has no itsw section");
    int n = 0;
    for (const char *p = strstr(help, "\n  --"); p; p = strstr(p + 1, "\n  --")) {
        char key[64];
        size_t k = 0;
        for (const char *q = p + 5; *q && *q != ' ' && k + 1 < sizeof key; q++)
            key[k++] = *q == '-' ? '_' : *q;
        key[k] = '\0';
        char row[80];
        snprintf(row, sizeof row, "| `%s` |", key);
        cr_expect_not_null(strstr(section, row), "docs/configuration.md (itsw) lacks %s", row);
        n++;
    }
    cr_assert_gt(n, 15, "could not read the options from --help: %s", help);
    free(help);
    free(doc);
    tu_rmtree(dir);
}
