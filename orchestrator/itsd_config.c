/* itsd_config.c — see itsd_config.h. One table (itsd_config_keys) names every key: its
 * section, flag, type, default, range and documentation. Defaults are written as text and go
 * through the same parser as the file and the flags, so a default can never be a value the
 * parser would reject. inih does the INI syntax; the line reader in front of it counts lines
 * (this inih build has no line numbers in its handler) and rejects what inih would silently
 * misread: over-long lines and indented continuation lines.
 */
#include "itsd_config.h"

#include <errno.h>
#include <ini.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <zmq.h>

#include "itsd_log.h"
#include "keyfile.h"
#include "metrics_http.h"
#include "zap.h"

enum itsd_config_kind {
    CFG_ENDPOINT, /* char[PATH_MAX]: tcp://... or ipc://... */
    CFG_PATH,     /* char[PATH_MAX]: relative to the config file's directory */
    CFG_U32,
    CFG_U64,
    CFG_F64,
    CFG_BOOL,
    CFG_LOG_LEVEL, /* int, by name */
    CFG_CHOICE,    /* int: the index of the value in `choices` */
    CFG_LISTEN,    /* char[PATH_MAX]: IPv4:PORT or [IPv6]:PORT, "" = off */
};

struct itsd_config_key {
    const char *section;
    const char *name;
    const char *flag; /* without "--" */
    enum itsd_config_kind kind;
    size_t off;
    const char *def; /* default, as text */
    double lo, hi;   /* inclusive range of numbers; for a path: hi = may be empty (1) */
    const char *doc;
    /* SIGHUP applies a new value to the running daemon (LIVE), or the key keeps its value
     * until a restart (RESTART): sockets, their options and the CURVE identity are made once,
     * before READY=1, and changing them under connected peers would drop their requests. */
    bool reload;
};

#define LIVE true
#define RESTART false

/* The words of each CFG_CHOICE key, NULL-terminated, in the order of its enum. */
static const char *const itsd_config_plaintext_choices[] = {"refuse", "force", NULL};

#define OFF(field) offsetof(struct itsd_config, field)
#define U32_MAX_D 4294967295.0

