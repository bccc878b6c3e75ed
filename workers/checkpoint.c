/* checkpoint.c — a Hugging Face Llama directory as a validated model_config plus weight views.
 *
 * Reads config.json (transformers 4.x and 5.x key layouts) and generation_config.json, maps
 * model.safetensors or the shards named by model.safetensors.index.json (each shard once),
 * and binds every weight the model contract needs, checking name, dtype and shape against
 * the config. Also makes heap-resident random weights of a named real shape for benchmarks.
 *
 * Owns: the safetensors mappings (or the random-weight slab) and the per-layer view array.
 * Must never: copy weights from disk into heap memory (a 70B index opens in a few MB), print,
 * exit, or accept a config value it has not range-checked.
 */
#include "checkpoint.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "safetensors.h"

/* Sanity bounds on config values: far above any real Llama (405B has dim 16384, ffn 53248),
 * low enough that every product of two of them fits comfortably in int64. */
#define CHECKPOINT_MAX_VOCAB (1 << 24)
#define CHECKPOINT_MAX_DIM (1 << 20)
#define CHECKPOINT_MAX_FFN (1 << 22)
#define CHECKPOINT_MAX_LAYERS 4096
#define CHECKPOINT_MAX_HEADS 4096
#define CHECKPOINT_MAX_HEAD_DIM 4096
#define CHECKPOINT_MAX_SEQ (1 << 24)
#define CHECKPOINT_NAME_MAX 128

struct checkpoint {
    char *dir;                   /* NULL for random weights */
    struct model_config cfg;
    struct model_weights w;      /* views into files[] or heap */
    struct safetensors **files;  /* n_files mappings (one per shard) */
    char **file_names;           /* n_files shard names as the index spells them */
    size_t n_files;
    void *heap;                  /* random weights: one anonymous mapping */
    size_t heap_bytes;
};

size_t dtype_size(enum dtype t)
{
    switch (t) {
    case DTYPE_F32:
        return 4;
    case DTYPE_F16:
    case DTYPE_BF16:
        return 2;
    }
    return 0;
}

const char *dtype_name(enum dtype t)
{
    switch (t) {
    case DTYPE_F32:
        return "F32";
    case DTYPE_F16:
        return "F16";
    case DTYPE_BF16:
        return "BF16";
    }
    return "?";
}

__attribute__((format(printf, 3, 4))) static int checkpoint_fail(char *err, size_t err_len,
                                                                 const char *fmt, ...)
{
    if (err && err_len) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, err_len, fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* ---------------------------------------------------------------------------------------------
 * config.json
 * ------------------------------------------------------------------------------------------- */

/* `v` printed for an error message, at most 40 characters. */
static void checkpoint_json_repr(const json_t *v, char *buf, size_t len)
{
    char *s = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
    snprintf(buf, len, "%.40s%s", s ? s : "?", s && strlen(s) > 40 ? "..." : "");
    free(s);
}

/* Reads integer `<ctx><key>` of object `o`. Absent or null: *out = def when !required, else an
 * error. Integral reals (8192.0) are accepted: some exporters write every number as a float. */
static int checkpoint_json_int(const char *file, const char *ctx, const json_t *o,
                               const char *key, int required, int def, int *out, char *err,
                               size_t err_len)
{
    const json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        if (required)
            return checkpoint_fail(err, err_len, "%s: %s%s is missing", file, ctx, key);
        *out = def;
        return 0;
    }
    double d = 0;
    if (json_is_integer(v))
        d = (double)json_integer_value(v);
    else if (json_is_real(v))
        d = json_real_value(v);
    if ((!json_is_integer(v) && !(json_is_real(v) && d == floor(d))) || d < -2147483648.0 ||
        d > 2147483647.0) {
        char repr[48];
        checkpoint_json_repr(v, repr, sizeof repr);
        return checkpoint_fail(err, err_len, "%s: %s%s (%s) is not a 32-bit integer", file, ctx,
                               key, repr);
    }
    *out = (int)d;
    return 0;
}

/* Reads number `<ctx><key>` of object `o`; same rules as checkpoint_json_int. */
static int checkpoint_json_num(const char *file, const char *ctx, const json_t *o,
                               const char *key, int required, double def, double *out,
                               char *err, size_t err_len)
{
    const json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        if (required)
            return checkpoint_fail(err, err_len, "%s: %s%s is missing", file, ctx, key);
        *out = def;
        return 0;
    }
    if (!json_is_number(v)) {
        char repr[48];
        checkpoint_json_repr(v, repr, sizeof repr);
        return checkpoint_fail(err, err_len, "%s: %s%s (%s) is not a number", file, ctx, key,
                               repr);
    }
    *out = json_number_value(v);
    return 0;
}

/* Reads boolean `key`; absent or null gives `def`. */
static int checkpoint_json_bool(const char *file, const json_t *o, const char *key, int def,
                                int *out, char *err, size_t err_len)
{
    const json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        *out = def;
        return 0;
    }
    if (!json_is_boolean(v)) {
        char repr[48];
        checkpoint_json_repr(v, repr, sizeof repr);
        return checkpoint_fail(err, err_len, "%s: %s (%s) is not true or false", file, key,
                               repr);
    }
    *out = json_is_true(v);
    return 0;
}

/* Adds the ids of an eos_token_id value (int, array of ints, or null) to cfg, skipping
 * duplicates so that config.json and generation_config.json can both list the same ids. */
static int checkpoint_add_eos(const char *file, const json_t *v, struct model_config *c,
                              char *err, size_t err_len)
{
    if (!v || json_is_null(v))
        return 0;
    size_t n = json_is_array(v) ? json_array_size(v) : 1;
    if (!json_is_array(v) && !json_is_integer(v))
        return checkpoint_fail(err, err_len, "%s: eos_token_id is neither an integer nor an "
                               "array of integers", file);
    for (size_t i = 0; i < n; i++) {
        const json_t *e = json_is_array(v) ? json_array_get(v, i) : v;
        if (!json_is_integer(e) || json_integer_value(e) < 0 ||
            json_integer_value(e) >= c->vocab_size)
            return checkpoint_fail(err, err_len, "%s: eos_token_id[%zu] is not a token id in "
                                   "[0, vocab_size %d)", file, i, c->vocab_size);
        int id = (int)json_integer_value(e);
        int seen = 0;
        for (int k = 0; k < c->n_eos; k++)
            seen |= c->eos_ids[k] == id;
        if (seen)
            continue;
        if (c->n_eos == MODEL_MAX_EOS)
            return checkpoint_fail(err, err_len, "%s: more than %d distinct eos_token_id "
                                   "values", file, MODEL_MAX_EOS);
        c->eos_ids[c->n_eos++] = id;
    }
    return 0;
}

