/* itsw.c — the worker binary: local verbs over one model (tokenize, detokenize, chat-ids,
 * logits, generate, score, bench), the cuda kernels' self-tests (selftest) and `serve`, the
 * worker daemon (itsw_serve.c).
 *
 * Contract (DESIGN.md, stable: other tooling scripts against it): JSON on stdout; on failure
 * one line on stderr naming the problem, nothing on stdout, and a non-zero exit.
 * Owns the checkpoint, tokenizer and engine it opens for one verb; frees them before exit.
 */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "bench_cuda.h"
#include "chat.h"
#include "checkpoint.h"
#include "cuda_tools.h"
#include "engine.h"
#include "itsw_serve.h"
#include "model.h"
#include "tokenizer.h"

#define ITSW_ERR_LEN 512

/* Exit codes: 0 success, 1 runtime failure (model, input, engine), 2 usage. */
enum { ITSW_EXIT_OK = 0, ITSW_EXIT_FAIL = 1, ITSW_EXIT_USAGE = 2 };

static const char itsw_usage[] =
    "usage: itsw VERB [options]\n"
    "  tokenize   --model DIR [--text STR] [--special]      text (or stdin) -> {\"ids\"}\n"
    "  detokenize --model DIR --ids 1,2,3                   -> {\"text\"}\n"
    "  chat-ids   --model DIR --messages FILE [--no-generation-prompt]\n"
    "  logits     --model DIR --messages FILE [--no-generation-prompt] --out F.f32\n"
    "  generate   --model DIR --messages FILE --max-tokens N [--temperature T] [--top-p P]\n"
    "             [--top-k K] [--seed S] [--n K] [--ignore-eos]\n"
    "  score      --model DIR --messages FILE                -> {\"score\"}\n"
    "  bench      --shape NAME [--threads N] | --tokenizer --model DIR [--text-file F]\n"
    "  bench      --backend cuda [--shape NAME] [--device N]   GPU throughput vs ceilings\n"
    "  selftest   --backend cuda [--device N] [--seed S]       kernel self-tests on the GPU\n"
    "  serve      [--config FILE] [--connect EP] [--role R] [--model DIR] [--backend B] ...\n"
    "common: --backend cpu|cuda (default cpu), --device N, --threads N, --chat-format NAME\n"
    "        (llama3|llama31|nemotron-super|plain|auto), --kv-tokens N, --max-seqs N\n"
    "FILE holds a JSON array of {\"role\",\"content\"}; '-' reads stdin.\n";

/* Everything a verb may be given; zero = not given unless noted. */
struct itsw_args {
    const char *model_dir;
    const char *backend;
    const char *chat_format;
    const char *text;
    const char *text_file;
    const char *ids;
    const char *messages;
    const char *out;
    const char *shape;
    int special;
    int no_generation_prompt;
    int ignore_eos;
    int bench_tokenizer;
    long max_tokens; /* -1: not given */
    double temperature;
    double top_p;
    long top_k;
    unsigned long long seed;
    long n;
    long threads;
    long kv_tokens;
    long max_seqs;
    long device;
};

