/* proto.h — the wire protocol between clients, itsd and itsw: message structs, limits, error
 * codes, and the msgpack encoder/decoder. docs/protocol.md is the normative description; this
 * header is its C form.
 *
 * Pure C over libc and msgpack-c: no I/O, no sockets, no printing, no global mutable state
 * (it is linked into itsd, itsw and the libits shared library, and built alone for fuzzing).
 * Decoders are pure functions over (buf, len) that validate every field; encoders apply the
 * same rules, so nothing this code emits is rejected by a peer running it.
 */
#ifndef ITS_PROTO_H
#define ITS_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PROTO_VERSION 1

/* ---- limits ----------------------------------------------------------------------------
 * A value over one of these is `too_large`, and the error message names the constant. */
#define PROTO_MAX_MESSAGE_BYTES (16u << 20) /* one encoded message (one ZeroMQ frame) */
#define PROTO_MAX_DEPTH 8                   /* nested arrays/maps, the top-level map is 1 */
#define PROTO_MAX_OBJECTS (1u << 18)        /* msgpack values in one message (bounds memory) */
#define PROTO_MAX_STRING_BYTES (4u << 20)   /* any text: content, draft, edit, answer */
#define PROTO_MAX_NAME_BYTES 256            /* names: worker, model, backend */
#define PROTO_MAX_ID_BYTES 64               /* a request id */
#define PROTO_MAX_ERROR_BYTES 4096          /* error/job_error message, disconnect reason */
#define PROTO_MAX_MESSAGES 1024             /* chat messages in one conversation */
#define PROTO_MAX_DRAFTS 32                 /* submit.drafts */
#define PROTO_MAX_FEEDBACKS 64              /* submit.feedbacks (per draft) */
#define PROTO_MAX_EDITS 64                  /* submit.edits (per draft) */
#define PROTO_MAX_FEEDBACKS_PER_EDIT 3      /* submit.feedbacks_per_edit */
#define PROTO_MAX_CANDIDATES 4096           /* result.candidates */
#define PROTO_MAX_SAMPLES 64                /* generate.n, generate_result.outputs */
#define PROTO_MAX_CONVERSATIONS 256         /* score.conversations, score_result.scores */
#define PROTO_MAX_TOKENS 131072             /* max_tokens, output n_tokens */
#define PROTO_MAX_CONTEXT (1u << 20)        /* capacity.max_ctx (tokens per sequence) */
#define PROTO_MAX_SEQS 65536                /* capacity.max_seqs */
#define PROTO_MAX_TOP_K (1u << 20)          /* sampling.top_k (0 = off) */
#define PROTO_MAX_TEMPERATURE 10.0          /* sampling temperature, 0 = greedy */
#define PROTO_MAX_DEADLINE_MS 86400000u     /* submit.deadline_ms: 24 h */
#define PROTO_MAX_WORKERS 4096              /* status_reply.workers */

/* ---- error codes -----------------------------------------------------------------------
 * Returned (negative) by every function here, and carried by name in error/job_error
 * messages. The wire names are in docs/protocol.md and proto_err_name(). */
enum proto_err {
    PROTO_OK = 0,
    PROTO_ERR_BAD_MESSAGE = -1,   /* not msgpack, not a map, bad structure, bad/unknown type */
    PROTO_ERR_BAD_VERSION = -2,   /* `v` is not PROTO_VERSION */
    PROTO_ERR_BAD_FIELD = -3,     /* a field's type, range, text or presence is wrong */
    PROTO_ERR_TOO_LARGE = -4,     /* a field or the message exceeds a limit */
    PROTO_ERR_NO_MEMORY = -5,     /* an allocation failed */
    PROTO_ERR_BUSY = -6,          /* queue or capacity full: retry later */
    PROTO_ERR_NOT_FOUND = -7,     /* no such request id / job */
    PROTO_ERR_NO_WORKER = -8,     /* no worker serves a role the request needs */
    PROTO_ERR_DEADLINE = -9,      /* the deadline passed before anything could be returned */
    PROTO_ERR_CANCELLED = -10,    /* cancelled by the client or the daemon */
    PROTO_ERR_UNAUTHORIZED = -11, /* the peer may not do this */
    PROTO_ERR_SHUTTING_DOWN = -12,/* the daemon/worker is draining */
    PROTO_ERR_WORKER_LOST = -13,  /* workers kept dying on this job; retries exhausted */
    PROTO_ERR_INTERNAL = -14,     /* a bug or an engine failure */
};
#define PROTO_ERR_COUNT 14 /* codes -1 .. -PROTO_ERR_COUNT */

