/* test_metrics.c — itsd's metrics as an operator reads them.
 *
 * Unit part: the Prometheus text that orchestrator/metrics.c renders (every family has HELP
 * and TYPE, every sample line parses, label values are escaped, histogram buckets are
 * cumulative and +Inf equals _count), the quantile estimate, the status_reply conversion and
 * the metrics_listen address parser.
 * Integration part: the real build/bin/itsd with metrics_listen on a free loopback port and
 * fake workers on ipc:// (as tests/test_itsd.c does, in a smaller form): /metrics is scraped
 * over a plain socket before and after requests run, wrong paths and methods get 404 and 405,
 * and `status` over libits reports the same numbers as the scrape.
 */
#include <criterion/criterion.h>
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <signal.h>
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
#include "metrics.h"
#include "metrics_http.h"
#include "proto.h"
#include "testutil.h"

#define PATH_BYTES 1200

/* ---- reading the exposition text ------------------------------------------------------------ */

/* The value of the sample whose name and labels are exactly `series` (e.g.
 * its_requests_total{outcome="ok"}); fails the test when there is none. */
static double sample(const char *text, const char *series)
{
    size_t n = strlen(series);
    for (const char *p = text; p && *p;) {
        if (strncmp(p, series, n) == 0 && p[n] == ' ')
            return strtod(p + n + 1, NULL);
        p = strchr(p, '\n');
        if (p)
            p++;
    }
    cr_assert_fail("no sample %s in:\n%.3000s", series, text);
    return NAN;
}

static bool is_name_char(char c, bool first)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':' ||
           (!first && c >= '0' && c <= '9');
}

/* Checks the whole text against the 0.0.4 grammar as far as a scraper relies on it: every
 * sample's family has a HELP and a TYPE line before it, names are valid, label values are
 * quoted with only \\, \" and \n escapes, and every value is a number. Returns the number of
 * samples. */
static int check_exposition(const char *text)
{
    char *copy = strdup(text);
    cr_assert_not_null(copy);
    char helped[256][96], typed[256][96];
    int n_helped = 0, n_typed = 0, n_samples = 0;
    cr_assert(strlen(text) > 0 && text[strlen(text) - 1] == '\n', "text must end with \\n");
    for (char *save = NULL, *line = strtok_r(copy, "\n", &save); line;
         line = strtok_r(NULL, "\n", &save)) {
        if (strncmp(line, "# HELP ", 7) == 0 || strncmp(line, "# TYPE ", 7) == 0) {
            char name[96] = "", rest[64] = "";
            cr_assert_eq(sscanf(line + 7, "%95s %63s", name, rest), 2, "bad line: %s", line);
            if (line[2] == 'H') {
                cr_assert(n_helped < 256);
                snprintf(helped[n_helped++], 96, "%s", name);
            } else {
                cr_assert(strcmp(rest, "counter") == 0 || strcmp(rest, "gauge") == 0 ||
                              strcmp(rest, "histogram") == 0,
                          "bad type: %s", line);
                cr_assert(n_typed < 256);
                snprintf(typed[n_typed++], 96, "%s", name);
            }
            continue;
        }
        cr_assert_neq(line[0], '#', "unknown comment line: %s", line);
        const char *p = line;
        cr_assert(is_name_char(*p, true), "bad metric name: %s", line);
        while (is_name_char(*p, false))
            p++;
        char name[96];
        snprintf(name, sizeof name, "%.*s", (int)(p - line), line);
        if (*p == '{') {
            p++;
            while (*p != '}') {
                cr_assert(is_name_char(*p, true), "bad label name: %s", line);
                while (is_name_char(*p, false))
                    p++;
                cr_assert(p[0] == '=' && p[1] == '"', "label without =\": %s", line);
                p += 2;
                while (*p != '"') {
                    cr_assert(*p, "unterminated label value: %s", line);
                    if (*p == '\\') {
                        cr_assert(p[1] == '\\' || p[1] == '"' || p[1] == 'n',
                                  "bad escape in: %s", line);
                        p++;
                    }
                    p++;
                }
                p++;
                if (*p == ',')
                    p++;
            }
            p++;
        }
        cr_assert_eq(*p, ' ', "no value after the series: %s", line);
        char *end;
        strtod(p + 1, &end);
        cr_assert(end != p + 1 && *end == '\0', "value is not a number: %s", line);
        /* the family: the name, or for a histogram's series the name before the suffix */
        char family[96];
        snprintf(family, sizeof family, "%s", name);
        const char *suffixes[] = {"_bucket", "_sum", "_count"};
        bool known = false;
        for (int pass = 0; pass < 2 && !known; pass++) {
            for (int i = 0; i < n_typed; i++)
                known |= strcmp(typed[i], family) == 0;
            for (int s = 0; s < 3 && !known && pass == 0; s++) {
                size_t fl = strlen(family), sl = strlen(suffixes[s]);
                if (fl > sl && strcmp(family + fl - sl, suffixes[s]) == 0) {
                    char base[96];
                    snprintf(base, sizeof base, "%.*s", (int)(fl - sl), family);
                    for (int i = 0; i < n_typed; i++)
                        if (strcmp(typed[i], base) == 0) {
                            known = true;
                            snprintf(family, sizeof family, "%s", base);
                        }
                }
            }
        }
        cr_assert(known, "sample of %s before (or without) its TYPE line", name);
        bool has_help = false;
        for (int i = 0; i < n_helped; i++)
            has_help |= strcmp(helped[i], family) == 0;
        cr_assert(has_help, "%s has no HELP line", family);
        n_samples++;
    }
    free(copy);
    return n_samples;
}

