/* itsctl.c — the command-line client of itsd: submit a question and print the chosen answer
 * (or the whole result as JSON), show the cluster's status and workers, fetch or cancel a
 * request. Everything goes through libits (its.h); JSON through jansson.
 *
 * Owns: the process's command line, stdin/stdout/stderr and exit status. Output contract
 * (docs/client.md, `itsctl --help`): results on stdout; errors as ONE line on stderr naming the
 * problem, with a documented non-zero exit status; progress on stderr only when stderr is a
 * terminal.
 *
 * Must never: print anything but the result on stdout (scripts parse it), block forever
 * waiting for a daemon that never answered, or leave a request running on itsd when the user
 * interrupts it with Ctrl-C.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "its.h"

/* Exit statuses: stable, documented in the usage text and docs/client.md. */
enum itsctl_exit {
    ITSCTL_EXIT_OK = 0,
    ITSCTL_EXIT_USAGE = 1,       /* bad command line or input file */
    ITSCTL_EXIT_DAEMON = 2,      /* itsd answered with an error */
    ITSCTL_EXIT_TIMEOUT = 3,     /* no reply in time: itsd down, unreachable or stuck */
    ITSCTL_EXIT_PARTIAL = 4,     /* a result came, but the deadline cut it short */
    ITSCTL_EXIT_FAILURE = 5,     /* malformed reply, socket failure, out of memory, stdout */
    ITSCTL_EXIT_AUTH = 6,        /* itsd refused our CURVE key, or a curve on/off mismatch */
    ITSCTL_EXIT_INTERRUPTED = 130,
};

#define ITSCTL_DEFAULT_TIMEOUT_MS 5000 /* status, workers, get, cancel */
#define ITSCTL_ACCEPT_TIMEOUT_MS 10000 /* submit: itsd must at least accept within this */
#define ITSCTL_TICK_MS 200             /* progress redraw and Ctrl-C check interval */
#define ITSCTL_MAX_TIMEOUT_S 86400.0   /* the protocol's longest deadline */
#define ITSCTL_MAX_STDIN_BYTES (16u << 20) /* a question larger than a protocol message */

static const char itsctl_usage_text[] =
    "usage: itsctl [--endpoint EP] [--server-key FILE --key FILE] COMMAND [OPTIONS]\n"
    "\n"
    "Talks to itsd, the Feedback-Edit inference-time-scaling daemon.\n"
    "EP is a ZeroMQ endpoint; default $ITS_ENDPOINT, else " ITS_DEFAULT_ENDPOINT ".\n"
    "With itsd's [security] curve = on, give itsd's public key (--server-key, default\n"
    "$ITS_SERVER_KEY) and this client's key pair (--key, default $ITS_KEY): the connection\n"
    "is then encrypted, and itsd admits it only if the public key is in its client_keys.\n"
    "\n"
    "commands:\n"
    "  submit [QUESTION]     ask a question (read from stdin when QUESTION is absent) and\n"
    "                        print the chosen answer\n"
    "      --messages FILE   a JSON array of {\"role\": system|user|assistant, \"content\": ...}\n"
    "                        instead of QUESTION (\"-\" reads stdin)\n"
    "      --drafts N  --feedbacks N  --edits N  --feedbacks-per-edit N\n"
    "                        override itsd's pipeline defaults\n"
    "      --include-drafts  unedited drafts also compete in selection\n"
    "      --max-tokens SPEC --temperature SPEC --top-p SPEC\n"
    "                        per-stage sampling: SPEC is one value for all three generating\n"
    "                        stages, or STAGE=VALUE[,STAGE=VALUE...] with STAGE instruct,\n"
    "                        feedback or edit (e.g. --max-tokens instruct=256,feedback=128)\n"
    "      --seed N          make the request reproducible\n"
    "      --timeout SECONDS itsd's deadline for the request, and how long itsctl waits\n"
    "                        (plus a short grace for the partial result); without it itsctl\n"
    "                        waits for itsd's own deadline but gives up when itsd has not\n"
    "                        accepted the request within 10 s\n"
    "      --json            print the whole result as one JSON object\n"
    "  status [--json]       workers per role, queue depth, requests in flight, and itsd's\n"
    "                        counters: requests by outcome, latency, jobs, tokens, errors\n"
    "  workers [--json]      one line per worker: id role model backend state load capacity\n"
    "      --watch SECONDS   (status, workers) print again every SECONDS until Ctrl-C\n"
    "  get ID [--json]       a finished request's result, or a running one's progress\n"
    "  cancel ID             cancel a request\n"
    "  keygen [--out PREFIX] write a new CURVE key pair to PREFIX.key (mode 0600) and its\n"
    "                        public key to PREFIX.pub (0644); default PREFIX \"its\"; never\n"
    "                        overwrites; prints the public key\n"
    "  status, workers, get and cancel take --timeout SECONDS too (default 5).\n"
    "\n"
    "Progress is shown on stderr when it is a terminal. Ctrl-C during submit cancels the\n"
    "request on itsd.\n"
    "\n"
    "exit status:\n"
    "  0  success\n"
    "  1  usage: bad command line, options or input file\n"
    "  2  itsd answered with an error (busy, not_found, no_worker, deadline, ...)\n"
    "  3  timeout: no reply in time (itsd not running, unreachable or overloaded)\n"
    "  4  partial result: the deadline cut the work short (the answer is still printed)\n"
    "  5  other failure: malformed reply, socket error, out of memory, cannot write output\n"
    "  6  security: itsd refused this client's key, or curve is on at one end only\n"
    "  130 interrupted (Ctrl-C); a submitted request is cancelled first\n";

static volatile sig_atomic_t itsctl_interrupted;
static bool itsctl_curve; /* keys were given: hints in timeout messages */

static void itsctl_on_sigint(int sig)
{
    (void)sig;
    itsctl_interrupted = 1;
}

/* Prints "itsctl: MESSAGE" as exactly one line on stderr: newlines inside a daemon's message
 * become spaces, so that scripts can rely on one line per error. */
__attribute__((format(printf, 1, 2))) static void itsctl_error(const char *fmt, ...)
{
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    for (char *p = buf; *p; p++)
        if (*p == '\n' || *p == '\r')
            *p = ' ';
    fprintf(stderr, "itsctl: %s\n", buf);
}

static int itsctl_exit_for(int rc)
{
    switch (rc) {
    case ITS_OK: return ITSCTL_EXIT_OK;
    case ITS_ERR_INVALID: return ITSCTL_EXIT_USAGE;
    case ITS_ERR_DAEMON: return ITSCTL_EXIT_DAEMON;
    case ITS_ERR_TIMEOUT: return ITSCTL_EXIT_TIMEOUT;
    case ITS_ERR_AUTH: return ITSCTL_EXIT_AUTH;
    default: return ITSCTL_EXIT_FAILURE;
    }
}