/* Range checks shared by configs read from disk and configs given for random weights. `what`
 * names the source in messages; the key names are config.json's. */
static int checkpoint_validate_config(const char *what, const struct model_config *c,
                                      char *err, size_t err_len)
{
    const struct {
        const char *key;
        int value, lo, hi;
    } ints[] = {
        {"vocab_size", c->vocab_size, 1, CHECKPOINT_MAX_VOCAB},
        {"hidden_size", c->dim, 1, CHECKPOINT_MAX_DIM},
        {"intermediate_size", c->ffn_dim, 1, CHECKPOINT_MAX_FFN},
        {"num_hidden_layers", c->n_layers, 1, CHECKPOINT_MAX_LAYERS},
        {"num_attention_heads", c->n_heads, 1, CHECKPOINT_MAX_HEADS},
        {"num_key_value_heads", c->n_kv_heads, 1, CHECKPOINT_MAX_HEADS},
        {"head_dim", c->head_dim, 2, CHECKPOINT_MAX_HEAD_DIM},
        {"max_position_embeddings", c->max_seq_len, 1, CHECKPOINT_MAX_SEQ},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
        if (ints[i].value < ints[i].lo || ints[i].value > ints[i].hi)
            return checkpoint_fail(err, err_len, "%s: %s (%d) must be in [%d, %d]", what,
                                   ints[i].key, ints[i].value, ints[i].lo, ints[i].hi);
    if (c->n_heads % c->n_kv_heads != 0)
        return checkpoint_fail(err, err_len, "%s: num_key_value_heads (%d) must divide "
                               "num_attention_heads (%d)", what, c->n_kv_heads, c->n_heads);
    if (c->head_dim % 2 != 0)
        return checkpoint_fail(err, err_len, "%s: head_dim (%d) must be even for RoPE", what,
                               c->head_dim);
    if (!(c->norm_eps > 0 && c->norm_eps < 1))
        return checkpoint_fail(err, err_len, "%s: rms_norm_eps (%g) must be in (0, 1)", what,
                               (double)c->norm_eps);
    if (!(c->rope_theta > 0 && isfinite(c->rope_theta)))
        return checkpoint_fail(err, err_len, "%s: rope_theta (%g) must be positive", what,
                               (double)c->rope_theta);
    if (c->rope_kind != ROPE_DEFAULT && c->rope_kind != ROPE_LLAMA3)
        return checkpoint_fail(err, err_len, "%s: unknown rope kind %d", what,
                               (int)c->rope_kind);
    if (c->rope_kind == ROPE_LLAMA3) {
        if (!(c->rope_factor > 0 && isfinite(c->rope_factor)))
            return checkpoint_fail(err, err_len, "%s: rope factor (%g) must be positive", what,
                                   (double)c->rope_factor);
        if (!(c->rope_low_freq_factor > 0 && isfinite(c->rope_low_freq_factor)))
            return checkpoint_fail(err, err_len, "%s: rope low_freq_factor (%g) must be "
                                   "positive", what, (double)c->rope_low_freq_factor);
        if (!(c->rope_high_freq_factor > c->rope_low_freq_factor &&
              isfinite(c->rope_high_freq_factor)))
            return checkpoint_fail(err, err_len, "%s: rope high_freq_factor (%g) must exceed "
                                   "low_freq_factor (%g)", what,
                                   (double)c->rope_high_freq_factor,
                                   (double)c->rope_low_freq_factor);
        if (c->rope_original_max_pos < 1 || c->rope_original_max_pos > CHECKPOINT_MAX_SEQ)
            return checkpoint_fail(err, err_len, "%s: rope original_max_position_embeddings "
                                   "(%d) must be in [1, %d]", what, c->rope_original_max_pos,
                                   CHECKPOINT_MAX_SEQ);
    }
    if (c->bos_id < -1 || c->bos_id >= c->vocab_size)
        return checkpoint_fail(err, err_len, "%s: bos_token_id (%d) is not a token id in [0, "
                               "vocab_size %d)", what, c->bos_id, c->vocab_size);
    if (c->n_eos < 0 || c->n_eos > MODEL_MAX_EOS)
        return checkpoint_fail(err, err_len, "%s: %d eos ids (at most %d)", what, c->n_eos,
                               MODEL_MAX_EOS);
    for (int i = 0; i < c->n_eos; i++)
        if (c->eos_ids[i] < 0 || c->eos_ids[i] >= c->vocab_size)
            return checkpoint_fail(err, err_len, "%s: eos_token_id %d is not a token id in "
                                   "[0, vocab_size %d)", what, c->eos_ids[i], c->vocab_size);
    if (dtype_size(c->dtype) == 0)
        return checkpoint_fail(err, err_len, "%s: unknown dtype %d", what, (int)c->dtype);
    return 0;
}

/* The RoPE settings: rope_parameters (5.x) or rope_theta + rope_scaling (4.x). */
static int checkpoint_parse_rope(const char *file, const json_t *root, struct model_config *c,
                                 char *err, size_t err_len)
{
    const json_t *params = json_object_get(root, "rope_parameters");
    const char *ctx = "rope_parameters.";
    double theta;
    if (params && !json_is_null(params)) {
        if (!json_is_object(params))
            return checkpoint_fail(err, err_len, "%s: rope_parameters is not an object", file);
        /* Some 5.x exports keep a top-level rope_theta as well; rope_parameters wins. */
        double top;
        if (checkpoint_json_num(file, "", root, "rope_theta", 0, 10000.0, &top, err,
                                err_len) < 0 ||
            checkpoint_json_num(file, ctx, params, "rope_theta", 0, top, &theta, err,
                                err_len) < 0)
            return -1;
    } else {
        params = json_object_get(root, "rope_scaling");
        ctx = "rope_scaling.";
        if (params && !json_is_null(params) && !json_is_object(params))
            return checkpoint_fail(err, err_len, "%s: rope_scaling is not an object or null",
                                   file);
        if (json_is_null(params))
            params = NULL;
        /* LlamaConfig's default when the key is absent. */
        if (checkpoint_json_num(file, "", root, "rope_theta", 0, 10000.0, &theta, err,
                                err_len) < 0)
            return -1;
    }
    c->rope_theta = (float)theta;
    c->rope_kind = ROPE_DEFAULT;
    if (!params)
        return 0;

    /* transformers < 4.45 spelled rope_type as "type". */
    const json_t *jt = json_object_get(params, "rope_type");
    if (!jt)
        jt = json_object_get(params, "type");
    if (jt && !json_is_string(jt))
        return checkpoint_fail(err, err_len, "%s: %srope_type is not a string", file, ctx);
    const char *type = jt ? json_string_value(jt) : "default";
    if (strcmp(type, "default") == 0)
        return 0;
    if (strcmp(type, "llama3") != 0)
        return checkpoint_fail(err, err_len, "%s: %srope_type \"%.40s\" is not supported "
                               "(only \"default\" and \"llama3\")", file, ctx, type);
    c->rope_kind = ROPE_LLAMA3;
    double factor, lo, hi;
    if (checkpoint_json_num(file, ctx, params, "factor", 1, 0, &factor, err, err_len) < 0 ||
        checkpoint_json_num(file, ctx, params, "low_freq_factor", 1, 0, &lo, err, err_len) < 0 ||
        checkpoint_json_num(file, ctx, params, "high_freq_factor", 1, 0, &hi, err, err_len) < 0 ||
        checkpoint_json_int(file, ctx, params, "original_max_position_embeddings", 1, 0,
                            &c->rope_original_max_pos, err, err_len) < 0)
        return -1;
    c->rope_factor = (float)factor;
    c->rope_low_freq_factor = (float)lo;
    c->rope_high_freq_factor = (float)hi;
    return 0;
}

/* Fills `c` from config.json's root object. *dtype_given is 0 when neither torch_dtype nor
 * dtype is present (the caller then takes the embedding tensor's dtype). */
static int checkpoint_parse_config(const char *file, const json_t *root, struct model_config *c,
                                   int *dtype_given, char *err, size_t err_len)
{
    memset(c, 0, sizeof *c);
    if (!json_is_object(root))
        return checkpoint_fail(err, err_len, "%s: not a JSON object", file);

    const json_t *arch = json_object_get(root, "architectures");
    if (arch && !json_is_null(arch)) {
        if (!json_is_array(arch) || json_array_size(arch) == 0)
            return checkpoint_fail(err, err_len, "%s: architectures is not a non-empty array",
                                   file);
        for (size_t i = 0; i < json_array_size(arch); i++) {
            const json_t *a = json_array_get(arch, i);
            if (!json_is_string(a) || strcmp(json_string_value(a), "LlamaForCausalLM") != 0) {
                char repr[48];
                checkpoint_json_repr(a, repr, sizeof repr);
                return checkpoint_fail(err, err_len, "%s: architectures[%zu] %s is not "
                                       "supported (only LlamaForCausalLM)", file, i, repr);
            }
        }
    }
    const json_t *mt = json_object_get(root, "model_type");
    if (!json_is_string(mt))
        return checkpoint_fail(err, err_len, "%s: model_type is missing or not a string", file);
    if (strcmp(json_string_value(mt), "llama") != 0)
        return checkpoint_fail(err, err_len, "%s: model_type \"%.40s\" is not supported (only "
                               "\"llama\")", file, json_string_value(mt));
    const json_t *act = json_object_get(root, "hidden_act");
    if (act && !json_is_null(act) &&
        (!json_is_string(act) || strcmp(json_string_value(act), "silu") != 0))
        return checkpoint_fail(err, err_len, "%s: hidden_act is not \"silu\"", file);
    /* The weight contract has no bias vectors: a model that needs them must not load. */
    int bias = 0;
    if (checkpoint_json_bool(file, root, "attention_bias", 0, &bias, err, err_len) < 0)
        return -1;
    if (bias)
        return checkpoint_fail(err, err_len, "%s: attention_bias true is not supported", file);
    if (checkpoint_json_bool(file, root, "mlp_bias", 0, &bias, err, err_len) < 0)
        return -1;
    if (bias)
        return checkpoint_fail(err, err_len, "%s: mlp_bias true is not supported", file);

    if (checkpoint_json_int(file, "", root, "vocab_size", 1, 0, &c->vocab_size, err,
                            err_len) < 0 ||
        checkpoint_json_int(file, "", root, "hidden_size", 1, 0, &c->dim, err, err_len) < 0 ||
        checkpoint_json_int(file, "", root, "intermediate_size", 1, 0, &c->ffn_dim, err,
                            err_len) < 0 ||
        checkpoint_json_int(file, "", root, "num_hidden_layers", 1, 0, &c->n_layers, err,
                            err_len) < 0 ||
        checkpoint_json_int(file, "", root, "num_attention_heads", 1, 0, &c->n_heads, err,
                            err_len) < 0 ||
        checkpoint_json_int(file, "", root, "num_key_value_heads", 0, c->n_heads,
                            &c->n_kv_heads, err, err_len) < 0 ||
        checkpoint_json_int(file, "", root, "max_position_embeddings", 1, 0, &c->max_seq_len,
                            err, err_len) < 0)
        return -1;
    if (c->n_heads < 1)
        return checkpoint_fail(err, err_len, "%s: num_attention_heads (%d) must be positive",
                               file, c->n_heads);
    if (!json_object_get(root, "head_dim") || json_is_null(json_object_get(root, "head_dim"))) {
        if (c->dim % c->n_heads != 0)
            return checkpoint_fail(err, err_len, "%s: num_attention_heads (%d) must divide "
                                   "hidden_size (%d) when head_dim is absent", file,
                                   c->n_heads, c->dim);
        c->head_dim = c->dim / c->n_heads;
    } else if (checkpoint_json_int(file, "", root, "head_dim", 1, 0, &c->head_dim, err,
                                   err_len) < 0) {
        return -1;
    }
    double eps;
    if (checkpoint_json_num(file, "", root, "rms_norm_eps", 1, 0, &eps, err, err_len) < 0)
        return -1;
    c->norm_eps = (float)eps;
    if (checkpoint_parse_rope(file, root, c, err, err_len) < 0)
        return -1;
    if (checkpoint_json_bool(file, root, "tie_word_embeddings", 0, &c->tied_embeddings, err,
                             err_len) < 0)
        return -1;

    const char *dkey = "dtype";
    const json_t *jd = json_object_get(root, dkey);
    if (!jd || json_is_null(jd)) {
        dkey = "torch_dtype";
        jd = json_object_get(root, dkey);
    }
    *dtype_given = jd && !json_is_null(jd);
    if (*dtype_given) {
        const char *s = json_is_string(jd) ? json_string_value(jd) : "";
        if (strcmp(s, "bfloat16") == 0)
            c->dtype = DTYPE_BF16;
        else if (strcmp(s, "float16") == 0)
            c->dtype = DTYPE_F16;
        else if (strcmp(s, "float32") == 0)
            c->dtype = DTYPE_F32;
        else
            return checkpoint_fail(err, err_len, "%s: %s \"%.40s\" is not bfloat16, float16 "
                                   "or float32", file, dkey, s);
    }

    /* The tokens' range checks need vocab_size, so check it before reading them. */
    if (c->vocab_size < 1 || c->vocab_size > CHECKPOINT_MAX_VOCAB)
        return checkpoint_fail(err, err_len, "%s: vocab_size (%d) must be in [1, %d]", file,
                               c->vocab_size, CHECKPOINT_MAX_VOCAB);
    if (checkpoint_json_int(file, "", root, "bos_token_id", 0, -1, &c->bos_id, err,
                            err_len) < 0)
        return -1;
    if (c->bos_id < -1 || c->bos_id >= c->vocab_size)
        return checkpoint_fail(err, err_len, "%s: bos_token_id (%d) is not a token id in [0, "
                               "vocab_size %d)", file, c->bos_id, c->vocab_size);
    return checkpoint_add_eos(file, json_object_get(root, "eos_token_id"), c, err, err_len);
}

/* Loads `path` as JSON. A missing file is an error only when `required`; *out stays NULL. */
static int checkpoint_load_json(const char *path, int required, json_t **out, char *err,
                                size_t err_len)
{
    *out = NULL;
    struct stat sb;
    if (stat(path, &sb) != 0) {
        if (errno == ENOENT && !required)
            return 0;
        return checkpoint_fail(err, err_len, "%s: %s", path, strerror(errno));
    }
    if (!S_ISREG(sb.st_mode))
        return checkpoint_fail(err, err_len, "%s: not a regular file", path);
    json_error_t jerr;
    *out = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (!*out)
        return checkpoint_fail(err, err_len, "%s: invalid JSON at line %d column %d: %s", path,
                               jerr.line, jerr.column, jerr.text);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Weights from safetensors
 * ------------------------------------------------------------------------------------------- */

/* Where open-time lookups go: a single file, or an index's weight_map over the shards. */
struct checkpoint_src {
    const json_t *weight_map; /* NULL for a single model.safetensors */
    const char *index_path;
};

static char *checkpoint_join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + 1 + strlen(name) + 1;
    char *p = malloc(n);
    if (p)
        snprintf(p, n, "%s/%s", dir, name);
    return p;
}

/* Opens (once) shard `name` of the index, returning its slot in ck->files. */
static int checkpoint_open_shard(struct checkpoint *ck, const char *index_path,
                                 const char *tensor, const char *name, char *err,
                                 size_t err_len)
{
    for (size_t i = 0; i < ck->n_files; i++)
        if (strcmp(ck->file_names[i], name) == 0)
            return (int)i;
    /* Shards live beside the index: a name that climbs out of the directory is refused. */
    if (!*name || strchr(name, '/') || strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
        return checkpoint_fail(err, err_len, "%s: weight_map[%s] \"%.80s\" is not a file name "
                               "in the model directory", index_path, tensor, name);
    struct safetensors **nf = realloc(ck->files, (ck->n_files + 1) * sizeof *nf);
    if (!nf)
        return checkpoint_fail(err, err_len, "%s: out of memory", index_path);
    ck->files = nf;
    char **nn = realloc(ck->file_names, (ck->n_files + 1) * sizeof *nn);
    if (!nn)
        return checkpoint_fail(err, err_len, "%s: out of memory", index_path);
    ck->file_names = nn;
    char *path = checkpoint_join(ck->dir, name);
    char *copy = strdup(name);
    if (!path || !copy) {
        free(path);
        free(copy);
        return checkpoint_fail(err, err_len, "%s: out of memory", index_path);
    }
    struct safetensors *st = NULL;
    int rc = safetensors_open(path, &st, err, err_len);
    free(path);
    if (rc < 0) {
        free(copy);
        return rc;
    }
    ck->files[ck->n_files] = st;
    ck->file_names[ck->n_files] = copy;
    return (int)ck->n_files++;
}

/* Opens every shard the index names and leaves src->weight_map pointing into `index`. */
static int checkpoint_open_index(struct checkpoint *ck, const char *index_path,
                                 const json_t *index, struct checkpoint_src *src, char *err,
                                 size_t err_len)
{
    if (!json_is_object(index))
        return checkpoint_fail(err, err_len, "%s: not a JSON object", index_path);
    const json_t *wm = json_object_get(index, "weight_map");
    if (!json_is_object(wm) || json_object_size(wm) == 0)
        return checkpoint_fail(err, err_len, "%s: weight_map is missing, empty or not an "
                               "object", index_path);
    const char *tensor;
    const json_t *v;
    json_object_foreach((json_t *)wm, tensor, v) {
        if (!json_is_string(v))
            return checkpoint_fail(err, err_len, "%s: weight_map[%s] is not a string",
                                   index_path, tensor);
        if (checkpoint_open_shard(ck, index_path, tensor, json_string_value(v), err,
                                  err_len) < 0)
            return -1;
    }
    src->weight_map = wm;
    src->index_path = index_path;
    return 0;
}

/* Finds tensor `name` and the path of the file holding it (*file). Returns it, or NULL with
 * err filled. */
static const struct safetensors_tensor *checkpoint_find(const struct checkpoint *ck,
                                                        const struct checkpoint_src *src,
                                                        const char *name, const char **file,
                                                        char *err, size_t err_len)
{
    if (!src->weight_map) {
        *file = safetensors_path(ck->files[0]);
        const struct safetensors_tensor *t = safetensors_find(ck->files[0], name);
        if (!t)
            checkpoint_fail(err, err_len, "%s: tensor %s is missing", *file, name);
        return t;
    }
    const json_t *v = json_object_get(src->weight_map, name);
    if (!v) {
        checkpoint_fail(err, err_len, "%s: tensor %s is missing from weight_map",
                        src->index_path, name);
        return NULL;
    }
    for (size_t i = 0; i < ck->n_files; i++) {
        if (strcmp(ck->file_names[i], json_string_value(v)) != 0)
            continue;
        *file = safetensors_path(ck->files[i]);
        const struct safetensors_tensor *t = safetensors_find(ck->files[i], name);
        if (!t)
            checkpoint_fail(err, err_len, "%s: tensor %s is missing, though %s lists it there",
                            safetensors_path(ck->files[i]), name, src->index_path);
        return t;
    }
    checkpoint_fail(err, err_len, "%s: tensor %s: shard not opened", src->index_path, name);
    return NULL;
}

static void checkpoint_shape_str(const int64_t *shape, int n_dims, char *buf, size_t len)
{
    size_t off = 0;
    off += (size_t)snprintf(buf, len, "[");
    for (int i = 0; i < n_dims && off < len; i++)
        off += (size_t)snprintf(buf + off, len - off, "%s%lld", i ? ", " : "",
                                (long long)shape[i]);
    if (off < len)
        snprintf(buf + off, len - off, "]");
}

/* Binds tensor `name` into `out`, checking dtype and shape: (d0) when d1 == 0, else (d0, d1). */
static int checkpoint_bind(const struct checkpoint *ck, const struct checkpoint_src *src,
                           const char *name, int64_t d0, int64_t d1, struct tensor *out,
                           char *err, size_t err_len)
{
    const char *file = NULL;
    const struct safetensors_tensor *t = checkpoint_find(ck, src, name, &file, err, err_len);
    if (!t)
        return -1;
    if (!t->dtype_known)
        return checkpoint_fail(err, err_len, "%s: tensor %s has dtype %s; weights must be F32, "
                               "F16 or BF16", file, name, t->dtype_str);
    int64_t want[2] = {d0, d1};
    int want_dims = d1 ? 2 : 1;
    int ok = t->n_dims == want_dims;
    for (int i = 0; ok && i < want_dims; i++)
        ok = t->shape[i] == want[i];
    if (!ok) {
        char ws[64], fs[160];
        checkpoint_shape_str(want, want_dims, ws, sizeof ws);
        checkpoint_shape_str(t->shape, t->n_dims, fs, sizeof fs);
        return checkpoint_fail(err, err_len, "%s: tensor %s has shape %s but config.json "
                               "implies %s", file, name, fs, ws);
    }
    out->data = t->data;
    out->dtype = t->dtype;
    out->n_dims = want_dims;
    out->shape[0] = d0;
    out->shape[1] = d1 ? d1 : 1;
    return 0;
}

static int checkpoint_bind_all(struct checkpoint *ck, const struct checkpoint_src *src,
                               char *err, size_t err_len)
{
    const struct model_config *c = &ck->cfg;
    int64_t dim = c->dim, ffn = c->ffn_dim, q = (int64_t)c->n_heads * c->head_dim;
    int64_t kv = (int64_t)c->n_kv_heads * c->head_dim;
    struct model_weights *w = &ck->w;
    if (checkpoint_bind(ck, src, "model.embed_tokens.weight", c->vocab_size, dim, &w->embed,
                        err, err_len) < 0 ||
        checkpoint_bind(ck, src, "model.norm.weight", dim, 0, &w->final_norm, err,
                        err_len) < 0)
        return -1;
    if (c->tied_embeddings) {
        /* Like transformers, a tied model uses the embedding even if lm_head was saved too. */
        w->lm_head = w->embed;
    } else if (checkpoint_bind(ck, src, "lm_head.weight", c->vocab_size, dim, &w->lm_head, err,
                               err_len) < 0) {
        return -1;
    }
    for (int i = 0; i < c->n_layers; i++) {
        struct layer_weights *l = &w->layers[i];
        const struct {
            const char *suffix;
            int64_t d0, d1;
            struct tensor *t;
        } parts[] = {
            {"input_layernorm.weight", dim, 0, &l->attn_norm},
            {"self_attn.q_proj.weight", q, dim, &l->wq},
            {"self_attn.k_proj.weight", kv, dim, &l->wk},
            {"self_attn.v_proj.weight", kv, dim, &l->wv},
            {"self_attn.o_proj.weight", dim, q, &l->wo},
            {"post_attention_layernorm.weight", dim, 0, &l->mlp_norm},
            {"mlp.gate_proj.weight", ffn, dim, &l->w_gate},
            {"mlp.up_proj.weight", ffn, dim, &l->w_up},
            {"mlp.down_proj.weight", dim, ffn, &l->w_down},
        };
        for (size_t p = 0; p < sizeof parts / sizeof parts[0]; p++) {
            char name[CHECKPOINT_NAME_MAX];
            snprintf(name, sizeof name, "model.layers.%d.%s", i, parts[p].suffix);
            if (checkpoint_bind(ck, src, name, parts[p].d0, parts[p].d1, parts[p].t, err,
                                err_len) < 0)
                return -1;
        }
    }
    return 0;
}

int checkpoint_open(const char *dir, struct checkpoint **out, char *err, size_t err_len)
{
    struct checkpoint *ck = NULL;
    json_t *config = NULL, *gen = NULL, *index = NULL;
    char *config_path = NULL, *gen_path = NULL, *index_path = NULL, *single_path = NULL;
    int rc = -1;
    if (!out || !dir)
        return checkpoint_fail(err, err_len, "checkpoint_open: invalid arguments");
    *out = NULL;
    ck = calloc(1, sizeof *ck);
    if (!ck || !(ck->dir = strdup(dir)))
        goto oom;
    config_path = checkpoint_join(dir, "config.json");
    gen_path = checkpoint_join(dir, "generation_config.json");
    index_path = checkpoint_join(dir, "model.safetensors.index.json");
    single_path = checkpoint_join(dir, "model.safetensors");
    if (!config_path || !gen_path || !index_path || !single_path)
        goto oom;

    struct stat sb;
    if (stat(dir, &sb) != 0) {
        checkpoint_fail(err, err_len, "%s: cannot open model directory: %s", dir,
                        strerror(errno));
        goto done;
    }
    if (!S_ISDIR(sb.st_mode)) {
        checkpoint_fail(err, err_len, "%s: not a model directory", dir);
        goto done;
    }
    int dtype_given = 0;
    if (checkpoint_load_json(config_path, 1, &config, err, err_len) < 0 ||
        checkpoint_parse_config(config_path, config, &ck->cfg, &dtype_given, err, err_len) < 0 ||
        checkpoint_load_json(gen_path, 0, &gen, err, err_len) < 0)
        goto done;
    if (gen) {
        if (!json_is_object(gen)) {
            checkpoint_fail(err, err_len, "%s: not a JSON object", gen_path);
            goto done;
        }
        if (checkpoint_add_eos(gen_path, json_object_get(gen, "eos_token_id"), &ck->cfg, err,
                               err_len) < 0)
            goto done;
    }
    /* Without torch_dtype/dtype a placeholder passes the check; the embedding's type replaces
     * it once bound. */
    ck->cfg.dtype = dtype_given ? ck->cfg.dtype : DTYPE_BF16;
    if (checkpoint_validate_config(config_path, &ck->cfg, err, err_len) < 0)
        goto done;

    struct checkpoint_src src = {0};
    if (checkpoint_load_json(index_path, 0, &index, err, err_len) < 0)
        goto done;
    if (index) {
        if (checkpoint_open_index(ck, index_path, index, &src, err, err_len) < 0)
            goto done;
    } else {
        if (stat(single_path, &sb) != 0 && errno == ENOENT) {
            checkpoint_fail(err, err_len, "%s: neither model.safetensors nor "
                            "model.safetensors.index.json found", dir);
            goto done;
        }
        ck->files = calloc(1, sizeof *ck->files);
        ck->file_names = calloc(1, sizeof *ck->file_names);
        if (!ck->files || !ck->file_names)
            goto oom;
        ck->n_files = 1; /* slot 0 NULL until filled: destroy copes */
        if (!(ck->file_names[0] = strdup("model.safetensors")))
            goto oom;
        if (safetensors_open(single_path, &ck->files[0], err, err_len) < 0)
            goto done;
    }
    ck->w.layers = calloc((size_t)ck->cfg.n_layers, sizeof *ck->w.layers);
    if (!ck->w.layers)
        goto oom;
    if (checkpoint_bind_all(ck, &src, err, err_len) < 0)
        goto done;
    if (!dtype_given)
        ck->cfg.dtype = ck->w.embed.dtype;
    *out = ck;
    ck = NULL;
    rc = 0;
    goto done; /* ck is now the caller's; only the temporaries go */
oom:
    checkpoint_fail(err, err_len, "%s: out of memory", dir);
done:
    json_decref(config);
    json_decref(gen);
    json_decref(index);
    free(config_path);
    free(gen_path);
    free(index_path);
    free(single_path);
    checkpoint_destroy(&ck);
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * Random weights
 * ------------------------------------------------------------------------------------------- */

#define CHECKPOINT_ALIGN 256          /* every tensor starts on a 256-byte boundary */
#define CHECKPOINT_CHUNK (1 << 20)    /* elements per fill work item */
#define CHECKPOINT_MAX_THREADS 16

/* One tensor to fill; `norm` ones get values near 1, the rest a small symmetric spread. */
struct checkpoint_fill {
    void *data;
    size_t n_elem;
    int norm;
};

struct checkpoint_filler {
    const struct checkpoint_fill *fills;
    size_t n_fills;
    size_t *first_chunk; /* n_fills + 1 prefix sums of each tensor's chunk count */
    enum dtype dtype;
    uint64_t seed;
    atomic_size_t next_chunk;
};

static uint64_t checkpoint_splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint16_t checkpoint_f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even; our values are finite */
    return (uint16_t)(u >> 16);
}

/* IEEE half from a finite float of magnitude < 65504, round to nearest even, subnormals kept. */
static uint16_t checkpoint_f32_to_f16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t sign = (u >> 16) & 0x8000u;
    int32_t exp = (int32_t)((u >> 23) & 0xff) - 127 + 15;
    uint32_t mant = u & 0x7fffffu;
    if (exp <= 0) {
        if (exp < -10)
            return (uint16_t)sign;
        mant |= 0x800000u;
        uint32_t shift = (uint32_t)(14 - exp);
        uint32_t h = mant >> shift;
        uint32_t rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1u)))
            h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((uint32_t)exp << 10) | (mant >> 13);
    uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u)))
        h++; /* a carry into the exponent is the correct rounding */
    return (uint16_t)(sign | h);
}

