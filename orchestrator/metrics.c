/* metrics.c — see metrics.h.
 *
 * The text is built in one growable buffer; a failed allocation poisons the buffer and the
 * render returns PROTO_ERR_NO_MEMORY at the end, so the writers need no error paths of
 * their own. Numbers: counters and gauges are integers; seconds are written with the fewest
 * digits that read back to the same double.
 */
#include "metrics.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const double metrics_bounds[METRICS_N_BUCKETS] = {
    0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600,
};

static const char *const metrics_outcome_names[METRICS_OUTCOME_COUNT] = {
    "ok", "partial", "cancelled", "deadline", "failed", "rejected",
};

static const char *const metrics_socket_names[METRICS_SOCKET_COUNT] = {"frontend", "backend"};

double metrics_bucket_bound(size_t i)
{
    return i < METRICS_N_BUCKETS ? metrics_bounds[i] : 0.0;
}

const char *metrics_outcome_name(enum metrics_outcome o)
{
    return (unsigned)o < METRICS_OUTCOME_COUNT ? metrics_outcome_names[o] : "?";
}

/* ---- counting -------------------------------------------------------------------------- */

static void metrics_count_error(struct metrics *m, int code)
{
    if (code < 0 && code >= -PROTO_ERR_COUNT)
        m->request_errors[-code - 1]++;
}

void metrics_request_end(struct metrics *m, int code, bool partial, double seconds)
{
    if (!m)
        return;
    enum metrics_outcome o;
    if (code == 0)
        o = partial ? METRICS_PARTIAL : METRICS_OK;
    else if (code == PROTO_ERR_CANCELLED)
        o = METRICS_CANCELLED;
    else if (code == PROTO_ERR_DEADLINE)
        o = METRICS_DEADLINE;
    else
        o = METRICS_FAILED;
    m->requests[o]++;
    metrics_count_error(m, code);
    if (!(seconds >= 0.0)) /* also NaN: a clock that went wrong must not poison the sum */
        seconds = 0.0;
    size_t b = 0;
    while (b < METRICS_N_BUCKETS && seconds > metrics_bounds[b])
        b++;
    m->duration.bucket[b]++;
    m->duration.count++;
    m->duration.sum += seconds;
}

void metrics_request_rejected(struct metrics *m, int code)
{
    if (!m)
        return;
    m->requests[METRICS_REJECTED]++;
    metrics_count_error(m, code);
}

void metrics_tokens(struct metrics *m, enum proto_role role, uint64_t generated,
                    uint64_t prompt)
{
    if (!m || (unsigned)role >= PROTO_ROLE_COUNT)
        return;
    m->tokens_generated[role] += generated;
    m->prompt_tokens[role] += prompt;
}

int metrics_quantile(const struct metrics_histogram *h, double q, double *out)
{
    if (h->count == 0)
        return -1;
    double rank = q * (double)h->count;
    uint64_t below = 0;
    for (size_t b = 0; b < METRICS_N_BUCKETS; b++) {
        uint64_t upto = below + h->bucket[b];
        if ((double)upto >= rank && h->bucket[b] > 0) {
            double lo = b ? metrics_bounds[b - 1] : 0.0;
            double hi = metrics_bounds[b];
            *out = lo + (hi - lo) * (rank - (double)below) / (double)h->bucket[b];
            return 0;
        }
        below = upto;
    }
    *out = metrics_bounds[METRICS_N_BUCKETS - 1];
    return 0;
}

/* ---- text ------------------------------------------------------------------------------ */

struct metrics_buf {
    char *p;
    size_t len, cap;
    bool failed;
};

static void metrics_put(struct metrics_buf *b, const char *s, size_t n)
{
    if (b->failed)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t ncap = b->cap ? b->cap : 8192;
        while (ncap < b->len + n + 1)
            ncap *= 2;
        char *np = realloc(b->p, ncap);
        if (!np) {
            b->failed = true;
            return;
        }
        b->p = np;
        b->cap = ncap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void metrics_printf(struct metrics_buf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void metrics_printf(struct metrics_buf *b, const char *fmt, ...)
{
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof tmp) {
        b->failed = true; /* our own formats are short: a bug, reported as no memory */
        return;
    }
    metrics_put(b, tmp, (size_t)n);
}

/* Text that reads back to v: whole numbers as integers ("10", not "1e+01"), others in the
 * shortest %g form (Prometheus parses Go-style floats). */
static void metrics_float(char *out, size_t out_len, double v)
{
    if (v > -1e15 && v < 1e15 && v == (double)(long long)v) { /* range first: no UB cast */
        snprintf(out, out_len, "%lld", (long long)v);
        return;
    }
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(out, out_len, "%.*g", prec, v);
        if (strtod(out, NULL) == v)
            return;
    }
}