/* Reports the handle's last error and returns the matching exit status. */
static int itsctl_fail(its_client_t *c, int rc)
{
    itsctl_error("%s", its_client_errstr(c));
    return itsctl_exit_for(rc);
}

static int64_t itsctl_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Everything went to stdout? A closed pipe or a full disk is a failure, not a success. */
static int itsctl_finish_stdout(int status)
{
    if (fflush(stdout) != 0 || ferror(stdout)) {
        itsctl_error("cannot write to stdout: %s", strerror(errno));
        return ITSCTL_EXIT_FAILURE;
    }
    return status;
}

/* ---- parsing -------------------------------------------------------------------------------- */

static int itsctl_parse_u32(const char *flag, const char *s, uint32_t *out)
{
    char *end;
    errno = 0;
    if (!s || !*s || *s == '-' || *s == '+' || *s == ' ')
        goto bad;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end || v > UINT32_MAX)
        goto bad;
    *out = (uint32_t)v;
    return 0;
bad:
    itsctl_error("%s: '%s' is not a whole number (0..%" PRIu32 ")", flag, s ? s : "",
                 UINT32_MAX);
    return -1;
}

static int itsctl_parse_u64(const char *flag, const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    if (!s || !*s || *s == '-' || *s == '+' || *s == ' ')
        goto bad;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end)
        goto bad;
    *out = v;
    return 0;
bad:
    itsctl_error("%s: '%s' is not a whole number (0..%" PRIu64 ")", flag, s ? s : "",
                 UINT64_MAX);
    return -1;
}

/* Seconds (a decimal, > 0, at most a day) to milliseconds. */
static int itsctl_parse_seconds(const char *flag, const char *s, int *ms)
{
    char *end;
    errno = 0;
    double v = s && *s ? strtod(s, &end) : NAN;
    if (!s || !*s || errno || *end || !isfinite(v) || v <= 0 || v > ITSCTL_MAX_TIMEOUT_S) {
        itsctl_error("%s: '%s' is not a number of seconds in (0, %.0f]", flag, s ? s : "",
                     ITSCTL_MAX_TIMEOUT_S);
        return -1;
    }
    double m = ceil(v * 1000.0);
    *ms = m < 1 ? 1 : (int)m;
    return 0;
}

enum itsctl_sampling_key { ITSCTL_MAX_TOKENS, ITSCTL_TEMPERATURE, ITSCTL_TOP_P };

/* Sets `key` in one stage's overrides from text; ranges are libits' to check. */
static int itsctl_set_sampling(const char *flag, enum itsctl_sampling_key key, const char *v,
                               struct its_sampling_options *so)
{
    if (key == ITSCTL_MAX_TOKENS) {
        if (itsctl_parse_u32(flag, v, &so->max_tokens) != 0)
            return -1;
        so->has_max_tokens = true;
        return 0;
    }
    char *end;
    errno = 0;
    double d = *v ? strtod(v, &end) : NAN;
    if (!*v || errno || *end || !isfinite(d)) {
        itsctl_error("%s: '%s' is not a number", flag, v);
        return -1;
    }
    if (key == ITSCTL_TEMPERATURE) {
        so->temperature = d;
        so->has_temperature = true;
    } else {
        so->top_p = d;
        so->has_top_p = true;
    }
    return 0;
}

/* Parses a per-stage SPEC: "VALUE" (all three generating stages) or
 * "STAGE=VALUE[,STAGE=VALUE...]" with STAGE instruct, feedback or edit. */
static int itsctl_parse_sampling(const char *flag, enum itsctl_sampling_key key,
                                 const char *spec, struct its_options *o)
{
    struct its_sampling_options *stages[] = {&o->instruct, &o->feedback, &o->edit};
    static const char *const names[] = {"instruct", "feedback", "edit"};
    if (!strchr(spec, '=')) {
        for (int i = 0; i < 3; i++)
            if (itsctl_set_sampling(flag, key, spec, stages[i]) != 0)
                return -1;
        return 0;
    }
    char *copy = strdup(spec);
    if (!copy) {
        itsctl_error("%s: out of memory", flag);
        return -1;
    }
    int rc = 0;
    char *save = NULL;
    for (char *item = strtok_r(copy, ",", &save); item && rc == 0;
         item = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(item, '=');
        int stage = -1;
        if (eq) {
            *eq = '\0';
            for (int i = 0; i < 3; i++)
                if (strcmp(item, names[i]) == 0)
                    stage = i;
        }
        if (stage < 0) {
            itsctl_error("%s: '%s' is not STAGE=VALUE with STAGE instruct, feedback or edit",
                         flag, spec);
            rc = -1;
        } else {
            rc = itsctl_set_sampling(flag, key, eq + 1, stages[stage]);
        }
    }
    free(copy);
    return rc;
}

/* Reports getopt's complaint about argv[optind - 1] and returns the usage status. */
static int itsctl_bad_option(const char *cmd, int c, char **argv, int optind_now)
{
    const char *arg = optind_now > 0 ? argv[optind_now - 1] : "?";
    if (c == ':')
        itsctl_error("%s: option '%s' needs a value", cmd, arg);
    else
        itsctl_error("%s: unknown option '%s' (see itsctl --help)", cmd, arg);
    return ITSCTL_EXIT_USAGE;
}

/* Reads all of `f` into a NUL-terminated heap buffer; NULL with errno set on failure (EFBIG
 * past ITSCTL_MAX_STDIN_BYTES: nothing that large could be sent anyway). */
static char *itsctl_read_all(FILE *f, size_t *len_out)
{
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    if (!buf)
        return NULL;
    for (;;) {
        if (len > ITSCTL_MAX_STDIN_BYTES) {
            free(buf);
            errno = EFBIG;
            return NULL;
        }
        if (len + 1 >= cap) {
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                return NULL;
            }
            buf = nb;
            cap *= 2;
        }
        size_t got = fread(buf + len, 1, cap - len - 1, f);
        len += got;
        if (got == 0)
            break;
    }
    if (ferror(f)) {
        free(buf);
        return NULL;
    }
    buf[len] = '\0';
    *len_out = len;
    return buf;
}

/* Loads a JSON array of {role, content} from `path` ("-" = stdin). The message contents point
 * into *doc, which the caller releases with json_decref after use. Returns 0 or -1 (reported). */