static void checkpoint_fill_chunk(const struct checkpoint_filler *f, size_t ti, size_t chunk)
{
    const struct checkpoint_fill *t = &f->fills[ti];
    size_t begin = chunk * CHECKPOINT_CHUNK;
    size_t end = begin + CHECKPOINT_CHUNK < t->n_elem ? begin + CHECKPOINT_CHUNK : t->n_elem;
    /* Seeded per (tensor, chunk) so the values do not depend on the thread schedule. */
    uint64_t s = f->seed ^ (0x9e3779b97f4a7c15ull * (ti + 1)) ^ (0xd1b54a32d192ed03ull * chunk);
    checkpoint_splitmix(&s);
    /* Uniform on [-a, a] has standard deviation a/sqrt(3): 0.02 like HF's initializer_range.
     * Norm weights are 1 +- 0.1. Each 64-bit draw gives four 16-bit values. */
    float scale = t->norm ? 0.1f / 32768.0f : 0.0346410f / 32768.0f;
    float base = t->norm ? 1.0f : 0.0f;
    /* Values go through a small float buffer so that both loops stay branch-free and
     * vectorisable: ~4x faster than converting element by element behind a switch. */
    float buf[1024];
    for (size_t i = begin; i < end;) {
        size_t n = end - i < 1024 ? end - i : 1024;
        for (size_t k = 0; k < n; k += 4) {
            uint64_t r = checkpoint_splitmix(&s);
            for (int j = 0; j < 4; j++)
                buf[k + (size_t)j] = base + (float)(int16_t)(uint16_t)(r >> (16 * j)) * scale;
        }
        switch (f->dtype) {
        case DTYPE_F32:
            memcpy((float *)t->data + i, buf, n * sizeof *buf);
            break;
        case DTYPE_F16:
            for (size_t k = 0; k < n; k++)
                ((uint16_t *)t->data)[i + k] = checkpoint_f32_to_f16(buf[k]);
            break;
        case DTYPE_BF16:
            for (size_t k = 0; k < n; k++)
                ((uint16_t *)t->data)[i + k] = checkpoint_f32_to_bf16(buf[k]);
            break;
        }
        i += n;
    }
}