/* ---- message types ---------------------------------------------------------------------- */
enum proto_type {
    PROTO_NONE = 0, /* a zeroed struct proto_msg; never on the wire */
    /* client <-> itsd (frontend) */
    PROTO_SUBMIT,
    PROTO_ACCEPTED,
    PROTO_CANCEL,
    PROTO_GET,
    PROTO_STATUS,
    PROTO_STATUS_REPLY,
    PROTO_PROGRESS,
    PROTO_RESULT,
    PROTO_ERROR, /* either direction, both sockets */
    /* itsd <-> itsw (backend) */
    PROTO_READY,
    PROTO_HEARTBEAT,
    PROTO_DISCONNECT,
    PROTO_GENERATE,
    PROTO_SCORE,
    PROTO_CANCEL_JOB,
    PROTO_GENERATE_RESULT,
    PROTO_SCORE_RESULT,
    PROTO_JOB_ERROR,
    PROTO_SAMPLE, /* one finished sample of a generate job, ahead of generate_result */
    PROTO_TYPE_COUNT
};

/* Sets of types for proto_decode's `accept`: what each end may receive. */
#define PROTO_BIT(t) (UINT32_C(1) << (t))
#define PROTO_ANY (((UINT32_C(1) << PROTO_TYPE_COUNT) - 1) & ~PROTO_BIT(PROTO_NONE))
#define PROTO_FROM_CLIENT (PROTO_BIT(PROTO_SUBMIT) | PROTO_BIT(PROTO_CANCEL) | \
                           PROTO_BIT(PROTO_GET) | PROTO_BIT(PROTO_STATUS) | PROTO_BIT(PROTO_ERROR))
#define PROTO_TO_CLIENT (PROTO_BIT(PROTO_ACCEPTED) | PROTO_BIT(PROTO_STATUS_REPLY) | \
                         PROTO_BIT(PROTO_PROGRESS) | PROTO_BIT(PROTO_RESULT) | \
                         PROTO_BIT(PROTO_ERROR))
#define PROTO_FROM_WORKER (PROTO_BIT(PROTO_READY) | PROTO_BIT(PROTO_HEARTBEAT) | \
                           PROTO_BIT(PROTO_DISCONNECT) | PROTO_BIT(PROTO_GENERATE_RESULT) | \
                           PROTO_BIT(PROTO_SCORE_RESULT) | PROTO_BIT(PROTO_JOB_ERROR) | \
                           PROTO_BIT(PROTO_SAMPLE) | PROTO_BIT(PROTO_ERROR))
#define PROTO_TO_WORKER (PROTO_BIT(PROTO_HEARTBEAT) | PROTO_BIT(PROTO_DISCONNECT) | \
                         PROTO_BIT(PROTO_GENERATE) | PROTO_BIT(PROTO_SCORE) | \
                         PROTO_BIT(PROTO_CANCEL_JOB) | PROTO_BIT(PROTO_ERROR))

/* ---- enumerations carried as strings ------------------------------------------------------ */
enum proto_chat_role { PROTO_CHAT_SYSTEM, PROTO_CHAT_USER, PROTO_CHAT_ASSISTANT };
enum proto_role { PROTO_ROLE_INSTRUCT, PROTO_ROLE_FEEDBACK, PROTO_ROLE_EDIT, PROTO_ROLE_SELECT };
#define PROTO_ROLE_COUNT 4
enum proto_finish { PROTO_FINISH_STOP, PROTO_FINISH_LENGTH, PROTO_FINISH_CANCELLED };
enum proto_worker_state {
    PROTO_WORKER_READY,    /* registered, has free capacity */
    PROTO_WORKER_BUSY,     /* at capacity */
    PROTO_WORKER_DRAINING, /* said disconnect; gets no new jobs */
    PROTO_WORKER_LOST,     /* missed heartbeats; its jobs are being re-dispatched */
};
#define PROTO_WORKER_STATE_COUNT 4

