/* itsw_config.c — see itsw_config.h. One table drives the INI keys, the flags (the key with
 * '_' written '-'), the defaults, range checks and the usage text.
 *
 * Owns the strings it stores in struct itsw_config. Never prints: every problem goes into the
 * caller's error buffer, all of them at once (nginx -t style), each with its file:line.
 */
#include "itsw_config.h"

#include <errno.h>
#include <ini.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "checkpoint.h"
#include "keyfile.h"

/* CFG_PATH is a string that, when it comes from a file and is relative, is taken relative to
 * that file's directory (so a config works wherever the daemon is started from). */
enum cfg_kind { CFG_STRING, CFG_PATH, CFG_INT, CFG_ROLE, CFG_BOOL };

struct cfg_option {
    const char *key;
    enum cfg_kind kind;
    size_t offset;
    const char *def; /* default, as text; NULL = none */
    long min, max;   /* CFG_INT */
    const char *help;
};

#define CFG_AT(field) offsetof(struct itsw_config, field)

static const struct cfg_option cfg_options[] = {
    {"connect", CFG_STRING, CFG_AT(connect), "tcp://127.0.0.1:7701", 0, 0,
     "itsd's backend endpoint (tcp:// or ipc://)"},
    {"role", CFG_ROLE, CFG_AT(role), NULL, 0, 0, "instruct | feedback | edit | select"},
    {"model", CFG_PATH, CFG_AT(model_dir), NULL, 0, 0,
     "Hugging Face model directory (in a file: relative to the file), or random:SHAPE"},
    {"model_name", CFG_STRING, CFG_AT(model_name), "", 0, 0,
     "name announced to itsd (default: the model directory's name)"},
    {"tokenizer", CFG_PATH, CFG_AT(tokenizer_dir), "", 0, 0,
     "directory of tokenizer.json and tokenizer_config.json; empty = the model directory "
     "(required with random:)"},
    {"random_seed", CFG_INT, CFG_AT(random_seed), "1", 0, INT_MAX,
     "seed of the weights of a random:SHAPE model"},
    {"ignore_eos", CFG_BOOL, CFG_AT(ignore_eos), "false", 0, 0,
     "true: every generate runs to its max_tokens (benchmarks)"},
    {"backend", CFG_STRING, CFG_AT(backend), "cpu", 0, 0, "cpu | cuda"},
    {"device", CFG_INT, CFG_AT(device), "0", 0, 1024, "cuda device ordinal"},
    {"chat_format", CFG_STRING, CFG_AT(chat_format), "auto", 0, 0,
     "auto | llama3 | llama31 | nemotron-super | plain"},
    {"name", CFG_STRING, CFG_AT(name), "", 0, 0, "worker id (default: ROLE-HOST-PID)"},
    {"threads", CFG_INT, CFG_AT(threads), "0", 0, 1024, "cpu threads (0 = every core)"},
    {"max_seqs", CFG_INT, CFG_AT(max_seqs), "0", 0, 65536,
     "concurrent sequences (0 = engine default, 16)"},
    {"kv_tokens", CFG_INT, CFG_AT(kv_tokens), "0", 0, INT_MAX,
     "KV cache positions (0 = engine default, 32768)"},
    {"max_batch_tokens", CFG_INT, CFG_AT(max_batch_tokens), "0", 0, INT_MAX,
     "tokens per engine step (0 = engine default)"},
    {"heartbeat_ms", CFG_INT, CFG_AT(heartbeat_ms), "1000", 10, 600000,
     "heartbeat interval, both ways"},
    {"liveness", CFG_INT, CFG_AT(liveness), "5", 1, 1000,
     "missed itsd heartbeats before reconnecting"},
    {"log_level", CFG_INT, CFG_AT(log_level), "2", 0, 3, "0 error, 1 warn, 2 info, 3 debug"},
    {"server_key", CFG_PATH, CFG_AT(server_key), "", 0, 0,
     "itsd's CURVE public key file (with key; docs/security.md) [plain text when empty]"},
    {"key", CFG_PATH, CFG_AT(key), "", 0, 0,
     "this worker's key pair file (itsctl keygen) [plain text when empty]"},
};
#define CFG_N (sizeof cfg_options / sizeof cfg_options[0])