static void *checkpoint_fill_worker(void *arg)
{
    struct checkpoint_filler *f = arg;
    size_t total = f->first_chunk[f->n_fills];
    size_t ti = 0;
    for (;;) {
        size_t c = atomic_fetch_add(&f->next_chunk, 1);
        if (c >= total)
            break;
        while (c >= f->first_chunk[ti + 1])
            ti++;
        checkpoint_fill_chunk(f, ti, c - f->first_chunk[ti]);
    }
    return NULL;
}

/* Bytes of memory the kernel could give us now (MemAvailable: free plus reclaimable cache);
 * physical memory when /proc/meminfo says nothing; 0 when even that is unknown. */
static double checkpoint_mem_available(void)
{
    FILE *f = fopen("/proc/meminfo", "r");
    if (f) {
        char line[256];
        long long kb = -1;
        while (fgets(line, sizeof line, f))
            if (sscanf(line, "MemAvailable: %lld kB", &kb) == 1)
                break;
        fclose(f);
        if (kb >= 0)
            return (double)kb * 1024.0;
    }
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    return pages > 0 && page > 0 ? (double)pages * (double)page : 0;
}

int checkpoint_new_random(const struct model_config *cfg, enum dtype dtype, uint64_t seed,
                          struct checkpoint **out, char *err, size_t err_len)
{
    struct checkpoint *ck = NULL;
    struct checkpoint_fill *fills = NULL;
    struct tensor **views = NULL;
    size_t *first_chunk = NULL;
    if (!out || !cfg)
        return checkpoint_fail(err, err_len, "checkpoint_new_random: invalid arguments");
    *out = NULL;
    size_t esize = dtype_size(dtype);
    if (!esize)
        return checkpoint_fail(err, err_len, "random weights: unknown dtype %d", (int)dtype);
    ck = calloc(1, sizeof *ck);
    if (!ck)
        goto oom;
    ck->cfg = *cfg;
    ck->cfg.dtype = dtype;
    if (checkpoint_validate_config("random weights config", &ck->cfg, err, err_len) < 0)
        goto fail;
    const struct model_config *c = &ck->cfg;
    ck->w.layers = calloc((size_t)c->n_layers, sizeof *ck->w.layers);
    size_t n_views = 2 + (c->tied_embeddings ? 0 : 1) + 9 * (size_t)c->n_layers;
    fills = calloc(n_views, sizeof *fills);
    views = calloc(n_views, sizeof *views);
    first_chunk = calloc(n_views + 1, sizeof *first_chunk);
    if (!ck->w.layers || !fills || !views || !first_chunk)
        goto oom;