static char *render(const struct metrics *m, const struct metrics_build *b)
{
    char *text = NULL;
    size_t len = 0;
    cr_assert_eq(metrics_render(m, b, &text, &len), 0);
    cr_assert_not_null(text);
    cr_assert_eq(strlen(text), len);
    return text;
}

/* ---- unit: rendering ------------------------------------------------------------------------ */

Test(metrics, render_follows_the_text_format_with_every_label_combination)
{
    struct metrics m = {0};
    m.requests[METRICS_OK] = 7;
    m.workers[PROTO_ROLE_EDIT][PROTO_WORKER_BUSY] = 2;
    m.queue_depth[PROTO_ROLE_FEEDBACK] = 11;
    struct metrics_build b = {.version = "1.2.3", .libzmq = "4.3.4", .microhttpd = "0.9.75"};
    char *text = render(&m, &b);
    int n = check_exposition(text);
    /* 6 outcomes + 14 codes + 16 buckets/sum/count + role x state 16 + ... */
    cr_assert_geq(n, 6 + PROTO_ERR_COUNT + METRICS_N_BUCKETS + 3 + 16, "%d samples", n);
    cr_assert_eq(sample(text, "its_requests_total{outcome=\"ok\"}"), 7);
    cr_assert_eq(sample(text, "its_requests_total{outcome=\"rejected\"}"), 0);
    cr_assert_eq(sample(text, "its_workers{role=\"edit\",state=\"busy\"}"), 2);
    cr_assert_eq(sample(text, "its_workers{role=\"select\",state=\"lost\"}"), 0,
                 "zeros must be written too");
    cr_assert_eq(sample(text, "its_queue_depth{role=\"feedback\"}"), 11);
    cr_assert_eq(sample(text, "its_request_errors_total{code=\"worker_lost\"}"), 0);
    cr_assert_eq(sample(text, "its_protocol_errors_total{socket=\"backend\"}"), 0);
    cr_assert_eq(sample(text, "its_tokens_generated_total{role=\"instruct\"}"), 0);
    cr_assert_eq(sample(text, "its_heartbeat_misses_total"), 0);
    cr_assert_not_null(strstr(text, "# TYPE its_requests_total counter\n"));
    cr_assert_not_null(strstr(text, "# TYPE its_request_duration_seconds histogram\n"));
    cr_assert_not_null(strstr(text, "# TYPE its_queue_depth gauge\n"));
    free(text);
}

Test(metrics, label_values_are_escaped)
{
    char out[64];
    cr_assert_eq(metrics_escape_label("a\\b\"c\nd", out, sizeof out), 10);
    cr_assert_str_eq(out, "a\\\\b\\\"c\\nd");
    cr_assert_eq(metrics_escape_label("plain", out, sizeof out), 5);
    cr_assert_str_eq(out, "plain");
    cr_assert_eq(metrics_escape_label("\"\"\"", out, 6), -1, "too small a buffer is -1");
    /* and in the rendered text: a version string with every character that needs it */
    struct metrics m = {0};
    struct metrics_build b = {.version = "v\"1\"\\beta\nline2", .libzmq = "4", .microhttpd = "0"};
    char *text = render(&m, &b);
    check_exposition(text);
    cr_assert_not_null(strstr(text, "its_build_info{version=\"v\\\"1\\\"\\\\beta\\nline2\","),
                       "%.600s", text);
    free(text);
}