static int itsctl_load_messages(const char *path, json_t **doc, struct its_message **out,
                                size_t *n_out)
{
    *doc = NULL;
    *out = NULL;
    *n_out = 0;
    json_error_t je;
    bool is_stdin = strcmp(path, "-") == 0;
    const char *name = is_stdin ? "<stdin>" : path;
    json_t *j = is_stdin ? json_loadf(stdin, JSON_REJECT_DUPLICATES, &je)
                         : json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!j) {
        if (je.line > 0)
            itsctl_error("%s:%d: %s", name, je.line, je.text);
        else
            itsctl_error("%s: %s", name, je.text);
        return -1;
    }
    if (!json_is_array(j) || json_array_size(j) == 0) {
        itsctl_error("%s: expected a non-empty JSON array of {\"role\", \"content\"} objects",
                     name);
        json_decref(j);
        return -1;
    }
    size_t n = json_array_size(j);
    struct its_message *m = calloc(n, sizeof *m);
    if (!m) {
        itsctl_error("%s: out of memory for %zu messages", name, n);
        json_decref(j);
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_array_get(j, i);
        json_t *role = json_object_get(e, "role"), *content = json_object_get(e, "content");
        const char *why = NULL;
        if (!json_is_object(e))
            why = "is not an object";
        else if (json_object_size(e) != 2 || !role || !content)
            why = "must have exactly the keys \"role\" and \"content\"";
        else if (!json_is_string(role) ||
                 its_chat_role_from_name(json_string_value(role), &m[i].role) != 0)
            why = "role: expected \"system\", \"user\" or \"assistant\"";
        else if (!json_is_string(content))
            why = "content: expected a string";
        else if (strlen(json_string_value(content)) != json_string_length(content))
            why = "content: contains a NUL character";
        if (why) {
            /* "role: ..." reads best as "[2].role: ..."; whole-entry problems as "[2] ...". */
            itsctl_error("%s: [%zu]%s%s", name, i, strncmp(why, "role", 4) == 0 ||
                         strncmp(why, "content", 7) == 0 ? "." : " ", why);
            free(m);
            json_decref(j);
            return -1;
        }
        m[i].content = json_string_value(content);
    }
    *doc = j;
    *out = m;
    *n_out = n;
    return 0;
}

/* ---- JSON renderings ------------------------------------------------------------------------ */

/* json_object_set_new that remembers a failure (jansson returns -1 on allocation failure). */
static void itsctl_set(json_t *obj, const char *key, json_t *val, bool *ok)
{
    if (!val || json_object_set_new(obj, key, val) != 0)
        *ok = false;
}

static json_t *itsctl_uint(uint64_t v)
{
    return json_integer(v > (uint64_t)INT64_MAX ? INT64_MAX : (json_int_t)v);
}

static json_t *itsctl_result_json(const struct its_result *r)
{
    static const char *const stage_keys[] = {"drafts_ms", "feedbacks_ms", "edits_ms",
                                             "scores_ms", "total_ms"};
    bool ok = true;
    json_t *o = json_object();
    if (!o)
        return NULL;
    itsctl_set(o, "id", json_string(r->id), &ok);
    itsctl_set(o, "answer", json_string(r->answer ? r->answer : ""), &ok);
    itsctl_set(o, "score", r->has_score ? json_real(r->score) : json_null(), &ok);
    itsctl_set(o, "best", r->has_best ? itsctl_uint(r->best) : json_null(), &ok);
    itsctl_set(o, "partial", json_boolean(r->partial), &ok);
    json_t *cands = json_array();
    for (size_t i = 0; cands && ok && i < r->n_candidates; i++) {
        const struct its_candidate *c = &r->candidates[i];
        json_t *co = json_object(), *fb = json_array();
        for (size_t k = 0; fb && k < c->n_feedbacks; k++)
            if (json_array_append_new(fb, json_string(c->feedbacks[k])) != 0)
                ok = false;
        if (!co) {
            json_decref(fb);
            ok = false;
            break;
        }
        itsctl_set(co, "draft_index", itsctl_uint(c->draft_index), &ok);
        itsctl_set(co, "draft", json_string(c->draft ? c->draft : ""), &ok);
        itsctl_set(co, "feedbacks", fb, &ok);
        itsctl_set(co, "edit", c->edit ? json_string(c->edit) : json_null(), &ok);
        itsctl_set(co, "score", c->has_score ? json_real(c->score) : json_null(), &ok);
        if (json_array_append_new(cands, co) != 0)
            ok = false;
    }
    itsctl_set(o, "candidates", cands, &ok);
    json_t *t = json_object();
    const uint64_t stage_ms[] = {r->timings.drafts_ms, r->timings.feedbacks_ms,
                                 r->timings.edits_ms, r->timings.scores_ms, r->timings.total_ms};
    for (size_t i = 0; t && i < sizeof stage_ms / sizeof *stage_ms; i++)
        itsctl_set(t, stage_keys[i], itsctl_uint(stage_ms[i]), &ok);
    itsctl_set(o, "timings", t, &ok);
    json_t *u = json_object();
    for (int role = 0; u && role < ITS_ROLE_COUNT; role++) {
        json_t *ru = json_object();
        if (ru) {
            itsctl_set(ru, "prompt_tokens", itsctl_uint(r->usage[role].prompt_tokens), &ok);
            itsctl_set(ru, "completion_tokens", itsctl_uint(r->usage[role].completion_tokens),
                       &ok);
        }
        itsctl_set(u, its_role_name((enum its_role)role), ru, &ok);
    }
    itsctl_set(o, "usage", u, &ok);
    if (!ok) {
        json_decref(o);
        return NULL;
    }
    return o;
}

static json_t *itsctl_stage_json(const struct its_stage *s)
{
    return json_pack("{s:I, s:I}", "done", (json_int_t)s->done, "total", (json_int_t)s->total);
}

static json_t *itsctl_progress_json(const struct its_progress *p)
{
    bool ok = true;
    json_t *o = json_object();
    if (!o)
        return NULL;
    itsctl_set(o, "drafts", itsctl_stage_json(&p->drafts), &ok);
    itsctl_set(o, "feedbacks", itsctl_stage_json(&p->feedbacks), &ok);
    itsctl_set(o, "edits", itsctl_stage_json(&p->edits), &ok);
    itsctl_set(o, "scores", itsctl_stage_json(&p->scores), &ok);
    itsctl_set(o, "elapsed_ms", itsctl_uint(p->elapsed_ms), &ok);
    if (!ok) {
        json_decref(o);
        return NULL;
    }
    return o;
}