int metrics_escape_label(const char *in, char *out, size_t out_len)
{
    size_t k = 0;
    for (const char *p = in; *p; p++) {
        const char *rep = NULL;
        char one[2] = {*p, '\0'};
        if (*p == '\\')
            rep = "\\\\";
        else if (*p == '"')
            rep = "\\\"";
        else if (*p == '\n')
            rep = "\\n";
        else
            rep = one;
        size_t n = strlen(rep);
        if (k + n + 1 > out_len) {
            if (out_len)
                out[0] = '\0';
            return -1;
        }
        memcpy(out + k, rep, n);
        k += n;
    }
    if (k + 1 > out_len)
        return -1;
    out[k] = '\0';
    return (int)k;
}

/* A label value, escaped, written straight into the buffer. */
static void metrics_label_value(struct metrics_buf *b, const char *v)
{
    for (const char *p = v ? v : ""; *p; p++) {
        if (*p == '\\')
            metrics_put(b, "\\\\", 2);
        else if (*p == '"')
            metrics_put(b, "\\\"", 2);
        else if (*p == '\n')
            metrics_put(b, "\\n", 2);
        else
            metrics_put(b, p, 1);
    }
}

/* HELP (whose text is ours: no backslash or line feed in it) and TYPE lines. */
static void metrics_head(struct metrics_buf *b, const char *name, const char *type,
                         const char *help)
{
    metrics_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void metrics_u64(struct metrics_buf *b, const char *name, uint64_t v)
{
    metrics_printf(b, "%s %llu\n", name, (unsigned long long)v);
}

static void metrics_scalar(struct metrics_buf *b, const char *name, const char *type,
                           const char *help, uint64_t v)
{
    metrics_head(b, name, type, help);
    metrics_u64(b, name, v);
}

/* One sample per role: name{role="..."} v[role]. */
static void metrics_per_role(struct metrics_buf *b, const char *name, const char *type,
                             const char *help, const uint64_t v[PROTO_ROLE_COUNT])
{
    metrics_head(b, name, type, help);
    for (int r = 0; r < PROTO_ROLE_COUNT; r++)
        metrics_printf(b, "%s{role=\"%s\"} %llu\n", name, proto_role_name((enum proto_role)r),
                       (unsigned long long)v[r]);
}

static void metrics_histogram_text(struct metrics_buf *b, const char *name, const char *help,
                                   const struct metrics_histogram *h)
{
    metrics_head(b, name, "histogram", help);
    uint64_t cum = 0;
    char le[64], sum[64];
    for (size_t i = 0; i < METRICS_N_BUCKETS; i++) {
        cum += h->bucket[i];
        metrics_float(le, sizeof le, metrics_bounds[i]);
        metrics_printf(b, "%s_bucket{le=\"%s\"} %llu\n", name, le, (unsigned long long)cum);
    }
    cum += h->bucket[METRICS_N_BUCKETS];
    metrics_printf(b, "%s_bucket{le=\"+Inf\"} %llu\n", name, (unsigned long long)cum);
    metrics_float(sum, sizeof sum, h->sum);
    metrics_printf(b, "%s_sum %s\n", name, sum);
    metrics_printf(b, "%s_count %llu\n", name, (unsigned long long)h->count);
}

int metrics_render(const struct metrics *m, const struct metrics_build *bi, char **out,
                   size_t *out_len)
{
    *out = NULL;
    *out_len = 0;
    struct metrics_buf b = {0};
    uint64_t v[PROTO_ROLE_COUNT];

    metrics_head(&b, "its_build_info", "gauge",
                 "Always 1; the labels say which its and libraries this itsd runs.");
    metrics_put(&b, "its_build_info{version=\"", 24);
    metrics_label_value(&b, bi ? bi->version : "");
    metrics_put(&b, "\",libzmq=\"", 10);
    metrics_label_value(&b, bi ? bi->libzmq : "");
    metrics_put(&b, "\",libmicrohttpd=\"", 17);
    metrics_label_value(&b, bi ? bi->microhttpd : "");
    metrics_printf(&b, "\",protocol=\"%d\"} 1\n", PROTO_VERSION);
    char start[64];
    metrics_float(start, sizeof start, m->start_time_s);
    metrics_head(&b, "its_start_time_seconds", "gauge",
                 "When this itsd started, in seconds since the Unix epoch.");
    metrics_printf(&b, "its_start_time_seconds %s\n", start);

    metrics_head(&b, "its_requests_total", "counter",
                 "Requests that ended, by outcome: ok and partial are results, cancelled, "
                 "deadline and failed are errors after acceptance, rejected are submits "
                 "refused before acceptance.");
    for (int o = 0; o < METRICS_OUTCOME_COUNT; o++)
        metrics_printf(&b, "its_requests_total{outcome=\"%s\"} %llu\n", metrics_outcome_names[o],
                       (unsigned long long)m->requests[o]);
    metrics_head(&b, "its_request_errors_total", "counter",
                 "Errors that requests and refused submits ended with, by protocol error code.");
    for (int i = 0; i < PROTO_ERR_COUNT; i++)
        metrics_printf(&b, "its_request_errors_total{code=\"%s\"} %llu\n",
                       proto_err_name(-i - 1), (unsigned long long)m->request_errors[i]);
    metrics_histogram_text(&b, "its_request_duration_seconds",
                           "Time from acceptance to the end of accepted requests (every "
                           "outcome), queueing included.",
                           &m->duration);

    metrics_scalar(&b, "its_requests_queued", "gauge",
                   "Requests accepted and waiting for an in-flight slot (max_inflight).",
                   m->requests_queued);
    metrics_scalar(&b, "its_requests_in_flight", "gauge", "Requests running now.",
                   m->requests_in_flight);
    for (int r = 0; r < PROTO_ROLE_COUNT; r++)
        v[r] = m->queue_depth[r];
    metrics_per_role(&b, "its_queue_depth", "gauge",
                     "Jobs waiting for a worker of the role with room.", v);
    for (int r = 0; r < PROTO_ROLE_COUNT; r++)
        v[r] = m->jobs_in_flight[r];
    metrics_per_role(&b, "its_jobs_in_flight", "gauge", "Jobs running on workers of the role.",
                     v);
    metrics_head(&b, "its_workers", "gauge",
                 "Registered workers by role and state (ready: room for more jobs, busy: at "
                 "capacity, draining: leaving, lost: unreachable, about to be dropped).");
    for (int r = 0; r < PROTO_ROLE_COUNT; r++)
        for (int s = 0; s < PROTO_WORKER_STATE_COUNT; s++)
            metrics_printf(&b, "its_workers{role=\"%s\",state=\"%s\"} %u\n",
                           proto_role_name((enum proto_role)r),
                           proto_worker_state_name((enum proto_worker_state)s),
                           m->workers[r][s]);

    metrics_per_role(&b, "its_tokens_generated_total", "counter",
                     "Completion tokens of the generate jobs that finished, by role.",
                     m->tokens_generated);
    metrics_per_role(&b, "its_prompt_tokens_total", "counter",
                     "Prompt tokens of the jobs that finished, by role (select: all it reads).",
                     m->prompt_tokens);

    metrics_scalar(&b, "its_jobs_started_total", "counter",
                   "Jobs the pipelines started (re-dispatches not counted).", m->jobs_started);
    metrics_scalar(&b, "its_jobs_failed_total", "counter",
                   "Jobs that failed for good (retries spent, no worker, or a worker's "
                   "non-retryable error).",
                   m->jobs_failed);
    metrics_scalar(&b, "its_job_retries_total", "counter",
                   "Jobs sent again after their worker was lost or failed them retryably.",
                   m->job_retries);
    metrics_scalar(&b, "its_workers_registered_total", "counter",
                   "Worker registrations (ready) accepted.", m->workers_registered);
    metrics_scalar(&b, "its_workers_lost_total", "counter",
                   "Workers dropped because they stopped heartbeating or became unreachable.",
                   m->workers_lost);
    metrics_scalar(&b, "its_heartbeat_misses_total", "counter",
                   "Workers dropped because nothing arrived from them for liveness x "
                   "heartbeat_ms.",
                   m->heartbeat_misses);

    metrics_head(&b, "its_frames_received_total", "counter",
                 "ZeroMQ frames received, by socket.");
    for (int s = 0; s < METRICS_SOCKET_COUNT; s++)
        metrics_printf(&b, "its_frames_received_total{socket=\"%s\"} %llu\n",
                       metrics_socket_names[s], (unsigned long long)m->frames[s]);
    metrics_head(&b, "its_protocol_errors_total", "counter",
                 "Frames that broke the protocol (wrong envelope, undecodable, a message that "
                 "peer may not send) and error messages from peers, by socket.");
    for (int s = 0; s < METRICS_SOCKET_COUNT; s++)
        metrics_printf(&b, "its_protocol_errors_total{socket=\"%s\"} %llu\n",
                       metrics_socket_names[s], (unsigned long long)m->protocol_errors[s]);
    metrics_head(&b, "its_send_failures_total", "counter",
                 "Messages itsd could not send: the peer was gone (unroutable) or its queue "
                 "was full (dropped).");
    metrics_printf(&b, "its_send_failures_total{reason=\"unroutable\"} %llu\n",
                   (unsigned long long)m->sends_unroutable);
    metrics_printf(&b, "its_send_failures_total{reason=\"dropped\"} %llu\n",
                   (unsigned long long)m->sends_dropped);
    metrics_scalar(&b, "its_auth_refusals_total", "counter",
                   "CURVE handshakes refused by the allow-lists, and frames of keys a reload "
                   "removed (0 with curve off).",
                   m->auth_refusals);

    if (b.failed) {
        free(b.p);
        return PROTO_ERR_NO_MEMORY;
    }
    *out = b.p;
    *out_len = b.len;
    return 0;
}

/* ---- status_reply ---------------------------------------------------------------------- */

void metrics_to_proto(const struct metrics *m, struct proto_metrics *out)
{
    memset(out, 0, sizeof *out);
    out->requests = (struct proto_request_counts){
        .ok = m->requests[METRICS_OK],
        .partial = m->requests[METRICS_PARTIAL],
        .cancelled = m->requests[METRICS_CANCELLED],
        .deadline = m->requests[METRICS_DEADLINE],
        .failed = m->requests[METRICS_FAILED],
        .rejected = m->requests[METRICS_REJECTED],
    };
    out->latency.count = m->duration.count;
    out->latency.sum_s = m->duration.sum;
    out->latency.has_p50_s = metrics_quantile(&m->duration, 0.5, &out->latency.p50_s) == 0;
    out->latency.has_p95_s = metrics_quantile(&m->duration, 0.95, &out->latency.p95_s) == 0;
    out->queue_depth = (struct proto_role_counts){
        m->queue_depth[PROTO_ROLE_INSTRUCT], m->queue_depth[PROTO_ROLE_FEEDBACK],
        m->queue_depth[PROTO_ROLE_EDIT], m->queue_depth[PROTO_ROLE_SELECT]};
    out->jobs_in_flight = (struct proto_role_counts){
        m->jobs_in_flight[PROTO_ROLE_INSTRUCT], m->jobs_in_flight[PROTO_ROLE_FEEDBACK],
        m->jobs_in_flight[PROTO_ROLE_EDIT], m->jobs_in_flight[PROTO_ROLE_SELECT]};
    out->tokens_generated = (struct proto_role_totals){
        m->tokens_generated[PROTO_ROLE_INSTRUCT], m->tokens_generated[PROTO_ROLE_FEEDBACK],
        m->tokens_generated[PROTO_ROLE_EDIT], m->tokens_generated[PROTO_ROLE_SELECT]};
    out->heartbeat_misses = m->heartbeat_misses;
    out->job_retries = m->job_retries;
    out->protocol_errors.frontend = m->protocol_errors[METRICS_FRONTEND];
    out->protocol_errors.backend = m->protocol_errors[METRICS_BACKEND];
}
