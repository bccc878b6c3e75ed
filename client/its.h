/* its.h — libits, the C client library of the its service: submit a question to itsd and get
 * the best Feedback-Edit answer back, synchronously or through an event queue; cancel, fetch
 * and list requests; read the daemon's status.
 *
 * Owns: one ZeroMQ DEALER socket per handle (and the ZeroMQ context, unless the caller shares
 * one), the requests in flight on that handle and the events waiting to be read. Never prints,
 * never exits, never installs signal handlers; every failure is a negative return code with a
 * message kept on the handle (its_client_errstr).
 *
 * Self-contained: nothing here exposes the wire protocol (protocol/proto.h) or ZeroMQ types, so
 * the header can be installed alone. Link with `pkg-config --libs libits` (libits.so carries the
 * protocol code). docs/client.md is the guide; this header is the reference.
 *
 * Threads: a handle is used by one thread at a time (it holds a ZeroMQ socket, which is not
 * thread-safe). Use one handle per thread; handles may share one ZeroMQ context
 * (its_client_new_ctx), which is thread-safe.
 */
#ifndef ITS_H
#define ITS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ITS_DEFAULT_ENDPOINT "tcp://127.0.0.1:7700" /* when no endpoint and no $ITS_ENDPOINT */
#define ITS_ID_MAX 64                               /* bytes of a request id, without the NUL */
#define ITS_CODE_MAX 31                             /* bytes of a daemon error code name */

/* Return codes. Every function returning int returns 0 (ITS_OK) or one of these. */
enum its_err {
    ITS_OK = 0,
    ITS_ERR_INVALID = -1,   /* a bad argument or option; errstr names it */
    ITS_ERR_NO_MEMORY = -2, /* an allocation failed */
    ITS_ERR_IO = -3,        /* ZeroMQ refused: bad endpoint, socket failure, send queue full */
    ITS_ERR_TIMEOUT = -4,   /* no (complete) reply within the timeout; errstr says what waited */
    ITS_ERR_DAEMON = -5,    /* itsd answered with an error: its_client_daemon_code names it */
    ITS_ERR_PROTOCOL = -6,  /* itsd's reply could not be decoded (a bug or a wrong endpoint) */
    ITS_ERR_AUTH = -7,      /* security: itsd refused this client's CURVE key, or one side uses
                               CURVE and the other plain text; errstr says which */
};

/* ---- input ---------------------------------------------------------------------------------- */

enum its_chat_role { ITS_CHAT_SYSTEM, ITS_CHAT_USER, ITS_CHAT_ASSISTANT };

/* One chat message. `content` is UTF-8 without NUL bytes; the library copies what it sends. */
struct its_message {
    enum its_chat_role role;
    const char *content;
};

/* Sampling overrides for one generating role; each value counts only when its has_ flag is
 * set, otherwise itsd's configured default applies. */
struct its_sampling_options {
    double temperature;  /* 0 (greedy) .. 10 */
    double top_p;        /* (0, 1] */
    uint32_t max_tokens; /* >= 1: longest completion */
    bool has_temperature, has_top_p, has_max_tokens;
};

/* Pipeline options of one submit. A zeroed struct (or a NULL pointer) asks for itsd's defaults
 * for everything; set a value AND its has_ flag to override it. Ranges are checked before
 * anything is sent (ITS_ERR_INVALID naming the field), with the protocol's limits. */
struct its_options {
    uint32_t drafts;             /* instruct samples, 1..32 */
    uint32_t feedbacks;          /* feedback samples per draft, 0..64 (0: drafts only) */
    uint32_t edits;              /* edits per draft, 0..64 */
    uint32_t feedbacks_per_edit; /* effective feedbacks one edit sees, 1..3 */
    bool include_drafts;         /* unedited drafts also compete in selection */
    uint32_t deadline_ms;        /* daemon-side limit from acceptance, 1..86400000; past it
                                    itsd returns what it has (partial) or a deadline error */
    uint64_t seed;               /* makes the request reproducible */
    struct its_sampling_options instruct, feedback, edit;
    bool has_drafts, has_feedbacks, has_edits, has_feedbacks_per_edit, has_include_drafts,
        has_deadline_ms, has_seed;
    bool progress; /* its_submit_async only: ask itsd for ITS_EVENT_PROGRESS events */
};

/* ---- output --------------------------------------------------------------------------------- */