    /* Lay every tensor out in one slab; shapes come from the validated config. */
    int64_t dim = c->dim, ffn = c->ffn_dim, q = (int64_t)c->n_heads * c->head_dim;
    int64_t kv = (int64_t)c->n_kv_heads * c->head_dim;
    size_t nv = 0;
    struct model_weights *w = &ck->w;
#define CHECKPOINT_VIEW(t, a, b)                                                               \
    do {                                                                                       \
        (t)->n_dims = (b) ? 2 : 1;                                                             \
        (t)->shape[0] = (a);                                                                   \
        (t)->shape[1] = (b) ? (b) : 1;                                                         \
        views[nv++] = (t);                                                                     \
    } while (0)
    CHECKPOINT_VIEW(&w->embed, c->vocab_size, dim);
    CHECKPOINT_VIEW(&w->final_norm, dim, 0);
    if (!c->tied_embeddings)
        CHECKPOINT_VIEW(&w->lm_head, c->vocab_size, dim);
    for (int i = 0; i < c->n_layers; i++) {
        struct layer_weights *l = &w->layers[i];
        CHECKPOINT_VIEW(&l->attn_norm, dim, 0);
        CHECKPOINT_VIEW(&l->wq, q, dim);
        CHECKPOINT_VIEW(&l->wk, kv, dim);
        CHECKPOINT_VIEW(&l->wv, kv, dim);
        CHECKPOINT_VIEW(&l->wo, dim, q);
        CHECKPOINT_VIEW(&l->mlp_norm, dim, 0);
        CHECKPOINT_VIEW(&l->w_gate, ffn, dim);
        CHECKPOINT_VIEW(&l->w_up, ffn, dim);
        CHECKPOINT_VIEW(&l->w_down, dim, ffn);
    }
#undef CHECKPOINT_VIEW
    size_t total = 0;
    double need = 0; /* for the message, exact even where size_t would wrap */
    int wraps = 0;
    for (size_t i = 0; i < nv; i++) {
        /* The config limits keep each product inside int64; only a 32-bit size_t can wrap. */
        int64_t n64 = views[i]->shape[0] * views[i]->shape[1];
        size_t n = (size_t)n64, bytes;
        need += (double)n64 * (double)esize;
        if ((uint64_t)n64 > SIZE_MAX || __builtin_mul_overflow(n, esize, &bytes) ||
            __builtin_add_overflow(total, bytes + CHECKPOINT_ALIGN - 1, &total))
            wraps = 1;
        total &= ~(size_t)(CHECKPOINT_ALIGN - 1);
        fills[i].n_elem = n;
        fills[i].norm = views[i]->n_dims == 1;
    }
    /* With overcommit an oversized mapping succeeds and the fill is then OOM-killed, so the
     * size is checked against what the kernel says is available first. */
    double avail = checkpoint_mem_available();
    void *slab = MAP_FAILED;
    if (!wraps && !(avail > 0 && need > avail))
        slab = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (slab == MAP_FAILED) {
        checkpoint_fail(err, err_len, "random weights: out of memory: %s weights of this shape "
                        "need %.1f GiB, %.1f GiB available", dtype_name(dtype),
                        need / 1073741824.0, avail / 1073741824.0);
        goto fail;
    }
    ck->heap = slab;
    ck->heap_bytes = total;
    /* Huge pages cut the page faults of a multi-GB fill by ~500x; a hint, so failure is fine. */
    madvise(slab, total, MADV_HUGEPAGE);
    size_t off = 0;
    for (size_t i = 0; i < nv; i++) {
        views[i]->data = (uint8_t *)slab + off;
        views[i]->dtype = dtype;
        fills[i].data = (uint8_t *)slab + off;
        off += (fills[i].n_elem * esize + CHECKPOINT_ALIGN - 1) &
               ~(size_t)(CHECKPOINT_ALIGN - 1);
        first_chunk[i + 1] = first_chunk[i] + (fills[i].n_elem + CHECKPOINT_CHUNK - 1) /
                                                  CHECKPOINT_CHUNK;
    }
    if (c->tied_embeddings)
        w->lm_head = w->embed;