static json_t *itsctl_workers_json(const struct its_status *s)
{
    bool ok = true;
    json_t *a = json_array();
    for (size_t i = 0; a && ok && i < s->n_workers; i++) {
        const struct its_worker *w = &s->workers[i];
        json_t *o = json_object();
        if (!o || json_array_append_new(a, o) != 0) {
            ok = false;
            break;
        }
        itsctl_set(o, "id", json_string(w->id), &ok);
        itsctl_set(o, "role", json_string(its_role_name(w->role)), &ok);
        itsctl_set(o, "model", json_string(w->model), &ok);
        itsctl_set(o, "backend", json_string(w->backend), &ok);
        itsctl_set(o, "state", json_string(its_worker_state_name(w->state)), &ok);
        itsctl_set(o, "capacity",
                   json_pack("{s:I, s:I, s:I}", "max_seqs", (json_int_t)w->max_seqs, "max_ctx",
                             (json_int_t)w->max_ctx, "kv_tokens", (json_int_t)w->kv_tokens),
                   &ok);
        itsctl_set(o, "jobs", itsctl_uint(w->jobs), &ok);
        itsctl_set(o, "load",
                   w->has_load ? json_pack("{s:I, s:I, s:I}", "running", (json_int_t)w->running,
                                           "queued", (json_int_t)w->queued, "kv_used",
                                           (json_int_t)w->kv_used)
                               : json_null(),
                   &ok);
    }
    if (!ok) {
        json_decref(a);
        return NULL;
    }
    return a;
}

/* Prints `j` (consumed) as one line of JSON on stdout. */
static int itsctl_print_json(json_t *j)
{
    if (!j) {
        itsctl_error("out of memory building the JSON output");
        return ITSCTL_EXIT_FAILURE;
    }
    int rc = json_dumpf(j, stdout, JSON_COMPACT | JSON_ENSURE_ASCII | JSON_REAL_PRECISION(17));
    json_decref(j);
    if (rc != 0 || putchar('\n') == EOF)
        return itsctl_finish_stdout(ITSCTL_EXIT_FAILURE);
    return itsctl_finish_stdout(ITSCTL_EXIT_OK);
}

/* Prints a finished result: the answer, or with --json the whole object. */
static int itsctl_print_result(const struct its_result *r, bool json)
{
    int status;
    if (json) {
        status = itsctl_print_json(itsctl_result_json(r));
    } else {
        fputs(r->answer ? r->answer : "", stdout);
        putchar('\n');
        status = itsctl_finish_stdout(ITSCTL_EXIT_OK);
    }
    if (status == ITSCTL_EXIT_OK && r->partial) {
        itsctl_error("request %s: partial result (the deadline cut the work short)", r->id);
        status = ITSCTL_EXIT_PARTIAL;
    }
    return status;
}

static void itsctl_progress_text(const struct its_progress *p, char *buf, size_t len)
{
    snprintf(buf, len,
             "drafts %" PRIu32 "/%" PRIu32 ", feedbacks %" PRIu32 "/%" PRIu32 ", edits %" PRIu32
             "/%" PRIu32 ", scores %" PRIu32 "/%" PRIu32,
             p->drafts.done, p->drafts.total, p->feedbacks.done, p->feedbacks.total,
             p->edits.done, p->edits.total, p->scores.done, p->scores.total);
}

/* ---- submit --------------------------------------------------------------------------------- */

struct itsctl_progress_line {
    bool enabled;  /* stderr is a terminal */
    bool drawn;    /* something is on the line */
    int64_t start_ms;
    bool have;     /* a progress event has come */
    struct its_progress last;
};

static void itsctl_progress_draw(struct itsctl_progress_line *pl, bool accepted, const char *ep)
{
    if (!pl->enabled)
        return;
    double secs = (double)(itsctl_now_ms() - pl->start_ms) / 1000.0;
    char text[256];
    if (pl->have)
        itsctl_progress_text(&pl->last, text, sizeof text);
    else if (accepted)
        snprintf(text, sizeof text, "accepted, waiting for the first draft");
    else
        snprintf(text, sizeof text, "waiting for itsd at %s", ep);
    fprintf(stderr, "\r\033[K[%6.1fs] %s", secs, text);
    fflush(stderr);
    pl->drawn = true;
}

static void itsctl_progress_clear(struct itsctl_progress_line *pl)
{
    if (pl->drawn) {
        fputs("\r\033[K", stderr);
        fflush(stderr);
        pl->drawn = false;
    }
}

/* Drops trailing newlines from a question read from stdin ("echo q | itsctl submit"). */
static void itsctl_chomp(char *s, size_t *len)
{
    while (*len > 0 && (s[*len - 1] == '\n' || s[*len - 1] == '\r'))
        s[--*len] = '\0';
}