/* Accumulates error text; problems are separated by "; ". */
struct cfg_errors {
    char *buf;
    size_t len;
    int count;
};

static void cfg_error(struct cfg_errors *e, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void cfg_error(struct cfg_errors *e, const char *fmt, ...)
{
    size_t used = strlen(e->buf);
    if (e->count++ && used + 2 < e->len) {
        strcpy(e->buf + used, "; ");
        used += 2;
    }
    if (used + 1 >= e->len)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->buf + used, e->len - used, fmt, ap);
    va_end(ap);
}

static const struct cfg_option *cfg_find(const char *key)
{
    for (size_t i = 0; i < CFG_N; i++)
        if (strcmp(cfg_options[i].key, key) == 0)
            return &cfg_options[i];
    return NULL;
}

/* Stores `value` for option o; returns NULL or the reason it is refused. */
static const char *cfg_set(struct itsw_config *c, const struct cfg_option *o, const char *value)
{
    void *field = (char *)c + o->offset;
    switch (o->kind) {
    case CFG_STRING:
    case CFG_PATH: {
        char *copy = strdup(value);
        if (!copy)
            return "out of memory";
        free(*(char **)field);
        *(char **)field = copy;
        return NULL;
    }
    case CFG_INT: {
        char *end = NULL;
        errno = 0;
        long v = strtol(value, &end, 10);
        if (errno || end == value || *end)
            return "not an integer";
        if (v < o->min || v > o->max)
            return "out of range";
        *(int *)field = (int)v;
        return NULL;
    }
    case CFG_BOOL:
        if (strcmp(value, "true") == 0 || strcmp(value, "1") == 0)
            *(bool *)field = true;
        else if (strcmp(value, "false") == 0 || strcmp(value, "0") == 0)
            *(bool *)field = false;
        else
            return "not true or false";
        return NULL;
    case CFG_ROLE: {
        enum proto_role r;
        if (proto_role_from_name(value, &r) != 0)
            return "not one of instruct, feedback, edit, select";
        *(enum proto_role *)field = r;
        return NULL;
    }
    }
    return "bad option kind";
}

/* inih calls the handler after reading each line; counting lines in the reader therefore
 * gives the handler the line it is looking at. */
struct cfg_file {
    FILE *f;
    const char *path;
    int line;
    struct itsw_config *c;
    struct cfg_errors *errors;
};

static char *cfg_reader(char *str, int num, void *stream)
{
    struct cfg_file *cf = stream;
    char *got = fgets(str, num, cf->f);
    if (got)
        cf->line++;
    return got;
}

static int cfg_handler(void *user, const char *section, const char *name, const char *value)
{
    struct cfg_file *cf = user;
    if (strcmp(section, "worker") != 0) {
        cfg_error(cf->errors, "%s:%d: unknown section [%s] (itsw reads [worker])", cf->path,
                  cf->line, section);
        return 1;
    }
    const struct cfg_option *o = cfg_find(name);
    if (!o) {
        cfg_error(cf->errors, "%s:%d: unknown key '%s'", cf->path, cf->line, name);
        return 1;
    }
    char resolved[4096];
    const char *slash = strrchr(cf->path, '/');
    bool random_model = o->offset == CFG_AT(model_dir) &&
                        strncmp(value, ITSW_RANDOM_PREFIX, strlen(ITSW_RANDOM_PREFIX)) == 0;
    if (o->kind == CFG_PATH && !random_model && value[0] != '/' && value[0] && slash) {
        int n = snprintf(resolved, sizeof resolved, "%.*s/%s", (int)(slash - cf->path), cf->path,
                         value);
        if (n < 0 || (size_t)n >= sizeof resolved) {
            cfg_error(cf->errors, "%s:%d: %s: path too long", cf->path, cf->line, name);
            return 1;
        }
        value = resolved;
    }
    const char *why = cfg_set(cf->c, o, value);
    if (why)
        cfg_error(cf->errors, "%s:%d: %s = '%s': %s", cf->path, cf->line, name, value, why);
    return 1;
}