    struct checkpoint_filler filler = {
        .fills = fills, .n_fills = nv, .first_chunk = first_chunk, .dtype = dtype, .seed = seed,
    };
    atomic_init(&filler.next_chunk, 0);
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    int n_threads = ncpu < 1 ? 1 : ncpu > CHECKPOINT_MAX_THREADS ? CHECKPOINT_MAX_THREADS
                                                                  : (int)ncpu;
    pthread_t tids[CHECKPOINT_MAX_THREADS];
    int started = 0;
    /* The caller's thread works too; threads that fail to start just leave it more to do. */
    while (started < n_threads - 1 &&
           pthread_create(&tids[started], NULL, checkpoint_fill_worker, &filler) == 0)
        started++;
    checkpoint_fill_worker(&filler);
    for (int i = 0; i < started; i++)
        pthread_join(tids[i], NULL);

    free(fills);
    free(views);
    free(first_chunk);
    *out = ck;
    return 0;
oom:
    checkpoint_fail(err, err_len, "random weights: out of memory");
fail:
    free(fills);
    free(views);
    free(first_chunk);
    checkpoint_destroy(&ck);
    return -1;
}

/* ---------------------------------------------------------------------------------------------
 * Accessors, named shapes
 * ------------------------------------------------------------------------------------------- */