static int itsctl_cmd_submit(its_client_t *c, int argc, char **argv)
{
    enum { OPT_DRAFTS = 256, OPT_FEEDBACKS, OPT_EDITS, OPT_FPE, OPT_INCLUDE, OPT_SEED,
           OPT_TIMEOUT, OPT_JSON, OPT_MESSAGES, OPT_MAX_TOKENS, OPT_TEMPERATURE, OPT_TOP_P };
    static const struct option longopts[] = {
        {"drafts", required_argument, NULL, OPT_DRAFTS},
        {"feedbacks", required_argument, NULL, OPT_FEEDBACKS},
        {"edits", required_argument, NULL, OPT_EDITS},
        {"feedbacks-per-edit", required_argument, NULL, OPT_FPE},
        {"include-drafts", no_argument, NULL, OPT_INCLUDE},
        {"seed", required_argument, NULL, OPT_SEED},
        {"timeout", required_argument, NULL, OPT_TIMEOUT},
        {"json", no_argument, NULL, OPT_JSON},
        {"messages", required_argument, NULL, OPT_MESSAGES},
        {"max-tokens", required_argument, NULL, OPT_MAX_TOKENS},
        {"temperature", required_argument, NULL, OPT_TEMPERATURE},
        {"top-p", required_argument, NULL, OPT_TOP_P},
        {NULL, 0, NULL, 0},
    };
    struct its_options o = {0};
    bool json = false;
    int timeout_ms = -1;
    const char *messages_path = NULL;
    int opt;
    while ((opt = getopt_long(argc, argv, ":", longopts, NULL)) != -1) {
        int bad = 0;
        switch (opt) {
        case OPT_DRAFTS:
            bad = itsctl_parse_u32("--drafts", optarg, &o.drafts);
            o.has_drafts = true;
            break;
        case OPT_FEEDBACKS:
            bad = itsctl_parse_u32("--feedbacks", optarg, &o.feedbacks);
            o.has_feedbacks = true;
            break;
        case OPT_EDITS:
            bad = itsctl_parse_u32("--edits", optarg, &o.edits);
            o.has_edits = true;
            break;
        case OPT_FPE:
            bad = itsctl_parse_u32("--feedbacks-per-edit", optarg, &o.feedbacks_per_edit);
            o.has_feedbacks_per_edit = true;
            break;
        case OPT_INCLUDE:
            o.include_drafts = o.has_include_drafts = true;
            break;
        case OPT_SEED:
            bad = itsctl_parse_u64("--seed", optarg, &o.seed);
            o.has_seed = true;
            break;
        case OPT_TIMEOUT: bad = itsctl_parse_seconds("--timeout", optarg, &timeout_ms); break;
        case OPT_JSON: json = true; break;
        case OPT_MESSAGES: messages_path = optarg; break;
        case OPT_MAX_TOKENS:
            bad = itsctl_parse_sampling("--max-tokens", ITSCTL_MAX_TOKENS, optarg, &o);
            break;
        case OPT_TEMPERATURE:
            bad = itsctl_parse_sampling("--temperature", ITSCTL_TEMPERATURE, optarg, &o);
            break;
        case OPT_TOP_P: bad = itsctl_parse_sampling("--top-p", ITSCTL_TOP_P, optarg, &o); break;
        default: return itsctl_bad_option("submit", opt, argv, optind);
        }
        if (bad)
            return ITSCTL_EXIT_USAGE;
    }
    if (argc - optind > 1) {
        itsctl_error("submit: one QUESTION at most (quote it); got %d arguments", argc - optind);
        return ITSCTL_EXIT_USAGE;
    }
    const char *question = optind < argc ? argv[optind] : NULL;
    if (question && messages_path) {
        itsctl_error("submit: give either QUESTION or --messages, not both");
        return ITSCTL_EXIT_USAGE;
    }

    /* The conversation. */
    json_t *doc = NULL;
    struct its_message *msgs = NULL, single = {ITS_CHAT_USER, NULL};
    size_t n_msgs = 0;
    char *stdin_text = NULL;
    if (messages_path) {
        if (itsctl_load_messages(messages_path, &doc, &msgs, &n_msgs) != 0)
            return ITSCTL_EXIT_USAGE;
    } else {
        if (!question) {
            size_t len = 0;
            if (isatty(STDIN_FILENO) == 1)
                fputs("itsctl: reading the question from stdin (end it with Ctrl-D)\n", stderr);
            stdin_text = itsctl_read_all(stdin, &len);
            if (!stdin_text) {
                itsctl_error("submit: cannot read the question from stdin: %s",
                             strerror(errno));
                return ITSCTL_EXIT_USAGE;
            }
            itsctl_chomp(stdin_text, &len);
            if (strlen(stdin_text) != len) {
                itsctl_error("submit: the question on stdin contains a NUL byte");
                free(stdin_text);
                return ITSCTL_EXIT_USAGE;
            }
            question = stdin_text;
        }
        if (!*question) {
            itsctl_error("submit: the question is empty");
            free(stdin_text);
            return ITSCTL_EXIT_USAGE;
        }
        single.content = question;
        msgs = &single;
        n_msgs = 1;
    }

    /* Deadline and waiting: itsd answers at its deadline with what it has, so itsctl waits a
     * little longer than the deadline for that partial result to travel back. */
    int64_t result_wait_ms = -1;
    if (timeout_ms > 0) {
        o.deadline_ms = (uint32_t)timeout_ms;
        o.has_deadline_ms = true;
        int64_t grace = timeout_ms / 10;
        grace = grace < 1000 ? 1000 : grace > 5000 ? 5000 : grace;
        result_wait_ms = timeout_ms + grace;
    }
    int64_t accept_wait_ms = ITSCTL_ACCEPT_TIMEOUT_MS;
    if (result_wait_ms >= 0 && result_wait_ms < accept_wait_ms)
        accept_wait_ms = result_wait_ms;

    struct itsctl_progress_line pl = {.enabled = isatty(STDERR_FILENO) == 1};
    o.progress = pl.enabled;
    pl.start_ms = itsctl_now_ms();

    struct sigaction sa = {.sa_handler = itsctl_on_sigint}, old_sa;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old_sa); /* no SA_RESTART: the wait returns to look at the flag */

    uint64_t tag = 0;
    int rc = its_submit_async(c, msgs, n_msgs, &o, &tag);
    if (msgs != &single)
        free(msgs);
    int status = ITSCTL_EXIT_FAILURE;
    if (rc < 0) {
        status = itsctl_fail(c, rc);
        goto out;
    }
    char id[ITS_ID_MAX + 1] = "";
    for (;;) {
        if (itsctl_interrupted) {
            itsctl_progress_clear(&pl);
            if (id[0] && its_cancel(c, id, 2000) == 0)
                itsctl_error("interrupted: request %s cancelled", id);
            else if (id[0])
                itsctl_error("interrupted: cancelling request %s: %s", id,
                             its_client_errstr(c));
            else
                itsctl_error("interrupted before itsd accepted the request");
            status = ITSCTL_EXIT_INTERRUPTED;
            goto out;
        }
        int64_t elapsed = itsctl_now_ms() - pl.start_ms;
        if (!id[0] && elapsed >= accept_wait_ms) {
            itsctl_progress_clear(&pl);
            itsctl_error("no reply from %s within %" PRId64 " ms (is itsd running?%s)",
                         its_client_endpoint(c), accept_wait_ms,
                         itsctl_curve ? " with CURVE, authentication may have failed: check "
                                        "that --server-key is itsd's public key"
                                      : "");
            status = ITSCTL_EXIT_TIMEOUT;
            goto out;
        }
        if (result_wait_ms >= 0 && elapsed >= result_wait_ms) {
            itsctl_progress_clear(&pl);
            (void)its_cancel(c, id, 1000); /* best effort: itsd may be gone */
            itsctl_error("request %s: no result from %s within %" PRId64 " ms (cancelled)", id,
                         its_client_endpoint(c), result_wait_ms);
            status = ITSCTL_EXIT_TIMEOUT;
            goto out;
        }
        struct its_event *ev = NULL;
        rc = its_next_event(c, &ev, ITSCTL_TICK_MS);
        if (rc < 0) {
            itsctl_progress_clear(&pl);
            status = itsctl_fail(c, rc);
            goto out;
        }
        if (rc == 0) {
            itsctl_progress_draw(&pl, id[0] != '\0', its_client_endpoint(c));
            continue;
        }
        if (ev->tag != tag) { /* unaddressed garbage from the daemon */
            if (ev->type == ITS_EVENT_ERROR && !id[0]) {
                itsctl_progress_clear(&pl);
                itsctl_error("%s", ev->message);
                status = itsctl_exit_for(ev->err);
                its_event_free(&ev);
                goto out;
            }
            its_event_free(&ev);
            continue;
        }
        switch (ev->type) {
        case ITS_EVENT_ACCEPTED:
            snprintf(id, sizeof id, "%s", ev->id);
            itsctl_progress_draw(&pl, true, its_client_endpoint(c));
            break;
        case ITS_EVENT_PROGRESS:
            pl.last = ev->progress;
            pl.have = true;
            itsctl_progress_draw(&pl, true, its_client_endpoint(c));
            break;
        case ITS_EVENT_RESULT:
            itsctl_progress_clear(&pl);
            status = itsctl_print_result(ev->result, json);
            its_event_free(&ev);
            goto out;
        case ITS_EVENT_ERROR:
            itsctl_progress_clear(&pl);
            if (ev->err == ITS_ERR_DAEMON)
                itsctl_error("itsd error %s: %s", ev->code, ev->message);
            else
                itsctl_error("%s", ev->message);
            status = itsctl_exit_for(ev->err);
            its_event_free(&ev);
            goto out;
        }
        its_event_free(&ev);
    }