Test(metrics, histogram_buckets_are_cumulative_and_inf_is_the_count)
{
    struct metrics m = {0};
    const double obs[] = {0.2, 0.5, 0.7, 7.0, 45.0, 45.0, 3599.0, 5000.0};
    double sum = 0;
    for (size_t i = 0; i < sizeof obs / sizeof obs[0]; i++) {
        metrics_request_end(&m, 0, false, obs[i]);
        sum += obs[i];
    }
    metrics_request_end(&m, PROTO_ERR_NO_WORKER, false, 1.5);
    sum += 1.5;
    cr_assert_eq(m.requests[METRICS_OK], 8);
    cr_assert_eq(m.requests[METRICS_FAILED], 1);
    cr_assert_eq(m.request_errors[-PROTO_ERR_NO_WORKER - 1], 1);
    char *text = render(&m, NULL);
    check_exposition(text);
    double prev = 0;
    char series[128];
    for (size_t i = 0; i < METRICS_N_BUCKETS; i++) {
        char le[32];
        snprintf(le, sizeof le, "%g", metrics_bucket_bound(i));
        snprintf(series, sizeof series, "its_request_duration_seconds_bucket{le=\"%s\"}", le);
        double v = sample(text, series);
        cr_assert_geq(v, prev, "bucket le=%s (%g) below the one before (%g)", le, v, prev);
        /* the count at each bound is the number of observations <= it */
        int want = 0;
        for (size_t k = 0; k < sizeof obs / sizeof obs[0]; k++)
            want += obs[k] <= metrics_bucket_bound(i);
        want += 1.5 <= metrics_bucket_bound(i);
        cr_assert_eq(v, want, "le=%s: %g, expected %d", le, v, want);
        prev = v;
    }
    double inf = sample(text, "its_request_duration_seconds_bucket{le=\"+Inf\"}");
    cr_assert_eq(inf, sample(text, "its_request_duration_seconds_count"));
    cr_assert_eq(inf, 9);
    cr_assert_geq(inf, prev);
    cr_assert_float_eq(sample(text, "its_request_duration_seconds_sum"), sum, 1e-9);
    free(text);
}

Test(metrics, quantiles_interpolate_within_the_bucket)
{
    struct metrics_histogram h = {0};
    double q;
    cr_assert_eq(metrics_quantile(&h, 0.5, &q), -1, "no observation, no quantile");
    struct metrics m = {0};
    /* 10 requests in (10, 20]: the median is halfway through that bucket */
    for (int i = 0; i < 10; i++)
        metrics_request_end(&m, 0, false, 15.0);
    cr_assert_eq(metrics_quantile(&m.duration, 0.5, &q), 0);
    cr_assert_float_eq(q, 15.0, 1e-9);
    cr_assert_eq(metrics_quantile(&m.duration, 0.95, &q), 0);
    cr_assert_float_eq(q, 19.5, 1e-9);
    /* beyond the last bound: the last bound */
    struct metrics big = {0};
    metrics_request_end(&big, 0, false, 1e6);
    cr_assert_eq(metrics_quantile(&big.duration, 0.5, &q), 0);
    cr_assert_float_eq(q, metrics_bucket_bound(METRICS_N_BUCKETS - 1), 1e-9);
}

Test(metrics, outcomes_and_the_status_reply_agree)
{
    struct metrics m = {0};
    metrics_request_end(&m, 0, false, 1);
    metrics_request_end(&m, 0, true, 2);
    metrics_request_end(&m, PROTO_ERR_CANCELLED, false, 3);
    metrics_request_end(&m, PROTO_ERR_DEADLINE, false, 4);
    metrics_request_end(&m, PROTO_ERR_WORKER_LOST, false, 5);
    metrics_request_rejected(&m, PROTO_ERR_BUSY);
    metrics_request_rejected(&m, PROTO_ERR_TOO_LARGE);
    metrics_tokens(&m, PROTO_ROLE_FEEDBACK, 40, 100);
    metrics_request_end(NULL, 0, false, 1); /* NULL-safe */
    metrics_request_rejected(NULL, PROTO_ERR_BUSY);
    metrics_tokens(NULL, PROTO_ROLE_EDIT, 1, 1);
    m.heartbeat_misses = 3;
    m.protocol_errors[METRICS_FRONTEND] = 4;
    struct proto_metrics pm;
    metrics_to_proto(&m, &pm);
    cr_assert_eq(pm.requests.ok, 1);
    cr_assert_eq(pm.requests.partial, 1);
    cr_assert_eq(pm.requests.cancelled, 1);
    cr_assert_eq(pm.requests.deadline, 1);
    cr_assert_eq(pm.requests.failed, 1);
    cr_assert_eq(pm.requests.rejected, 2);
    cr_assert_eq(pm.latency.count, 5, "rejected submits have no latency");
    cr_assert_float_eq(pm.latency.sum_s, 15.0, 1e-9);
    cr_assert(pm.latency.has_p50_s && pm.latency.has_p95_s);
    cr_assert_leq(pm.latency.p50_s, pm.latency.p95_s);
    cr_assert_eq(pm.tokens_generated.feedback, 40);
    cr_assert_eq(pm.heartbeat_misses, 3);
    cr_assert_eq(pm.protocol_errors.frontend, 4);
    /* and it survives the wire */
    struct proto_msg msg = {.type = PROTO_STATUS_REPLY};
    msg.status_reply.metrics = pm;
    msg.status_reply.has_metrics = true;
    void *buf;
    size_t len;
    char err[256];
    cr_assert_eq(proto_encode(&msg, &buf, &len, err, sizeof err), 0, "%s", err);
    struct proto_msg back;
    cr_assert_eq(proto_decode(buf, len, PROTO_TO_CLIENT, &back, err, sizeof err), 0, "%s", err);
    cr_assert(proto_msg_equal(&msg, &back));
    free(buf);
    proto_msg_free(&back);
    /* the text shows the same outcome counts */
    char *text = render(&m, NULL);
    cr_assert_eq(sample(text, "its_requests_total{outcome=\"rejected\"}"), 2);
    cr_assert_eq(sample(text, "its_request_errors_total{code=\"busy\"}"), 1);
    cr_assert_eq(sample(text, "its_request_errors_total{code=\"worker_lost\"}"), 1);
    cr_assert_eq(sample(text, "its_prompt_tokens_total{role=\"feedback\"}"), 100);
    free(text);
}