/* ---- message bodies ----------------------------------------------------------------------
 * Strings are NUL-terminated UTF-8 owned by the struct (the wire forbids NUL bytes in text).
 * An array is a pointer plus an n_ count; NULL when the count is 0. `has_X` says whether an
 * optional X was present (absent = the receiver's default) or, for a nullable X, whether it
 * is non-nil; an optional or nullable string is NULL instead. Field meanings, units and
 * ranges: docs/protocol.md. */

struct proto_chat_msg {
    enum proto_chat_role role;
    char *content;
};

struct proto_conversation {
    struct proto_chat_msg *messages;
    uint32_t n_messages;
};

/* Per-role sampling overrides in submit; each field optional. */
struct proto_sampling_opt {
    double temperature;
    double top_p;
    uint32_t max_tokens;
    bool has_temperature, has_top_p, has_max_tokens;
};

struct proto_submit_sampling {
    struct proto_sampling_opt instruct, feedback, edit;
    bool has_instruct, has_feedback, has_edit;
};

struct proto_submit {
    uint64_t tag; /* chosen by the client; echoed in accepted and in errors */
    struct proto_chat_msg *messages;
    uint32_t n_messages;
    uint32_t drafts;             /* instruct samples */
    uint32_t feedbacks;          /* feedback samples per draft */
    uint32_t edits;              /* edit jobs per draft */
    uint32_t feedbacks_per_edit; /* effective feedbacks one edit sees */
    struct proto_submit_sampling sampling;
    bool include_drafts;         /* unedited drafts also compete in selection */
    uint32_t deadline_ms;        /* from acceptance; past it a partial result is returned */
    bool progress;               /* send progress events */
    uint64_t seed;
    bool has_drafts, has_feedbacks, has_edits, has_feedbacks_per_edit, has_sampling,
        has_include_drafts, has_deadline_ms, has_progress, has_seed;
};

struct proto_accepted {
    uint64_t tag;
    char *id;
};

struct proto_cancel {
    char *id;
};

struct proto_get {
    char *id;
};

struct proto_status {
    uint64_t tag;
    bool has_tag;
    bool metrics; /* ask for status_reply.metrics (an older itsd rejects the key) */
    bool has_metrics;
};

struct proto_capacity {
    uint32_t max_seqs;  /* concurrent sequences */
    uint32_t max_ctx;   /* tokens per sequence (prompt + output) */
    uint64_t kv_tokens; /* KV cache positions in all */
};

struct proto_load {
    uint32_t running; /* sequences decoding now */
    uint32_t queued;  /* sequences waiting for capacity */
    uint64_t kv_used; /* KV positions in use */
};

struct proto_role_counts {
    uint32_t instruct, feedback, edit, select;
};

struct proto_worker_info {
    char *id; /* the worker's name */
    enum proto_role role;
    char *model;
    char *backend;
    enum proto_worker_state state;
    struct proto_capacity capacity;
    uint32_t jobs; /* jobs itsd has in flight on it */
    struct proto_load load; /* as last reported by its heartbeat */
    bool has_load;
};

/* Requests that ended since itsd started, by how they ended. */
struct proto_request_counts {
    uint64_t ok;        /* a full result */
    uint64_t partial;   /* a partial result: the deadline or a shutdown cut the work short */
    uint64_t cancelled; /* error cancelled: by a client, or the client went away */
    uint64_t deadline;  /* error deadline: nothing was scored in time */
    uint64_t failed;    /* any other error after acceptance (no_worker, worker_lost, ...) */
    uint64_t rejected;  /* submits answered with an error and never accepted (busy, ...) */
};

/* Time from acceptance to the end of every accepted request that ended. */
struct proto_latency {
    uint64_t count;
    double sum_s;
    double p50_s, p95_s; /* estimated from itsd's histogram buckets; absent when count is 0 */
    bool has_p50_s, has_p95_s;
};

struct proto_role_totals {
    uint64_t instruct, feedback, edit, select;
};

struct proto_socket_counts {
    uint64_t frontend, backend;
};