void checkpoint_destroy(struct checkpoint **pck)
{
    if (!pck || !*pck)
        return;
    struct checkpoint *ck = *pck;
    for (size_t i = 0; i < ck->n_files; i++) {
        safetensors_destroy(&ck->files[i]);
        free(ck->file_names[i]);
    }
    free(ck->files);
    free(ck->file_names);
    if (ck->heap)
        munmap(ck->heap, ck->heap_bytes);
    free(ck->w.layers);
    free(ck->dir);
    free(ck);
    *pck = NULL;
}

const struct model_config *checkpoint_config(const struct checkpoint *ck)
{
    return &ck->cfg;
}

const struct model_weights *checkpoint_weights(const struct checkpoint *ck)
{
    return &ck->w;
}

const char *checkpoint_dir(const struct checkpoint *ck)
{
    return ck->dir;
}

/* Values from the published config.json files of meta-llama/Llama-3.2-1B(-Instruct),
 * Llama-3.2-3B, Llama-3.1-8B and Llama-3.1-70B; tiny-llama-3 is the shape of the test checkpoint
 * hf-reference/tiny-llama31 (Llama 3 vocabulary, 2 layers of width 64), for service tests of
 * random weights that must run in seconds on a CPU. */
static const struct {
    const char *name;
    int dim, ffn, layers, heads, kv_heads, head_dim, tied;
    float rope_factor;
} checkpoint_shapes[] = {
    {"llama-3.2-1b", 2048, 8192, 16, 32, 8, 64, 1, 32.0f},
    {"llama-3.2-3b", 3072, 8192, 28, 24, 8, 128, 1, 32.0f},
    {"llama-3.1-8b", 4096, 14336, 32, 32, 8, 128, 0, 8.0f},
    {"llama-3.1-70b", 8192, 28672, 80, 64, 8, 128, 0, 8.0f},
    {"tiny-llama-3", 64, 176, 2, 4, 2, 16, 0, 8.0f},
};