static const struct itsd_config_key itsd_config_keys[] = {
    /* ---- [itsd] ---- */
    {"itsd", "frontend", "frontend", CFG_ENDPOINT, OFF(frontend), "tcp://127.0.0.1:7700", 0, 0,
     "ZeroMQ endpoint of the ROUTER socket clients (libits, itsctl) connect to: tcp://HOST:PORT "
     "or ipc://PATH.", RESTART},
    {"itsd", "backend", "backend", CFG_ENDPOINT, OFF(backend), "tcp://127.0.0.1:7701", 0, 0,
     "ZeroMQ endpoint of the ROUTER socket workers (itsw serve --connect) connect to.",
     RESTART},
    {"itsd", "metrics_listen", "metrics-listen", CFG_LISTEN, OFF(metrics_listen), "", 0, 0,
     "Address of the plain-HTTP Prometheus endpoint GET /metrics: IPv4:PORT or [IPv6]:PORT "
     "(literal addresses, no host names); empty = no endpoint. Anyone who reaches it reads "
     "the counters: bind loopback or a private address (docs/operations.md, Metrics).",
     RESTART},
    {"itsd", "templates", "templates", CFG_PATH, OFF(templates), ITSD_TEMPLATES_DIR, 0, 0,
     "Directory of the role prompt templates (instruct.tmpl, feedback.tmpl, edit.tmpl, "
     "select.tmpl). A relative path in a config file is relative to that file's directory; "
     "on the command line, to the working directory. Read at start and again on SIGHUP (running "
     "requests keep the templates they started with); -t checks them.", LIVE},
    {"itsd", "log_level", "log-level", CFG_LOG_LEVEL, OFF(log_level), "info", 0, 0,
     "error, warn, info (one line per request and worker event) or debug (every message).", LIVE},
    {"itsd", "heartbeat_ms", "heartbeat-ms", CFG_U32, OFF(heartbeat_ms), "1000", 10, 600000,
     "Heartbeat interval between itsd and each worker, both ways (milliseconds). A reload "
     "applies it to registered workers at once; keep it well below every worker's own "
     "heartbeat_ms x liveness, or they take itsd for lost.", LIVE},
    {"itsd", "liveness", "liveness", CFG_U32, OFF(liveness), "5", 1, 1000,
     "A worker silent for this many heartbeat intervals is dropped and its jobs "
     "re-dispatched. A reload applies it from the next check on (a worker already silent "
     "that long is dropped then).", LIVE},
    {"itsd", "client_heartbeat_ms", "client-heartbeat-ms", CFG_U32, OFF(client_heartbeat_ms),
     "5000", 0, 600000,
     "ZMTP heartbeat interval on client connections, so that a half-open TCP connection is "
     "noticed and its requests cancelled (0 = off).", RESTART},
    {"itsd", "client_timeout_ms", "client-timeout-ms", CFG_U32, OFF(client_timeout_ms), "15000",
     0, 3600000,
     "A client connection that answers no heartbeat for this long is closed and its requests "
     "cancelled. At least client_heartbeat_ms when heartbeats are on.", RESTART},
    {"itsd", "hwm", "hwm", CFG_U32, OFF(hwm), "10000", 1, 10000000,
     "ZeroMQ high-water mark: messages queued per peer and direction before sends to that "
     "peer are dropped (and counted).", RESTART},
    {"itsd", "linger_ms", "linger-ms", CFG_U32, OFF(linger_ms), "200", 0, 60000,
     "At exit, how long messages not yet sent (cancel_job, final errors) may delay it.",
     RESTART},
    {"itsd", "shutdown_ms", "shutdown-ms", CFG_U32, OFF(shutdown_ms), "10000", 0, 3600000,
     "On SIGTERM/SIGINT running requests get this long to finish before they are cancelled "
     "(a second signal cancels at once). New and queued requests get shutting_down.", LIVE},
    {"itsd", "max_workers", "max-workers", CFG_U32, OFF(max_workers), "1024", 1,
     PROTO_MAX_WORKERS,
     "Workers registered at once; a ready beyond it is answered busy. Lowered by a reload "
     "below the workers registered, it drops none: new ones wait for room.", LIVE},
    /* ---- [limits] ---- */
    {"limits", "max_inflight", "max-inflight", CFG_U32, OFF(max_inflight), "16", 1, 100000,
     "Requests running at once; later ones wait in the queue. Lowered by a reload below the "
     "requests running, it ends none: no queued request starts until they are fewer.", LIVE},
    {"limits", "max_queued", "max-queued", CFG_U32, OFF(max_queued), "64", 0, 1000000,
     "Requests waiting to start; a submit beyond it is answered with a busy error.", LIVE},
    {"limits", "max_candidates", "max-candidates", CFG_U32, OFF(max_candidates), "512", 1,
     PROTO_MAX_CANDIDATES,
     "Candidates one request may produce: drafts x edits (+ drafts with include_drafts). "
     "A submit over it is answered too_large naming the product.", LIVE},
    {"limits", "max_sequences", "max-sequences", CFG_U32, OFF(max_sequences), "4096", 1,
     1000000,
     "Sequences one request may generate: drafts + drafts x feedbacks + drafts x edits. "
     "A submit over it is answered too_large.", LIVE},
    {"limits", "max_queued_jobs", "max-queued-jobs", CFG_U32, OFF(max_queued_jobs), "100000", 1,
     10000000,
     "Jobs waiting for a worker, per role; a request whose job would exceed it fails busy.", LIVE},
    {"limits", "default_deadline_ms", "default-deadline-ms", CFG_U32, OFF(default_deadline_ms),
     "600000", 1, PROTO_MAX_DEADLINE_MS,
     "Deadline of a request whose submit sets none, from acceptance. At the deadline the best "
     "scored candidate so far is returned (partial), else a deadline error.", LIVE},
    {"limits", "max_deadline_ms", "max-deadline-ms", CFG_U32, OFF(max_deadline_ms), "3600000", 1,
     PROTO_MAX_DEADLINE_MS, "Longer submit.deadline_ms values are cut to this.", LIVE},
    {"limits", "no_worker_grace_ms", "no-worker-grace-ms", CFG_U32, OFF(no_worker_grace_ms),
     "30000", 0, PROTO_MAX_DEADLINE_MS,
     "How long a job waits for a worker of its role to register before its request fails "
     "with no_worker naming the role. Must be below default_deadline_ms.", LIVE},
    {"limits", "job_retries", "job-retries", CFG_U32, OFF(job_retries), "2", 0, 100,
     "How often a job is sent again after its worker was lost or failed it with a retryable "
     "error (busy, internal, ...); after that the job fails with worker_lost.", LIVE},
    {"limits", "keep_results", "keep-results", CFG_U32, OFF(keep_results), "1024", 0, 1000000,
     "Finished requests whose result (or error) is kept for `get ID`; the oldest go first.", LIVE},
    {"limits", "keep_results_mib", "keep-results-mib", CFG_U32, OFF(keep_results_mib), "256", 0,
     1048576, "Memory the kept results may take, in MiB (encoded); the oldest go first.", LIVE},
    {"limits", "result_ttl_ms", "result-ttl-ms", CFG_U32, OFF(result_ttl_ms), "600000", 0,
     U32_MAX_D, "How long a finished request's result is kept for `get ID`.", LIVE},
    {"limits", "progress_interval_ms", "progress-interval-ms", CFG_U32,
     OFF(progress_interval_ms), "250", 0, 3600000,
     "Least time between two progress events of one request (submit with progress=true).", LIVE},
    {"limits", "max_requests_per_client", "max-requests-per-client", CFG_U32,
     OFF(max_requests_per_client), "0", 0, 1000000,
     "Requests one client may have running or queued at once (0 = no per-client limit); a "
     "submit beyond it is answered busy naming this key. Clients are told apart by their "
     "CURVE key, so it applies only with [security] curve = on. The size of each request is "
     "bounded by max_candidates and max_sequences, for every client alike.", LIVE},
    /* ---- [pipeline] ---- */
    {"pipeline", "drafts", "drafts", CFG_U32, OFF(drafts), "8", 1, PROTO_MAX_DRAFTS,
     "Draft responses the instruct model samples per request (submit.drafts overrides).", LIVE},
    {"pipeline", "feedbacks", "feedbacks", CFG_U32, OFF(feedbacks), "16", 0,
     PROTO_MAX_FEEDBACKS, "Feedbacks the feedback model samples per draft (0: drafts only).", LIVE},
    {"pipeline", "edits", "edits", CFG_U32, OFF(edits), "16", 0, PROTO_MAX_EDITS,
     "Edit jobs per draft, each over feedbacks_per_edit effective feedbacks.", LIVE},
    {"pipeline", "feedbacks_per_edit", "feedbacks-per-edit", CFG_U32, OFF(feedbacks_per_edit),
     "1", 1, PROTO_MAX_FEEDBACKS_PER_EDIT, "Effective feedbacks one edit job sees.", LIVE},
    {"pipeline", "include_drafts", "include-drafts", CFG_BOOL, OFF(include_drafts), "false", 0,
     0, "Whether unedited drafts also compete in the final selection.", LIVE},
    {"pipeline", "seed", "seed", CFG_U64, OFF(seed), "0", 0, 0,
     "Seed of requests that set none (job seeds derive from it); 0 = a random seed each.", LIVE},
    /* ---- [instruct] [feedback] [edit] [select] ---- */
    {"instruct", "temperature", "instruct-temperature", CFG_F64, OFF(instruct.temperature),
     "0.7", 0, PROTO_MAX_TEMPERATURE, "Sampling temperature of drafts (0 = greedy).", LIVE},
    {"instruct", "top_p", "instruct-top-p", CFG_F64, OFF(instruct.top_p), "0.9", 1e-9, 1,
     "Nucleus sampling mass of drafts, in (0, 1].", LIVE},
    {"instruct", "top_k", "instruct-top-k", CFG_U32, OFF(instruct.top_k), "0", 0,
     PROTO_MAX_TOP_K, "Top-k of drafts (0 = off).", LIVE},
    {"instruct", "max_tokens", "instruct-max-tokens", CFG_U32, OFF(instruct.max_tokens), "4096",
     1, PROTO_MAX_TOKENS, "New tokens per draft at most.", LIVE},
    {"instruct", "template", "instruct-template", CFG_PATH, OFF(template_file[PROTO_ROLE_INSTRUCT]),
     "", 0, 1, "Template file of the instruct role; empty = TEMPLATES/instruct.tmpl.", LIVE},
    {"feedback", "temperature", "feedback-temperature", CFG_F64, OFF(feedback.temperature),
     "0.7", 0, PROTO_MAX_TEMPERATURE, "Sampling temperature of feedbacks.", LIVE},
    {"feedback", "top_p", "feedback-top-p", CFG_F64, OFF(feedback.top_p), "0.9", 1e-9, 1,
     "Nucleus sampling mass of feedbacks.", LIVE},
    {"feedback", "top_k", "feedback-top-k", CFG_U32, OFF(feedback.top_k), "0", 0,
     PROTO_MAX_TOP_K, "Top-k of feedbacks (0 = off).", LIVE},
    {"feedback", "max_tokens", "feedback-max-tokens", CFG_U32, OFF(feedback.max_tokens), "512",
     1, PROTO_MAX_TOKENS,
     "New tokens per feedback at most (the model card's 128 is short for 2-10 sentences).", LIVE},
    {"feedback", "template", "feedback-template", CFG_PATH,
     OFF(template_file[PROTO_ROLE_FEEDBACK]), "", 0, 1,
     "Template file of the feedback role; empty = TEMPLATES/feedback.tmpl.", LIVE},
    {"edit", "temperature", "edit-temperature", CFG_F64, OFF(edit.temperature), "0", 0,
     PROTO_MAX_TEMPERATURE, "Sampling temperature of edits (the paper edits greedily).", LIVE},
    {"edit", "top_p", "edit-top-p", CFG_F64, OFF(edit.top_p), "1", 1e-9, 1,
     "Nucleus sampling mass of edits (no effect when greedy).", LIVE},
    {"edit", "top_k", "edit-top-k", CFG_U32, OFF(edit.top_k), "0", 0, PROTO_MAX_TOP_K,
     "Top-k of edits (0 = off).", LIVE},
    {"edit", "max_tokens", "edit-max-tokens", CFG_U32, OFF(edit.max_tokens), "4096", 1,
     PROTO_MAX_TOKENS, "New tokens per edited response at most.", LIVE},
    {"edit", "template", "edit-template", CFG_PATH, OFF(template_file[PROTO_ROLE_EDIT]), "", 0,
     1, "Template file of the edit role; empty = TEMPLATES/edit.tmpl.", LIVE},
    {"select", "template", "select-template", CFG_PATH, OFF(template_file[PROTO_ROLE_SELECT]),
     "", 0, 1, "Template file of the select role; empty = TEMPLATES/select.tmpl.", LIVE},
    /* ---- [security] ---- */
    {"security", "curve", "curve", CFG_BOOL, OFF(curve), "off", 0, 0,
     "CurveZMQ on both sockets: traffic is encrypted and only peers whose public key is in "
     "client_keys (frontend) or worker_keys (backend) get in. off = plain text, which is "
     "refused on an endpoint other hosts can reach unless plaintext_nonloopback = force. "
     "docs/security.md explains keys, rotation and what is protected.", RESTART},
    {"security", "secret_key", "secret-key", CFG_PATH, OFF(secret_key), "", 0, 1,
     "itsd's key pair file (written by `itsctl keygen --out PREFIX`: PREFIX.key, mode 0600); "
     "clients and workers are given PREFIX.pub. Required when curve = on.", RESTART},
    {"security", "client_keys", "client-keys", CFG_PATH, OFF(client_keys), "", 0, 1,
     "Allow-list of clients: a directory whose NAME.pub files each hold one public key (NAME "
     "is the client's name in logs and limits), or one such file. Required when curve = on; "
     "SIGHUP reloads it.", LIVE},
    {"security", "worker_keys", "worker-keys", CFG_PATH, OFF(worker_keys), "", 0, 1,
     "Allow-list of workers, like client_keys. Required when curve = on; SIGHUP reloads it.",
     LIVE},
    {"security", "plaintext_nonloopback", "plaintext-nonloopback", CFG_CHOICE,
     OFF(plaintext_nonloopback), "refuse", 0, 0,
     "With curve = off on a tcp:// endpoint that is not 127.0.0.0/8, ::1 or localhost: refuse "
     "(itsd does not start) or force (plain text anyway, e.g. inside a private network).",
     RESTART},
};