Test(metrics, listen_addresses)
{
    struct sockaddr_storage ss;
    size_t len;
    char err[256];
    cr_assert_eq(metrics_http_parse_listen("127.0.0.1:9464", &ss, &len, err, sizeof err), 0,
                 "%s", err);
    cr_assert_eq(ss.ss_family, AF_INET);
    cr_assert_eq(ntohs(((struct sockaddr_in *)&ss)->sin_port), 9464);
    cr_assert_eq(metrics_http_parse_listen("[::1]:80", &ss, &len, err, sizeof err), 0, "%s",
                 err);
    cr_assert_eq(ss.ss_family, AF_INET6);
    cr_assert_eq(len, sizeof(struct sockaddr_in6));
    cr_assert_eq(metrics_http_parse_listen("0.0.0.0:0", &ss, &len, err, sizeof err), 0);
    const char *bad[] = {"", "9464", ":9464", "127.0.0.1", "127.0.0.1:", "127.0.0.1:65536",
                         "127.0.0.1:-1", "127.0.0.1:94a", "::1:9464", "[::1]", "[127.0.0.1]:1",
                         "localhost:9464", "[::1:9464", "300.1.1.1:80"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = '\0';
        cr_assert_eq(metrics_http_parse_listen(bad[i], &ss, &len, err, sizeof err), -1,
                     "'%s' was accepted", bad[i]);
        cr_assert(err[0], "'%s': no message", bad[i]);
    }
}

/* ---- integration: the daemon ---------------------------------------------------------------- */

#define HB_MS 100
#define N_WORKERS 4
#define N_REQUESTS 3
#define DRAFTS 2

#define DIR_BYTES 1024
static char g_dir[DIR_BYTES], g_front[PATH_BYTES], g_back[PATH_BYTES], g_log[PATH_BYTES];
static pid_t g_pid = -1;
static void *g_zctx;
static unsigned g_port;

struct fake {
    void *s;
    enum proto_role role;
    uint64_t next_hb;
};
static struct fake g_w[N_WORKERS];
static void *g_client;

static const char *log_tail(void)
{
    return tu_file_tail(g_log, 2500);
}

/* One HTTP/1.0 exchange with itsd's endpoint: returns the status code, *body (malloc'd) the
 * body. Retries the connect for a while (itsd binds it just after its ZeroMQ sockets). */
static int http(const char *request, char **body)
{
    *body = NULL;
    int fd = -1;
    for (uint64_t end = tu_now_ms() + 5000;;) {
        fd = socket(AF_INET, SOCK_STREAM, 0);
        cr_assert_geq(fd, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)g_port),
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0)
            break;
        close(fd);
        cr_assert(tu_now_ms() < end, "cannot connect to 127.0.0.1:%u: %s; itsd log: %s", g_port,
                  strerror(errno), log_tail());
        usleep(10000);
    }
    struct timeval tv = {.tv_sec = 10};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    size_t n = strlen(request);
    cr_assert_eq(send(fd, request, n, MSG_NOSIGNAL), (ssize_t)n);
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    cr_assert_not_null(buf);
    for (;;) {
        if (len + 1 >= cap) {
            cap *= 2;
            buf = realloc(buf, cap);
            cr_assert_not_null(buf);
        }
        ssize_t got = recv(fd, buf + len, cap - len - 1, 0);
        cr_assert_geq(got, 0, "recv: %s", strerror(errno));
        if (got == 0)
            break;
        len += (size_t)got;
    }
    close(fd);
    buf[len] = '\0';
    int status = 0;
    cr_assert_eq(sscanf(buf, "HTTP/1.%*d %d", &status), 1, "not an HTTP reply: %.200s", buf);
    char *sep = strstr(buf, "\r\n\r\n");
    cr_assert_not_null(sep, "no end of headers");
    *sep = '\0';
    *body = strdup(sep + 4);
    if (status == 200)
        cr_assert_not_null(strcasestr(buf, "\r\nContent-Type: text/plain; version=0.0.4; "
                                           "charset=utf-8"),
                           "content type: %s", buf);
    free(buf);
    return status;
}