enum its_role { ITS_ROLE_INSTRUCT, ITS_ROLE_FEEDBACK, ITS_ROLE_EDIT, ITS_ROLE_SELECT };
#define ITS_ROLE_COUNT 4

/* One candidate answer: a draft, the feedbacks its edit used (or, when unedited, all of the
 * draft's feedbacks), the edited text, and the select model's score. */
struct its_candidate {
    uint32_t draft_index; /* which draft (0-based) it grew from */
    char *draft;
    char **feedbacks; /* n_feedbacks strings; NULL when none */
    size_t n_feedbacks;
    char *edit;       /* NULL when the draft competed unedited */
    double score;     /* reward logit; meaningful only when has_score */
    bool has_score;   /* false when it was never scored (e.g. cut by the deadline) */
};

struct its_timings {
    uint64_t drafts_ms, feedbacks_ms, edits_ms, scores_ms; /* when each stage finished */
    uint64_t total_ms;                                     /* acceptance to result */
};

struct its_usage {
    uint64_t prompt_tokens, completion_tokens;
};

/* A finished request. Everything it points to is owned by it; free with its_result_free. */
struct its_result {
    char id[ITS_ID_MAX + 1]; /* itsd's request id */
    char *answer;            /* the chosen candidate's text ("" when there is none) */
    double score;            /* the answer's score; meaningful only when has_score */
    bool has_score;
    size_t best; /* index of the answer in candidates; meaningful only when has_best */
    bool has_best;
    bool partial; /* the deadline cut the work short: answer is the best found so far */
    struct its_candidate *candidates; /* n_candidates; NULL when none */
    size_t n_candidates;
    struct its_timings timings;
    struct its_usage usage[ITS_ROLE_COUNT]; /* tokens per role, indexed by enum its_role */
};

struct its_stage {
    uint32_t done, total; /* totals grow as the tree unfolds */
};

/* How far a running request is. */
struct its_progress {
    char id[ITS_ID_MAX + 1];
    struct its_stage drafts, feedbacks, edits, scores;
    uint64_t elapsed_ms; /* since acceptance */
};

enum its_worker_state {
    ITS_WORKER_READY,    /* registered, has free capacity */
    ITS_WORKER_BUSY,     /* at capacity */
    ITS_WORKER_DRAINING, /* leaving; gets no new jobs */
    ITS_WORKER_LOST,     /* missed heartbeats; its jobs are being re-dispatched */
};

struct its_worker {
    char *id; /* the worker's name */
    enum its_role role;
    char *model;
    char *backend; /* "cpu", "cuda", ... */
    enum its_worker_state state;
    uint32_t max_seqs;  /* capacity: concurrent sequences */
    uint32_t max_ctx;   /* capacity: tokens per sequence */
    uint64_t kv_tokens; /* capacity: KV cache positions in all */
    uint32_t jobs;      /* jobs itsd has in flight on it */
    bool has_load;      /* the load below was reported by the worker's heartbeat */
    uint32_t running, queued; /* sequences decoding / waiting */
    uint64_t kv_used;         /* KV positions in use */
};

/* itsd's live counters: the numbers its Prometheus endpoint (/metrics) serves, as counted
 * since itsd started. Arrays are indexed by enum its_role. */
struct its_metrics {
    /* requests that ended, by how: */
    uint64_t requests_ok;        /* a full result */
    uint64_t requests_partial;   /* a partial result (deadline or shutdown cut it short) */
    uint64_t requests_cancelled; /* cancelled by a client, or its client went away */
    uint64_t requests_deadline;  /* error deadline: nothing scored in time */
    uint64_t requests_failed;    /* any other error after acceptance (no_worker, ...) */
    uint64_t requests_rejected;  /* submits refused before acceptance (busy, bad_field, ...) */
    /* time from acceptance to the end of every accepted request that ended: */
    uint64_t latency_count;
    double latency_sum_s;
    double latency_p50_s, latency_p95_s; /* estimates; meaningful only when has_latency_p */
    bool has_latency_p;                  /* false before the first request ended */
    uint32_t jobs_queued[ITS_ROLE_COUNT];    /* jobs waiting for a worker of the role */
    uint32_t jobs_in_flight[ITS_ROLE_COUNT]; /* jobs running on workers of the role */
    uint64_t tokens_generated[ITS_ROLE_COUNT]; /* completion tokens of finished jobs */
    uint64_t heartbeat_misses; /* workers dropped because their heartbeats stopped */
    uint64_t job_retries;      /* jobs sent again after a worker was lost or failed them */
    /* bad frames (and error messages) from clients / from workers */
    uint64_t protocol_errors_frontend, protocol_errors_backend;
};