#define ITSD_CONFIG_N_KEYS (sizeof itsd_config_keys / sizeof itsd_config_keys[0])

static const char *const itsd_config_sections[] = {"itsd",     "limits", "pipeline", "instruct",
                                                   "feedback", "edit",   "select", "security"};
#define ITSD_CONFIG_N_SECTIONS (sizeof itsd_config_sections / sizeof itsd_config_sections[0])

/* ---- error accumulation ------------------------------------------------------------------ */

/* Appends one line to the NUL-terminated text in err (truncating quietly when full: the
 * count still says how many problems there were). */
static void itsd_config_errf(char *err, size_t err_len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void itsd_config_errf(char *err, size_t err_len, const char *fmt, ...)
{
    if (!err || err_len == 0)
        return;
    size_t used = strnlen(err, err_len - 1);
    err[used] = '\0';
    if (used + 1 >= err_len)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(err + used, err_len - used, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    used += (size_t)n < err_len - used ? (size_t)n : err_len - used - 1;
    if (used + 1 < err_len) {
        err[used++] = '\n';
        err[used] = '\0';
    }
}

/* ---- values -------------------------------------------------------------------------------- */

static const struct itsd_config_key *itsd_config_find(const char *section, const char *name)
{
    for (size_t i = 0; i < ITSD_CONFIG_N_KEYS; i++)
        if (strcmp(itsd_config_keys[i].section, section) == 0 &&
            strcmp(itsd_config_keys[i].name, name) == 0)
            return &itsd_config_keys[i];
    return NULL;
}

static const struct itsd_config_key *itsd_config_find_flag(const char *flag)
{
    for (size_t i = 0; i < ITSD_CONFIG_N_KEYS; i++)
        if (strcmp(itsd_config_keys[i].flag, flag) == 0)
            return &itsd_config_keys[i];
    return NULL;
}

static int itsd_config_parse_u64(const char *s, uint64_t *out)
{
    if (*s < '0' || *s > '9')
        return -1; /* strtoull would accept signs and blanks */
    errno = 0;
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || *end != '\0')
        return -1;
    *out = v;
    return 0;
}

static int itsd_config_parse_bool(const char *s, bool *out)
{
    static const char *const yes[] = {"true", "yes", "on", "1"};
    static const char *const no[] = {"false", "no", "off", "0"};
    for (size_t i = 0; i < 4; i++) {
        if (strcasecmp(s, yes[i]) == 0) {
            *out = true;
            return 0;
        }
        if (strcasecmp(s, no[i]) == 0) {
            *out = false;
            return 0;
        }
    }
    return -1;
}

static const char *const *itsd_config_choices(const struct itsd_config_key *k)
{
    if (k->off == OFF(plaintext_nonloopback))
        return itsd_config_plaintext_choices;
    return NULL;
}

/* Stores `value` into the field of `k`. base_dir (may be NULL) prefixes relative paths.
 * Returns 0, or -1 with `why` saying what is wrong. */
static int itsd_config_store(struct itsd_config *cfg, const struct itsd_config_key *k,
                             const char *value, const char *base_dir, char *why, size_t why_len)
{
    char *field = (char *)cfg + k->off;
    switch (k->kind) {
    case CFG_ENDPOINT: {
        if (strncmp(value, "tcp://", 6) != 0 && strncmp(value, "ipc://", 6) != 0) {
            snprintf(why, why_len, "'%s' is not a tcp:// or ipc:// endpoint", value);
            return -1;
        }
        if (strlen(value) <= 6) {
            snprintf(why, why_len, "'%s' has no address after the scheme", value);
            return -1;
        }
        if (strlen(value) >= ITSD_CONFIG_PATH_MAX) {
            snprintf(why, why_len, "longer than %d bytes", ITSD_CONFIG_PATH_MAX - 1);
            return -1;
        }
        strcpy(field, value);
        return 0;
    }
    case CFG_LISTEN: {
        if (strlen(value) >= ITSD_CONFIG_PATH_MAX) {
            snprintf(why, why_len, "longer than %d bytes", ITSD_CONFIG_PATH_MAX - 1);
            return -1;
        }
        struct sockaddr_storage ss;
        size_t ss_len;
        if (*value && metrics_http_parse_listen(value, &ss, &ss_len, why, why_len) != 0)
            return -1;
        strcpy(field, value);
        return 0;
    }
    case CFG_PATH: {
        if (!*value && k->hi == 0) {
            snprintf(why, why_len, "must not be empty");
            return -1;
        }
        int n;
        if (*value && value[0] != '/' && base_dir && *base_dir)
            n = snprintf(field, ITSD_CONFIG_PATH_MAX, "%s/%s", base_dir, value);
        else
            n = snprintf(field, ITSD_CONFIG_PATH_MAX, "%s", value);
        if (n < 0 || n >= ITSD_CONFIG_PATH_MAX) {
            field[0] = '\0';
            snprintf(why, why_len, "path longer than %d bytes", ITSD_CONFIG_PATH_MAX - 1);
            return -1;
        }
        return 0;
    }
    case CFG_U32:
    case CFG_U64: {
        uint64_t v;
        if (itsd_config_parse_u64(value, &v) != 0) {
            snprintf(why, why_len, "'%s' is not a non-negative integer", value);
            return -1;
        }
        if (k->kind == CFG_U32) {
            if ((double)v < k->lo || (double)v > k->hi) {
                snprintf(why, why_len, "%s is out of range %.0f..%.0f", value, k->lo, k->hi);
                return -1;
            }
            uint32_t v32 = (uint32_t)v;
            memcpy(field, &v32, sizeof v32);
        } else {
            memcpy(field, &v, sizeof v);
        }
        return 0;
    }
    case CFG_F64: {
        errno = 0;
        char *end;
        double v = strtod(value, &end);
        if (errno != 0 || end == value || *end != '\0' || !isfinite(v)) {
            snprintf(why, why_len, "'%s' is not a number", value);
            return -1;
        }
        if (v < k->lo || v > k->hi) {
            if (k->lo > 0 && k->lo < 1e-6)
                snprintf(why, why_len, "%s is out of range (0, %g]", value, k->hi);
            else
                snprintf(why, why_len, "%s is out of range %g..%g", value, k->lo, k->hi);
            return -1;
        }
        memcpy(field, &v, sizeof v);
        return 0;
    }
    case CFG_BOOL: {
        bool b;
        if (itsd_config_parse_bool(value, &b) != 0) {
            snprintf(why, why_len, "'%s' is not a boolean (true/false, yes/no, on/off, 1/0)",
                     value);
            return -1;
        }
        memcpy(field, &b, sizeof b);
        return 0;
    }
    case CFG_LOG_LEVEL: {
        int lvl;
        if (itsd_log_level_from_name(value, &lvl) != 0) {
            snprintf(why, why_len, "'%s' is not one of error, warn, info, debug", value);
            return -1;
        }
        memcpy(field, &lvl, sizeof lvl);
        return 0;
    }
    case CFG_CHOICE: {
        const char *const *choices = itsd_config_choices(k);
        for (int i = 0; choices && choices[i]; i++) {
            if (strcmp(value, choices[i]) == 0) {
                memcpy(field, &i, sizeof i);
                return 0;
            }
        }
        size_t used = (size_t)snprintf(why, why_len, "'%s' is not one of", value);
        for (int i = 0; choices && choices[i] && used < why_len; i++)
            used += (size_t)snprintf(why + used, why_len - used, "%s %s", i ? "," : "",
                                     choices[i]);
        return -1;
    }
    }
    snprintf(why, why_len, "unknown kind (a bug)");
    return -1;
}

/* Formats the current value of `k` the way itsd_config_store reads it. */
static void itsd_config_format(const struct itsd_config *cfg, const struct itsd_config_key *k,
                               char *out, size_t out_len)
{
    const char *field = (const char *)cfg + k->off;
    switch (k->kind) {
    case CFG_ENDPOINT:
    case CFG_PATH:
    case CFG_LISTEN:
        snprintf(out, out_len, "%s", field);
        return;
    case CFG_U32: {
        uint32_t v;
        memcpy(&v, field, sizeof v);
        snprintf(out, out_len, "%u", v);
        return;
    }
    case CFG_U64: {
        uint64_t v;
        memcpy(&v, field, sizeof v);
        snprintf(out, out_len, "%llu", (unsigned long long)v);
        return;
    }
    case CFG_F64: {
        double v;
        memcpy(&v, field, sizeof v);
        snprintf(out, out_len, "%.17g", v);
        /* the shortest text that reads back the same value */
        for (int prec = 1; prec <= 17; prec++) {
            char tmp[64];
            snprintf(tmp, sizeof tmp, "%.*g", prec, v);
            if (strtod(tmp, NULL) == v) {
                snprintf(out, out_len, "%s", tmp);
                break;
            }
        }
        return;
    }
    case CFG_BOOL: {
        bool b;
        memcpy(&b, field, sizeof b);
        snprintf(out, out_len, "%s", b ? "true" : "false");
        return;
    }
    case CFG_LOG_LEVEL: {
        int v;
        memcpy(&v, field, sizeof v);
        snprintf(out, out_len, "%s", itsd_log_level_name(v));
        return;
    }
    case CFG_CHOICE: {
        int v;
        memcpy(&v, field, sizeof v);
        const char *const *choices = itsd_config_choices(k);
        snprintf(out, out_len, "%s", choices && v >= 0 ? choices[v] : "?");
        return;
    }
    }
    snprintf(out, out_len, "?");
}

int itsd_config_defaults(struct itsd_config *cfg, char *err, size_t err_len)
{
    memset(cfg, 0, sizeof *cfg);
    int bad = 0;
    for (size_t i = 0; i < ITSD_CONFIG_N_KEYS; i++) {
        const struct itsd_config_key *k = &itsd_config_keys[i];
        char why[256];
        if (itsd_config_store(cfg, k, k->def, NULL, why, sizeof why) != 0) {
            itsd_config_errf(err, err_len, "default of [%s] %s: %s", k->section, k->name, why);
            bad--;
        }
    }
    return bad;
}

/* ---- the INI file ------------------------------------------------------------------------ */

struct itsd_config_file {
    struct itsd_config *cfg;
    const char *path;
    char base_dir[ITSD_CONFIG_PATH_MAX];
    FILE *f;
    char *line;     /* getline buffer */
    size_t line_cap;
    int lineno;     /* of the line inih is handling */
    int set_line[ITSD_CONFIG_N_KEYS]; /* where each key was set, 0 = not yet */
    int bad_lines[64];                /* lines already reported by the reader */
    int n_bad_lines;
    int n_errors;
    char *err;
    size_t err_len;
};

static void itsd_config_file_error(struct itsd_config_file *cf, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void itsd_config_file_error(struct itsd_config_file *cf, int line, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    itsd_config_errf(cf->err, cf->err_len, "%s:%d: %s", cf->path, line, msg);
    cf->n_errors++;
    if (cf->n_bad_lines < (int)(sizeof cf->bad_lines / sizeof cf->bad_lines[0]))
        cf->bad_lines[cf->n_bad_lines++] = line;
}

static bool itsd_config_known_section(const char *s)
{
    for (size_t i = 0; i < ITSD_CONFIG_N_SECTIONS; i++)
        if (strcmp(itsd_config_sections[i], s) == 0)
            return true;
    return false;
}

/* inih's fgets-style reader. Reads whole physical lines itself so that a line longer than
 * inih's buffer (`num`) is reported instead of being split into two lines, and so that the
 * handler knows the line number. Lines inih would misparse are reported here and handed on
 * as blank lines. */
static char *itsd_config_reader(char *str, int num, void *stream)
{
    struct itsd_config_file *cf = stream;
    ssize_t n = getline(&cf->line, &cf->line_cap, cf->f);
    if (n < 0)
        return NULL;
    cf->lineno++;
    char *s = cf->line;
    size_t len = (size_t)n;
    while (len > 0 && (s[len - 1] == '\n' || s[len - 1] == '\r'))
        s[--len] = '\0';
    if (memchr(s, '\0', len)) {
        itsd_config_file_error(cf, cf->lineno, "NUL byte in line");
        goto blank;
    }
    const char *p = s;
    if (cf->lineno == 1 && (unsigned char)p[0] == 0xEF && (unsigned char)p[1] == 0xBB &&
        (unsigned char)p[2] == 0xBF)
        p += 3; /* a UTF-8 byte-order mark, which inih skips too */
    const char *q = p;
    while (*q == ' ' || *q == '\t')
        q++;
    if (*q == '\0' || *q == ';' || *q == '#')
        goto pass;
    if (q != p) {
        itsd_config_file_error(cf, cf->lineno,
                               "indented line (continuation lines are not supported)");
        goto blank;
    }
    if (*q == '[') {
        if (!strchr(q, ']')) {
            itsd_config_file_error(cf, cf->lineno, "section header without ']'");
            goto blank;
        }
    } else if (!strchr(q, '=') && !strchr(q, ':')) {
        itsd_config_file_error(cf, cf->lineno, "expected 'key = value'");
        goto blank;
    }
    if (len + 2 > (size_t)num) {
        itsd_config_file_error(cf, cf->lineno, "line longer than %d bytes", num - 2);
        goto blank;
    }
pass:
    if (len + 2 > (size_t)num) /* a long comment: nothing in it matters */
        goto blank;
    memcpy(str, s, len);
    str[len] = '\n';
    str[len + 1] = '\0';
    return str;
blank:
    if (num < 2)
        return NULL;
    str[0] = '\n';
    str[1] = '\0';
    return str;
}

static int itsd_config_handler(void *user, const char *section, const char *name,
                               const char *value)
{
    struct itsd_config_file *cf = user;
    if (!*section) {
        itsd_config_file_error(cf, cf->lineno, "%s: key outside a section (sections: [itsd] "
                               "[limits] [pipeline] [instruct] [feedback] [edit] [select] "
                               "[security])",
                               name);
        return 1;
    }
    if (!itsd_config_known_section(section)) {
        itsd_config_file_error(cf, cf->lineno, "[%s]: unknown section", section);
        return 1;
    }
    const struct itsd_config_key *k = itsd_config_find(section, name);
    if (!k) {
        itsd_config_file_error(cf, cf->lineno, "[%s] %s: unknown key", section, name);
        return 1;
    }
    size_t idx = (size_t)(k - itsd_config_keys);
    if (cf->set_line[idx]) {
        itsd_config_file_error(cf, cf->lineno, "[%s] %s: already set at line %d", section,
                               name, cf->set_line[idx]);
        return 1;
    }
    cf->set_line[idx] = cf->lineno;
    char why[512];
    if (itsd_config_store(cf->cfg, k, value, cf->base_dir, why, sizeof why) != 0)
        itsd_config_file_error(cf, cf->lineno, "[%s] %s: %s", section, name, why);
    return 1; /* keep going: every problem is reported */
}

int itsd_config_load_file(struct itsd_config *cfg, const char *path, char *err, size_t err_len)
{
    struct itsd_config_file cf = {.cfg = cfg, .path = path, .err = err, .err_len = err_len};
    const char *slash = strrchr(path, '/');
    if (slash) {
        size_t n = (size_t)(slash - path);
        if (n == 0)
            n = 1; /* "/itsd.conf": the root */
        if (n >= sizeof cf.base_dir) {
            itsd_config_errf(err, err_len, "%s: path too long", path);
            return -1;
        }
        memcpy(cf.base_dir, path, n);
        cf.base_dir[n] = '\0';
    }
    cf.f = fopen(path, "r");
    if (!cf.f) {
        itsd_config_errf(err, err_len, "%s: cannot open: %s", path, strerror(errno));
        return -1;
    }
    int rc = ini_parse_stream(itsd_config_reader, &cf, itsd_config_handler, &cf);
    bool read_error = ferror(cf.f) != 0;
    fclose(cf.f);
    free(cf.line);
    if (read_error) {
        itsd_config_errf(err, err_len, "%s: read error", path);
        cf.n_errors++;
    }
    if (rc > 0) {
        /* a syntax error the reader did not already report */
        bool known = false;
        for (int i = 0; i < cf.n_bad_lines; i++)
            known = known || cf.bad_lines[i] == rc;
        if (!known) {
            itsd_config_errf(err, err_len, "%s:%d: syntax error", path, rc);
            cf.n_errors++;
        }
    } else if (rc < 0) {
        itsd_config_errf(err, err_len, "%s: cannot parse (error %d)", path, rc);
        cf.n_errors++;
    }
    return -cf.n_errors;
}

/* ---- flags --------------------------------------------------------------------------------- */

int itsd_config_set_flag(struct itsd_config *cfg, const char *flag, const char *value,
                         char *err, size_t err_len)
{
    const struct itsd_config_key *k = itsd_config_find_flag(flag);
    if (!k) {
        itsd_config_errf(err, err_len, "--%s: unknown option (itsd --help lists them)", flag);
        return -1;
    }
    char why[512];
    if (itsd_config_store(cfg, k, value, NULL, why, sizeof why) != 0) {
        itsd_config_errf(err, err_len, "--%s: %s", flag, why);
        return -1;
    }
    return 0;
}

/* ---- rules across keys ------------------------------------------------------------------- */

bool itsd_config_endpoint_is_loopback(const char *endpoint)
{
    if (strncmp(endpoint, "ipc://", 6) == 0)
        return true;
    if (strncmp(endpoint, "tcp://", 6) != 0)
        return false;
    const char *host = endpoint + 6;
    const char *semi = strrchr(host, ';'); /* "source;destination" names the far end last */
    if (semi)
        host = semi + 1;
    const char *colon = strrchr(host, ':');
    if (!colon || colon == host)
        return false;
    size_t n = (size_t)(colon - host);
    if (host[0] == '[' && n >= 2 && host[n - 1] == ']') {
        host++;
        n -= 2;
    }
    char h[INET6_ADDRSTRLEN + 8];
    if (n >= sizeof h)
        return false;
    memcpy(h, host, n);
    h[n] = '\0';
    if (strcasecmp(h, "localhost") == 0)
        return true;
    struct in_addr a4;
    if (inet_pton(AF_INET, h, &a4) == 1)
        return ((const uint8_t *)&a4)[0] == 127;
    struct in6_addr a6;
    if (inet_pton(AF_INET6, h, &a6) == 1)
        return IN6_IS_ADDR_LOOPBACK(&a6) || (IN6_IS_ADDR_V4MAPPED(&a6) && a6.s6_addr[12] == 127);
    return false;
}

/* The [security] rules: with curve on, every key file must load now (so that -t catches a
 * typo before a restart does); with it off, plain text stays on loopback unless forced. */
static int itsd_config_check_security(const struct itsd_config *cfg, char *err, size_t err_len)
{
    int bad = 0;
    char why[1200];
    if (!cfg->curve) {
        if (cfg->plaintext_nonloopback == ITSD_PLAINTEXT_FORCE)
            return 0;
        const char *names[] = {"frontend", "backend"};
        const char *eps[] = {cfg->frontend, cfg->backend};
        for (int i = 0; i < 2; i++) {
            if (itsd_config_endpoint_is_loopback(eps[i]))
                continue;
            itsd_config_errf(err, err_len,
                             "[itsd] %s %s: other hosts can reach it, and [security] curve = "
                             "off would carry questions and answers there in plain text; "
                             "turn curve on, or set [security] plaintext_nonloopback = force "
                             "(--plaintext-nonloopback force)",
                             names[i], eps[i]);
            bad--;
        }
        return bad;
    }
    if (!zmq_has("curve")) {
        itsd_config_errf(err, err_len, "[security] curve = on, but this libzmq was built "
                         "without CURVE (libsodium)");
        return -1;
    }
    if (!cfg->secret_key[0]) {
        itsd_config_errf(err, err_len, "[security] secret_key: required when curve = on "
                         "(`itsctl keygen --out PREFIX` writes a key pair to PREFIX.key)");
        bad--;
    } else {
        uint8_t pub[ZAP_KEY_BYTES], sec[ZAP_KEY_BYTES];
        if (keyfile_read(cfg->secret_key, pub, sec, why, sizeof why) != 0) {
            itsd_config_errf(err, err_len, "[security] secret_key: %s", why);
            bad--;
        }
    }
    const char *names[] = {"client_keys", "worker_keys"};
    const char *paths[] = {cfg->client_keys, cfg->worker_keys};
    for (int i = 0; i < 2; i++) {
        if (!paths[i][0]) {
            itsd_config_errf(err, err_len, "[security] %s: required when curve = on (a "
                             "directory of NAME.pub public key files)", names[i]);
            bad--;
            continue;
        }
        struct zap_list *l = NULL;
        if (zap_list_load(paths[i], &l, why, sizeof why) != 0) {
            itsd_config_errf(err, err_len, "[security] %s: %s", names[i], why);
            bad--;
        }
        zap_list_destroy(&l);
    }
    return bad;
}

int itsd_config_check(const struct itsd_config *cfg, char *err, size_t err_len)
{
    int bad = 0;
    if (strcmp(cfg->frontend, cfg->backend) == 0) {
        itsd_config_errf(err, err_len, "frontend and backend are the same endpoint (%s)",
                         cfg->frontend);
        bad--;
    }
    if (cfg->no_worker_grace_ms >= cfg->default_deadline_ms) {
        itsd_config_errf(err, err_len,
                         "no_worker_grace_ms (%u) must be below default_deadline_ms (%u), or "
                         "a missing role would surface as a deadline instead of no_worker",
                         cfg->no_worker_grace_ms, cfg->default_deadline_ms);
        bad--;
    }
    if (cfg->default_deadline_ms > cfg->max_deadline_ms) {
        itsd_config_errf(err, err_len, "default_deadline_ms (%u) is above max_deadline_ms (%u)",
                         cfg->default_deadline_ms, cfg->max_deadline_ms);
        bad--;
    }
    if (cfg->client_heartbeat_ms > 0 && cfg->client_timeout_ms < cfg->client_heartbeat_ms) {
        itsd_config_errf(err, err_len,
                         "client_timeout_ms (%u) is below client_heartbeat_ms (%u)",
                         cfg->client_timeout_ms, cfg->client_heartbeat_ms);
        bad--;
    }
    if ((uint64_t)cfg->heartbeat_ms * cfg->liveness > UINT32_MAX) {
        itsd_config_errf(err, err_len, "heartbeat_ms x liveness overflows");
        bad--;
    }
    uint64_t edits = cfg->feedbacks > 0 ? cfg->edits : 0;
    uint64_t cands = (uint64_t)cfg->drafts * (edits + (cfg->include_drafts || edits == 0));
    if (cands > cfg->max_candidates) {
        itsd_config_errf(err, err_len,
                         "the default pipeline makes %llu candidates, over max_candidates (%u)",
                         (unsigned long long)cands, cfg->max_candidates);
        bad--;
    }
    uint64_t seqs = (uint64_t)cfg->drafts * (1 + (uint64_t)cfg->feedbacks + edits);
    if (seqs > cfg->max_sequences) {
        itsd_config_errf(err, err_len,
                         "the default pipeline generates %llu sequences, over max_sequences "
                         "(%u)",
                         (unsigned long long)seqs, cfg->max_sequences);
        bad--;
    }
    bool all_files = true;
    for (int r = 0; r < PROTO_ROLE_COUNT; r++)
        all_files = all_files && cfg->template_file[r][0];
    if (!cfg->templates[0] && !all_files) {
        itsd_config_errf(err, err_len, "templates is empty and not every role has a template");
        bad--;
    }
    bad += itsd_config_check_security(cfg, err, err_len);
    return bad;
}

/* ---- reload ------------------------------------------------------------------------------ */

/* Appends "[section] key" to the ", "-separated list in buf (truncated quietly when full). */
static void itsd_config_list_add(char *buf, size_t len, const struct itsd_config_key *k)
{
    if (!buf || len == 0)
        return;
    size_t used = strnlen(buf, len - 1);
    snprintf(buf + used, len - used, "%s[%s] %s", used ? ", " : "", k->section, k->name);
}

int itsd_config_apply_reloadable(struct itsd_config *live, const struct itsd_config *next,
                                 char *changed, size_t changed_len, char *restart,
                                 size_t restart_len)
{
    if (changed && changed_len)
        changed[0] = '\0';
    if (restart && restart_len)
        restart[0] = '\0';
    int n = 0;
    for (size_t i = 0; i < ITSD_CONFIG_N_KEYS; i++) {
        const struct itsd_config_key *k = &itsd_config_keys[i];
        /* compared as text: one rule for every kind, and the names the operator wrote */
        char a[ITSD_CONFIG_PATH_MAX + 64], b[ITSD_CONFIG_PATH_MAX + 64];
        itsd_config_format(live, k, a, sizeof a);
        itsd_config_format(next, k, b, sizeof b);
        if (strcmp(a, b) == 0)
            continue;
        if (!k->reload) {
            if (restart && restart_len) {
                size_t used = strnlen(restart, restart_len - 1);
                snprintf(restart + used, restart_len - used,
                         "[%s] %s = %s needs a restart; it stays %s until then\n", k->section,
                         k->name, *b ? b : "\"\"", *a ? a : "\"\"");
            }
            continue;
        }
        /* the field's bytes: the key owns exactly [off, off + size of its kind) */
        size_t size = 0;
        switch (k->kind) {
        case CFG_ENDPOINT:
        case CFG_PATH:
        case CFG_LISTEN:
            size = ITSD_CONFIG_PATH_MAX;
            break;
        case CFG_U32:
            size = sizeof(uint32_t);
            break;
        case CFG_U64:
            size = sizeof(uint64_t);
            break;
        case CFG_F64:
            size = sizeof(double);
            break;
        case CFG_BOOL:
            size = sizeof(bool);
            break;
        case CFG_LOG_LEVEL:
        case CFG_CHOICE:
            size = sizeof(int);
            break;
        }
        memcpy((char *)live + k->off, (const char *)next + k->off, size);
        itsd_config_list_add(changed, changed_len, k);
        n++;
    }
    return n;
}

/* ---- the command line ----------------------------------------------------------------------- */

int itsd_config_from_args(int argc, char **argv, struct itsd_config *cfg,
                          struct itsd_args *args, char *err, size_t err_len)
{
    memset(args, 0, sizeof *args);
    if (err && err_len)
        err[0] = '\0';
    int bad = itsd_config_defaults(cfg, err, err_len);
    if (bad)
        return bad;
    /* first pass: the file and the verbs; the file must be applied before any flag */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-t") == 0) {
            args->check_only = true;
        } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            args->help = true;
        } else if (strcmp(a, "--print-config") == 0) {
            args->print_config = true;
        } else if (strcmp(a, "--print-docs") == 0) {
            args->print_docs = true;
        } else if (strcmp(a, "--config") == 0 || strcmp(a, "-c") == 0) {
            if (i + 1 >= argc) {
                itsd_config_errf(err, err_len, "%s: needs a file", a);
                bad--;
            } else {
                args->config_path = argv[++i];
            }
        } else if (strncmp(a, "--config=", 9) == 0) {
            args->config_path = a + 9;
        } else if (strncmp(a, "--", 2) == 0 && !strchr(a, '=')) {
            i++; /* `--flag VALUE`: the value is never a verb */
        }
    }
    if (args->help)
        return bad;
    if (args->config_path)
        bad += itsd_config_load_file(cfg, args->config_path, err, err_len);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-t") == 0 || strcmp(a, "--print-config") == 0 ||
            strcmp(a, "--print-docs") == 0) {
            continue;
        }
        if (strcmp(a, "--config") == 0 || strcmp(a, "-c") == 0) {
            i++;
            continue;
        }
        if (strncmp(a, "--config=", 9) == 0)
            continue;
        if (strncmp(a, "--", 2) != 0 || a[2] == '\0') {
            itsd_config_errf(err, err_len, "%s: unexpected argument (itsd --help)", a);
            bad--;
            continue;
        }
        char flag[128];
        const char *value;
        const char *eq = strchr(a, '=');
        if (eq) {
            size_t n = (size_t)(eq - a - 2);
            if (n >= sizeof flag)
                n = sizeof flag - 1;
            memcpy(flag, a + 2, n);
            flag[n] = '\0';
            value = eq + 1;
        } else {
            snprintf(flag, sizeof flag, "%s", a + 2);
            if (!itsd_config_find_flag(flag)) {
                itsd_config_errf(err, err_len, "%s: unknown option (itsd --help lists them)", a);
                bad--;
                if (i + 1 < argc && strncmp(argv[i + 1], "--", 2) != 0)
                    i++; /* its value, most likely */
                continue;
            }
            if (i + 1 >= argc) {
                itsd_config_errf(err, err_len, "%s: needs a value", a);
                bad--;
                continue;
            }
            value = argv[++i];
        }
        if (itsd_config_set_flag(cfg, flag, value, err, err_len) != 0)
            bad--;
    }
    if (bad == 0)
        bad += itsd_config_check(cfg, err, err_len);
    return bad;
}