static int cfg_load_file(const char *path, struct itsw_config *c, struct cfg_errors *errors)
{
    struct cfg_file cf = {.path = path, .c = c, .errors = errors};
    cf.f = fopen(path, "r");
    if (!cf.f) {
        cfg_error(errors, "%s: %s", path, strerror(errno));
        return -1;
    }
    int rc = ini_parse_stream(cfg_reader, &cf, cfg_handler, &cf);
    fclose(cf.f);
    if (rc > 0)
        cfg_error(errors, "%s:%d: not a valid INI line", path, rc);
    else if (rc < 0)
        cfg_error(errors, "%s: cannot parse (%d)", path, rc);
    return 0;
}

static void cfg_set_defaults(struct itsw_config *c, struct cfg_errors *errors)
{
    for (size_t i = 0; i < CFG_N; i++) {
        if (!cfg_options[i].def)
            continue;
        const char *why = cfg_set(c, &cfg_options[i], cfg_options[i].def);
        if (why)
            cfg_error(errors, "default of %s: %s", cfg_options[i].key, why);
    }
}

/* Turns "--max-seqs" into "max_seqs" in `out`. Returns 0, or -1 if not a long flag. */
static int cfg_flag_key(const char *flag, char *out, size_t out_len)
{
    if (strncmp(flag, "--", 2) != 0 || strlen(flag + 2) + 1 > out_len)
        return -1;
    size_t i = 0;
    for (const char *p = flag + 2; *p; p++)
        out[i++] = *p == '-' ? '_' : *p;
    out[i] = '\0';
    return 0;
}

/* model = random:SHAPE: the shape must be known, and the tokenizer comes from `tokenizer`
 * (there is no model directory to take it from). */
static void cfg_check_random(struct itsw_config *c, struct cfg_errors *errors)
{
    size_t plen = strlen(ITSW_RANDOM_PREFIX);
    if (strncmp(c->model_dir, ITSW_RANDOM_PREFIX, plen) != 0)
        return;
    const char *shape = c->model_dir + plen;
    struct model_config cfg;
    if (model_shape_by_name(shape, &cfg) != 0) {
        cfg_error(errors, "model = '%s': unknown shape '%s' (known: %s)", c->model_dir, shape,
                  model_shape_names());
        return;
    }
    if (!c->tokenizer_dir || !*c->tokenizer_dir) {
        cfg_error(errors, "model = '%s': random weights need tokenizer = DIR (a directory with "
                  "tokenizer.json and tokenizer_config.json)", c->model_dir);
        return;
    }
    c->random_shape = shape;
}

/* Fills the defaults that depend on other values. */
static void cfg_derive(struct itsw_config *c, struct cfg_errors *errors)
{
    if (c->model_dir && (!c->model_name || !*c->model_name)) {
        const char *end = c->model_dir + strlen(c->model_dir);
        while (end > c->model_dir && end[-1] == '/')
            end--;
        const char *start = end;
        while (start > c->model_dir && start[-1] != '/')
            start--;
        free(c->model_name);
        c->model_name = strndup(start, (size_t)(end - start));
    }
    if (!c->name || !*c->name) {
        char host[128] = "host";
        gethostname(host, sizeof host - 1);
        host[sizeof host - 1] = '\0';
        char buf[256];
        snprintf(buf, sizeof buf, "%s-%s-%d", proto_role_name(c->role), host, (int)getpid());
        free(c->name);
        c->name = strdup(buf);
    }
    if (!c->model_name || !c->name)
        cfg_error(errors, "out of memory");
    else if (strlen(c->name) > PROTO_MAX_NAME_BYTES || strlen(c->model_name) > PROTO_MAX_NAME_BYTES)
        cfg_error(errors, "name and model_name must be at most %d bytes", PROTO_MAX_NAME_BYTES);
}