/* itsd's view of the cluster. Free with its_status_free. */
struct its_status {
    uint32_t workers_per_role[ITS_ROLE_COUNT]; /* live workers, indexed by enum its_role */
    uint32_t queue_depth;                      /* requests waiting to start */
    uint32_t in_flight;                        /* requests running */
    struct its_worker *workers;                /* n_workers; NULL when none */
    size_t n_workers;
    bool has_metrics;           /* false from an itsd too old to report them */
    struct its_metrics metrics; /* meaningful only when has_metrics */
};

/* ---- events (asynchronous use) -------------------------------------------------------------
 * Every request started with its_submit_async yields, in order: ITS_EVENT_ACCEPTED (itsd took
 * it and named it), any number of ITS_EVENT_PROGRESS (only when options.progress was set), and
 * exactly one final event, ITS_EVENT_RESULT or ITS_EVENT_ERROR. An error can also come first,
 * instead of ACCEPTED (e.g. busy). An ITS_EVENT_ERROR with tag 0 is one the library could
 * match to no request (a malformed or unaddressed message from the daemon). */
enum its_event_type {
    ITS_EVENT_ACCEPTED = 1,
    ITS_EVENT_PROGRESS,
    ITS_EVENT_RESULT,
    ITS_EVENT_ERROR,
};

struct its_event {
    enum its_event_type type;
    uint64_t tag;            /* what its_submit_async returned for the request */
    char id[ITS_ID_MAX + 1]; /* the request id; "" before ACCEPTED */
    struct its_progress progress; /* PROGRESS */
    struct its_result *result;    /* RESULT: owned by the event; to keep it past
                                     its_event_free, take the pointer and set it to NULL */
    int err;                      /* ERROR: ITS_ERR_DAEMON (itsd said so) or ITS_ERR_PROTOCOL */
    char code[ITS_CODE_MAX + 1];  /* ERROR: the daemon's code ("busy", "deadline", ...) */
    char *message;                /* ERROR: what went wrong, owned by the event */
};

/* ---- the handle ------------------------------------------------------------------------------ */

typedef struct its_client its_client_t;

/* Creates a handle talking to itsd at `endpoint` (a ZeroMQ endpoint such as
 * "tcp://127.0.0.1:7700" or "ipc:///run/its/frontend"); NULL means $ITS_ENDPOINT, or
 * ITS_DEFAULT_ENDPOINT when that is unset or empty. The handle owns a new ZeroMQ context.
 * ZeroMQ connects lazily and in the background, so an unreachable daemon is not an error here:
 * it shows as ITS_ERR_TIMEOUT on the first call that waits for a reply.
 * Returns 0 with *out set, or a negative its_err with *out NULL and, when err_len > 0, a
 * message in `err` (e.g. a malformed endpoint). */
int its_client_new(const char *endpoint, its_client_t **out, char *err, size_t err_len);

/* ---- security (CurveZMQ; docs/security.md) -------------------------------------------------- */

#define ITS_KEY_Z85_LEN 40 /* characters of a CURVE key as Z85 text, without the NUL */

/* Everything a handle can be created with. Zero it, then set what is needed. */
struct its_client_opts {
    const char *endpoint; /* NULL: $ITS_ENDPOINT, else ITS_DEFAULT_ENDPOINT */
    void *zmq_ctx;        /* NULL: the handle makes and owns a context; else as its_client_new_ctx */
    /* CurveZMQ: with itsd's public key and this client's key pair the connection is encrypted
     * and itsd admits the client only if its public key is in itsd's client_keys. Leave all
     * four NULL for plain text. Each key is given either as Z85 text or as a file, not both:
     * the server key as server_key or server_key_file (the PREFIX.pub of itsd's key pair), the
     * client's pair as public_key + secret_key or key_file (a PREFIX.key of itsctl keygen). */
    const char *server_key;      /* Z85, ITS_KEY_Z85_LEN characters */
    const char *server_key_file;
    const char *public_key, *secret_key; /* Z85 each */
    const char *key_file;
};