static char *scrape(void)
{
    char *body;
    int status = http("GET /metrics HTTP/1.0\r\nHost: itsd\r\n\r\n", &body);
    cr_assert_eq(status, 200, "GET /metrics: %d %s", status, body);
    check_exposition(body);
    return body;
}

static void send_msg(void *s, const struct proto_msg *m)
{
    void *buf;
    size_t len;
    char err[256];
    cr_assert_eq(proto_encode(m, &buf, &len, err, sizeof err), 0, "%s", err);
    cr_assert_geq(zmq_send(s, buf, len, 0), 0);
    free(buf);
}

/* Fake workers: heartbeat, and answer every job at once (3 tokens per output). */
static void workers_serve(void)
{
    uint64_t now = tu_now_ms();
    for (int i = 0; i < N_WORKERS; i++) {
        struct fake *w = &g_w[i];
        if (now >= w->next_hb) {
            struct proto_msg hb = {.type = PROTO_HEARTBEAT};
            send_msg(w->s, &hb);
            w->next_hb = now + HB_MS;
        }
        zmq_msg_t zm;
        zmq_msg_init(&zm);
        while (zmq_msg_recv(&zm, w->s, ZMQ_DONTWAIT) >= 0) {
            struct proto_msg m;
            char err[256];
            int rc = proto_decode(zmq_msg_data(&zm), zmq_msg_size(&zm), PROTO_TO_WORKER, &m, err,
                                  sizeof err);
            cr_assert_eq(rc, 0, "%s", err);
            if (m.type == PROTO_GENERATE) {
                struct proto_output outs[PROTO_MAX_SAMPLES];
                for (uint32_t k = 0; k < m.generate.n; k++)
                    outs[k] = (struct proto_output){.text = "text", .n_tokens = 3,
                                                    .finish = PROTO_FINISH_STOP};
                struct proto_msg r = {.type = PROTO_GENERATE_RESULT};
                r.generate_result = (struct proto_generate_result){
                    .job = m.generate.job, .outputs = outs, .n_outputs = m.generate.n,
                    .usage = {.prompt_tokens = 10, .completion_tokens = 3ull * m.generate.n}};
                send_msg(w->s, &r);
            } else if (m.type == PROTO_SCORE) {
                double scores[PROTO_MAX_CONVERSATIONS];
                for (uint32_t k = 0; k < m.score.n_conversations; k++)
                    scores[k] = (double)k;
                struct proto_msg r = {.type = PROTO_SCORE_RESULT};
                r.score_result = (struct proto_score_result){
                    .job = m.score.job, .scores = scores, .n_scores = m.score.n_conversations,
                    .usage = {.prompt_tokens = 20}};
                send_msg(w->s, &r);
            }
            proto_msg_free(&m);
            zmq_msg_close(&zm);
            zmq_msg_init(&zm);
        }
        zmq_msg_close(&zm);
    }
}

/* Serves the workers until the client has a message; returns it decoded. */
static struct proto_msg client_wait(int ms)
{
    for (uint64_t end = tu_now_ms() + (uint64_t)ms; tu_now_ms() < end;) {
        workers_serve();
        zmq_pollitem_t it = {.socket = g_client, .events = ZMQ_POLLIN};
        if (zmq_poll(&it, 1, 5) > 0) {
            zmq_msg_t zm;
            zmq_msg_init(&zm);
            cr_assert_geq(zmq_msg_recv(&zm, g_client, 0), 0);
            struct proto_msg m;
            char err[256];
            int rc = proto_decode(zmq_msg_data(&zm), zmq_msg_size(&zm), PROTO_TO_CLIENT, &m, err,
                                  sizeof err);
            zmq_msg_close(&zm);
            cr_assert_eq(rc, 0, "%s", err);
            return m;
        }
    }
    cr_assert_fail("no reply within %d ms; itsd log: %s", ms, log_tail());
    return (struct proto_msg){0};
}