/* The live numbers of status_reply.metrics; the same ones itsd's /metrics endpoint serves. */
struct proto_metrics {
    struct proto_request_counts requests;
    struct proto_latency latency;
    struct proto_role_counts queue_depth;     /* jobs waiting for a worker, per role */
    struct proto_role_counts jobs_in_flight;  /* jobs running on workers, per role */
    struct proto_role_totals tokens_generated; /* completion tokens of finished jobs */
    uint64_t heartbeat_misses;  /* workers dropped because their heartbeats stopped */
    uint64_t job_retries;       /* jobs sent again after a worker was lost or failed them */
    struct proto_socket_counts protocol_errors; /* bad frames, and errors from peers */
};

struct proto_status_reply {
    uint64_t tag;
    bool has_tag;
    struct proto_role_counts roles; /* live workers per role */
    uint32_t queue_depth;           /* requests waiting to start */
    uint32_t in_flight;             /* requests running */
    struct proto_worker_info *workers;
    uint32_t n_workers;
    struct proto_metrics metrics;   /* only when the status asked for it */
    bool has_metrics;
};

struct proto_stage {
    uint32_t done, total;
};

struct proto_progress {
    char *id;
    struct proto_stage drafts, feedbacks, edits, scores;
    uint64_t elapsed_ms;
};

struct proto_candidate {
    uint32_t draft_index;
    char *draft;
    char **feedbacks; /* the feedbacks the edit used (or, unedited, all of the draft's) */
    uint32_t n_feedbacks;
    char *edit;       /* NULL (nil) when the draft competed unedited */
    double score;
    bool has_score;   /* false (nil) when it was never scored */
};

struct proto_timings {
    uint64_t drafts_ms, feedbacks_ms, edits_ms, scores_ms, total_ms;
};

struct proto_usage {
    uint64_t prompt_tokens, completion_tokens;
};

struct proto_role_usage {
    struct proto_usage instruct, feedback, edit, select;
};

struct proto_result {
    char *id;
    char *answer;
    double score;
    bool has_score; /* false (nil) when nothing was scored */
    uint32_t best;  /* index into candidates of the answer */
    bool has_best;  /* false (nil) when there is no candidate */
    bool partial;   /* the deadline cut the work short */
    struct proto_candidate *candidates;
    uint32_t n_candidates;
    struct proto_timings timings;
    struct proto_role_usage usage;
};

struct proto_error {
    uint64_t tag;
    bool has_tag;
    char *id; /* NULL when absent */
    enum proto_err code;
    char *message;
};

struct proto_ready {
    char *worker;
    enum proto_role role;
    char *model;
    char *backend;
    struct proto_capacity capacity;
};

struct proto_heartbeat {
    struct proto_load load;
    bool has_load;
};

struct proto_disconnect {
    char *reason;
};

struct proto_sampling {
    double temperature; /* 0 = greedy */
    double top_p;       /* (0, 1] */
    uint32_t top_k;     /* 0 = off */
    uint64_t seed;
    uint32_t max_tokens;
    bool ignore_eos;
};

struct proto_generate {
    uint64_t job;
    struct proto_chat_msg *messages;
    uint32_t n_messages;
    bool add_generation_prompt;
    uint32_t n; /* samples sharing one prefill */
    struct proto_sampling sampling;
};

struct proto_score {
    uint64_t job;
    struct proto_conversation *conversations;
    uint32_t n_conversations;
};

struct proto_cancel_job {
    uint64_t job;
};

struct proto_output {
    char *text;
    uint32_t n_tokens;
    enum proto_finish finish;
};

struct proto_generate_result {
    uint64_t job;
    struct proto_output *outputs;
    uint32_t n_outputs;
    struct proto_usage usage;
};

struct proto_score_result {
    uint64_t job;
    double *scores; /* one per conversation, in order */
    uint32_t n_scores;
    struct proto_usage usage;
};

struct proto_job_error {
    uint64_t job;
    enum proto_err code;
    char *message;
};

/* Sent by a worker as each sample of a generate job finishes, so that itsd can start the
 * candidate's next stage while the other samples still decode. The job's generate_result
 * repeats every output; a receiver uses whichever arrives first. */
struct proto_sample {
    uint64_t job;
    uint32_t index; /* < the job's n */
    struct proto_output output;
};