/* Creates a handle from `opts` (see struct its_client_opts; NULL = all defaults). The key
 * files are read here: a missing or malformed one is ITS_ERR_INVALID naming the file and the
 * line. With CURVE, a key that itsd refuses is reported by the first call that waits for a
 * reply as ITS_ERR_AUTH (at once, not after the timeout). Otherwise as its_client_new. */
int its_client_new_opts(const struct its_client_opts *opts, its_client_t **out, char *err,
                        size_t err_len);

/* Reads a key file: `public-key = Z85` and `secret-key = Z85` lines, or one bare Z85 line (a
 * public key); blank lines and '#' comments are skipped. public_z85 (ITS_KEY_Z85_LEN + 1
 * bytes) gets the public key; when secret_z85 is not NULL (as large), the file must hold a
 * secret key, which is copied there (the public key is derived from it when absent).
 * Returns 0, or ITS_ERR_INVALID / ITS_ERR_NO_MEMORY with err naming the file and problem. */
int its_key_load(const char *path, char *public_z85, char *secret_z85, char *err,
                 size_t err_len);

/* Makes a new CURVE key pair and writes PREFIX.key (public and secret key, mode 0600) and
 * PREFIX.pub (public key only, mode 0644). Neither file may exist already: an existing one is
 * ITS_ERR_INVALID naming it, and nothing is written. public_z85 (ITS_KEY_Z85_LEN + 1 bytes,
 * may be NULL) gets the new public key. Returns 0 or a negative its_err with err set. */
int its_keygen(const char *prefix, char *public_z85, char *err, size_t err_len);

/* As its_client_new, on a ZeroMQ context the caller owns (a `void *` from zmq_ctx_new), which
 * must outlive the handle. Many handles, one per thread, can share one context. */
int its_client_new_ctx(void *zmq_ctx, const char *endpoint, its_client_t **out, char *err,
                       size_t err_len);

/* Closes the socket (pending outgoing messages are dropped, never waited for), frees every
 * queued event and request, and the context when the handle owns it. NULL-safe; clears *c.
 * Requests still running on itsd are not cancelled: call its_cancel first if that matters. */
void its_client_destroy(its_client_t **c);

/* The last error on the handle: its code (0 after a success), its message ("" after a
 * success), and for ITS_ERR_DAEMON the daemon's code name ("busy", "not_found", ...; "" for
 * other errors). The strings live until the next call on the handle. */
int its_client_err(const its_client_t *c);
const char *its_client_errstr(const its_client_t *c);
const char *its_client_daemon_code(const its_client_t *c);

/* The endpoint the handle connects to. */
const char *its_client_endpoint(const its_client_t *c);

/* ---- synchronous calls ------------------------------------------------------------------------
 * Each sends one message and waits for its answer up to timeout_ms milliseconds (< 0: no
 * limit). Events of asynchronous requests that arrive meanwhile are queued, not lost. */

/* Asks one question (a single user message) and waits for the chosen answer. `opt` may be
 * NULL; opt->progress is ignored. On success *out is a new result (free with
 * its_result_free), which may be partial (result->partial) when opt->deadline_ms or the
 * daemon's default deadline cut the work short. On timeout a request itsd had accepted is
 * cancelled (best effort) and ITS_ERR_TIMEOUT returned; no reply at all reads "no reply from
 * EP within N ms (is itsd running?)". A daemon error (busy, no_worker, deadline, ...) returns
 * ITS_ERR_DAEMON. *out is NULL on every error. */
int its_submit(its_client_t *c, const char *question, const struct its_options *opt,
               int timeout_ms, struct its_result **out);

/* As its_submit for a whole conversation: n_messages >= 1 messages, the last one usually the
 * user's. */
int its_submit_messages(its_client_t *c, const struct its_message *messages, size_t n_messages,
                        const struct its_options *opt, int timeout_ms, struct its_result **out);

/* Fetches request `id`: when it has finished (itsd keeps results for a while), *result is set
 * (free with its_result_free); when it is still running, *result is NULL and *progress (if
 * not NULL) says how far it is. An unknown or expired id is ITS_ERR_DAEMON "not_found". */
int its_get(its_client_t *c, const char *id, int timeout_ms, struct its_result **result,
            struct its_progress *progress);