static void daemon_start(void)
{
    char tpl[PATH_BYTES + 16];
    snprintf(tpl, sizeof tpl, "%s/tpl", g_dir);
    mkdir(tpl, 0700);
    tu_write_in(tpl, "instruct.tmpl", "@conversation\n");
    tu_write_in(tpl, "feedback.tmpl",
               "@conversation\n@assistant\n{response}\n@user\nEvaluate the response.\n");
    tu_write_in(tpl, "edit.tmpl",
               "@conversation\n@assistant\n{response}\n@user\nEdit it using:\n{feedback}\n");
    tu_write_in(tpl, "select.tmpl", "@user\n{prompt}\n@assistant\n{response}\n");
    g_port = tu_free_port();
    char listen[64], hb[16];
    snprintf(listen, sizeof listen, "127.0.0.1:%u", g_port);
    snprintf(hb, sizeof hb, "%d", HB_MS);
    char bin[PATH_BYTES];
    snprintf(bin, sizeof bin, "%s", tu_build("bin/itsd"));
    cr_assert_eq(access(bin, X_OK), 0, "%s is not built", bin);
    char *argv[] = {bin, "--frontend", g_front, "--backend", g_back, "--templates", tpl,
                    "--heartbeat-ms", hb, "--liveness", "5", "--metrics-listen", listen,
                    "--shutdown-ms", "1000", NULL};
    pid_t parent = getpid();
    pid_t pid = fork();
    cr_assert_neq(pid, -1);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        int fd = open(g_log, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (fd >= 0) {
            dup2(fd, STDERR_FILENO);
            close(fd);
        }
        execv(bin, argv);
        _exit(127);
    }
    g_pid = pid;
}

static void daemon_stop(void)
{
    if (g_pid <= 0)
        return;
    kill(g_pid, SIGTERM);
    int status = 0;
    pid_t got = 0;
    for (uint64_t end = tu_now_ms() + 5000; tu_now_ms() < end;) {
        if ((got = waitpid(g_pid, &status, WNOHANG)) == g_pid)
            break;
        usleep(5000);
    }
    bool exited = got == g_pid;
    if (!exited) {
        kill(g_pid, SIGKILL);
        waitpid(g_pid, &status, 0);
    }
    g_pid = -1;
    cr_assert(exited && WIFEXITED(status) && WEXITSTATUS(status) == 0,
              "itsd did not exit 0 within 5 s of SIGTERM (status %d): %s", status, log_tail());
}

static void setup(void)
{
    snprintf(g_dir, sizeof g_dir, "%s", tu_tmpdir());
    snprintf(g_front, sizeof g_front, "ipc://%s/front.sock", g_dir);
    snprintf(g_back, sizeof g_back, "ipc://%s/back.sock", g_dir);
    snprintf(g_log, sizeof g_log, "%s/itsd.log", g_dir);
    g_zctx = zmq_ctx_new();
    cr_assert_not_null(g_zctx);
}

static void teardown(void)
{
    if (g_pid > 0) {
        kill(g_pid, SIGKILL);
        waitpid(g_pid, NULL, 0);
        g_pid = -1;
    }
    for (int i = 0; i < N_WORKERS; i++)
        if (g_w[i].s)
            zmq_close(g_w[i].s);
    if (g_client)
        zmq_close(g_client);
    memset(g_w, 0, sizeof g_w);
    g_client = NULL;
    zmq_ctx_term(g_zctx);
    if (!getenv("ITS_TEST_KEEP"))
        tu_rmtree(g_dir);
}

static void *dealer(const char *ep, const char *rid)
{
    void *s = zmq_socket(g_zctx, ZMQ_DEALER);
    cr_assert_not_null(s);
    int zero = 0;
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    if (rid)
        zmq_setsockopt(s, ZMQ_ROUTING_ID, rid, strlen(rid));
    cr_assert_eq(zmq_connect(s, ep), 0);
    return s;
}

static struct proto_chat_msg g_question[] = {{PROTO_CHAT_USER, "What is two plus two?"}};

static void submit(uint64_t tag, uint32_t drafts, uint32_t feedbacks, uint32_t edits)
{
    struct proto_msg m = {.type = PROTO_SUBMIT};
    m.submit = (struct proto_submit){
        .tag = tag, .messages = g_question, .n_messages = 1, .drafts = drafts,
        .feedbacks = feedbacks, .edits = edits, .has_drafts = true, .has_feedbacks = true,
        .has_edits = true, .seed = 1, .has_seed = true};
    send_msg(g_client, &m);
}