out:
    sigaction(SIGINT, &old_sa, NULL);
    json_decref(doc);
    free(stdin_text);
    return status;
}

/* ---- status, workers, get, cancel ------------------------------------------------------------ */

/* Parses the options shared by the small commands: --json (when json != NULL), --timeout, and
 * exactly `n_args` positional arguments into args[]. */
static int itsctl_simple_opts(const char *cmd, int argc, char **argv, bool *json,
                              int *timeout_ms, int n_args, const char **args)
{
    static const struct option with_json[] = {
        {"json", no_argument, NULL, 'j'},
        {"timeout", required_argument, NULL, 't'},
        {NULL, 0, NULL, 0},
    };
    const struct option *longopts = json ? with_json : with_json + 1;
    *timeout_ms = ITSCTL_DEFAULT_TIMEOUT_MS;
    int opt;
    while ((opt = getopt_long(argc, argv, ":", longopts, NULL)) != -1) {
        if (opt == 'j') {
            *json = true;
        } else if (opt == 't') {
            if (itsctl_parse_seconds("--timeout", optarg, timeout_ms) != 0)
                return ITSCTL_EXIT_USAGE;
        } else {
            return itsctl_bad_option(cmd, opt, argv, optind);
        }
    }
    if (argc - optind != n_args) {
        itsctl_error("%s: expected %s (see itsctl --help)", cmd,
                     n_args ? "one request ID" : "no arguments");
        return ITSCTL_EXIT_USAGE;
    }
    for (int i = 0; i < n_args; i++)
        args[i] = argv[optind + i];
    return ITSCTL_EXIT_OK;
}

static json_t *itsctl_roles_json(const uint64_t v[ITS_ROLE_COUNT])
{
    return json_pack("{s:I, s:I, s:I, s:I}", "instruct", (json_int_t)v[ITS_ROLE_INSTRUCT],
                     "feedback", (json_int_t)v[ITS_ROLE_FEEDBACK], "edit",
                     (json_int_t)v[ITS_ROLE_EDIT], "select", (json_int_t)v[ITS_ROLE_SELECT]);
}

/* status_reply.metrics as JSON, with the wire's names (docs/protocol.md). */
static json_t *itsctl_metrics_json(const struct its_metrics *m)
{
    bool ok = true;
    json_t *o = json_object();
    if (!o)
        return NULL;
    itsctl_set(o, "requests",
               json_pack("{s:I, s:I, s:I, s:I, s:I, s:I}", "ok", (json_int_t)m->requests_ok,
                         "partial", (json_int_t)m->requests_partial, "cancelled",
                         (json_int_t)m->requests_cancelled, "deadline",
                         (json_int_t)m->requests_deadline, "failed",
                         (json_int_t)m->requests_failed, "rejected",
                         (json_int_t)m->requests_rejected),
               &ok);
    json_t *lat = json_pack("{s:I, s:f}", "count", (json_int_t)m->latency_count, "sum_s",
                            m->latency_sum_s);
    itsctl_set(lat, "p50_s", m->has_latency_p ? json_real(m->latency_p50_s) : json_null(), &ok);
    itsctl_set(lat, "p95_s", m->has_latency_p ? json_real(m->latency_p95_s) : json_null(), &ok);
    itsctl_set(o, "latency", lat, &ok);
    uint64_t q[ITS_ROLE_COUNT], f[ITS_ROLE_COUNT];
    for (int r = 0; r < ITS_ROLE_COUNT; r++) {
        q[r] = m->jobs_queued[r];
        f[r] = m->jobs_in_flight[r];
    }
    itsctl_set(o, "queue_depth", itsctl_roles_json(q), &ok);
    itsctl_set(o, "jobs_in_flight", itsctl_roles_json(f), &ok);
    itsctl_set(o, "tokens_generated", itsctl_roles_json(m->tokens_generated), &ok);
    itsctl_set(o, "heartbeat_misses", itsctl_uint(m->heartbeat_misses), &ok);
    itsctl_set(o, "job_retries", itsctl_uint(m->job_retries), &ok);
    itsctl_set(o, "protocol_errors",
               json_pack("{s:I, s:I}", "frontend", (json_int_t)m->protocol_errors_frontend,
                         "backend", (json_int_t)m->protocol_errors_backend),
               &ok);
    if (!ok) {
        json_decref(o);
        return NULL;
    }
    return o;
}

static void itsctl_print_roles_u64(const char *label, const uint64_t v[ITS_ROLE_COUNT])
{
    printf("%s: instruct %" PRIu64 ", feedback %" PRIu64 ", edit %" PRIu64 ", select %" PRIu64
           "\n",
           label, v[ITS_ROLE_INSTRUCT], v[ITS_ROLE_FEEDBACK], v[ITS_ROLE_EDIT],
           v[ITS_ROLE_SELECT]);
}

static void itsctl_print_metrics(const struct its_status *s)
{
    if (!s->has_metrics) {
        printf("metrics: not reported by this itsd (it predates them)\n");
        return;
    }
    const struct its_metrics *m = &s->metrics;
    printf("requests: ok %" PRIu64 ", partial %" PRIu64 ", cancelled %" PRIu64
           ", deadline %" PRIu64 ", failed %" PRIu64 ", rejected %" PRIu64 "\n",
           m->requests_ok, m->requests_partial, m->requests_cancelled, m->requests_deadline,
           m->requests_failed, m->requests_rejected);
    if (m->has_latency_p && m->latency_count > 0)
        printf("latency: %" PRIu64 " requests, mean %.3g s, p50 %.3g s, p95 %.3g s\n",
               m->latency_count, m->latency_sum_s / (double)m->latency_count, m->latency_p50_s,
               m->latency_p95_s);
    else
        printf("latency: %" PRIu64 " requests\n", m->latency_count);
    uint64_t q[ITS_ROLE_COUNT], f[ITS_ROLE_COUNT];
    for (int r = 0; r < ITS_ROLE_COUNT; r++) {
        q[r] = m->jobs_queued[r];
        f[r] = m->jobs_in_flight[r];
    }
    itsctl_print_roles_u64("jobs queued", q);
    itsctl_print_roles_u64("jobs in flight", f);
    itsctl_print_roles_u64("tokens generated", m->tokens_generated);
    printf("heartbeat misses: %" PRIu64 "\njob retries: %" PRIu64
           "\nprotocol errors: frontend %" PRIu64 ", backend %" PRIu64 "\n",
           m->heartbeat_misses, m->job_retries, m->protocol_errors_frontend,
           m->protocol_errors_backend);
}