/* ---- documentation ------------------------------------------------------------------------ */

/* Writes `text` as '#' comment lines wrapped before 96 columns. */
static int itsd_config_write_comment(FILE *out, const char *text)
{
    const char *p = text;
    while (*p) {
        size_t n = strlen(p);
        if (n > 94) {
            n = 94;
            while (n > 0 && p[n] != ' ')
                n--;
            if (n == 0)
                n = 94;
        }
        if (fprintf(out, "# %.*s\n", (int)n, p) < 0)
            return -1;
        p += n;
        while (*p == ' ')
            p++;
    }
    return 0;
}

int itsd_config_write_ini(const struct itsd_config *cfg, FILE *out)
{
    for (size_t s = 0; s < ITSD_CONFIG_N_SECTIONS; s++) {
        if (fprintf(out, "%s[%s]\n", s ? "\n" : "", itsd_config_sections[s]) < 0)
            return -1;
        for (size_t i = 0; i < ITSD_CONFIG_N_KEYS; i++) {
            const struct itsd_config_key *k = &itsd_config_keys[i];
            if (strcmp(k->section, itsd_config_sections[s]) != 0)
                continue;
            char v[ITSD_CONFIG_PATH_MAX + 64];
            itsd_config_format(cfg, k, v, sizeof v);
            if (itsd_config_write_comment(out, k->doc) != 0 ||
                fprintf(out, "%s = %s\n", k->name, v) < 0)
                return -1;
        }
    }
    return fflush(out) == 0 ? 0 : -1;
}

