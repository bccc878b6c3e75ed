/* metrics.h — itsd's numbers for operators: request outcomes and latency, queues, jobs,
 * workers, tokens and error counts, in one struct that the orchestrator owns and updates where
 * things happen; rendered as Prometheus text exposition format 0.0.4 (metrics_http.h serves
 * it on /metrics) and converted into status_reply.metrics (itsctl status).
 *
 * Owns nothing but the struct's own values (no heap, no I/O, no clocks, no logging): the
 * caller passes durations in and gets text out. The counters of the first part are kept here;
 * the other fields are a snapshot the owner fills in from the modules' own state just before
 * rendering or converting (orch.c), so both outputs show the same numbers. Must never block,
 * print or exit; every function is safe on a NULL `m` where it says so, so modules can be
 * tested without one.
 */
#ifndef ITS_METRICS_H
#define ITS_METRICS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "proto.h"

/* How an accepted request ended, or that a submit was never accepted. Label values of
 * its_requests_total{outcome}; the names are metrics_outcome_name(). */
enum metrics_outcome {
    METRICS_OK,        /* "ok": a full result */
    METRICS_PARTIAL,   /* "partial": a partial result (deadline or shutdown cut it short) */
    METRICS_CANCELLED, /* "cancelled": error cancelled (a client's cancel, or it went away) */
    METRICS_DEADLINE,  /* "deadline": error deadline, nothing scored in time */
    METRICS_FAILED,    /* "failed": any other error after acceptance */
    METRICS_REJECTED,  /* "rejected": the submit was answered with an error, never accepted */
};
#define METRICS_OUTCOME_COUNT 6

enum metrics_socket { METRICS_FRONTEND, METRICS_BACKEND };
#define METRICS_SOCKET_COUNT 2


/* Upper bounds (seconds) of the request duration buckets: a Feedback-Edit request takes
 * seconds on a small model and minutes on a 70B one; the last bound is the longest deadline
 * a default configuration allows (max_deadline_ms). Observations above it count in +Inf. */
#define METRICS_N_BUCKETS 17
double metrics_bucket_bound(size_t i); /* i < METRICS_N_BUCKETS, ascending */

struct metrics_histogram {
    uint64_t bucket[METRICS_N_BUCKETS + 1]; /* per bucket (not cumulative); [N] = above all */
    uint64_t count;
    double sum; /* seconds */
};

struct metrics {
    /* ---- kept here, counted where it happens ---- */
    uint64_t requests[METRICS_OUTCOME_COUNT];  /* by enum metrics_outcome */
    uint64_t request_errors[PROTO_ERR_COUNT];  /* error codes requests/submits ended with;
                                                  index -code - 1 */
    struct metrics_histogram duration;         /* acceptance to end, accepted requests */
    uint64_t tokens_generated[PROTO_ROLE_COUNT]; /* outputs' n_tokens of generate results */
    uint64_t prompt_tokens[PROTO_ROLE_COUNT];    /* usage.prompt_tokens of job results */

    /* ---- snapshot, filled in by the owner before metrics_render / metrics_to_proto ---- */
    uint64_t heartbeat_misses;   /* workers dropped because their heartbeats stopped */
    uint64_t job_retries;        /* re-dispatches after a lost worker / retryable job_error */
    uint64_t jobs_started, jobs_failed;
    uint64_t workers_registered, workers_lost;
    uint64_t protocol_errors[METRICS_SOCKET_COUNT]; /* frames that broke the protocol */
    uint64_t frames[METRICS_SOCKET_COUNT];          /* frames received */
    uint64_t sends_unroutable, sends_dropped;       /* sends to a gone peer / a full pipe */
    uint64_t auth_refusals;      /* CURVE handshakes refused and frames of revoked keys */
    uint32_t requests_queued, requests_in_flight;
    uint32_t queue_depth[PROTO_ROLE_COUNT];    /* jobs waiting for a worker */
    uint32_t jobs_in_flight[PROTO_ROLE_COUNT]; /* jobs running on workers */
    uint32_t workers[PROTO_ROLE_COUNT][PROTO_WORKER_STATE_COUNT]; /* [role][worker state] */
    double start_time_s; /* when itsd started, seconds since the Unix epoch */
};

/* What its_build_info says (label values; any text, escaped on output). */
struct metrics_build {
    const char *version;     /* of its */
    const char *libzmq;      /* e.g. "4.3.4" */
    const char *microhttpd;  /* e.g. "0.9.75" */
};

/* An accepted request ended: with a result (code 0; `partial` when cut short) or an error
 * (code a negative enum proto_err), `seconds` after it was accepted. NULL-safe. */
void metrics_request_end(struct metrics *m, int code, bool partial, double seconds);

/* A submit was refused with error `code` before it was accepted. NULL-safe. */
void metrics_request_rejected(struct metrics *m, int code);

/* A job of `role` finished with `generated` completion tokens and `prompt` prompt tokens.
 * NULL-safe. */
void metrics_tokens(struct metrics *m, enum proto_role role, uint64_t generated,
                    uint64_t prompt);

/* The wire name of an outcome ("ok", ...), "?" out of range. */
const char *metrics_outcome_name(enum metrics_outcome o);

/* Estimates the q-quantile (0 < q < 1) of h the way Prometheus' histogram_quantile does:
 * linear within the bucket where the rank falls, with 0 as the lower edge of the first; a
 * rank in the +Inf bucket gives the highest finite bound. Returns 0 with *out in seconds, or
 * -1 when h holds no observation. */
int metrics_quantile(const struct metrics_histogram *h, double q, double *out);

/* Escapes `in` as a Prometheus label value (backslash, double quote and line feed become
 * \\, \" and \n) into out (out_len bytes, NUL-terminated). Returns the length written, or -1
 * when out is too small (out then holds "" ). */
int metrics_escape_label(const char *in, char *out, size_t out_len);

/* Renders every metric as Prometheus text format 0.0.4: HELP and TYPE lines, then the
 * samples; every label combination is written, zeros included. On success *out is a
 * malloc'd NUL-terminated buffer of *out_len bytes (without the NUL) that the caller frees.
 * Returns 0, or PROTO_ERR_NO_MEMORY with *out NULL. */
int metrics_render(const struct metrics *m, const struct metrics_build *b, char **out,
                   size_t *out_len);

/* Fills status_reply.metrics from *m (nothing to free). */
void metrics_to_proto(const struct metrics *m, struct proto_metrics *out);

#endif