/* Cancels request `id` (its drafts, feedbacks, edits and scores stop on the workers). Any
 * client may cancel any request. Returns 0 when itsd confirms (code "cancelled") or the
 * request had already ended (with a result, or with deadline / no_worker / worker_lost);
 * ITS_ERR_DAEMON "not_found" for an unknown or expired id. If this handle submitted the
 * request asynchronously, its final event is an ITS_EVENT_ERROR with code "cancelled". */
int its_cancel(its_client_t *c, const char *id, int timeout_ms);

/* Reads the cluster's state: workers per role, queue depth, requests in flight, the worker
 * list and itsd's live counters (status->metrics). An itsd older than the metrics answers the
 * request for them with bad_field; the call then asks again without them and returns the rest
 * with has_metrics false. On success *out is new (free with its_status_free). */
int its_status(its_client_t *c, int timeout_ms, struct its_status **out);

/* ---- asynchronous calls -------------------------------------------------------------------------
 * its_submit_async returns as soon as the request is queued for sending; what happens to it
 * comes back as events (see above), read with its_next_event. To wait on many handles or on
 * other fds too, poll its_client_fd: it is ZeroMQ's ZMQ_FD, which is EDGE-triggered and
 * signals "the socket's state changed", not "a message is waiting". Messages can therefore sit
 * unread while the fd stays quiet: after every wake-up, and after every other its_* call on the
 * handle (sends and synchronous calls read the socket too), call its_next_event(c, &ev, 0)
 * until it returns 0. That call drains the socket completely before reporting "nothing", which
 * re-arms the fd:
 *
 *     struct pollfd p = {.fd = fd, .events = POLLIN};
 *     while (running) {
 *         poll(&p, 1, timeout);                      // or epoll / libev / ...
 *         struct its_event *ev;
 *         while (its_next_event(c, &ev, 0) > 0) {
 *             ... ev->type, ev->tag ...
 *             its_event_free(&ev);
 *         }
 *     }
 */

/* Sends a submit. `opt` may be NULL; set opt->progress for progress events. *tag (chosen by
 * the library, unique on the handle, never 0) identifies the request's events. Returns 0, or
 * ITS_ERR_INVALID / ITS_ERR_IO / ITS_ERR_NO_MEMORY (nothing was sent; no event will come). */
int its_submit_async(its_client_t *c, const struct its_message *messages, size_t n_messages,
                     const struct its_options *opt, uint64_t *tag);

/* The pollable file descriptor of the handle's socket (ZMQ_FD: readable = "look again", edge-
 * triggered; see above). The handle owns it: never read, write or close it. */
int its_client_fd(its_client_t *c, int *fd);

/* Reads every message waiting on the socket without blocking and turns each into a queued
 * event (or drops it when no request wants it). Returns the number of events now queued
 * (>= 0), or a negative its_err. its_next_event does this itself when its queue is empty;
 * this call is for loops that drain the socket apart from consuming events. */
int its_client_process(its_client_t *c);

/* Takes the oldest queued event; when there is none, reads the socket, waiting up to
 * timeout_ms (0: not at all, < 0: no limit). Returns 1 with *ev set (free with
 * its_event_free), 0 with *ev NULL when nothing came in time or a signal interrupted the wait
 * (the socket is drained either way), or a negative its_err. Blocking calls (its_submit, ...)
 * instead resume their wait after a signal. */
int its_next_event(its_client_t *c, struct its_event **ev, int timeout_ms);

/* ---- freeing and names ---------------------------------------------------------------------- */

/* Each frees the object and everything it owns. NULL-safe; clears the pointer. */
void its_result_free(struct its_result **r);
void its_status_free(struct its_status **s);
void its_event_free(struct its_event **ev);

/* Short names: "timeout" for ITS_ERR_TIMEOUT, "instruct" for ITS_ROLE_INSTRUCT, "user" for
 * ITS_CHAT_USER, "ready" for ITS_WORKER_READY; "?" for a value out of range. */
const char *its_strerror(int err);
const char *its_role_name(enum its_role role);
const char *its_chat_role_name(enum its_chat_role role);
const char *its_worker_state_name(enum its_worker_state state);

/* Parses "system" / "user" / "assistant". Returns 0 with *out set, or ITS_ERR_INVALID. */
int its_chat_role_from_name(const char *name, enum its_chat_role *out);

#ifdef __cplusplus
}
#endif

#endif