int itsd_config_write_docs(FILE *out)
{
    for (size_t s = 0; s < ITSD_CONFIG_N_SECTIONS; s++) {
        if (fprintf(out, "%s### [%s]\n\n| key | flag | default | reload | meaning |\n| --- | --- "
                    "| --- | --- | --- |\n",
                    s ? "\n" : "", itsd_config_sections[s]) < 0)
            return -1;
        for (size_t i = 0; i < ITSD_CONFIG_N_KEYS; i++) {
            const struct itsd_config_key *k = &itsd_config_keys[i];
            if (strcmp(k->section, itsd_config_sections[s]) != 0)
                continue;
            if (fprintf(out, "| `%s` | `--%s` | `%s` | %s | %s |\n", k->name, k->flag,
                        *k->def ? k->def : "\"\"", k->reload ? "live" : "restart", k->doc) < 0)
                return -1;
        }
    }
    return fflush(out) == 0 ? 0 : -1;
}

int itsd_config_write_usage(FILE *out)
{
    if (fputs("usage: itsd [--config FILE] [--frontend EP] [--backend EP] [-t] [--OPTION VALUE]"
              "...\n"
              "\n"
              "The Feedback-Edit orchestrator daemon (foreground). Configuration comes from the\n"
              "defaults, then --config FILE (INI), then the flags in order.\n"
              "\n"
              "  -c, --config FILE   read this INI file first\n"
              "  -t                  check the configuration and the templates, print every\n"
              "                      problem, exit 0 (good) or 1 (bad)\n"
              "  --print-config      print the effective configuration as INI and exit\n"
              "  --print-docs        print the option reference (Markdown) and exit\n"
              "  -h, --help          this text\n"
              "\n"
              "Options (also --OPTION=VALUE; in the file: [section] key = value):\n",
              out) < 0)
        return -1;
    for (size_t i = 0; i < ITSD_CONFIG_N_KEYS; i++) {
        const struct itsd_config_key *k = &itsd_config_keys[i];
        char left[96];
        snprintf(left, sizeof left, "--%s", k->flag);
        if (fprintf(out, "  %-26s [%s] %s (default %s)\n", left, k->section, k->name,
                    *k->def ? k->def : "\"\"") < 0)
            return -1;
    }
    return fflush(out) == 0 ? 0 : -1;
}