Test(metrics, itsd_serves_metrics_that_move_and_match_status, .init = setup, .fini = teardown,
     .timeout = 90)
{
    daemon_start();
    /* wrong path, wrong method */
    char *body;
    cr_assert_eq(http("GET /nope HTTP/1.0\r\n\r\n", &body), 404, "%s", body);
    free(body);
    cr_assert_eq(http("POST /metrics HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc", &body), 405,
                 "%s", body);
    free(body);
    cr_assert_eq(http("DELETE /metrics HTTP/1.0\r\n\r\n", &body), 405, "%s", body);
    free(body);

    char *before = scrape();
    cr_assert_eq(sample(before, "its_workers{role=\"instruct\",state=\"ready\"}"), 0);

    static const enum proto_role roles[N_WORKERS] = {PROTO_ROLE_INSTRUCT, PROTO_ROLE_FEEDBACK,
                                                     PROTO_ROLE_EDIT, PROTO_ROLE_SELECT};
    for (int i = 0; i < N_WORKERS; i++) {
        char name[32];
        snprintf(name, sizeof name, "w-%s", proto_role_name(roles[i]));
        g_w[i].s = dealer(g_back, name);
        g_w[i].role = roles[i];
        struct proto_msg m = {.type = PROTO_READY};
        m.ready = (struct proto_ready){
            .worker = name, .role = roles[i], .model = "fake", .backend = "cpu",
            .capacity = {.max_seqs = 64, .max_ctx = 4096, .kv_tokens = 65536}};
        send_msg(g_w[i].s, &m);
    }
    g_client = dealer(g_front, NULL);
    /* registered: the gauges say so */
    char *regd = NULL;
    for (uint64_t end = tu_now_ms() + 5000;;) {
        workers_serve();
        free(regd);
        regd = scrape();
        if (sample(regd, "its_workers{role=\"select\",state=\"ready\"}") == 1 &&
            sample(regd, "its_workers{role=\"instruct\",state=\"ready\"}") == 1)
            break;
        cr_assert(tu_now_ms() < end, "workers did not show as registered:\n%s", regd);
        usleep(20000);
    }
    free(regd);

    /* N requests, each to the end */
    for (int i = 0; i < N_REQUESTS; i++) {
        submit(100 + (uint64_t)i, DRAFTS, 1, 1);
        struct proto_msg a = client_wait(5000);
        cr_assert_eq(a.type, PROTO_ACCEPTED, "%s: %s", proto_type_name(a.type),
                     a.type == PROTO_ERROR ? a.error.message : "");
        proto_msg_free(&a);
        struct proto_msg r = client_wait(10000);
        cr_assert_eq(r.type, PROTO_RESULT, "%s: %s", proto_type_name(r.type),
                     r.type == PROTO_ERROR ? r.error.message : "");
        cr_assert(!r.result.partial);
        proto_msg_free(&r);
    }
    /* one submit refused before acceptance (32 x 64 candidates is over max_candidates) */
    submit(200, 32, 64, 64);
    struct proto_msg e = client_wait(5000);
    cr_assert_eq(e.type, PROTO_ERROR);
    cr_assert_eq(e.error.code, PROTO_ERR_TOO_LARGE, "%s", e.error.message);
    proto_msg_free(&e);
    /* one frame that is not msgpack at all */
    cr_assert_geq(zmq_send(g_client, "\xc1junk", 5, 0), 0);
    e = client_wait(5000);
    cr_assert_eq(e.type, PROTO_ERROR);
    proto_msg_free(&e);
    workers_serve();

    char *after = scrape();
    struct {
        const char *series;
        double delta;
    } moved[] = {
        {"its_requests_total{outcome=\"ok\"}", N_REQUESTS},
        {"its_requests_total{outcome=\"rejected\"}", 1},
        {"its_requests_total{outcome=\"failed\"}", 0},
        {"its_request_errors_total{code=\"too_large\"}", 1},
        {"its_request_duration_seconds_count", N_REQUESTS},
        {"its_request_duration_seconds_bucket{le=\"+Inf\"}", N_REQUESTS},
        /* each draft job: DRAFTS outputs of 3 tokens; one feedback and one edit per draft */
        {"its_tokens_generated_total{role=\"instruct\"}", 3.0 * DRAFTS * N_REQUESTS},
        {"its_tokens_generated_total{role=\"feedback\"}", 3.0 * DRAFTS * N_REQUESTS},
        {"its_tokens_generated_total{role=\"edit\"}", 3.0 * DRAFTS * N_REQUESTS},
        {"its_tokens_generated_total{role=\"select\"}", 0},
        {"its_protocol_errors_total{socket=\"frontend\"}", 1},
        {"its_protocol_errors_total{socket=\"backend\"}", 0},
    };
    for (size_t i = 0; i < sizeof moved / sizeof moved[0]; i++) {
        double d = sample(after, moved[i].series) - sample(before, moved[i].series);
        cr_assert_eq(d, moved[i].delta, "%s moved by %g, expected %g", moved[i].series, d,
                     moved[i].delta);
    }
    cr_assert_gt(sample(after, "its_prompt_tokens_total{role=\"select\"}"), 0);
    cr_assert_eq(sample(after, "its_requests_in_flight"), 0);
    cr_assert_eq(sample(after, "its_jobs_in_flight{role=\"edit\"}"), 0);

    /* status over libits: the same numbers */
    its_client_t *c = NULL;
    char err[256];
    cr_assert_eq(its_client_new(g_front, &c, err, sizeof err), 0, "%s", err);
    struct its_status *st = NULL;
    cr_assert_eq(its_status(c, 5000, &st), 0, "%s", its_client_errstr(c));
    cr_assert(st->has_metrics, "status carried no metrics");
    const struct its_metrics *m = &st->metrics;
    cr_assert_eq(m->requests_ok, sample(after, "its_requests_total{outcome=\"ok\"}"));
    cr_assert_eq(m->requests_partial, sample(after, "its_requests_total{outcome=\"partial\"}"));
    cr_assert_eq(m->requests_cancelled,
                 sample(after, "its_requests_total{outcome=\"cancelled\"}"));
    cr_assert_eq(m->requests_deadline, sample(after, "its_requests_total{outcome=\"deadline\"}"));
    cr_assert_eq(m->requests_failed, sample(after, "its_requests_total{outcome=\"failed\"}"));
    cr_assert_eq(m->requests_rejected, sample(after, "its_requests_total{outcome=\"rejected\"}"));
    cr_assert_eq(m->latency_count, sample(after, "its_request_duration_seconds_count"));
    cr_assert_float_eq(m->latency_sum_s, sample(after, "its_request_duration_seconds_sum"),
                       1e-9);
    cr_assert(m->has_latency_p);
    cr_assert_leq(m->latency_p50_s, m->latency_p95_s);
    for (int r = 0; r < ITS_ROLE_COUNT; r++) {
        char series[96];
        const char *rn = its_role_name((enum its_role)r);
        snprintf(series, sizeof series, "its_tokens_generated_total{role=\"%s\"}", rn);
        cr_assert_eq(m->tokens_generated[r], sample(after, series), "%s", series);
        snprintf(series, sizeof series, "its_queue_depth{role=\"%s\"}", rn);
        cr_assert_eq(m->jobs_queued[r], sample(after, series), "%s", series);
        snprintf(series, sizeof series, "its_jobs_in_flight{role=\"%s\"}", rn);
        cr_assert_eq(m->jobs_in_flight[r], sample(after, series), "%s", series);
    }
    cr_assert_eq(m->heartbeat_misses, sample(after, "its_heartbeat_misses_total"));
    cr_assert_eq(m->job_retries, sample(after, "its_job_retries_total"));
    cr_assert_eq(m->protocol_errors_frontend,
                 sample(after, "its_protocol_errors_total{socket=\"frontend\"}"));
    cr_assert_eq(m->protocol_errors_backend,
                 sample(after, "its_protocol_errors_total{socket=\"backend\"}"));
    cr_assert_eq(st->in_flight, sample(after, "its_requests_in_flight"));
    cr_assert_eq(st->queue_depth, sample(after, "its_requests_queued"));
    its_status_free(&st);
    its_client_destroy(&c);
    free(before);
    free(after);
    daemon_stop();
}

Test(metrics, a_taken_port_stops_itsd_naming_the_address, .init = setup, .fini = teardown,
     .timeout = 30)
{
    /* hold a port, then ask itsd to bind it */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    cr_assert_eq(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    cr_assert_eq(listen(fd, 1), 0);
    socklen_t len = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &len);
    char cmd[4 * PATH_BYTES];
    snprintf(cmd, sizeof cmd,
             "timeout 20 '%s' --frontend '%s' --backend '%s' --templates '%s' "
             "--metrics-listen 127.0.0.1:%u 2>'%s'",
             tu_build("bin/itsd"), g_front, g_back, tu_src("configs/prompts"),
             ntohs(a.sin_port), g_log);
    int rc = system(cmd);
    close(fd);
    cr_assert(WIFEXITED(rc) && WEXITSTATUS(rc) == 2, "itsd exited %d, not 2: %s", rc,
              log_tail());
    char want[64];
    snprintf(want, sizeof want, "metrics_listen 127.0.0.1:%u: bind:", ntohs(a.sin_port));
    cr_assert_not_null(strstr(log_tail(), want), "%s", log_tail());
}