int model_shape_by_name(const char *name, struct model_config *out)
{
    for (size_t i = 0; name && i < sizeof checkpoint_shapes / sizeof checkpoint_shapes[0];
         i++) {
        if (strcmp(name, checkpoint_shapes[i].name) != 0)
            continue;
        struct model_config c = {
            .vocab_size = 128256,
            .dim = checkpoint_shapes[i].dim,
            .ffn_dim = checkpoint_shapes[i].ffn,
            .n_layers = checkpoint_shapes[i].layers,
            .n_heads = checkpoint_shapes[i].heads,
            .n_kv_heads = checkpoint_shapes[i].kv_heads,
            .head_dim = checkpoint_shapes[i].head_dim,
            .max_seq_len = 131072,
            .norm_eps = 1e-5f,
            .rope_theta = 500000.0f,
            .rope_kind = ROPE_LLAMA3,
            .rope_factor = checkpoint_shapes[i].rope_factor,
            .rope_low_freq_factor = 1.0f,
            .rope_high_freq_factor = 4.0f,
            .rope_original_max_pos = 8192,
            .tied_embeddings = checkpoint_shapes[i].tied,
            .bos_id = 128000,
            .eos_ids = {128001, 128008, 128009},
            .n_eos = 3,
            .dtype = DTYPE_BF16,
        };
        *out = c;
        return 0;
    }
    return -1;
}

const char *model_shape_names(void)
{
    return "llama-3.2-1b, llama-3.2-3b, llama-3.1-8b, llama-3.1-70b, tiny-llama-3";
}