/* Any message: `type` selects the member of the anonymous union. */
struct proto_msg {
    enum proto_type type;
    union {
        struct proto_submit submit;
        struct proto_accepted accepted;
        struct proto_cancel cancel;
        struct proto_get get;
        struct proto_status status;
        struct proto_status_reply status_reply;
        struct proto_progress progress;
        struct proto_result result;
        struct proto_error error;
        struct proto_ready ready;
        struct proto_heartbeat heartbeat;
        struct proto_disconnect disconnect;
        struct proto_generate generate;
        struct proto_score score;
        struct proto_cancel_job cancel_job;
        struct proto_generate_result generate_result;
        struct proto_score_result score_result;
        struct proto_job_error job_error;
        struct proto_sample sample;
    };
};

/* What proto_peek could learn from a message that may not decode: enough to address an
 * error reply. */
struct proto_peek {
    enum proto_type type; /* PROTO_NONE when `type` is absent or unknown */
    bool has_tag, has_job;
    uint64_t tag, job;
    char id[PROTO_MAX_ID_BYTES + 1]; /* "" when absent or not a valid id */
};

/* ---- functions ----------------------------------------------------------------------------- */

/* Decodes one message from the `len` bytes at `buf` (not retained) into `*out`, which is
 * overwritten (not freed) first. Only types whose PROTO_BIT is in `accept` decode; others are
 * bad_message (use PROTO_ANY, PROTO_FROM_CLIENT, ...). Every field is validated: msgpack
 * type, presence, range, size and UTF-8; unknown keys are rejected.
 * Returns 0 with *out owning its strings and arrays (free with proto_msg_free), or a negative
 * enum proto_err with *out zeroed and `err` (if err_len > 0) holding an ASCII message that
 * names the field, e.g. "submit.messages[3].content: invalid UTF-8 at byte 17". */
int proto_decode(const void *buf, size_t len, uint32_t accept, struct proto_msg *out,
                 char *err, size_t err_len);

/* Encodes `m` as one msgpack map after checking it by the same rules as proto_decode.
 * On success *out is a malloc'd buffer of *out_len bytes that the caller frees with free().
 * Returns 0, or a negative enum proto_err with err naming the field; *out is then NULL. */
int proto_encode(const struct proto_msg *m, void **out, size_t *out_len, char *err,
                 size_t err_len);

/* Frees every string and array `m` owns (as proto_decode made it, or built by the caller from
 * malloc'd parts) and zeroes it. NULL-safe; safe on a zeroed message. */
void proto_msg_free(struct proto_msg *m);

/* Deep equality: same type and every field equal (absent optional fields compare equal
 * whatever their value member holds). */
bool proto_msg_equal(const struct proto_msg *a, const struct proto_msg *b);

/* Best-effort look at a message that may be invalid: its type and the tag / id / job that an
 * error reply should carry. Returns 0 when the bytes are a well-formed msgpack map within the
 * limits (then *out holds what could be read), else a negative enum proto_err. */
int proto_peek(const void *buf, size_t len, struct proto_peek *out);

/* Encodes the `error` reply to a message: tag and id are taken from `about` (NULL: neither),
 * `code` is a negative enum proto_err, and `message` (NULL: "") is made fit for the wire: cut
 * to PROTO_MAX_ERROR_BYTES and every byte that is not valid UTF-8 replaced by '?'. Typical
 * use: proto_decode fails -> proto_peek the same bytes -> answer with this and the decode's
 * err text. Output and return as proto_encode. */
int proto_encode_error(const struct proto_peek *about, int code, const char *message,
                       void **out, size_t *out_len, char *err, size_t err_len);

/* Wire names. Each *_name returns "?" for a value out of range; each *_from_name returns 0
 * with *out set, or -1 for an unknown name. */
const char *proto_type_name(enum proto_type t);
int proto_type_from_name(const char *name, enum proto_type *out);
const char *proto_err_name(int code); /* "ok" for 0, "bad_field" for PROTO_ERR_BAD_FIELD */
int proto_err_from_name(const char *name, enum proto_err *out);
const char *proto_role_name(enum proto_role r);
int proto_role_from_name(const char *name, enum proto_role *out);
const char *proto_chat_role_name(enum proto_chat_role r);
int proto_chat_role_from_name(const char *name, enum proto_chat_role *out);
const char *proto_finish_name(enum proto_finish f);
const char *proto_worker_state_name(enum proto_worker_state s);

#endif