/* server_key and key: both or neither, and each must read. */
static void cfg_load_curve(struct itsw_config *c, struct cfg_errors *errors)
{
    bool has_server = c->server_key && *c->server_key, has_key = c->key && *c->key;
    if (!has_server && !has_key)
        return;
    if (!has_server || !has_key) {
        cfg_error(errors, "%s is set but not %s: CURVE needs itsd's public key (server_key) and "
                  "the worker's key pair (key)", has_server ? "server_key" : "key",
                  has_server ? "key" : "server_key");
        return;
    }
    if (!zmq_has("curve")) {
        cfg_error(errors, "server_key: this libzmq was built without CURVE");
        return;
    }
    char why[1200]; /* keyfile_read names the file in it */
    if (keyfile_read(c->server_key, c->curve_server, NULL, why, sizeof why) != 0)
        cfg_error(errors, "server_key: %s", why);
    else if (keyfile_read(c->key, c->curve_public, c->curve_secret, why, sizeof why) != 0)
        cfg_error(errors, "key: %s", why);
    else
        c->curve = true;
}

int itsw_config_from_args(int argc, char **argv, struct itsw_config *c, char *err,
                          size_t err_len)
{
    memset(c, 0, sizeof *c);
    c->role = (enum proto_role)-1;
    if (err_len)
        err[0] = '\0';
    struct cfg_errors errors = {.buf = err, .len = err_len};
    cfg_set_defaults(c, &errors);

    /* The file first, wherever --config stands, so that flags override it. */
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0)
            return 1;
        if (strcmp(argv[i], "--config") == 0) {
            if (i + 1 >= argc) {
                cfg_error(&errors, "--config needs a file");
                return -1;
            }
            cfg_load_file(argv[++i], c, &errors);
        }
    }
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--config") == 0) {
            i++;
            continue;
        }
        char key[64];
        const struct cfg_option *o = NULL;
        if (cfg_flag_key(argv[i], key, sizeof key) == 0)
            o = cfg_find(key);
        if (!o) {
            cfg_error(&errors, "unknown option '%s' (see itsw serve --help)", argv[i]);
            continue;
        }
        if (i + 1 >= argc) {
            cfg_error(&errors, "%s needs a value", argv[i]);
            break;
        }
        const char *why = cfg_set(c, o, argv[++i]);
        if (why)
            cfg_error(&errors, "%s '%s': %s", argv[i - 1], argv[i], why);
    }
    if ((int)c->role < 0)
        cfg_error(&errors, "role is required (--role instruct|feedback|edit|select)");
    if (!c->model_dir || !*c->model_dir)
        cfg_error(&errors, "model is required (--model DIR)");
    else
        cfg_check_random(c, &errors);
    if (errors.count == 0)
        cfg_derive(c, &errors);
    if (errors.count == 0)
        cfg_load_curve(c, &errors);
    return errors.count ? -1 : 0;
}

void itsw_config_deinit(struct itsw_config *c)
{
    if (!c)
        return;
    for (size_t i = 0; i < CFG_N; i++)
        if (cfg_options[i].kind == CFG_STRING || cfg_options[i].kind == CFG_PATH) {
            char **field = (char **)((char *)c + cfg_options[i].offset);
            free(*field);
            *field = NULL;
        }
    c->random_shape = NULL;
    c->curve = false;
    memset(c->curve_secret, 0, sizeof c->curve_secret);
}

const char *itsw_config_usage(void)
{
    static char text[4096];
    if (text[0])
        return text;
    size_t used = (size_t)snprintf(text, sizeof text,
                                   "usage: itsw serve [--config FILE] [--KEY VALUE ...]\n"
                                   "KEY is any [worker] key of the config file, '_' written "
                                   "'-'; flags override the file.\n");
    for (size_t i = 0; i < CFG_N && used < sizeof text; i++) {
        char flag[64];
        size_t k = 0;
        for (const char *p = cfg_options[i].key; *p && k + 1 < sizeof flag; p++)
            flag[k++] = *p == '_' ? '-' : *p;
        flag[k] = '\0';
        used += (size_t)snprintf(text + used, sizeof text - used, "  --%-18s %s%s%s%s\n", flag,
                                 cfg_options[i].help, cfg_options[i].def ? " [" : " (required)",
                                 cfg_options[i].def ? cfg_options[i].def : "",
                                 cfg_options[i].def ? "]" : "");
    }
    return text;
}