/* Prints one status snapshot in the form the command asked for; returns the exit status. */
static int itsctl_print_status(const struct its_status *s, bool json, bool workers_only)
{
    if (json && workers_only)
        return itsctl_print_json(itsctl_workers_json(s));
    if (json) {
        json_t *o = json_pack("{s:{s:I, s:I, s:I, s:I}, s:I, s:I}", "roles", "instruct",
                              (json_int_t)s->workers_per_role[ITS_ROLE_INSTRUCT], "feedback",
                              (json_int_t)s->workers_per_role[ITS_ROLE_FEEDBACK], "edit",
                              (json_int_t)s->workers_per_role[ITS_ROLE_EDIT], "select",
                              (json_int_t)s->workers_per_role[ITS_ROLE_SELECT], "queue_depth",
                              (json_int_t)s->queue_depth, "in_flight", (json_int_t)s->in_flight);
        json_t *w = itsctl_workers_json(s);
        if (o && (!w || json_object_set_new(o, "workers", w) != 0)) {
            json_decref(o);
            o = NULL;
        }
        json_t *mj = s->has_metrics ? itsctl_metrics_json(&s->metrics) : json_null();
        if (o && (!mj || json_object_set_new(o, "metrics", mj) != 0)) {
            json_decref(o);
            o = NULL;
        }
        return itsctl_print_json(o);
    }
    if (workers_only) {
        for (size_t i = 0; i < s->n_workers; i++) {
            const struct its_worker *w = &s->workers[i];
            char running[24] = "-", queued[24] = "-", kv_used[24] = "-";
            if (w->has_load) {
                snprintf(running, sizeof running, "%" PRIu32, w->running);
                snprintf(queued, sizeof queued, "%" PRIu32, w->queued);
                snprintf(kv_used, sizeof kv_used, "%" PRIu64, w->kv_used);
            }
            printf("%s %s %s %s %s seqs=%s/%" PRIu32 " queued=%s kv=%s/%" PRIu64
                   " ctx=%" PRIu32 " jobs=%" PRIu32 "\n",
                   w->id, its_role_name(w->role), w->model, w->backend,
                   its_worker_state_name(w->state), running, w->max_seqs, queued, kv_used,
                   w->kv_tokens, w->max_ctx, w->jobs);
        }
        return itsctl_finish_stdout(ITSCTL_EXIT_OK);
    }
    printf("workers: instruct %" PRIu32 ", feedback %" PRIu32 ", edit %" PRIu32
           ", select %" PRIu32 "\nqueue depth: %" PRIu32 "\nin flight: %" PRIu32 "\n",
           s->workers_per_role[ITS_ROLE_INSTRUCT], s->workers_per_role[ITS_ROLE_FEEDBACK],
           s->workers_per_role[ITS_ROLE_EDIT], s->workers_per_role[ITS_ROLE_SELECT],
           s->queue_depth, s->in_flight);
    itsctl_print_metrics(s);
    return itsctl_finish_stdout(ITSCTL_EXIT_OK);
}

/* status / workers [--json] [--timeout S] [--watch S]: with --watch, a new snapshot every S
 * seconds until Ctrl-C (exit 0) or an error (its exit status). On a terminal each snapshot
 * replaces the last; elsewhere they follow one another, separated by a blank line (JSON: one
 * object per line). */
static int itsctl_cmd_status(its_client_t *c, int argc, char **argv, bool workers_only)
{
    const char *cmd = workers_only ? "workers" : "status";
    static const struct option longopts[] = {
        {"json", no_argument, NULL, 'j'},
        {"timeout", required_argument, NULL, 't'},
        {"watch", required_argument, NULL, 'w'},
        {NULL, 0, NULL, 0},
    };
    bool json = false;
    int timeout_ms = ITSCTL_DEFAULT_TIMEOUT_MS, watch_ms = 0;
    int opt;
    while ((opt = getopt_long(argc, argv, ":", longopts, NULL)) != -1) {
        if (opt == 'j') {
            json = true;
        } else if (opt == 't') {
            if (itsctl_parse_seconds("--timeout", optarg, &timeout_ms) != 0)
                return ITSCTL_EXIT_USAGE;
        } else if (opt == 'w') {
            if (itsctl_parse_seconds("--watch", optarg, &watch_ms) != 0)
                return ITSCTL_EXIT_USAGE;
        } else {
            return itsctl_bad_option(cmd, opt, argv, optind);
        }
    }
    if (argc != optind) {
        itsctl_error("%s: expected no arguments (see itsctl --help)", cmd);
        return ITSCTL_EXIT_USAGE;
    }
    struct sigaction sa = {.sa_handler = itsctl_on_sigint}, old_sa;
    sigemptyset(&sa.sa_mask);
    if (watch_ms > 0)
        sigaction(SIGINT, &sa, &old_sa); /* no SA_RESTART: the sleep returns to see the flag */
    bool tty = isatty(STDOUT_FILENO);
    int st = ITSCTL_EXIT_OK;
    for (unsigned round = 0;; round++) {
        struct its_status *s = NULL;
        int rc = its_status(c, timeout_ms, &s);
        if (rc < 0) {
            st = itsctl_fail(c, rc);
            break;
        }
        if (watch_ms > 0) {
            if (tty)
                printf("\033[H\033[J"); /* home, clear: the snapshot replaces the last */
            else if (round > 0 && !json)
                printf("\n");
        }
        st = itsctl_print_status(s, json, workers_only);
        its_status_free(&s);
        if (st != ITSCTL_EXIT_OK || watch_ms <= 0)
            break;
        for (int64_t until = itsctl_now_ms() + watch_ms;
             !itsctl_interrupted && itsctl_now_ms() < until;) {
            int64_t left = until - itsctl_now_ms();
            struct timespec ts = {.tv_sec = 0,
                                  .tv_nsec = (left < ITSCTL_TICK_MS ? left : ITSCTL_TICK_MS) *
                                             1000000L};
            nanosleep(&ts, NULL);
        }
        if (itsctl_interrupted)
            break; /* the way --watch is meant to end */
    }
    if (watch_ms > 0)
        sigaction(SIGINT, &old_sa, NULL);
    return st;
}