static void itsw_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void itsw_fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("itsw: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static int itsw_parse_long(const char *flag, const char *s, long lo, long hi, long *out)
{
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        itsw_fail("%s: '%s' is not an integer in [%ld, %ld]", flag, s, lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

static int itsw_parse_double(const char *flag, const char *s, double lo, double hi,
                             double *out)
{
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v) || v < lo || v > hi) {
        itsw_fail("%s: '%s' is not a number in [%g, %g]", flag, s, lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

enum {
    OPT_MODEL = 256, OPT_BACKEND, OPT_CHAT_FORMAT, OPT_TEXT, OPT_TEXT_FILE, OPT_IDS,
    OPT_MESSAGES, OPT_OUT, OPT_SHAPE, OPT_SPECIAL, OPT_NO_GEN, OPT_IGNORE_EOS, OPT_TOKENIZER,
    OPT_MAX_TOKENS, OPT_TEMPERATURE, OPT_TOP_P, OPT_TOP_K, OPT_SEED, OPT_N, OPT_THREADS,
    OPT_KV_TOKENS, OPT_MAX_SEQS, OPT_DEVICE, OPT_HELP,
};

static const struct option itsw_options[] = {
    {"model", required_argument, NULL, OPT_MODEL},
    {"backend", required_argument, NULL, OPT_BACKEND},
    {"chat-format", required_argument, NULL, OPT_CHAT_FORMAT},
    {"text", required_argument, NULL, OPT_TEXT},
    {"text-file", required_argument, NULL, OPT_TEXT_FILE},
    {"ids", required_argument, NULL, OPT_IDS},
    {"messages", required_argument, NULL, OPT_MESSAGES},
    {"out", required_argument, NULL, OPT_OUT},
    {"shape", required_argument, NULL, OPT_SHAPE},
    {"special", no_argument, NULL, OPT_SPECIAL},
    {"no-generation-prompt", no_argument, NULL, OPT_NO_GEN},
    {"ignore-eos", no_argument, NULL, OPT_IGNORE_EOS},
    {"tokenizer", no_argument, NULL, OPT_TOKENIZER},
    {"max-tokens", required_argument, NULL, OPT_MAX_TOKENS},
    {"temperature", required_argument, NULL, OPT_TEMPERATURE},
    {"top-p", required_argument, NULL, OPT_TOP_P},
    {"top-k", required_argument, NULL, OPT_TOP_K},
    {"seed", required_argument, NULL, OPT_SEED},
    {"n", required_argument, NULL, OPT_N},
    {"threads", required_argument, NULL, OPT_THREADS},
    {"kv-tokens", required_argument, NULL, OPT_KV_TOKENS},
    {"max-seqs", required_argument, NULL, OPT_MAX_SEQS},
    {"device", required_argument, NULL, OPT_DEVICE},
    {"help", no_argument, NULL, OPT_HELP},
    {NULL, 0, NULL, 0},
};

/* Parses argv after the verb. Returns 0, 1 for --help, or -1 (message printed). */
static int itsw_parse_args(int argc, char **argv, struct itsw_args *a)
{
    memset(a, 0, sizeof *a);
    a->max_tokens = -1;
    a->temperature = 1.0;
    a->top_p = 1.0;
    a->n = 1;
    a->backend = "cpu";
    optind = 1;
    opterr = 0;
    int c;
    long v;
    while ((c = getopt_long(argc, argv, "", itsw_options, NULL)) != -1) {
        switch (c) {
        case OPT_MODEL: a->model_dir = optarg; break;
        case OPT_BACKEND: a->backend = optarg; break;
        case OPT_CHAT_FORMAT: a->chat_format = optarg; break;
        case OPT_TEXT: a->text = optarg; break;
        case OPT_TEXT_FILE: a->text_file = optarg; break;
        case OPT_IDS: a->ids = optarg; break;
        case OPT_MESSAGES: a->messages = optarg; break;
        case OPT_OUT: a->out = optarg; break;
        case OPT_SHAPE: a->shape = optarg; break;
        case OPT_SPECIAL: a->special = 1; break;
        case OPT_NO_GEN: a->no_generation_prompt = 1; break;
        case OPT_IGNORE_EOS: a->ignore_eos = 1; break;
        case OPT_TOKENIZER: a->bench_tokenizer = 1; break;
        case OPT_MAX_TOKENS:
            if (itsw_parse_long("--max-tokens", optarg, 1, 1L << 30, &a->max_tokens))
                return -1;
            break;
        case OPT_TEMPERATURE:
            if (itsw_parse_double("--temperature", optarg, 0, 100, &a->temperature))
                return -1;
            break;
        case OPT_TOP_P:
            if (itsw_parse_double("--top-p", optarg, 1e-9, 1, &a->top_p))
                return -1;
            break;
        case OPT_TOP_K:
            if (itsw_parse_long("--top-k", optarg, 0, INT_MAX, &a->top_k))
                return -1;
            break;
        case OPT_SEED: {
            char *end = NULL;
            errno = 0;
            a->seed = strtoull(optarg, &end, 10);
            if (errno || end == optarg || *end || optarg[0] == '-') {
                itsw_fail("--seed: '%s' is not an unsigned integer", optarg);
                return -1;
            }
            break;
        }
        case OPT_N:
            if (itsw_parse_long("--n", optarg, 1, 4096, &a->n))
                return -1;
            break;
        case OPT_THREADS:
            if (itsw_parse_long("--threads", optarg, 0, 1024, &a->threads))
                return -1;
            break;
        case OPT_KV_TOKENS:
            if (itsw_parse_long("--kv-tokens", optarg, 16, INT_MAX, &a->kv_tokens))
                return -1;
            break;
        case OPT_MAX_SEQS:
            if (itsw_parse_long("--max-seqs", optarg, 1, 65536, &a->max_seqs))
                return -1;
            break;
        case OPT_DEVICE:
            if (itsw_parse_long("--device", optarg, 0, 1024, &v))
                return -1;
            a->device = v;
            break;
        case OPT_HELP: return 1;
        case ':':
            itsw_fail("%s needs a value", argv[optind - 1]);
            return -1;
        default:
            itsw_fail("unknown option '%s' (see itsw --help)", argv[optind - 1]);
            return -1;
        }
    }
    if (optind < argc) {
        itsw_fail("unexpected argument '%s' (see itsw --help)", argv[optind]);
        return -1;
    }
    return 0;
}

static int itsw_require(const char *value, const char *flag, const char *verb)
{
    if (value)
        return 0;
    itsw_fail("%s needs %s", verb, flag);
    return -1;
}

/* ---- output ------------------------------------------------------------------------------ */

/* Prints `j` as one compact JSON line on stdout and drops the reference. */
static int itsw_print_json(json_t *j)
{
    if (!j) {
        itsw_fail("out of memory building the output");
        return -1;
    }
    int rc = json_dumpf(j, stdout, JSON_COMPACT);
    json_decref(j);
    if (rc != 0 || fputc('\n', stdout) == EOF || fflush(stdout) != 0) {
        itsw_fail("cannot write to stdout: %s", strerror(errno));
        return -1;
    }
    return 0;
}

static json_t *itsw_ids_json(const int32_t *ids, size_t n)
{
    json_t *arr = json_array();
    for (size_t i = 0; arr && i < n; i++)
        if (json_array_append_new(arr, json_integer(ids[i])) != 0) {
            json_decref(arr);
            return NULL;
        }
    return arr;
}

/* ---- inputs ------------------------------------------------------------------------------ */

/* Reads a whole file ("-" = stdin) into a NUL-terminated heap buffer. */
static char *itsw_slurp(const char *path, size_t *len_out)
{
    FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "rb");
    if (!f) {
        itsw_fail("%s: %s", path, strerror(errno));
        return NULL;
    }
    size_t len = 0, cap = 1 << 16;
    char *buf = malloc(cap);
    while (buf) {
        size_t got = fread(buf + len, 1, cap - len - 1, f);
        len += got;
        if (got == 0)
            break;
        if (cap - len - 1 == 0) {
            char *nb = cap > ((size_t)1 << 40) ? NULL : realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
    }
    int bad = ferror(f);
    if (f != stdin)
        fclose(f);
    if (!buf || bad) {
        itsw_fail("%s: %s", path, buf ? "read error" : "out of memory");
        free(buf);
        return NULL;
    }
    buf[len] = '\0';
    *len_out = len;
    return buf;
}

/* A conversation read from a messages file; owns the JSON its messages point into. */
struct itsw_conversation {
    json_t *root;
    struct chat_message *msgs;
    size_t n;
};

static void itsw_conversation_free(struct itsw_conversation *c)
{
    free(c->msgs);
    json_decref(c->root);
    memset(c, 0, sizeof *c);
}

/* Loads FILE: a JSON array of {"role": string, "content": string}. Errors name the file and
 * the element; the chat layer checks roles and UTF-8 again when rendering. */
static int itsw_load_messages(const char *path, struct itsw_conversation *c)
{
    memset(c, 0, sizeof *c);
    size_t len = 0;
    char *raw = itsw_slurp(path, &len);
    if (!raw)
        return -1;
    size_t good = tokenizer_utf8_prefix(raw, len);
    if (good != len) {
        itsw_fail("%s: invalid UTF-8 at byte %zu", path, good);
        free(raw);
        return -1;
    }
    json_error_t je;
    c->root = json_loadb(raw, len, JSON_REJECT_DUPLICATES, &je);
    free(raw);
    if (!c->root) {
        itsw_fail("%s: not valid JSON: %s (line %d, column %d)", path, je.text, je.line,
                  je.column);
        return -1;
    }
    if (!json_is_array(c->root) || json_array_size(c->root) == 0) {
        itsw_fail("%s: expected a non-empty JSON array of {\"role\", \"content\"}", path);
        goto fail;
    }
    c->n = json_array_size(c->root);
    c->msgs = calloc(c->n, sizeof *c->msgs);
    if (!c->msgs) {
        itsw_fail("%s: out of memory", path);
        goto fail;
    }
    for (size_t i = 0; i < c->n; i++) {
        json_t *m = json_array_get(c->root, i);
        json_t *role = json_object_get(m, "role");
        json_t *content = json_object_get(m, "content");
        if (!json_is_object(m) || !json_is_string(role) || !json_is_string(content)) {
            itsw_fail("%s: messages[%zu] must be an object with string \"role\" and "
                      "\"content\"", path, i);
            goto fail;
        }
        const char *key;
        json_t *val;
        json_object_foreach(m, key, val) {
            if (strcmp(key, "role") != 0 && strcmp(key, "content") != 0) {
                itsw_fail("%s: messages[%zu]: unknown key \"%s\"", path, i, key);
                goto fail;
            }
        }
        c->msgs[i].role = json_string_value(role);
        c->msgs[i].role_len = json_string_length(role);
        c->msgs[i].content = json_string_value(content);
        c->msgs[i].content_len = json_string_length(content);
    }
    return 0;
fail:
    itsw_conversation_free(c);
    return -1;
}

/* ---- the model a verb runs on --------------------------------------------------------------- */

struct itsw_model {
    struct tokenizer *tok;
    enum chat_format format;
    struct checkpoint *ck;
    struct engine *eng;
};

static void itsw_model_close(struct itsw_model *m)
{
    engine_destroy(&m->eng);
    checkpoint_destroy(&m->ck);
    tokenizer_destroy(&m->tok);
}

enum itsw_need { NEED_TOKENIZER = 1, NEED_CHAT = 2, NEED_ENGINE = 4 };

static int itsw_model_open(const struct itsw_args *a, int need, long n_samples,
                           struct itsw_model *m)
{
    char err[ITSW_ERR_LEN];
    memset(m, 0, sizeof *m);
    if (!a->model_dir) {
        itsw_fail("--model DIR is required");
        return -1;
    }
    char path[PATH_MAX];
    if ((size_t)snprintf(path, sizeof path, "%s/tokenizer.json", a->model_dir) >= sizeof path) {
        itsw_fail("--model: path too long");
        return -1;
    }
    if (tokenizer_open(path, &m->tok, err, sizeof err) != 0) {
        itsw_fail("%s", err);
        return -1;
    }
    if ((need & NEED_CHAT) &&
        chat_format_for_model(a->model_dir, a->chat_format, &m->format, err, sizeof err) != 0) {
        itsw_fail("%s", err);
        goto fail;
    }
    if (need & NEED_ENGINE) {
        if (checkpoint_open(a->model_dir, &m->ck, err, sizeof err) != 0) {
            itsw_fail("%s", err);
            goto fail;
        }
        struct engine_params p = {
            .backend = a->backend,
            .max_seqs = (int)(a->max_seqs ? a->max_seqs : n_samples > ENGINE_DEFAULT_MAX_SEQS
                                                              ? n_samples
                                                              : 0),
            .kv_tokens = (int)a->kv_tokens,
            .n_threads = (int)a->threads,
            .device = (int)a->device,
        };
        if (engine_new(m->ck, &p, &m->eng, err, sizeof err) != 0) {
            itsw_fail("%s", err);
            goto fail;
        }
    }
    return 0;
fail:
    itsw_model_close(m);
    return -1;
}

/* Renders a messages file to prompt ids in the model's chat format. */
static int itsw_messages_ids(const struct itsw_args *a, const struct itsw_model *m,
                             int generation_prompt, struct tokenizer_ids *ids)
{
    struct itsw_conversation conv;
    if (itsw_load_messages(a->messages, &conv) != 0)
        return -1;
    char err[ITSW_ERR_LEN];
    int rc = chat_render_ids(m->format, m->tok, conv.msgs, conv.n, generation_prompt, ids, err,
                             sizeof err);
    itsw_conversation_free(&conv);
    if (rc != 0) {
        itsw_fail("%s: %s", a->messages, err);
        return -1;
    }
    return 0;
}

/* ---- verbs --------------------------------------------------------------------------------- */

static int itsw_cmd_tokenize(const struct itsw_args *a)
{
    struct itsw_model m;
    if (itsw_model_open(a, NEED_TOKENIZER, 1, &m) != 0)
        return ITSW_EXIT_FAIL;
    int exit_code = ITSW_EXIT_FAIL;
    char *owned = NULL;
    const char *text = a->text;
    size_t len = text ? strlen(text) : 0;
    if (!text) {
        owned = itsw_slurp(a->text_file ? a->text_file : "-", &len);
        if (!owned)
            goto out;
        text = owned;
    }
    struct tokenizer_ids ids = {0};
    char err[ITSW_ERR_LEN];
    if (tokenizer_encode(m.tok, text, len, a->special, &ids, err, sizeof err) != 0) {
        itsw_fail("%s", err);
        goto out;
    }
    json_t *ids_json = itsw_ids_json(ids.ids, ids.n);
    tokenizer_ids_free(&ids);
    if (itsw_print_json(ids_json ? json_pack("{s:o}", "ids", ids_json) : NULL) == 0)
        exit_code = ITSW_EXIT_OK;
out:
    free(owned);
    itsw_model_close(&m);
    return exit_code;
}

/* Parses "1,2,3" into ids; every id must be a token of the tokenizer. */
static int itsw_parse_ids(const char *s, const struct tokenizer *tok, struct tokenizer_ids *out)
{
    int vocab = tokenizer_vocab_size(tok);
    const char *p = s;
    for (size_t index = 0;; index++) {
        char *end = NULL;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (errno || end == p || (*end != ',' && *end != '\0')) {
            itsw_fail("--ids: item %zu of '%s' is not an integer", index, s);
            return -1;
        }
        if (v < 0 || v >= vocab) {
            itsw_fail("--ids: id %ld is outside the vocabulary [0, %d)", v, vocab);
            return -1;
        }
        if (tokenizer_ids_push(out, (int32_t)v) != 0) {
            itsw_fail("--ids: out of memory");
            return -1;
        }
        if (*end == '\0')
            return 0;
        p = end + 1;
    }
}

static int itsw_cmd_detokenize(const struct itsw_args *a)
{
    if (itsw_require(a->ids, "--ids", "detokenize"))
        return ITSW_EXIT_USAGE;
    struct itsw_model m;
    if (itsw_model_open(a, NEED_TOKENIZER, 1, &m) != 0)
        return ITSW_EXIT_FAIL;
    int exit_code = ITSW_EXIT_FAIL;
    struct tokenizer_ids ids = {0};
    char *text = NULL;
    size_t len = 0;
    char err[ITSW_ERR_LEN];
    if (itsw_parse_ids(a->ids, m.tok, &ids) != 0)
        goto out;
    if (tokenizer_decode(m.tok, ids.ids, ids.n, TOKENIZER_LOSSY_UTF8, &text, &len, err,
                         sizeof err) != 0) {
        itsw_fail("--ids: %s", err);
        goto out;
    }
    if (itsw_print_json(json_pack("{s:s%}", "text", text, len)) == 0)
        exit_code = ITSW_EXIT_OK;
out:
    free(text);
    tokenizer_ids_free(&ids);
    itsw_model_close(&m);
    return exit_code;
}

static int itsw_cmd_chat_ids(const struct itsw_args *a)
{
    if (itsw_require(a->messages, "--messages FILE", "chat-ids"))
        return ITSW_EXIT_USAGE;
    struct itsw_model m;
    if (itsw_model_open(a, NEED_TOKENIZER | NEED_CHAT, 1, &m) != 0)
        return ITSW_EXIT_FAIL;
    int exit_code = ITSW_EXIT_FAIL;
    struct tokenizer_ids ids = {0};
    if (itsw_messages_ids(a, &m, !a->no_generation_prompt, &ids) == 0) {
        json_t *ids_json = itsw_ids_json(ids.ids, ids.n);
        if (itsw_print_json(ids_json ? json_pack("{s:o}", "ids", ids_json) : NULL) == 0)
            exit_code = ITSW_EXIT_OK;
    }
    tokenizer_ids_free(&ids);
    itsw_model_close(&m);
    return exit_code;
}

static int itsw_cmd_logits(const struct itsw_args *a)
{
    if (itsw_require(a->messages, "--messages FILE", "logits") ||
        itsw_require(a->out, "--out F.f32", "logits"))
        return ITSW_EXIT_USAGE;
    struct itsw_model m;
    if (itsw_model_open(a, NEED_TOKENIZER | NEED_CHAT | NEED_ENGINE, 1, &m) != 0)
        return ITSW_EXIT_FAIL;
    int exit_code = ITSW_EXIT_FAIL;
    struct tokenizer_ids ids = {0};
    int vocab = engine_config(m.eng)->vocab_size;
    float *logits = malloc((size_t)vocab * sizeof *logits);
    char err[ITSW_ERR_LEN];
    if (!logits) {
        itsw_fail("out of memory for %d logits", vocab);
        goto out;
    }
    if (itsw_messages_ids(a, &m, !a->no_generation_prompt, &ids) != 0)
        goto out;
    if (engine_logits(m.eng, ids.ids, (int)ids.n, logits, err, sizeof err) != 0) {
        itsw_fail("%s", err);
        goto out;
    }
    /* float32 little-endian is the file format; this code runs on little-endian hosts only. */
    FILE *f = fopen(a->out, "wb");
    if (!f || fwrite(logits, sizeof *logits, (size_t)vocab, f) != (size_t)vocab ||
        fclose(f) != 0) {
        itsw_fail("%s: cannot write: %s", a->out, strerror(errno));
        goto out;
    }
    /* Top 5 in one pass: top[] stays sorted by logit, descending; strict '>' keeps the
     * lower id first among equal logits. */
    int top[5];
    int n_top = 0;
    for (int i = 0; i < vocab; i++) {
        if (n_top == 5 && !(logits[i] > logits[top[4]]))
            continue;
        int k = n_top < 5 ? n_top++ : 4;
        while (k > 0 && logits[i] > logits[top[k - 1]]) {
            top[k] = top[k - 1];
            k--;
        }
        top[k] = i;
    }
    json_t *ids_j = json_array(), *vals_j = json_array();
    for (int k = 0; k < n_top && ids_j && vals_j; k++) {
        json_array_append_new(ids_j, json_integer(top[k]));
        json_array_append_new(vals_j, json_real(logits[top[k]]));
    }
    if (itsw_print_json(ids_j && vals_j
                            ? json_pack("{s:o,s:o}", "top5_ids", ids_j, "top5_logits", vals_j)
                            : NULL) == 0)
        exit_code = ITSW_EXIT_OK;
out:
    free(logits);
    tokenizer_ids_free(&ids);
    itsw_model_close(&m);
    return exit_code;
}

static int itsw_cmd_generate(const struct itsw_args *a)
{
    if (itsw_require(a->messages, "--messages FILE", "generate"))
        return ITSW_EXIT_USAGE;
    if (a->max_tokens < 0) {
        itsw_fail("generate needs --max-tokens N");
        return ITSW_EXIT_USAGE;
    }
    struct itsw_model m;
    if (itsw_model_open(a, NEED_TOKENIZER | NEED_CHAT | NEED_ENGINE, a->n, &m) != 0)
        return ITSW_EXIT_FAIL;
    int exit_code = ITSW_EXIT_FAIL;
    struct tokenizer_ids ids = {0};
    struct engine_result *res = NULL;
    json_t *outputs = NULL;
    char err[ITSW_ERR_LEN];
    if (itsw_messages_ids(a, &m, !a->no_generation_prompt, &ids) != 0)
        goto out;
    struct engine_sampling s = {
        .temperature = (float)a->temperature,
        .top_p = (float)a->top_p,
        .top_k = (int)a->top_k,
        .seed = a->seed,
        .max_tokens = (int)a->max_tokens,
        .ignore_eos = a->ignore_eos,
    };
    if (engine_generate(m.eng, ids.ids, (int)ids.n, (int)a->n, &s, &res, err, sizeof err) != 0) {
        itsw_fail("%s", err);
        goto out;
    }
    outputs = json_array();
    for (int i = 0; outputs && i < res->n_outputs; i++) {
        const struct engine_output *o = &res->outputs[i];
        char *text = NULL;
        size_t len = 0;
        if (tokenizer_decode(m.tok, o->ids, (size_t)o->n_ids,
                             TOKENIZER_SKIP_SPECIAL | TOKENIZER_LOSSY_UTF8, &text, &len, err,
                             sizeof err) != 0) {
            itsw_fail("decoding sample %d: %s", i, err);
            goto out;
        }
        json_t *ids_j = itsw_ids_json(o->ids, (size_t)o->n_ids);
        json_t *one = ids_j ? json_pack("{s:o,s:s%,s:s}", "ids", ids_j, "text", text, len,
                                        "finish", engine_finish_name(o->finish))
                            : NULL;
        free(text);
        if (!one || json_array_append_new(outputs, one) != 0) {
            itsw_fail("out of memory building the output");
            goto out;
        }
    }
    json_t *doc = json_pack("{s:O,s:{s:i,s:i}}", "outputs", outputs, "usage", "prompt_tokens",
                            res->prompt_tokens, "completion_tokens", res->completion_tokens);
    if (itsw_print_json(doc) == 0)
        exit_code = ITSW_EXIT_OK;
out:
    json_decref(outputs);
    engine_result_free(&res);
    tokenizer_ids_free(&ids);
    itsw_model_close(&m);
    return exit_code;
}

static int itsw_cmd_score(const struct itsw_args *a)
{
    if (itsw_require(a->messages, "--messages FILE", "score"))
        return ITSW_EXIT_USAGE;
    struct itsw_model m;
    if (itsw_model_open(a, NEED_TOKENIZER | NEED_CHAT | NEED_ENGINE, 1, &m) != 0)
        return ITSW_EXIT_FAIL;
    int exit_code = ITSW_EXIT_FAIL;
    struct tokenizer_ids ids = {0};
    char err[ITSW_ERR_LEN];
    /* The Nemotron Reward/Select convention: no generation prompt, logit of id 0. */
    if (itsw_messages_ids(a, &m, 0, &ids) == 0) {
        const int32_t *conv = ids.ids;
        int len = (int)ids.n;
        float score = 0;
        if (engine_score(m.eng, &conv, &len, 1, &score, err, sizeof err) != 0)
            itsw_fail("%s", err);
        else if (itsw_print_json(json_pack("{s:f}", "score", (double)score)) == 0)
            exit_code = ITSW_EXIT_OK;
    }
    tokenizer_ids_free(&ids);
    itsw_model_close(&m);
    return exit_code;
}

/* English text for the tokenizer benchmark: a file, or the GPL text every Debian system has,
 * repeated to about 8 MB so that the word cache's warm-up is a small part of the time. */
static int itsw_bench_tokenizer(const struct itsw_args *a)
{
    struct itsw_model m;
    if (itsw_model_open(a, NEED_TOKENIZER, 1, &m) != 0)
        return ITSW_EXIT_FAIL;
    const char *src = a->text_file ? a->text_file : "/usr/share/common-licenses/GPL-3";
    size_t len = 0;
    char *one = itsw_slurp(src, &len);
    int exit_code = ITSW_EXIT_FAIL;
    char *text = NULL;
    if (!one || len == 0)
        goto out;
    size_t reps = (8u << 20) / len + 1, total = reps * len;
    text = malloc(total);
    if (!text) {
        itsw_fail("out of memory for %zu bytes of text", total);
        goto out;
    }
    for (size_t r = 0; r < reps; r++)
        memcpy(text + r * len, one, len);
    double mb_s = 0;
    size_t n_tokens = 0;
    char err[ITSW_ERR_LEN];
    if (tokenizer_bench(m.tok, text, total, &mb_s, &n_tokens, err, sizeof err) != 0) {
        itsw_fail("%s", err);
        goto out;
    }
    if (itsw_print_json(json_pack("{s:s,s:s,s:I,s:I,s:f}", "bench", "tokenizer", "text", src,
                                  "bytes", (json_int_t)total, "tokens", (json_int_t)n_tokens,
                                  "mb_per_s", mb_s)) == 0)
        exit_code = ITSW_EXIT_OK;
out:
    free(one);
    free(text);
    itsw_model_close(&m);
    return exit_code;
}

/* "13.0" from CUDA's 13000 encoding. */
static json_t *itsw_cuda_version(int v)
{
    char s[32];
    snprintf(s, sizeof s, "%d.%d", v / 1000, v % 1000 / 10);
    return json_string(s);
}

/* Adds `value` under `key`; on a NULL value (out of memory) marks the document broken. */
static void itsw_set(json_t *obj, const char *key, json_t *value, int *broken)
{
    if (!obj || !value || json_object_set_new(obj, key, value) != 0)
        *broken = 1;
}

/* `itsw bench --backend cuda`: the JSON layout is docs/BENCHMARKS.md's "GPU" section. */
static int itsw_bench_cuda(const struct itsw_args *a)
{
    struct bench_cuda_params p = {.shape = a->shape ? a->shape : "llama-3.1-8b",
                                  .device = (int)a->device,
                                  .seed = a->seed};
    struct bench_cuda_result *r = calloc(1, sizeof *r);
    char err[ITSW_ERR_LEN];
    if (!r) {
        itsw_fail("bench: out of memory");
        return ITSW_EXIT_FAIL;
    }
    if (bench_cuda_run(&p, r, err, sizeof err) != 0) {
        itsw_fail("%s", err);
        free(r);
        return ITSW_EXIT_FAIL;
    }
    const char *commit = getenv("ITS_COMMIT");
    int broken = 0;
    json_t *doc = json_object();
    itsw_set(doc, "bench", json_string("engine"), &broken);
    itsw_set(doc, "backend", json_string("cuda"), &broken);
    itsw_set(doc, "shape", json_string(r->shape), &broken);
    itsw_set(doc, "dtype", json_string("BF16"), &broken);
    itsw_set(doc, "device", json_integer(r->device), &broken);
    itsw_set(doc, "gpu", json_string(r->ceil.device_name), &broken);
    itsw_set(doc, "sm_count", json_integer(r->ceil.sm_count), &broken);
    itsw_set(doc, "driver", itsw_cuda_version(r->ceil.driver_version), &broken);
    itsw_set(doc, "runtime", itsw_cuda_version(r->ceil.runtime_version), &broken);
    itsw_set(doc, "commit", json_string(commit && *commit ? commit : "unknown"), &broken);
    itsw_set(doc, "kv_blocks", json_integer(r->kv_blocks), &broken);

    json_t *ceil = json_object();
    itsw_set(ceil, "copy_gb_s", json_real(r->ceil.copy_gb_s), &broken);
    itsw_set(ceil, "bf16_tflops", json_real(r->ceil.bf16_tflops), &broken);
    itsw_set(ceil, "mem_total_bytes", json_integer((json_int_t)r->ceil.mem_total), &broken);
    itsw_set(ceil, "mem_free_bytes", json_integer((json_int_t)r->ceil.mem_free), &broken);
    itsw_set(doc, "ceilings", ceil, &broken);

    json_t *pre = json_object();
    itsw_set(pre, "tokens", json_integer(r->prefill_tokens), &broken);
    itsw_set(pre, "seconds", json_real(r->prefill_s), &broken);
    itsw_set(pre, "tok_per_s", json_real(r->prefill_tok_s), &broken);
    itsw_set(doc, "prefill", pre, &broken);

    json_t *dec = json_object(), *batches = json_array();
    itsw_set(dec, "context", json_integer(r->decode_context), &broken);
    itsw_set(dec, "warmup_steps", json_integer(r->warmup_steps), &broken);
    itsw_set(dec, "steps", json_integer(r->steps), &broken);
    for (int i = 0; i < r->n_batches && batches; i++) {
        json_t *b = json_object();
        itsw_set(b, "batch", json_integer(r->decode[i].batch), &broken);
        itsw_set(b, "step_ms", json_real(r->decode[i].step_ms), &broken);
        itsw_set(b, "tok_per_s", json_real(r->decode[i].tok_s), &broken);
        itsw_set(b, "gemm_util", json_real(r->decode[i].gemm_util), &broken);
        if (!b || json_array_append_new(batches, b) != 0)
            broken = 1;
    }
    itsw_set(dec, "batches", batches, &broken);
    itsw_set(doc, "decode", dec, &broken);

    json_t *sh = json_object();
    itsw_set(sh, "prompt_tokens", json_integer(r->shared_prompt), &broken);
    itsw_set(sh, "n", json_integer(r->n_samples), &broken);
    itsw_set(sh, "copied_blocks", json_integer(r->copied_blocks), &broken);
    itsw_set(sh, "shared_step_ms", json_real(r->shared_step_ms), &broken);
    itsw_set(sh, "single_step_ms", json_real(r->single_step_ms), &broken);
    itsw_set(sh, "unshared_step_ms", json_real(r->unshared_step_ms), &broken);
    itsw_set(sh, "shared_over_single", json_real(r->shared_over_single), &broken);
    itsw_set(sh, "unshared_over_single", json_real(r->unshared_over_single), &broken);
    itsw_set(sh, "target_shared_over_single", json_real(1.3), &broken);
    itsw_set(doc, "shared_prefix", sh, &broken);

    json_t *roof = json_object();
    itsw_set(roof, "weight_bytes_per_step", json_real(r->weight_bytes_per_step), &broken);
    itsw_set(roof, "flops_per_token", json_real(r->flops_per_token), &broken);
    itsw_set(roof, "batch1_tok_per_s", json_real(r->roofline_b1_tok_s), &broken);
    itsw_set(roof, "batch1_ratio", json_real(r->b1_ratio), &broken);
    itsw_set(doc, "roofline", roof, &broken);
    free(r);
    if (broken) {
        json_decref(doc);
        doc = NULL;
    }
    return itsw_print_json(doc) == 0 ? ITSW_EXIT_OK : ITSW_EXIT_FAIL;
}

static int itsw_cmd_bench(const struct itsw_args *a)
{
    if (a->bench_tokenizer)
        return itsw_bench_tokenizer(a);
    if (strcmp(a->backend, "cuda") == 0)
        return itsw_bench_cuda(a);
    if (strcmp(a->backend, "cpu") != 0) {
        itsw_fail("bench: unknown backend '%s' (choose cpu or cuda)", a->backend);
        return ITSW_EXIT_USAGE;
    }
    struct bench_params p = {
        .shape = a->shape ? a->shape : "llama-3.2-1b",
        .dtype = DTYPE_BF16,
        .n_threads = (int)a->threads,
    };
    struct bench_result r;
    char err[ITSW_ERR_LEN];
    if (bench_run(&p, &r, err, sizeof err) != 0) {
        itsw_fail("bench: %s", err);
        return ITSW_EXIT_FAIL;
    }
    json_t *doc = json_pack(
        "{s:s,s:s,s:s,s:s,s:i,s:{s:i,s:f},s:{s:i,s:f,s:i,s:f},"
        "s:{s:f,s:f,s:f,s:f}}",
        "bench", "engine", "backend", "cpu", "shape", r.shape, "dtype", r.dtype, "threads",
        r.n_threads, "prefill", "tokens", r.prefill_tokens, "tok_per_s", r.prefill_tok_s,
        "decode", "steps", r.decode_steps, "batch1_tok_per_s", r.decode_b1_tok_s, "batch",
        r.decode_batch, "batch_tok_per_s", r.decode_batch_tok_s, "roofline", "bandwidth_gb_s",
        r.bandwidth_gb_s, "weight_bytes_per_step", r.weight_bytes_per_step,
        "batch1_tok_per_s", r.roofline_b1_tok_s, "batch1_ratio", r.roofline_ratio);
    if (doc)
        json_object_set_new(doc, "isa", json_string(r.isa));
    return itsw_print_json(doc) == 0 ? ITSW_EXIT_OK : ITSW_EXIT_FAIL;
}

/* `itsw selftest --backend cuda`: every kernel self-test on the device. Exit 0 when all pass,
 * 1 when some fail (the JSON lists them), 2 when the tests cannot run (no plugin, driver or
 * device: one line on stderr, nothing on stdout). */
static int itsw_cmd_selftest(const struct itsw_args *a)
{
    if (strcmp(a->backend, "cuda") != 0) {
        itsw_fail("selftest: backend '%s' has no kernel self-tests (use --backend cuda)",
                  a->backend);
        return ITSW_EXIT_USAGE;
    }
    const size_t len = (size_t)1 << 20;
    char *report = malloc(len);
    if (!report) {
        itsw_fail("selftest: out of memory");
        return ITSW_EXIT_FAIL;
    }
    unsigned long long seed = a->seed ? a->seed : 1;
    int n_checks = 0;
    int failures = cuda_selftest((int)a->device, seed, report, len, &n_checks);
    if (failures < 0) {
        /* one line: the reason may span several */
        for (char *c = report; *c; c++)
            if (*c == '\n')
                *c = ' ';
        itsw_fail("selftest: %s", report);
        free(report);
        return ITSW_EXIT_USAGE;
    }
    int broken = 0;
    json_t *lines = json_array();
    for (char *line = report; lines && *line;) {
        char *end = strchr(line, '\n');
        size_t n = end ? (size_t)(end - line) : strlen(line);
        if (n && json_array_append_new(lines, json_stringn(line, n)) != 0)
            broken = 1;
        line += n + (end ? 1 : 0);
    }
    json_t *doc = json_object();
    itsw_set(doc, "selftest", json_string("cuda"), &broken);
    itsw_set(doc, "device", json_integer(a->device), &broken);
    itsw_set(doc, "seed", json_integer((json_int_t)seed), &broken);
    itsw_set(doc, "checks", json_integer(n_checks), &broken);
    itsw_set(doc, "failures", json_integer(failures), &broken);
    itsw_set(doc, "report", lines, &broken);
    free(report);
    if (broken) {
        json_decref(doc);
        doc = NULL;
    }
    if (itsw_print_json(doc) != 0)
        return ITSW_EXIT_FAIL;
    if (failures > 0) {
        itsw_fail("selftest: %d of %d checks failed", failures, n_checks);
        return ITSW_EXIT_FAIL;
    }
    return ITSW_EXIT_OK;
}

struct itsw_verb {
    const char *name;
    int (*run)(const struct itsw_args *a);
};

static const struct itsw_verb itsw_verbs[] = {
    {"tokenize", itsw_cmd_tokenize}, {"detokenize", itsw_cmd_detokenize},
    {"chat-ids", itsw_cmd_chat_ids}, {"logits", itsw_cmd_logits},
    {"generate", itsw_cmd_generate}, {"score", itsw_cmd_score},
    {"bench", itsw_cmd_bench}, {"selftest", itsw_cmd_selftest},
};

int main(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        fputs(itsw_usage, argc < 2 ? stderr : stdout);
        return argc < 2 ? ITSW_EXIT_USAGE : ITSW_EXIT_OK;
    }
    const char *verb = argv[1];
    if (strcmp(verb, "serve") == 0)
        return itsw_serve_main(argc - 1, argv + 1);
    for (size_t i = 0; i < sizeof itsw_verbs / sizeof itsw_verbs[0]; i++) {
        if (strcmp(verb, itsw_verbs[i].name) != 0)
            continue;
        struct itsw_args a;
        int rc = itsw_parse_args(argc - 1, argv + 1, &a);
        if (rc == 1) {
            fputs(itsw_usage, stdout);
            return ITSW_EXIT_OK;
        }
        if (rc != 0)
            return ITSW_EXIT_USAGE;
        return itsw_verbs[i].run(&a);
    }
    itsw_fail("unknown verb '%s' (see itsw --help)", verb);
    return ITSW_EXIT_USAGE;
}