static int itsctl_cmd_get(its_client_t *c, int argc, char **argv)
{
    bool json = false;
    int timeout_ms;
    const char *id;
    int st = itsctl_simple_opts("get", argc, argv, &json, &timeout_ms, 1, &id);
    if (st != ITSCTL_EXIT_OK)
        return st;
    struct its_result *r = NULL;
    struct its_progress p;
    int rc = its_get(c, id, timeout_ms, &r, &p);
    if (rc < 0)
        return itsctl_fail(c, rc);
    if (r) {
        st = itsctl_print_result(r, json);
        its_result_free(&r);
        return st;
    }
    if (json) {
        json_t *o = json_pack("{s:s, s:b}", "id", id, "running", 1);
        json_t *pj = itsctl_progress_json(&p);
        if (o && (!pj || json_object_set_new(o, "progress", pj) != 0)) {
            json_decref(o);
            o = NULL;
        }
        return itsctl_print_json(o);
    }
    char text[256];
    itsctl_progress_text(&p, text, sizeof text);
    printf("%s running: %s, %.1f s elapsed\n", id, text, (double)p.elapsed_ms / 1000.0);
    return itsctl_finish_stdout(ITSCTL_EXIT_OK);
}

static int itsctl_cmd_cancel(its_client_t *c, int argc, char **argv)
{
    int timeout_ms;
    const char *id;
    int st = itsctl_simple_opts("cancel", argc, argv, NULL, &timeout_ms, 1, &id);
    if (st != ITSCTL_EXIT_OK)
        return st;
    int rc = its_cancel(c, id, timeout_ms);
    if (rc < 0)
        return itsctl_fail(c, rc);
    printf("%s cancelled\n", id);
    return itsctl_finish_stdout(ITSCTL_EXIT_OK);
}

/* ---- keygen ---------------------------------------------------------------------------------- */

static int itsctl_cmd_keygen(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"out", required_argument, NULL, 'o'},
        {NULL, 0, NULL, 0},
    };
    const char *prefix = "its";
    int opt;
    while ((opt = getopt_long(argc, argv, ":", longopts, NULL)) != -1) {
        if (opt == 'o')
            prefix = optarg;
        else
            return itsctl_bad_option("keygen", opt, argv, optind);
    }
    if (optind != argc) {
        itsctl_error("keygen: unexpected argument '%s' (see itsctl --help)", argv[optind]);
        return ITSCTL_EXIT_USAGE;
    }
    char pub[ITS_KEY_Z85_LEN + 1], err[1200];
    int rc = its_keygen(prefix, pub, err, sizeof err);
    if (rc < 0) {
        itsctl_error("keygen: %s", err);
        return itsctl_exit_for(rc);
    }
    printf("%s\n", pub);
    fprintf(stderr, "itsctl: wrote %s.key (secret, 0600) and %s.pub\n", prefix, prefix);
    return itsctl_finish_stdout(ITSCTL_EXIT_OK);
}

/* ---- main ------------------------------------------------------------------------------------ */

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"endpoint", required_argument, NULL, 'e'},
        {"server-key", required_argument, NULL, 's'},
        {"key", required_argument, NULL, 'k'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *endpoint = NULL;
    const char *server_key = NULL, *key = NULL;
    opterr = 0;
    int opt;
    /* '+': stop at the command; its own options are parsed by the command. */
    while ((opt = getopt_long(argc, argv, "+:e:h", longopts, NULL)) != -1) {
        switch (opt) {
        case 'e': endpoint = optarg; break;
        case 's': server_key = optarg; break;
        case 'k': key = optarg; break;
        case 'h': fputs(itsctl_usage_text, stdout); return itsctl_finish_stdout(ITSCTL_EXIT_OK);
        default: return itsctl_bad_option("itsctl", opt, argv, optind);
        }
    }
    if (optind >= argc) {
        itsctl_error("no command given (submit, status, workers, get, cancel, keygen; see "
                     "--help)");
        return ITSCTL_EXIT_USAGE;
    }
    const char *cmd = argv[optind];
    int sub_argc = argc - optind;
    char **sub_argv = argv + optind;
    if (strcmp(cmd, "help") == 0) {
        fputs(itsctl_usage_text, stdout);
        return itsctl_finish_stdout(ITSCTL_EXIT_OK);
    }
    if (strcmp(cmd, "keygen") == 0) {
        optind = 0;
        return itsctl_cmd_keygen(sub_argc, sub_argv);
    }
    if (strcmp(cmd, "submit") != 0 && strcmp(cmd, "status") != 0 &&
        strcmp(cmd, "workers") != 0 && strcmp(cmd, "get") != 0 && strcmp(cmd, "cancel") != 0) {
        itsctl_error("unknown command '%s' (submit, status, workers, get, cancel, keygen; see "
                     "--help)",
                     cmd);
        return ITSCTL_EXIT_USAGE;
    }
    /* flags first, then the environment; an empty value counts as unset */
    if (!server_key || !*server_key)
        server_key = getenv("ITS_SERVER_KEY");
    if (!key || !*key)
        key = getenv("ITS_KEY");
    if (server_key && !*server_key)
        server_key = NULL;
    if (key && !*key)
        key = NULL;
    if (!server_key != !key) {
        itsctl_error("%s: CURVE needs both itsd's public key (--server-key FILE or "
                     "$ITS_SERVER_KEY) and this client's key pair (--key FILE or $ITS_KEY)",
                     server_key ? "--key missing" : "--server-key missing");
        return ITSCTL_EXIT_USAGE;
    }
    itsctl_curve = server_key != NULL;
    if (endpoint && !*endpoint) {
        itsctl_error("--endpoint: empty endpoint");
        return ITSCTL_EXIT_USAGE;
    }
    signal(SIGPIPE, SIG_IGN); /* a closed stdout is reported by itsctl_finish_stdout */

    its_client_t *c = NULL;
    char err[1200];
    struct its_client_opts copts = {.endpoint = endpoint, .server_key_file = server_key,
                                    .key_file = key};
    int rc = its_client_new_opts(&copts, &c, err, sizeof err);
    if (rc < 0) {
        itsctl_error("%s", err);
        return itsctl_exit_for(rc);
    }
    optind = 0; /* glibc: re-initialise getopt for the command's own argv */
    int status;
    if (strcmp(cmd, "submit") == 0)
        status = itsctl_cmd_submit(c, sub_argc, sub_argv);
    else if (strcmp(cmd, "status") == 0)
        status = itsctl_cmd_status(c, sub_argc, sub_argv, false);
    else if (strcmp(cmd, "workers") == 0)
        status = itsctl_cmd_status(c, sub_argc, sub_argv, true);
    else if (strcmp(cmd, "get") == 0)
        status = itsctl_cmd_get(c, sub_argc, sub_argv);
    else
        status = itsctl_cmd_cancel(c, sub_argc, sub_argv);
    its_client_destroy(&c);
    return status;
}
