/* test_proto.c — the wire protocol codec: round trips of random valid messages of every type,
 * a full example of every type checked field by field, a table of invalid inputs (error code
 * AND the field named in the message), the encoder's refusals, limits at their edges, and
 * hostile bytes (huge declared lengths, deep nesting, every truncation, every single-byte
 * mutation).
 *
 * Test cases are written as JSON (jansson) and turned into msgpack here; string values with
 * a marker become what JSON cannot say: "@hex:6869c0" raw str bytes, "@bin:..." a bin value,
 * "@f32:0.5" a float32, "@f64:nan" a float64, "@u64:N" an unsigned beyond int64; a key
 * "@dup:tag" is packed as "tag" (a duplicate key) and "@hex:..." keys as raw bytes.
 */
#include <criterion/criterion.h>
#include <jansson.h>
#include <math.h>
#include <msgpack.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proto.h"
#include "proto_schema.h"
#include "testutil.h"

/* ---- JSON <-> msgpack ----------------------------------------------------------------------- */

static size_t tp_unhex(const char *hex, char *out)
{
    size_t n = 0;
    for (; hex[0] && hex[1]; hex += 2) {
        unsigned v;
        cr_assert(sscanf(hex, "%2x", &v) == 1, "bad hex in test case: %s", hex);
        out[n++] = (char)v;
    }
    return n;
}

static void tp_pack_str(msgpack_packer *pk, const char *s, size_t len)
{
    char raw[512];
    if (len > 5 && strncmp(s, "@hex:", 5) == 0) {
        size_t n = tp_unhex(s + 5, raw);
        msgpack_pack_str(pk, n);
        msgpack_pack_str_body(pk, raw, n);
    } else if (len > 5 && strncmp(s, "@dup:", 5) == 0) {
        msgpack_pack_str(pk, len - 5);
        msgpack_pack_str_body(pk, s + 5, len - 5);
    } else {
        msgpack_pack_str(pk, len);
        msgpack_pack_str_body(pk, s, len);
    }
}

static void tp_pack_json(msgpack_packer *pk, json_t *j)
{
    switch (json_typeof(j)) {
    case JSON_OBJECT: {
        const char *key;
        json_t *val;
        msgpack_pack_map(pk, json_object_size(j));
        json_object_foreach (j, key, val) {
            tp_pack_str(pk, key, strlen(key));
            tp_pack_json(pk, val);
        }
        break;
    }
    case JSON_ARRAY: {
        size_t i;
        json_t *val;
        msgpack_pack_array(pk, json_array_size(j));
        json_array_foreach (j, i, val)
            tp_pack_json(pk, val);
        break;
    }
    case JSON_STRING: {
        const char *s = json_string_value(j);
        size_t len = json_string_length(j);
        char raw[512];
        if (strncmp(s, "@bin:", 5) == 0) {
            size_t n = tp_unhex(s + 5, raw);
            msgpack_pack_bin(pk, n);
            msgpack_pack_bin_body(pk, raw, n);
        } else if (strncmp(s, "@f32:", 5) == 0) {
            msgpack_pack_float(pk, strtof(s + 5, NULL));
        } else if (strncmp(s, "@f64:", 5) == 0) {
            msgpack_pack_double(pk, strtod(s + 5, NULL));
        } else if (strncmp(s, "@u64:", 5) == 0) {
            msgpack_pack_uint64(pk, strtoull(s + 5, NULL, 10));
        } else {
            tp_pack_str(pk, s, len);
        }
        break;
    }
    case JSON_INTEGER: {
        json_int_t v = json_integer_value(j);
        if (v >= 0)
            msgpack_pack_uint64(pk, (uint64_t)v);
        else
            msgpack_pack_int64(pk, v);
        break;
    }
    case JSON_REAL:
        msgpack_pack_double(pk, json_real_value(j));
        break;
    case JSON_TRUE:
        msgpack_pack_true(pk);
        break;
    case JSON_FALSE:
        msgpack_pack_false(pk);
        break;
    case JSON_NULL:
        msgpack_pack_nil(pk);
        break;
    }
}

/* msgpack bytes of a JSON test case (malloc'd; *len set). */
static char *tp_msgpack(const char *json, size_t *len)
{
    json_error_t jerr;
    json_t *j = json_loads(json, JSON_ALLOW_NUL | JSON_DECODE_ANY, &jerr);
    cr_assert(j, "test JSON does not parse (%s): %s", jerr.text, json);
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    tp_pack_json(&pk, j);
    json_decref(j);
    *len = sb.size;
    return msgpack_sbuffer_release(&sb);
}

static json_t *tp_json_of(const msgpack_object *o)
{
    switch (o->type) {
    case MSGPACK_OBJECT_NIL: return json_null();
    case MSGPACK_OBJECT_BOOLEAN: return json_boolean(o->via.boolean);
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
        if (o->via.u64 > INT64_MAX) {
            char b[32];
            snprintf(b, sizeof b, "@u64:%llu", (unsigned long long)o->via.u64);
            return json_string(b);
        }
        return json_integer((json_int_t)o->via.u64);
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: return json_integer(o->via.i64);
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64: return json_real(o->via.f64);
    case MSGPACK_OBJECT_STR: return json_stringn(o->via.str.ptr, o->via.str.size);
    case MSGPACK_OBJECT_ARRAY: {
        json_t *a = json_array();
        for (uint32_t i = 0; i < o->via.array.size; i++)
            json_array_append_new(a, tp_json_of(&o->via.array.ptr[i]));
        return a;
    }
    case MSGPACK_OBJECT_MAP: {
        json_t *m = json_object();
        for (uint32_t i = 0; i < o->via.map.size; i++) {
            const msgpack_object *k = &o->via.map.ptr[i].key;
            char key[256];
            cr_assert(k->type == MSGPACK_OBJECT_STR && k->via.str.size < sizeof key);
            memcpy(key, k->via.str.ptr, k->via.str.size);
            key[k->via.str.size] = '\0';
            json_object_set_new(m, key, tp_json_of(&o->via.map.ptr[i].val));
        }
        return m;
    }
    default: return json_string("@unsupported");
    }
}

/* Compact JSON of msgpack bytes, keys in wire order (caller frees). */
static char *tp_json(const void *buf, size_t len)
{
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    size_t off = 0;
    cr_assert_eq(msgpack_unpack_next(&u, buf, len, &off), MSGPACK_UNPACK_SUCCESS);
    cr_assert_eq(off, len);
    json_t *j = tp_json_of(&u.data);
    char *s = json_dumps(j, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_ENCODE_ANY);
    json_decref(j);
    msgpack_unpacked_destroy(&u);
    return s;
}

/* Canonical compact form of a JSON text, for comparisons. */
static char *tp_json_canon(const char *json)
{
    json_error_t jerr;
    json_t *j = json_loads(json, JSON_ALLOW_NUL, &jerr);
    cr_assert(j, "test JSON does not parse (%s): %s", jerr.text, json);
    char *s = json_dumps(j, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(j);
    return s;
}

/* ---- random valid messages from the schema --------------------------------------------------- */

struct tp_rng {
    uint64_t s;
};

static uint64_t tp_next(struct tp_rng *r)
{
    uint64_t z = (r->s += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

static uint64_t tp_below(struct tp_rng *r, uint64_t n)
{
    return n ? tp_next(r) % n : 0;
}

static uint64_t tp_gen_uint(struct tp_rng *r, uint64_t lo, uint64_t hi)
{
    uint64_t span = hi - lo;
    switch (tp_below(r, 4)) {
    case 0: return lo;
    case 1: return hi;
    case 2: return lo + tp_below(r, (span < 1000 ? span : 1000) + 1);
    default: return span == UINT64_MAX ? tp_next(r) : lo + tp_below(r, span + 1);
    }
}

static double tp_gen_f64(struct tp_rng *r, const struct proto_schema_field *f)
{
    if (f->fhi > 1e300) {
        static const double pool[] = { 0.0, -3.28125, -4.78125, 1.5, 1e300, -1e-300, -0.0 };
        double v = tp_below(r, 2) ? pool[tp_below(r, sizeof pool / sizeof *pool)]
                                  : (double)(int64_t)tp_next(r) / 1048576.0;
        /* unbounded above but not below (durations: 0..): mirror into the range */
        return f->flo > -1e300 && v < f->flo ? -v : v;
    }
    double v;
    switch (tp_below(r, 4)) {
    case 0: v = f->flo; break;
    case 1: v = f->fhi; break;
    default: v = f->flo + (f->fhi - f->flo) * (double)(tp_next(r) >> 11) * 0x1p-53;
    }
    return f->flo_open && v == f->flo ? f->fhi : v;
}

/* Random strict UTF-8 of lo..min(hi, 40) bytes, no NUL: ASCII, controls, 2/3/4-byte forms. */
static char *tp_gen_str(struct tp_rng *r, uint64_t lo, uint64_t hi)
{
    size_t cap = hi < 40 ? (size_t)hi : 40;
    size_t target = (size_t)lo + (size_t)tp_below(r, cap - lo + 1);
    char *s = malloc(target + 1);
    cr_assert(s);
    size_t n = 0;
    while (n < target) {
        uint32_t cp;
        switch (tp_below(r, 10)) {
        case 0: cp = 1 + (uint32_t)tp_below(r, 0x7f); break;
        case 1: cp = 0x80 + (uint32_t)tp_below(r, 0x780); break;
        case 2:
            cp = 0x800 + (uint32_t)tp_below(r, 0xF800);
            if (cp >= 0xD800 && cp <= 0xDFFF)
                cp -= 0x1000;
            break;
        case 3: cp = 0x10000 + (uint32_t)tp_below(r, 0x100000); break;
        default: cp = 0x20 + (uint32_t)tp_below(r, 0x5f);
        }
        unsigned char b[4];
        size_t k;
        if (cp < 0x80) {
            b[0] = (unsigned char)cp, k = 1;
        } else if (cp < 0x800) {
            b[0] = (unsigned char)(0xC0 | cp >> 6), b[1] = (unsigned char)(0x80 | (cp & 63));
            k = 2;
        } else if (cp < 0x10000) {
            b[0] = (unsigned char)(0xE0 | cp >> 12);
            b[1] = (unsigned char)(0x80 | ((cp >> 6) & 63));
            b[2] = (unsigned char)(0x80 | (cp & 63));
            k = 3;
        } else {
            b[0] = (unsigned char)(0xF0 | cp >> 18);
            b[1] = (unsigned char)(0x80 | ((cp >> 12) & 63));
            b[2] = (unsigned char)(0x80 | ((cp >> 6) & 63));
            b[3] = (unsigned char)(0x80 | (cp & 63));
            k = 4;
        }
        if (n + k > target)
            b[0] = 'x', k = 1;
        memcpy(s + n, b, k);
        n += k;
    }
    s[n] = '\0';
    return s;
}

static void tp_gen_obj(struct tp_rng *r, const struct proto_schema_obj *o, char *base);

static void tp_gen_value(struct tp_rng *r, const struct proto_schema_field *f, char *base)
{
    char *dst = base + f->off;
    if (f->presence == PROTO_SCHEMA_OPTIONAL && tp_below(r, 2) == 0)
        return;
    if (f->presence == PROTO_SCHEMA_NULLABLE && tp_below(r, 4) == 0)
        return;
    switch (f->kind) {
    case PROTO_SCHEMA_BOOL: *(bool *)dst = tp_below(r, 2); break;
    case PROTO_SCHEMA_U32: *(uint32_t *)dst = (uint32_t)tp_gen_uint(r, f->lo, f->hi); break;
    case PROTO_SCHEMA_U64: *(uint64_t *)dst = tp_gen_uint(r, f->lo, f->hi); break;
    case PROTO_SCHEMA_F64: *(double *)dst = tp_gen_f64(r, f); break;
    case PROTO_SCHEMA_STR: *(char **)dst = tp_gen_str(r, f->lo, f->hi); break;
    case PROTO_SCHEMA_ENUM: {
        int v = f->en->first + (int)tp_below(r, (uint64_t)f->en->n_names) * f->en->step;
        memcpy(dst, &v, sizeof v);
        break;
    }
    case PROTO_SCHEMA_MAP: tp_gen_obj(r, f->obj, dst); break;
    case PROTO_SCHEMA_ARRAY: {
        uint32_t n = (uint32_t)(f->lo + tp_below(r, (f->hi < 3 ? f->hi : 3) - f->lo + 1));
        char *elems = n ? calloc(n, f->elem_size) : NULL;
        cr_assert(n == 0 || elems);
        for (uint32_t i = 0; i < n; i++)
            tp_gen_value(r, f->elem, elems + (size_t)i * f->elem_size);
        *(char **)dst = elems;
        *(uint32_t *)(base + f->count_off) = n;
        break;
    }
    }
    if (f->presence != PROTO_SCHEMA_REQUIRED && f->kind != PROTO_SCHEMA_STR)
        *(bool *)(base + f->has_off) = true;
}

static void tp_gen_obj(struct tp_rng *r, const struct proto_schema_obj *o, char *base)
{
    for (size_t i = 0; i < o->n_fields; i++)
        tp_gen_value(r, &o->fields[i], base);
    /* The two rules that span fields. */
    if (strcmp(o->name, "stage") == 0) {
        struct proto_stage *s = (struct proto_stage *)base;
        s->done = (uint32_t)(s->done % ((uint64_t)s->total + 1));
    } else if (strcmp(o->name, "result") == 0) {
        struct proto_result *res = (struct proto_result *)base;
        if (res->n_candidates == 0)
            res->has_best = false;
        else
            res->best %= res->n_candidates;
    }
}

static void tp_gen_msg(struct tp_rng *r, enum proto_type t, struct proto_msg *m)
{
    memset(m, 0, sizeof *m);
    m->type = t;
    tp_gen_obj(r, proto_schema_message(t), (char *)&m->submit);
}

/* ---- shared assertions ------------------------------------------------------------------- */

/* Decodes, re-encodes and decodes again: all equal, the two encodings byte-identical. */
static void tp_roundtrip(const struct proto_msg *m, const char *what)
{
    char err[512];
    void *buf = NULL, *buf2 = NULL;
    size_t len = 0, len2 = 0;
    int rc = proto_encode(m, &buf, &len, err, sizeof err);
    cr_assert_eq(rc, 0, "%s: encode failed: %s", what, err);
    struct proto_msg d, d2;
    rc = proto_decode(buf, len, PROTO_BIT(m->type), &d, err, sizeof err);
    cr_assert_eq(rc, 0, "%s: decode failed: %s", what, err);
    cr_assert(proto_msg_equal(m, &d), "%s: decoded message differs from the original", what);
    rc = proto_encode(&d, &buf2, &len2, err, sizeof err);
    cr_assert_eq(rc, 0, "%s: re-encode failed: %s", what, err);
    cr_assert(len == len2 && memcmp(buf, buf2, len) == 0, "%s: re-encoding differs", what);
    rc = proto_decode(buf2, len2, PROTO_ANY, &d2, err, sizeof err);
    cr_assert_eq(rc, 0, "%s: second decode failed: %s", what, err);
    cr_assert(proto_msg_equal(&d, &d2));
    proto_msg_free(&d);
    proto_msg_free(&d2);
    free(buf);
    free(buf2);
}

static int tp_decode_json(const char *json, uint32_t accept, struct proto_msg *m, char *err,
                          size_t err_len)
{
    size_t len;
    char *buf = tp_msgpack(json, &len);
    int rc = proto_decode(buf, len, accept, m, err, err_len);
    free(buf);
    return rc;
}

/* ---- full examples of every type (every optional field present), keys in wire order ---- */

static const struct {
    enum proto_type type;
    const char *json;
} tp_examples[] = {
    { PROTO_SUBMIT,
      "{\"v\":1,\"type\":\"submit\",\"tag\":7,\"messages\":[{\"role\":\"system\",\"content\":"
      "\"Be brief.\"},{\"role\":\"user\",\"content\":\"What is 2+2?\"}],\"drafts\":8,"
      "\"feedbacks\":16,\"edits\":16,\"feedbacks_per_edit\":1,\"sampling\":{\"instruct\":"
      "{\"temperature\":0.75,\"top_p\":0.875,\"max_tokens\":4096},\"feedback\":{\"temperature\":"
      "0.5},\"edit\":{\"temperature\":0.0,\"max_tokens\":2048}},\"include_drafts\":true,"
      "\"deadline_ms\":60000,\"progress\":true,\"seed\":42}" },
    { PROTO_ACCEPTED, "{\"v\":1,\"type\":\"accepted\",\"tag\":7,\"id\":\"r-1f3a\"}" },
    { PROTO_CANCEL, "{\"v\":1,\"type\":\"cancel\",\"id\":\"r-1f3a\"}" },
    { PROTO_GET, "{\"v\":1,\"type\":\"get\",\"id\":\"r-1f3a\"}" },
    { PROTO_STATUS, "{\"v\":1,\"type\":\"status\",\"tag\":9}" },
    { PROTO_STATUS_REPLY,
      "{\"v\":1,\"type\":\"status_reply\",\"tag\":9,\"roles\":{\"instruct\":2,\"feedback\":1,"
      "\"edit\":1,\"select\":1},\"queue_depth\":3,\"in_flight\":2,\"workers\":[{\"id\":"
      "\"gpu0-instruct\",\"role\":\"instruct\",\"model\":\"Llama-3.1-Nemotron-70B-Instruct-HF\","
      "\"backend\":\"cuda\",\"state\":\"busy\",\"capacity\":{\"max_seqs\":64,\"max_ctx\":8192,"
      "\"kv_tokens\":262144},\"jobs\":3,\"load\":{\"running\":24,\"queued\":5,\"kv_used\":"
      "50000}}]}" },
    { PROTO_PROGRESS,
      "{\"v\":1,\"type\":\"progress\",\"id\":\"r-1f3a\",\"drafts\":{\"done\":8,\"total\":8},"
      "\"feedbacks\":{\"done\":100,\"total\":128},\"edits\":{\"done\":40,\"total\":128},"
      "\"scores\":{\"done\":12,\"total\":129},\"elapsed_ms\":5120}" },
    { PROTO_RESULT,
      "{\"v\":1,\"type\":\"result\",\"id\":\"r-1f3a\",\"answer\":\"2+2=4\",\"score\":-3.28125,"
      "\"best\":0,\"partial\":false,\"candidates\":[{\"draft_index\":0,\"draft\":\"2+2=5\","
      "\"feedbacks\":[\"The response is not helpful. 2+2 is 4.\"],\"edit\":\"2+2=4\",\"score\":"
      "-3.28125},{\"draft_index\":1,\"draft\":\"2+2=5\",\"feedbacks\":[],\"edit\":null,"
      "\"score\":null}],\"timings\":{\"drafts_ms\":800,\"feedbacks_ms\":1500,\"edits_ms\":2100,"
      "\"scores_ms\":300,\"total_ms\":4700},\"usage\":{\"instruct\":{\"prompt_tokens\":20,"
      "\"completion_tokens\":8},\"feedback\":{\"prompt_tokens\":60,\"completion_tokens\":30},"
      "\"edit\":{\"prompt_tokens\":90,\"completion_tokens\":6},\"select\":{\"prompt_tokens\":"
      "50,\"completion_tokens\":0}}}" },
    { PROTO_ERROR,
      "{\"v\":1,\"type\":\"error\",\"tag\":7,\"id\":\"r-1f3a\",\"code\":\"bad_field\","
      "\"message\":\"submit.drafts: 0 out of range [1, 32]\"}" },
    { PROTO_READY,
      "{\"v\":1,\"type\":\"ready\",\"worker\":\"gpu0-instruct\",\"role\":\"instruct\","
      "\"model\":\"Llama-3.1-Nemotron-70B-Instruct-HF\",\"backend\":\"cuda\",\"capacity\":"
      "{\"max_seqs\":64,\"max_ctx\":8192,\"kv_tokens\":262144}}" },
    { PROTO_HEARTBEAT,
      "{\"v\":1,\"type\":\"heartbeat\",\"load\":{\"running\":3,\"queued\":1,\"kv_used\":4096}}" },
    { PROTO_DISCONNECT, "{\"v\":1,\"type\":\"disconnect\",\"reason\":\"SIGTERM: draining\"}" },
    { PROTO_GENERATE,
      "{\"v\":1,\"type\":\"generate\",\"job\":1001,\"messages\":[{\"role\":\"user\","
      "\"content\":\"What is 2+2?\"}],\"add_generation_prompt\":true,\"n\":4,\"sampling\":"
      "{\"temperature\":0.75,\"top_p\":0.875,\"top_k\":40,\"seed\":42,\"max_tokens\":4096,"
      "\"ignore_eos\":false}}" },
    { PROTO_SCORE,
      "{\"v\":1,\"type\":\"score\",\"job\":1002,\"conversations\":[[{\"role\":\"user\","
      "\"content\":\"What is 2+2?\"},{\"role\":\"assistant\",\"content\":\"4\"}],[{\"role\":"
      "\"user\",\"content\":\"What is 2+2?\"},{\"role\":\"assistant\",\"content\":\"5\"}]]}" },
    { PROTO_CANCEL_JOB, "{\"v\":1,\"type\":\"cancel_job\",\"job\":1001}" },
    { PROTO_GENERATE_RESULT,
      "{\"v\":1,\"type\":\"generate_result\",\"job\":1001,\"outputs\":[{\"text\":\"4\","
      "\"n_tokens\":2,\"finish\":\"stop\"},{\"text\":\"Four\",\"n_tokens\":4096,\"finish\":"
      "\"length\"}],\"usage\":{\"prompt_tokens\":18,\"completion_tokens\":4098}}" },
    { PROTO_SCORE_RESULT,
      "{\"v\":1,\"type\":\"score_result\",\"job\":1002,\"scores\":[-3.28125,-4.28125],"
      "\"usage\":{\"prompt_tokens\":40,\"completion_tokens\":0}}" },
    { PROTO_JOB_ERROR,
      "{\"v\":1,\"type\":\"job_error\",\"job\":1001,\"code\":\"too_large\",\"message\":"
      "\"prompt of 9000 tokens exceeds max_ctx 8192\"}" },
    { PROTO_SAMPLE,
      "{\"v\":1,\"type\":\"sample\",\"job\":1001,\"index\":1,\"output\":{\"text\":\"Four\","
      "\"n_tokens\":4096,\"finish\":\"length\"}}" },
};
#define TP_N_EXAMPLES (sizeof tp_examples / sizeof *tp_examples)

/* ---- schema sanity ------------------------------------------------------------------------- */

static size_t tp_kind_size(const struct proto_schema_field *f)
{
    switch (f->kind) {
    case PROTO_SCHEMA_BOOL: return sizeof(bool);
    case PROTO_SCHEMA_U32: return sizeof(uint32_t);
    case PROTO_SCHEMA_U64: return sizeof(uint64_t);
    case PROTO_SCHEMA_F64: return sizeof(double);
    case PROTO_SCHEMA_STR: return sizeof(char *);
    case PROTO_SCHEMA_ENUM: return sizeof(int);
    case PROTO_SCHEMA_MAP: return f->obj->size;
    case PROTO_SCHEMA_ARRAY: return sizeof(void *);
    }
    return 0;
}

static void tp_check_obj(const struct proto_schema_obj *o);

/* Bytes [off, off+size) of every field, flag and count must be disjoint and inside the struct:
 * two wire keys landing in one C member would round-trip happily and still be wrong. */
static void tp_check_fields(const char *name, const struct proto_schema_field *fields, size_t n,
                            size_t size)
{
    unsigned char used[1024] = { 0 };
    cr_assert(size <= sizeof used);
    for (size_t i = 0; i < n; i++) {
        const struct proto_schema_field *f = &fields[i];
        size_t spans[3][2] = { { f->off, tp_kind_size(f) }, { 0, 0 }, { 0, 0 } };
        if (f->presence != PROTO_SCHEMA_REQUIRED && f->kind != PROTO_SCHEMA_STR)
            spans[1][0] = f->has_off, spans[1][1] = sizeof(bool);
        if (f->kind == PROTO_SCHEMA_ARRAY)
            spans[2][0] = f->count_off, spans[2][1] = sizeof(uint32_t);
        for (int s = 0; s < 3; s++) {
            for (size_t b = spans[s][0]; b < spans[s][0] + spans[s][1]; b++) {
                cr_assert(b < size, "%s.%s lies outside its struct", name,
                          f->name ? f->name : "[]");
                cr_assert(!used[b], "%s.%s overlaps another field", name,
                          f->name ? f->name : "[]");
                used[b] = 1;
            }
        }
        for (size_t j = 0; j < i && f->name; j++)
            cr_assert(strcmp(f->name, fields[j].name) != 0, "%s.%s twice", name, f->name);
        cr_assert(f->kind != PROTO_SCHEMA_ARRAY || f->presence == PROTO_SCHEMA_REQUIRED,
                  "%s.%s: arrays are always required", name, f->name);
        if (f->kind == PROTO_SCHEMA_MAP)
            tp_check_obj(f->obj);
        if (f->kind == PROTO_SCHEMA_ARRAY) {
            cr_assert(f->hi_name, "%s.%s: array without a named limit", name, f->name);
            tp_check_fields(name, f->elem, 1, f->elem_size);
        }
        if (f->kind == PROTO_SCHEMA_STR)
            cr_assert(f->hi_name && f->hi <= PROTO_MAX_STRING_BYTES, "%s.%s", name, f->name);
    }
}

static void tp_check_obj(const struct proto_schema_obj *o)
{
    cr_assert(o->n_fields <= 64, "%s has too many fields", o->name);
    tp_check_fields(o->name, o->fields, o->n_fields, o->size);
}

Test(proto, schema_fields_are_disjoint_and_named)
{
    for (int t = 1; t < PROTO_TYPE_COUNT; t++) {
        const struct proto_schema_obj *o = proto_schema_message((enum proto_type)t);
        cr_assert(o, "type %d has no table", t);
        tp_check_obj(o);
        for (size_t i = 0; i < o->n_fields; i++)
            cr_assert(strcmp(o->fields[i].name, "v") && strcmp(o->fields[i].name, "type"),
                      "%s: field name collides with the envelope", o->name);
    }
    cr_assert_null(proto_schema_message(PROTO_NONE));
    cr_assert_null(proto_schema_message(PROTO_TYPE_COUNT));
}

/* ---- names --------------------------------------------------------------------------------- */

Test(proto, names_round_trip)
{
    for (int t = 1; t < PROTO_TYPE_COUNT; t++) {
        enum proto_type back;
        cr_assert_eq(proto_type_from_name(proto_type_name((enum proto_type)t), &back), 0);
        cr_assert_eq(back, t);
    }
    cr_assert_str_eq(proto_type_name(PROTO_NONE), "?");
    enum proto_type tt;
    cr_assert_eq(proto_type_from_name("submitx", &tt), -1);
    for (int code = -1; code >= -PROTO_ERR_COUNT; code--) {
        enum proto_err back;
        cr_assert_neq(strcmp(proto_err_name(code), "?"), 0, "code %d has no name", code);
        cr_assert_eq(proto_err_from_name(proto_err_name(code), &back), 0);
        cr_assert_eq((int)back, code);
    }
    cr_assert_str_eq(proto_err_name(PROTO_ERR_BAD_FIELD), "bad_field");
    cr_assert_str_eq(proto_err_name(PROTO_ERR_TOO_LARGE), "too_large");
    cr_assert_str_eq(proto_err_name(0), "ok");
    cr_assert_str_eq(proto_err_name(-PROTO_ERR_COUNT - 1), "?");
    cr_assert_str_eq(proto_role_name(PROTO_ROLE_SELECT), "select");
    enum proto_role role;
    cr_assert_eq(proto_role_from_name("feedback", &role), 0);
    cr_assert_eq(role, PROTO_ROLE_FEEDBACK);
    cr_assert_eq(proto_role_from_name("Feedback", &role), -1);
    enum proto_chat_role cr;
    cr_assert_eq(proto_chat_role_from_name("assistant", &cr), 0);
    cr_assert_eq(cr, PROTO_CHAT_ASSISTANT);
    cr_assert_str_eq(proto_finish_name(PROTO_FINISH_LENGTH), "length");
    cr_assert_str_eq(proto_worker_state_name(PROTO_WORKER_DRAINING), "draining");
    cr_assert_str_eq(proto_worker_state_name((enum proto_worker_state)9), "?");
}

/* ---- round trips --------------------------------------------------------------------------- */

Test(proto, random_messages_round_trip)
{
    struct tp_rng r = { 20240726 };
    int n = 0;
    for (int t = 1; t < PROTO_TYPE_COUNT; t++) {
        for (int it = 0; it < 1000; it++) {
            struct proto_msg m;
            tp_gen_msg(&r, (enum proto_type)t, &m);
            char what[64];
            snprintf(what, sizeof what, "%s #%d", proto_type_name((enum proto_type)t), it);
            tp_roundtrip(&m, what);
            proto_msg_free(&m);
            cr_assert_eq(m.type, PROTO_NONE, "proto_msg_free zeroes the message");
            n++;
        }
    }
    cr_assert_eq(n, 1000 * (PROTO_TYPE_COUNT - 1));
}

Test(proto, examples_decode_and_encode_back_to_the_same_wire)
{
    for (size_t i = 0; i < TP_N_EXAMPLES; i++) {
        char err[512];
        struct proto_msg m;
        int rc = tp_decode_json(tp_examples[i].json, PROTO_ANY, &m, err, sizeof err);
        cr_assert_eq(rc, 0, "example %zu: %s", i, err);
        cr_assert_eq(m.type, tp_examples[i].type, "example %zu decoded as %s", i,
                     proto_type_name(m.type));
        void *buf;
        size_t len;
        cr_assert_eq(proto_encode(&m, &buf, &len, err, sizeof err), 0, "%s", err);
        char *got = tp_json(buf, len), *want = tp_json_canon(tp_examples[i].json);
        cr_assert_str_eq(got, want, "%s re-encodes differently", proto_type_name(m.type));
        free(got);
        free(want);
        free(buf);
        tp_roundtrip(&m, proto_type_name(m.type));
        proto_msg_free(&m);
    }
}

Test(proto, every_type_has_an_example)
{
    for (int t = 1; t < PROTO_TYPE_COUNT; t++) {
        bool found = false;
        for (size_t i = 0; i < TP_N_EXAMPLES; i++)
            found |= (int)tp_examples[i].type == t;
        cr_assert(found, "no example for %s", proto_type_name((enum proto_type)t));
    }
}

static const char *tp_example(enum proto_type t)
{
    for (size_t i = 0; i < TP_N_EXAMPLES; i++)
        if (tp_examples[i].type == t)
            return tp_examples[i].json;
    cr_assert_fail("no example");
    return NULL;
}

Test(proto, submit_fields_land_where_the_daemon_reads_them)
{
    struct proto_msg m;
    char err[256];
    cr_assert_eq(tp_decode_json(tp_example(PROTO_SUBMIT), PROTO_FROM_CLIENT, &m, err,
                                sizeof err), 0, "%s", err);
    const struct proto_submit *s = &m.submit;
    cr_assert_eq(s->tag, 7);
    cr_assert_eq(s->n_messages, 2);
    cr_assert_eq(s->messages[0].role, PROTO_CHAT_SYSTEM);
    cr_assert_str_eq(s->messages[0].content, "Be brief.");
    cr_assert_eq(s->messages[1].role, PROTO_CHAT_USER);
    cr_assert_str_eq(s->messages[1].content, "What is 2+2?");
    cr_assert(s->has_drafts && s->drafts == 8);
    cr_assert(s->has_feedbacks && s->feedbacks == 16);
    cr_assert(s->has_edits && s->edits == 16);
    cr_assert(s->has_feedbacks_per_edit && s->feedbacks_per_edit == 1);
    cr_assert(s->has_sampling && s->sampling.has_instruct && s->sampling.has_feedback &&
              s->sampling.has_edit);
    cr_assert(s->sampling.instruct.has_temperature && s->sampling.instruct.temperature == 0.75);
    cr_assert(s->sampling.instruct.has_top_p && s->sampling.instruct.top_p == 0.875);
    cr_assert(s->sampling.instruct.has_max_tokens && s->sampling.instruct.max_tokens == 4096);
    cr_assert(s->sampling.feedback.has_temperature && s->sampling.feedback.temperature == 0.5);
    cr_assert(!s->sampling.feedback.has_top_p && !s->sampling.feedback.has_max_tokens);
    cr_assert(s->sampling.edit.has_temperature && s->sampling.edit.temperature == 0.0);
    cr_assert(!s->sampling.edit.has_top_p);
    cr_assert(s->sampling.edit.has_max_tokens && s->sampling.edit.max_tokens == 2048);
    cr_assert(s->has_include_drafts && s->include_drafts);
    cr_assert(s->has_deadline_ms && s->deadline_ms == 60000);
    cr_assert(s->has_progress && s->progress);
    cr_assert(s->has_seed && s->seed == 42);
    proto_msg_free(&m);

    /* Absent settings stay absent: the daemon's defaults apply. */
    const char *minimal = "{\"v\":1,\"type\":\"submit\",\"tag\":1,\"messages\":[{\"role\":"
                          "\"user\",\"content\":\"\"}]}";
    cr_assert_eq(tp_decode_json(minimal, PROTO_FROM_CLIENT, &m, err, sizeof err), 0, "%s",
                 err);
    cr_assert(!m.submit.has_drafts && !m.submit.has_feedbacks && !m.submit.has_edits &&
              !m.submit.has_feedbacks_per_edit && !m.submit.has_sampling &&
              !m.submit.has_include_drafts && !m.submit.has_deadline_ms &&
              !m.submit.has_progress && !m.submit.has_seed);
    cr_assert_str_eq(m.submit.messages[0].content, "");
    proto_msg_free(&m);
}

Test(proto, result_fields_land_where_the_client_reads_them)
{
    struct proto_msg m;
    char err[256];
    cr_assert_eq(tp_decode_json(tp_example(PROTO_RESULT), PROTO_TO_CLIENT, &m, err,
                                sizeof err), 0, "%s", err);
    const struct proto_result *r = &m.result;
    cr_assert_str_eq(r->id, "r-1f3a");
    cr_assert_str_eq(r->answer, "2+2=4");
    cr_assert(r->has_score && r->score == -3.28125);
    cr_assert(r->has_best && r->best == 0);
    cr_assert(!r->partial);
    cr_assert_eq(r->n_candidates, 2);
    cr_assert_eq(r->candidates[0].draft_index, 0);
    cr_assert_str_eq(r->candidates[0].draft, "2+2=5");
    cr_assert_eq(r->candidates[0].n_feedbacks, 1);
    cr_assert_str_eq(r->candidates[0].feedbacks[0], "The response is not helpful. 2+2 is 4.");
    cr_assert_str_eq(r->candidates[0].edit, "2+2=4");
    cr_assert(r->candidates[0].has_score && r->candidates[0].score == -3.28125);
    cr_assert_eq(r->candidates[1].draft_index, 1);
    cr_assert_eq(r->candidates[1].n_feedbacks, 0);
    cr_assert_null(r->candidates[1].feedbacks);
    cr_assert_null(r->candidates[1].edit, "nil edit decodes to NULL");
    cr_assert(!r->candidates[1].has_score, "nil score decodes to has_score false");
    cr_assert_eq(r->timings.drafts_ms, 800);
    cr_assert_eq(r->timings.feedbacks_ms, 1500);
    cr_assert_eq(r->timings.edits_ms, 2100);
    cr_assert_eq(r->timings.scores_ms, 300);
    cr_assert_eq(r->timings.total_ms, 4700);
    cr_assert_eq(r->usage.instruct.prompt_tokens, 20);
    cr_assert_eq(r->usage.instruct.completion_tokens, 8);
    cr_assert_eq(r->usage.feedback.prompt_tokens, 60);
    cr_assert_eq(r->usage.edit.completion_tokens, 6);
    cr_assert_eq(r->usage.select.prompt_tokens, 50);
    proto_msg_free(&m);
}

Test(proto, backend_fields_land_where_the_worker_reads_them)
{
    struct proto_msg m;
    char err[256];
    cr_assert_eq(tp_decode_json(tp_example(PROTO_GENERATE), PROTO_TO_WORKER, &m, err,
                                sizeof err), 0, "%s", err);
    cr_assert_eq(m.generate.job, 1001);
    cr_assert_eq(m.generate.n_messages, 1);
    cr_assert(m.generate.add_generation_prompt);
    cr_assert_eq(m.generate.n, 4);
    cr_assert_eq(m.generate.sampling.temperature, 0.75);
    cr_assert_eq(m.generate.sampling.top_p, 0.875);
    cr_assert_eq(m.generate.sampling.top_k, 40);
    cr_assert_eq(m.generate.sampling.seed, 42);
    cr_assert_eq(m.generate.sampling.max_tokens, 4096);
    cr_assert(!m.generate.sampling.ignore_eos);
    proto_msg_free(&m);

    cr_assert_eq(tp_decode_json(tp_example(PROTO_SCORE), PROTO_TO_WORKER, &m, err, sizeof err),
                 0, "%s", err);
    cr_assert_eq(m.score.n_conversations, 2);
    cr_assert_eq(m.score.conversations[1].n_messages, 2);
    cr_assert_eq(m.score.conversations[1].messages[1].role, PROTO_CHAT_ASSISTANT);
    cr_assert_str_eq(m.score.conversations[1].messages[1].content, "5");
    proto_msg_free(&m);

    cr_assert_eq(tp_decode_json(tp_example(PROTO_STATUS_REPLY), PROTO_TO_CLIENT, &m, err,
                                sizeof err), 0, "%s", err);
    const struct proto_status_reply *s = &m.status_reply;
    cr_assert(s->has_tag && s->tag == 9);
    cr_assert_eq(s->roles.instruct, 2);
    cr_assert_eq(s->roles.select, 1);
    cr_assert_eq(s->queue_depth, 3);
    cr_assert_eq(s->in_flight, 2);
    cr_assert_eq(s->n_workers, 1);
    cr_assert_str_eq(s->workers[0].id, "gpu0-instruct");
    cr_assert_eq(s->workers[0].state, PROTO_WORKER_BUSY);
    cr_assert_eq(s->workers[0].capacity.max_ctx, 8192);
    cr_assert_eq(s->workers[0].capacity.kv_tokens, 262144);
    cr_assert(s->workers[0].has_load && s->workers[0].load.queued == 5);
    proto_msg_free(&m);

    cr_assert_eq(tp_decode_json(tp_example(PROTO_GENERATE_RESULT), PROTO_FROM_WORKER, &m, err,
                                sizeof err), 0, "%s", err);
    cr_assert_eq(m.generate_result.n_outputs, 2);
    cr_assert_eq(m.generate_result.outputs[1].finish, PROTO_FINISH_LENGTH);
    cr_assert_eq(m.generate_result.outputs[1].n_tokens, 4096);
    cr_assert_eq(m.generate_result.usage.completion_tokens, 4098);
    proto_msg_free(&m);

    cr_assert_eq(tp_decode_json(tp_example(PROTO_JOB_ERROR), PROTO_FROM_WORKER, &m, err,
                                sizeof err), 0, "%s", err);
    cr_assert_eq(m.job_error.code, PROTO_ERR_TOO_LARGE);
    proto_msg_free(&m);
}

Test(proto, lenient_only_where_documented)
{
    /* Floats may arrive as float32 or as integers; u64 values use the full range. */
    const char *ok[] = {
        "{\"v\":1,\"type\":\"submit\",\"tag\":\"@u64:18446744073709551615\",\"messages\":[{"
        "\"role\":\"user\",\"content\":\"x\"}],\"sampling\":{\"instruct\":{\"temperature\":"
        "\"@f32:0.5\",\"top_p\":1}}}",
        "{\"type\":\"score_result\",\"scores\":[-3,\"@f32:-4.25\",7],\"v\":1,\"job\":0,"
        "\"usage\":{\"completion_tokens\":0,\"prompt_tokens\":1}}",
    };
    struct proto_msg m;
    char err[256];
    cr_assert_eq(tp_decode_json(ok[0], PROTO_ANY, &m, err, sizeof err), 0, "%s", err);
    cr_assert_eq(m.submit.tag, UINT64_MAX);
    cr_assert_eq(m.submit.sampling.instruct.temperature, 0.5);
    cr_assert_eq(m.submit.sampling.instruct.top_p, 1.0);
    proto_msg_free(&m);
    cr_assert_eq(tp_decode_json(ok[1], PROTO_ANY, &m, err, sizeof err), 0, "%s", err);
    cr_assert_eq(m.score_result.n_scores, 3);
    cr_assert_eq(m.score_result.scores[0], -3.0);
    cr_assert_eq(m.score_result.scores[1], -4.25);
    cr_assert_eq(m.score_result.scores[2], 7.0);
    proto_msg_free(&m);
}

/* ---- invalid input table --------------------------------------------------------------------- */

#define SUBMIT_HEAD "{\"v\":1,\"type\":\"submit\",\"tag\":7,"
#define USER_HI "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]"
#define GEN_HEAD "{\"v\":1,\"type\":\"generate\",\"job\":1,\"messages\":[{\"role\":\"user\"," \
                 "\"content\":\"hi\"}],\"add_generation_prompt\":true,"
#define GEN_SAMPLING "\"sampling\":{\"temperature\":0.5,\"top_p\":1.0,\"top_k\":0,\"seed\":1," \
                     "\"max_tokens\":16,\"ignore_eos\":false}"
#define RESULT_TAIL "\"timings\":{\"drafts_ms\":0,\"feedbacks_ms\":0,\"edits_ms\":0," \
    "\"scores_ms\":0,\"total_ms\":0},\"usage\":{\"instruct\":{\"prompt_tokens\":0," \
    "\"completion_tokens\":0},\"feedback\":{\"prompt_tokens\":0,\"completion_tokens\":0}," \
    "\"edit\":{\"prompt_tokens\":0,\"completion_tokens\":0},\"select\":{\"prompt_tokens\":0," \
    "\"completion_tokens\":0}}}"
#define RESULT_HEAD "{\"v\":1,\"type\":\"result\",\"id\":\"r1\",\"answer\":\"a\",\"score\":null," \
                    "\"partial\":false,"
#define CAND "{\"draft_index\":0,\"draft\":\"d\",\"feedbacks\":[],\"edit\":null,\"score\":null}"

static const struct {
    const char *json;
    uint32_t accept;
    int code;
    const char *err; /* expected substring of the error message */
} tp_bad[] = {
    /* text */
    { SUBMIT_HEAD "\"messages\":[{\"role\":\"user\",\"content\":\"@hex:6869c0af\"}]}", PROTO_ANY,
      PROTO_ERR_BAD_FIELD, "submit.messages[0].content: invalid UTF-8 at byte 2" },
    { SUBMIT_HEAD "\"messages\":[{\"role\":\"user\",\"content\":\"x\"},{\"role\":\"user\","
      "\"content\":\"@hex:4142eda080\"}]}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "submit.messages[1].content: invalid UTF-8 at byte 2" }, /* surrogate U+D800 */
    { SUBMIT_HEAD "\"messages\":[{\"role\":\"user\",\"content\":\"@hex:e080af\"}]}", PROTO_ANY,
      PROTO_ERR_BAD_FIELD, "submit.messages[0].content: invalid UTF-8 at byte 0" }, /* overlong */
    { SUBMIT_HEAD "\"messages\":[{\"role\":\"user\",\"content\":\"@hex:f4908080\"}]}",
      PROTO_ANY, PROTO_ERR_BAD_FIELD, "invalid UTF-8 at byte 0" }, /* above U+10FFFF */
    { SUBMIT_HEAD "\"messages\":[{\"role\":\"user\",\"content\":\"@hex:41e282\"}]}", PROTO_ANY,
      PROTO_ERR_BAD_FIELD, "invalid UTF-8 at byte 1" }, /* truncated sequence */
    { SUBMIT_HEAD "\"messages\":[{\"role\":\"user\",\"content\":\"a\\u0000b\"}]}", PROTO_ANY,
      PROTO_ERR_BAD_FIELD, "submit.messages[0].content: NUL character at byte 1" },
    { SUBMIT_HEAD "\"messages\":[{\"role\":\"user\",\"content\":\"@bin:6869\"}]}", PROTO_ANY,
      PROTO_ERR_BAD_FIELD, "submit.messages[0].content: expected string, got binary" },
    /* enums */
    { SUBMIT_HEAD "\"messages\":[{\"role\":\"bot\",\"content\":\"x\"}]}", PROTO_ANY,
      PROTO_ERR_BAD_FIELD,
      "submit.messages[0].role: unknown value 'bot' (expected system|user|assistant)" },
    { SUBMIT_HEAD "\"messages\":[{\"role\":1,\"content\":\"x\"}]}", PROTO_ANY,
      PROTO_ERR_BAD_FIELD, "submit.messages[0].role: expected string, got integer" },
    { SUBMIT_HEAD "\"messages\":[{\"role\":\"@hex:ff0a\",\"content\":\"x\"}]}", PROTO_ANY,
      PROTO_ERR_BAD_FIELD, "submit.messages[0].role: unknown value '\\xff\\x0a'" },
    /* presence and shape */
    { SUBMIT_HEAD "\"messages\":[]}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "submit.messages: 0 elements, at least 1 required" },
    { "{\"v\":1,\"type\":\"submit\",\"tag\":7}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "submit.messages: required field missing" },
    { SUBMIT_HEAD "\"messages\":[{\"role\":\"user\"}]}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "submit.messages[0].content: required field missing" },
    { SUBMIT_HEAD "\"messages\":{\"role\":\"user\"}}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "submit.messages: expected array, got map" },
    { SUBMIT_HEAD "\"messages\":[\"hi\"]}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "submit.messages[0]: expected map, got string" },
    { SUBMIT_HEAD USER_HI ",\"foo\":1}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "submit: unknown key 'foo'" },
    { SUBMIT_HEAD USER_HI ",\"@hex:c0af\":1}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "submit: unknown key '\\xc0\\xaf'" },
    { SUBMIT_HEAD USER_HI ",\"@dup:tag\":8}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "submit: duplicate key 'tag'" },
    { SUBMIT_HEAD USER_HI ",\"@dup:v\":1}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "submit: duplicate key 'v'" },
    { SUBMIT_HEAD USER_HI ",\"include_drafts\":null}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "submit.include_drafts: expected boolean, got nil" },
    { SUBMIT_HEAD USER_HI ",\"progress\":\"yes\"}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "submit.progress: expected boolean, got string" },
    /* integers */
    { "{\"v\":1,\"type\":\"submit\",\"tag\":-1," USER_HI "}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "submit.tag: -1 out of range" },
    { "{\"v\":1,\"type\":\"submit\",\"tag\":\"7\"," USER_HI "}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "submit.tag: expected unsigned integer, got string" },
    { "{\"v\":1,\"type\":\"submit\",\"tag\":1.5," USER_HI "}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "submit.tag: expected unsigned integer, got float64" },
    { SUBMIT_HEAD USER_HI ",\"drafts\":0}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "submit.drafts: 0 out of range [1, 32]" },
    { SUBMIT_HEAD USER_HI ",\"drafts\":33}", PROTO_ANY, PROTO_ERR_TOO_LARGE,
      "submit.drafts: 33 exceeds PROTO_MAX_DRAFTS (32)" },
    { SUBMIT_HEAD USER_HI ",\"feedbacks\":65}", PROTO_ANY, PROTO_ERR_TOO_LARGE,
      "submit.feedbacks: 65 exceeds PROTO_MAX_FEEDBACKS (64)" },
    { SUBMIT_HEAD USER_HI ",\"edits\":\"@u64:4294967296\"}", PROTO_ANY, PROTO_ERR_TOO_LARGE,
      "submit.edits: 4294967296 exceeds PROTO_MAX_EDITS (64)" },
    { SUBMIT_HEAD USER_HI ",\"feedbacks_per_edit\":4}", PROTO_ANY, PROTO_ERR_TOO_LARGE,
      "submit.feedbacks_per_edit: 4 exceeds PROTO_MAX_FEEDBACKS_PER_EDIT (3)" },
    { SUBMIT_HEAD USER_HI ",\"deadline_ms\":0}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "submit.deadline_ms: 0 out of range" },
    { SUBMIT_HEAD USER_HI ",\"deadline_ms\":86400001}", PROTO_ANY, PROTO_ERR_TOO_LARGE,
      "submit.deadline_ms: 86400001 exceeds PROTO_MAX_DEADLINE_MS (86400000)" },
    /* floats and nested maps */
    { SUBMIT_HEAD USER_HI ",\"sampling\":{\"instruct\":{\"temperature\":-0.5}}}", PROTO_ANY,
      PROTO_ERR_BAD_FIELD, "submit.sampling.instruct.temperature: -0.5 out of range [0, 10]" },
    { SUBMIT_HEAD USER_HI ",\"sampling\":{\"edit\":{\"top_p\":0.0}}}", PROTO_ANY,
      PROTO_ERR_BAD_FIELD, "submit.sampling.edit.top_p: 0 out of range (0, 1]" },
    { SUBMIT_HEAD USER_HI ",\"sampling\":{\"edit\":{\"top_p\":\"@f64:nan\"}}}", PROTO_ANY,
      PROTO_ERR_BAD_FIELD, "submit.sampling.edit.top_p: not a finite number" },
    { SUBMIT_HEAD USER_HI ",\"sampling\":{\"edit\":{\"temperature\":\"@f64:inf\"}}}", PROTO_ANY,
      PROTO_ERR_BAD_FIELD, "submit.sampling.edit.temperature: not a finite number" },
    { SUBMIT_HEAD USER_HI ",\"sampling\":{\"feedback\":{\"max_tokens\":200000}}}", PROTO_ANY,
      PROTO_ERR_TOO_LARGE,
      "submit.sampling.feedback.max_tokens: 200000 exceeds PROTO_MAX_TOKENS (131072)" },
    { SUBMIT_HEAD USER_HI ",\"sampling\":{\"instruct\":{\"temp\":1.0}}}", PROTO_ANY,
      PROTO_ERR_BAD_FIELD, "submit.sampling.instruct: unknown key 'temp'" },
    { SUBMIT_HEAD USER_HI ",\"sampling\":{\"select\":{}}}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "submit.sampling: unknown key 'select'" },
    { SUBMIT_HEAD USER_HI ",\"sampling\":[]}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "submit.sampling: expected map, got array" },
    /* envelope */
    { "{\"v\":2,\"type\":\"submit\"}", PROTO_ANY, PROTO_ERR_BAD_VERSION,
      "v: version 2 is not supported (this peer speaks 1)" },
    { "{\"type\":\"submit\",\"tag\":1}", PROTO_ANY, PROTO_ERR_BAD_MESSAGE,
      "message: missing key 'v'" },
    { "{\"v\":\"1\",\"type\":\"submit\"}", PROTO_ANY, PROTO_ERR_BAD_MESSAGE,
      "v: expected unsigned integer, got string" },
    { "{\"v\":-1,\"type\":\"submit\"}", PROTO_ANY, PROTO_ERR_BAD_MESSAGE,
      "v: expected unsigned integer, got negative integer" },
    { "{\"v\":1,\"tag\":1}", PROTO_ANY, PROTO_ERR_BAD_MESSAGE, "message: missing key 'type'" },
    { "{\"v\":1,\"type\":\"frobnicate\"}", PROTO_ANY, PROTO_ERR_BAD_MESSAGE,
      "type: unknown message type 'frobnicate'" },
    { "{\"v\":1,\"type\":5}", PROTO_ANY, PROTO_ERR_BAD_MESSAGE,
      "type: expected string, got integer" },
    { "[1,2]", PROTO_ANY, PROTO_ERR_BAD_MESSAGE, "message: expected a map, got array" },
    { "\"submit\"", PROTO_ANY, PROTO_ERR_BAD_MESSAGE, "message: expected a map, got string" },
    { "{\"v\":1,\"type\":\"cancel_job\",\"job\":1}", PROTO_FROM_CLIENT, PROTO_ERR_BAD_MESSAGE,
      "type: message type 'cancel_job' is not accepted here" },
    { "{\"v\":1,\"type\":\"submit\"}", PROTO_TO_WORKER, PROTO_ERR_BAD_MESSAGE,
      "type: message type 'submit' is not accepted here" },
    /* ids and names */
    { "{\"v\":1,\"type\":\"accepted\",\"tag\":1,\"id\":\"\"}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "accepted.id: empty" },
    { "{\"v\":1,\"type\":\"cancel\",\"id\":\"0123456789012345678901234567890123456789012345678"
      "9012345678901234\"}", PROTO_ANY, PROTO_ERR_TOO_LARGE,
      "cancel.id: 65 bytes exceeds PROTO_MAX_ID_BYTES (64)" },
    { "{\"v\":1,\"type\":\"get\"}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "get.id: required field missing" },
    { "{\"v\":1,\"type\":\"status\",\"tag\":null}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "status.tag: expected unsigned integer, got nil" },
    { "{\"v\":1,\"type\":\"error\",\"code\":\"oops\",\"message\":\"\"}", PROTO_ANY,
      PROTO_ERR_BAD_FIELD, "error.code: unknown value 'oops' (expected bad_message|" },
    { "{\"v\":1,\"type\":\"error\",\"code\":\"ok\",\"message\":\"\"}", PROTO_ANY,
      PROTO_ERR_BAD_FIELD, "error.code: unknown value 'ok'" },
    { "{\"v\":1,\"type\":\"error\",\"code\":-3,\"message\":\"\"}", PROTO_ANY,
      PROTO_ERR_BAD_FIELD, "error.code: expected string, got negative integer" },
    /* worker side */
    { "{\"v\":1,\"type\":\"ready\",\"worker\":\"w\",\"role\":\"judge\",\"model\":\"m\","
      "\"backend\":\"cpu\",\"capacity\":{\"max_seqs\":1,\"max_ctx\":1,\"kv_tokens\":1}}",
      PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "ready.role: unknown value 'judge' (expected instruct|feedback|edit|select)" },
    { "{\"v\":1,\"type\":\"ready\",\"worker\":\"w\",\"role\":\"edit\",\"model\":\"m\","
      "\"backend\":\"cpu\",\"capacity\":{\"max_seqs\":0,\"max_ctx\":1,\"kv_tokens\":1}}",
      PROTO_ANY, PROTO_ERR_BAD_FIELD, "ready.capacity.max_seqs: 0 out of range [1, 65536]" },
    { "{\"v\":1,\"type\":\"ready\",\"worker\":\"w\",\"role\":\"edit\",\"model\":\"m\","
      "\"backend\":\"cpu\",\"capacity\":{\"max_seqs\":1,\"max_ctx\":1}}", PROTO_ANY,
      PROTO_ERR_BAD_FIELD, "ready.capacity.kv_tokens: required field missing" },
    { "{\"v\":1,\"type\":\"heartbeat\",\"load\":{\"running\":1,\"queued\":1,\"kv_used\":1,"
      "\"gpu\":1}}", PROTO_ANY, PROTO_ERR_BAD_FIELD, "heartbeat.load: unknown key 'gpu'" },
    { "{\"v\":1,\"type\":\"disconnect\"}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "disconnect.reason: required field missing" },
    { GEN_HEAD "\"n\":0," GEN_SAMPLING "}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "generate.n: 0 out of range [1, 64]" },
    { GEN_HEAD "\"n\":65," GEN_SAMPLING "}", PROTO_ANY, PROTO_ERR_TOO_LARGE,
      "generate.n: 65 exceeds PROTO_MAX_SAMPLES (64)" },
    { GEN_HEAD "\"n\":1,\"sampling\":{\"temperature\":0.5,\"top_p\":1.0,\"top_k\":0,\"seed\":1,"
      "\"max_tokens\":16}}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "generate.sampling.ignore_eos: required field missing" },
    { GEN_HEAD "\"n\":1,\"sampling\":{\"temperature\":0.5,\"top_p\":1.0,\"top_k\":2000000,"
      "\"seed\":1,\"max_tokens\":16,\"ignore_eos\":true}}", PROTO_ANY, PROTO_ERR_TOO_LARGE,
      "generate.sampling.top_k: 2000000 exceeds PROTO_MAX_TOP_K (1048576)" },
    { GEN_HEAD "\"n\":1,\"sampling\":{\"temperature\":11.0,\"top_p\":1.0,\"top_k\":0,"
      "\"seed\":1,\"max_tokens\":16,\"ignore_eos\":true}}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "generate.sampling.temperature: 11 out of range [0, 10]" },
    { "{\"v\":1,\"type\":\"score\",\"job\":1,\"conversations\":[[]]}", PROTO_ANY,
      PROTO_ERR_BAD_FIELD, "score.conversations[0]: 0 elements, at least 1 required" },
    { "{\"v\":1,\"type\":\"score\",\"job\":1,\"conversations\":[[{\"role\":\"user\","
      "\"content\":\"a\"}],[{\"role\":\"user\",\"content\":\"@hex:ff\"}]]}", PROTO_ANY,
      PROTO_ERR_BAD_FIELD, "score.conversations[1][0].content: invalid UTF-8 at byte 0" },
    { "{\"v\":1,\"type\":\"score\",\"job\":1,\"conversations\":[{\"role\":\"user\"}]}",
      PROTO_ANY, PROTO_ERR_BAD_FIELD, "score.conversations[0]: expected array, got map" },
    { "{\"v\":1,\"type\":\"cancel_job\",\"job\":1.0}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "cancel_job.job: expected unsigned integer, got float64" },
    { "{\"v\":1,\"type\":\"generate_result\",\"job\":1,\"outputs\":[{\"text\":\"x\","
      "\"n_tokens\":1,\"finish\":\"eos\"}],\"usage\":{\"prompt_tokens\":1,"
      "\"completion_tokens\":1}}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "generate_result.outputs[0].finish: unknown value 'eos' (expected stop|length|cancelled)" },
    { "{\"v\":1,\"type\":\"generate_result\",\"job\":1,\"outputs\":[],\"usage\":{"
      "\"prompt_tokens\":1,\"completion_tokens\":1}}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "generate_result.outputs: 0 elements, at least 1 required" },
    { "{\"v\":1,\"type\":\"score_result\",\"job\":1,\"scores\":[\"x\"],\"usage\":{"
      "\"prompt_tokens\":1,\"completion_tokens\":1}}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "score_result.scores[0]: expected number, got string" },
    { "{\"v\":1,\"type\":\"score_result\",\"job\":1,\"scores\":[1.0,\"@f64:-inf\"],\"usage\":"
      "{\"prompt_tokens\":1,\"completion_tokens\":1}}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "score_result.scores[1]: not a finite number" },
    { "{\"v\":1,\"type\":\"sample\",\"job\":1,\"index\":64,\"output\":{\"text\":\"x\","
      "\"n_tokens\":1,\"finish\":\"stop\"}}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "sample.index: 64 out of range [0, 63]" },
    { "{\"v\":1,\"type\":\"sample\",\"job\":1,\"index\":0,\"output\":{\"text\":\"x\","
      "\"n_tokens\":1}}", PROTO_FROM_WORKER, PROTO_ERR_BAD_FIELD,
      "sample.output.finish: required field missing" },
    { "{\"v\":1,\"type\":\"sample\",\"job\":1,\"index\":0,\"output\":{\"text\":\"x\","
      "\"n_tokens\":1,\"finish\":\"stop\"}}", PROTO_TO_WORKER, PROTO_ERR_BAD_MESSAGE,
      "type: message type 'sample' is not accepted here" },
    { "{\"v\":1,\"type\":\"job_error\",\"job\":1,\"code\":\"nope\",\"message\":\"m\"}",
      PROTO_ANY, PROTO_ERR_BAD_FIELD, "job_error.code: unknown value 'nope'" },
    /* spanning rules and nullable fields */
    { RESULT_HEAD "\"best\":3,\"candidates\":[" CAND "]," RESULT_TAIL, PROTO_ANY,
      PROTO_ERR_BAD_FIELD, "result.best: 3 is not a candidate index (1 candidates)" },
    { RESULT_HEAD "\"best\":0,\"candidates\":[]," RESULT_TAIL, PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "result.best: 0 is not a candidate index (0 candidates)" },
    { RESULT_HEAD "\"candidates\":[]," RESULT_TAIL, PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "result.best: required field missing" },
    { RESULT_HEAD "\"best\":null,\"candidates\":[{\"draft_index\":0,\"draft\":\"d\","
      "\"feedbacks\":[],\"score\":null}]," RESULT_TAIL, PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "result.candidates[0].edit: required field missing" },
    { RESULT_HEAD "\"best\":null,\"candidates\":[{\"draft_index\":0,\"draft\":\"d\","
      "\"feedbacks\":[1],\"edit\":null,\"score\":null}]," RESULT_TAIL, PROTO_ANY,
      PROTO_ERR_BAD_FIELD, "result.candidates[0].feedbacks[0]: expected string, got integer" },
    { RESULT_HEAD "\"best\":null,\"candidates\":[{\"draft_index\":32,\"draft\":\"d\","
      "\"feedbacks\":[],\"edit\":null,\"score\":null}]," RESULT_TAIL, PROTO_ANY,
      PROTO_ERR_BAD_FIELD, "result.candidates[0].draft_index: 32 out of range [0, 31]" },
    { RESULT_HEAD "\"best\":null,\"candidates\":[{\"draft_index\":0,\"draft\":\"d\","
      "\"feedbacks\":[],\"edit\":null,\"score\":\"high\"}]," RESULT_TAIL, PROTO_ANY,
      PROTO_ERR_BAD_FIELD, "result.candidates[0].score: expected number, got string" },
    { "{\"v\":1,\"type\":\"progress\",\"id\":\"r\",\"drafts\":{\"done\":5,\"total\":3},"
      "\"feedbacks\":{\"done\":0,\"total\":0},\"edits\":{\"done\":0,\"total\":0},\"scores\":"
      "{\"done\":0,\"total\":0},\"elapsed_ms\":1}", PROTO_ANY, PROTO_ERR_BAD_FIELD,
      "progress.drafts.done: 5 exceeds total 3" },
    { "{\"v\":1,\"type\":\"status_reply\",\"roles\":{\"instruct\":0,\"feedback\":0,\"edit\":0,"
      "\"select\":0},\"queue_depth\":0,\"in_flight\":0,\"workers\":[{\"id\":\"w\",\"role\":"
      "\"edit\",\"model\":\"m\",\"backend\":\"cpu\",\"state\":\"zombie\",\"capacity\":{"
      "\"max_seqs\":1,\"max_ctx\":1,\"kv_tokens\":1},\"jobs\":0}]}", PROTO_ANY,
      PROTO_ERR_BAD_FIELD, "status_reply.workers[0].state: unknown value 'zombie'" },
};

Test(proto, invalid_inputs_name_the_field)
{
    for (size_t i = 0; i < sizeof tp_bad / sizeof *tp_bad; i++) {
        char err[512];
        struct proto_msg m;
        memset(&m, 0xA5, sizeof m); /* the decoder must zero it on failure */
        int rc = tp_decode_json(tp_bad[i].json, tp_bad[i].accept, &m, err, sizeof err);
        cr_assert_eq(rc, tp_bad[i].code, "case %zu: got %s (%s), want %s\n  input: %s", i,
                     proto_err_name(rc), err, proto_err_name(tp_bad[i].code), tp_bad[i].json);
        cr_assert(strstr(err, tp_bad[i].err), "case %zu: error \"%s\" lacks \"%s\"", i, err,
                  tp_bad[i].err);
        cr_assert_eq(m.type, PROTO_NONE, "case %zu: failed decode leaves a message", i);
        proto_msg_free(&m); /* harmless on the zeroed message */
    }
}

/* ---- limits at their edges ------------------------------------------------------------------ */

/* A submit whose only message has `content_len` bytes of 'a', or `n_msgs` messages "x". */
static char *tp_big_submit(size_t content_len, uint32_t n_msgs, size_t *len)
{
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 4);
    msgpack_pack_str_with_body(&pk, "v", 1);
    msgpack_pack_uint64(&pk, 1);
    msgpack_pack_str_with_body(&pk, "type", 4);
    msgpack_pack_str_with_body(&pk, "submit", 6);
    msgpack_pack_str_with_body(&pk, "tag", 3);
    msgpack_pack_uint64(&pk, 1);
    msgpack_pack_str_with_body(&pk, "messages", 8);
    msgpack_pack_array(&pk, n_msgs);
    char *text = malloc(content_len ? content_len : 1);
    cr_assert(text);
    memset(text, 'a', content_len);
    for (uint32_t i = 0; i < n_msgs; i++) {
        msgpack_pack_map(&pk, 2);
        msgpack_pack_str_with_body(&pk, "role", 4);
        msgpack_pack_str_with_body(&pk, "user", 4);
        msgpack_pack_str_with_body(&pk, "content", 7);
        msgpack_pack_str_with_body(&pk, text, content_len);
    }
    free(text);
    *len = sb.size;
    return msgpack_sbuffer_release(&sb);
}

Test(proto, limits_hold_exactly_at_the_edge)
{
    char err[512];
    struct proto_msg m;
    size_t len;
    char *buf = tp_big_submit(PROTO_MAX_STRING_BYTES, 1, &len);
    cr_assert_eq(proto_decode(buf, len, PROTO_ANY, &m, err, sizeof err), 0, "%s", err);
    cr_assert_eq(strlen(m.submit.messages[0].content), PROTO_MAX_STRING_BYTES);
    proto_msg_free(&m);
    free(buf);

    buf = tp_big_submit(PROTO_MAX_STRING_BYTES + 1, 1, &len);
    cr_assert_eq(proto_decode(buf, len, PROTO_ANY, &m, err, sizeof err), PROTO_ERR_TOO_LARGE);
    cr_assert(strstr(err, "submit.messages[0].content: 4194305 bytes exceeds "
                          "PROTO_MAX_STRING_BYTES (4194304)"), "%s", err);
    free(buf);

    buf = tp_big_submit(1, PROTO_MAX_MESSAGES, &len);
    cr_assert_eq(proto_decode(buf, len, PROTO_ANY, &m, err, sizeof err), 0, "%s", err);
    cr_assert_eq(m.submit.n_messages, PROTO_MAX_MESSAGES);
    proto_msg_free(&m);
    free(buf);

    buf = tp_big_submit(1, PROTO_MAX_MESSAGES + 1, &len);
    cr_assert_eq(proto_decode(buf, len, PROTO_ANY, &m, err, sizeof err), PROTO_ERR_TOO_LARGE);
    cr_assert(strstr(err, "submit.messages: 1025 elements exceeds PROTO_MAX_MESSAGES (1024)"),
              "%s", err);
    free(buf);

    /* Five strings at the limit are fine one by one, not together in one frame. */
    buf = tp_big_submit(PROTO_MAX_STRING_BYTES, 5, &len);
    cr_assert_eq(proto_decode(buf, len, PROTO_ANY, &m, err, sizeof err), PROTO_ERR_TOO_LARGE);
    cr_assert(strstr(err, "exceeds PROTO_MAX_MESSAGE_BYTES"), "%s", err);
    free(buf);
}

/* ---- the encoder refuses what a decoder would refuse ---------------------------------------- */

Test(proto, encoder_refuses_invalid_messages)
{
    char err[512];
    void *buf = (void *)1;
    size_t len = 1;
    struct proto_chat_msg msgs[2] = {
        { PROTO_CHAT_USER, "fine" },
        { PROTO_CHAT_USER, "bad \xC0\xAF here" },
    };
    struct proto_msg m = { .type = PROTO_SUBMIT };
    m.submit.tag = 1;
    m.submit.messages = msgs;
    m.submit.n_messages = 2;
    cr_assert_eq(proto_encode(&m, &buf, &len, err, sizeof err), PROTO_ERR_BAD_FIELD);
    cr_assert(strstr(err, "submit.messages[1].content: invalid UTF-8 at byte 4"), "%s", err);
    cr_assert_null(buf, "no output on failure");
    cr_assert_eq(len, 0);

    msgs[1].content = "ok";
    m.submit.has_drafts = true;
    m.submit.drafts = 0;
    cr_assert_eq(proto_encode(&m, &buf, &len, err, sizeof err), PROTO_ERR_BAD_FIELD);
    cr_assert(strstr(err, "submit.drafts: 0 out of range [1, 32]"), "%s", err);
    m.submit.drafts = 40;
    cr_assert_eq(proto_encode(&m, &buf, &len, err, sizeof err), PROTO_ERR_TOO_LARGE);
    cr_assert(strstr(err, "submit.drafts: 40 exceeds PROTO_MAX_DRAFTS (32)"), "%s", err);
    m.submit.has_drafts = false; /* the value member is ignored when absent */
    cr_assert_eq(proto_encode(&m, &buf, &len, err, sizeof err), 0, "%s", err);
    free(buf);

    m.submit.has_sampling = true;
    m.submit.sampling.has_feedback = true;
    m.submit.sampling.feedback.has_top_p = true;
    m.submit.sampling.feedback.top_p = NAN;
    cr_assert_eq(proto_encode(&m, &buf, &len, err, sizeof err), PROTO_ERR_BAD_FIELD);
    cr_assert(strstr(err, "submit.sampling.feedback.top_p: not a finite number"), "%s", err);
    m.submit.has_sampling = false;

    msgs[0].role = (enum proto_chat_role)7;
    cr_assert_eq(proto_encode(&m, &buf, &len, err, sizeof err), PROTO_ERR_BAD_FIELD);
    cr_assert(strstr(err, "submit.messages[0].role: 7 is not a valid value"), "%s", err);
    msgs[0].role = PROTO_CHAT_USER;

    msgs[0].content = NULL;
    cr_assert_eq(proto_encode(&m, &buf, &len, err, sizeof err), PROTO_ERR_BAD_FIELD);
    cr_assert(strstr(err, "submit.messages[0].content: required field missing"), "%s", err);
    msgs[0].content = "x";

    m.submit.messages = NULL;
    cr_assert_eq(proto_encode(&m, &buf, &len, err, sizeof err), PROTO_ERR_BAD_FIELD);
    cr_assert(strstr(err, "submit.messages: 2 elements but a NULL array"), "%s", err);
    m.submit.n_messages = 0;
    cr_assert_eq(proto_encode(&m, &buf, &len, err, sizeof err), PROTO_ERR_BAD_FIELD);
    cr_assert(strstr(err, "submit.messages: 0 elements, at least 1 required"), "%s", err);

    struct proto_candidate cand = { .draft = "d" };
    struct proto_msg r = { .type = PROTO_RESULT };
    r.result.id = "r1";
    r.result.answer = "d";
    r.result.candidates = &cand;
    r.result.n_candidates = 1;
    r.result.has_best = true;
    r.result.best = 1;
    cr_assert_eq(proto_encode(&r, &buf, &len, err, sizeof err), PROTO_ERR_BAD_FIELD);
    cr_assert(strstr(err, "result.best: 1 is not a candidate index (1 candidates)"), "%s", err);
    r.result.best = 0;
    cr_assert_eq(proto_encode(&r, &buf, &len, err, sizeof err), 0, "%s", err);
    free(buf);

    char id[PROTO_MAX_ID_BYTES + 2];
    memset(id, 'i', sizeof id - 1);
    id[sizeof id - 1] = '\0';
    struct proto_msg c = { .type = PROTO_CANCEL };
    c.cancel.id = id;
    cr_assert_eq(proto_encode(&c, &buf, &len, err, sizeof err), PROTO_ERR_TOO_LARGE);
    cr_assert(strstr(err, "cancel.id: 65 bytes exceeds PROTO_MAX_ID_BYTES (64)"), "%s", err);

    struct proto_msg none = { .type = PROTO_NONE };
    cr_assert_eq(proto_encode(&none, &buf, &len, err, sizeof err), PROTO_ERR_BAD_MESSAGE);
    struct proto_msg bogus = { .type = (enum proto_type)99 };
    cr_assert_eq(proto_encode(&bogus, &buf, &len, err, sizeof err), PROTO_ERR_BAD_MESSAGE);
    proto_msg_free(NULL);
    proto_msg_free(&none);
}

Test(proto, encoded_bytes_are_the_documented_msgpack)
{
    /* The smallest message, byte by byte: fixmap(3) "v" 1 "type" "cancel_job" "job" 1001. */
    struct proto_msg m = { .type = PROTO_CANCEL_JOB };
    m.cancel_job.job = 1001;
    void *buf;
    size_t len;
    char err[128];
    cr_assert_eq(proto_encode(&m, &buf, &len, err, sizeof err), 0, "%s", err);
    static const unsigned char want[] = {
        0x83, 0xa1, 'v', 0x01, 0xa4, 't', 'y', 'p', 'e', 0xaa, 'c', 'a', 'n', 'c', 'e', 'l',
        '_', 'j', 'o', 'b', 0xa3, 'j', 'o', 'b', 0xcd, 0x03, 0xe9,
    };
    cr_assert_eq(len, sizeof want);
    cr_assert_arr_eq(buf, want, sizeof want);
    free(buf);
}

/* ---- peek ------------------------------------------------------------------------------------ */

Test(proto, peek_finds_the_reply_address_of_a_bad_message)
{
    size_t len;
    struct proto_peek p;
    char *buf = tp_msgpack(SUBMIT_HEAD USER_HI ",\"drafts\":99}", &len);
    cr_assert_eq(proto_peek(buf, len, &p), 0);
    cr_assert_eq(p.type, PROTO_SUBMIT);
    cr_assert(p.has_tag && p.tag == 7);
    cr_assert(!p.has_job);
    cr_assert_str_eq(p.id, "");
    free(buf);

    buf = tp_msgpack("{\"v\":7,\"type\":\"get\",\"id\":\"r-9\",\"junk\":[1]}", &len);
    cr_assert_eq(proto_peek(buf, len, &p), 0);
    cr_assert_eq(p.type, PROTO_GET);
    cr_assert_str_eq(p.id, "r-9");
    free(buf);

    buf = tp_msgpack("{\"type\":\"nope\",\"job\":12,\"id\":\"@hex:ff\"}", &len);
    cr_assert_eq(proto_peek(buf, len, &p), 0);
    cr_assert_eq(p.type, PROTO_NONE);
    cr_assert(p.has_job && p.job == 12);
    cr_assert_str_eq(p.id, "", "an invalid id is not reported");
    free(buf);

    static const unsigned char junk[] = { 0xdd, 0xff, 0xff, 0xff, 0xff };
    cr_assert_eq(proto_peek(junk, sizeof junk, &p), PROTO_ERR_BAD_MESSAGE);
    static const unsigned char num[] = { 0x05 };
    cr_assert_eq(proto_peek(num, sizeof num, &p), PROTO_ERR_BAD_MESSAGE);
}

Test(proto, error_reply_to_a_bad_message)
{
    size_t len;
    char *buf = tp_msgpack(SUBMIT_HEAD USER_HI ",\"drafts\":99}", &len);
    struct proto_msg m;
    char err[512], err2[256];
    int rc = proto_decode(buf, len, PROTO_FROM_CLIENT, &m, err, sizeof err);
    cr_assert_eq(rc, PROTO_ERR_TOO_LARGE);
    struct proto_peek pk;
    cr_assert_eq(proto_peek(buf, len, &pk), 0);
    free(buf);

    void *reply;
    size_t reply_len;
    cr_assert_eq(proto_encode_error(&pk, rc, err, &reply, &reply_len, err2, sizeof err2), 0,
                 "%s", err2);
    cr_assert_eq(proto_decode(reply, reply_len, PROTO_TO_CLIENT, &m, err2, sizeof err2), 0,
                 "%s", err2);
    free(reply);
    cr_assert_eq(m.type, PROTO_ERROR);
    cr_assert(m.error.has_tag && m.error.tag == 7);
    cr_assert_null(m.error.id);
    cr_assert_eq(m.error.code, PROTO_ERR_TOO_LARGE);
    cr_assert_str_eq(m.error.message, "submit.drafts: 99 exceeds PROTO_MAX_DRAFTS (32)");
    proto_msg_free(&m);

    /* Text that is not fit for the wire is made fit, not refused. */
    static char text[5000];
    memset(text, 'x', sizeof text - 1);
    memcpy(text + PROTO_MAX_ERROR_BYTES - 1, "\xC3\xA9", 2); /* cut mid-character */
    memcpy(text, "ok \xFF\xFE end", 9);
    cr_assert_eq(proto_encode_error(NULL, PROTO_ERR_INTERNAL, text, &reply, &reply_len, err2,
                                    sizeof err2), 0, "%s", err2);
    cr_assert_eq(proto_decode(reply, reply_len, PROTO_ANY, &m, err2, sizeof err2), 0, "%s",
                 err2);
    free(reply);
    cr_assert(!m.error.has_tag && !m.error.id);
    cr_assert_eq(strlen(m.error.message), PROTO_MAX_ERROR_BYTES);
    cr_assert_eq(strncmp(m.error.message, "ok ?? end", 9), 0, "%.12s", m.error.message);
    cr_assert_eq(m.error.message[PROTO_MAX_ERROR_BYTES - 1], '?');
    proto_msg_free(&m);

    cr_assert_eq(proto_encode_error(NULL, PROTO_ERR_BUSY, NULL, &reply, &reply_len, err2,
                                    sizeof err2), 0, "%s", err2);
    free(reply);
    cr_assert_eq(proto_encode_error(NULL, 0, "x", &reply, &reply_len, err2, sizeof err2),
                 PROTO_ERR_BAD_FIELD, "0 is not an error code");
    cr_assert(strstr(err2, "error.code"), "%s", err2);
}

/* ---- hostile bytes ------------------------------------------------------------------------ */

static int tp_decode_raw(const void *buf, size_t len, char *err, size_t err_len)
{
    struct proto_msg m;
    int rc = proto_decode(buf, len, PROTO_ANY, &m, err, err_len);
    if (rc == 0)
        proto_msg_free(&m);
    return rc;
}

Test(proto_hostile, huge_declared_lengths_are_refused_before_allocation)
{
    static const struct {
        unsigned char bytes[16];
        size_t len;
        int code;
        const char *err;
    } cases[] = {
        { { 0xdd, 0xff, 0xff, 0xff, 0xff }, 5, PROTO_ERR_BAD_MESSAGE,
          "array at byte 0 declares 4294967295 elements but only 0 bytes follow" },
        { { 0xdf, 0xff, 0xff, 0xff, 0xff }, 5, PROTO_ERR_BAD_MESSAGE,
          "map at byte 0 declares 4294967295 entries" },
        { { 0x81, 0xa1, 'v', 0xdc, 0xff, 0xff, 0xc0 }, 7, PROTO_ERR_BAD_MESSAGE,
          "array at byte 3 declares 65535 elements but only 1 bytes follow" },
        { { 0xdb, 0xff, 0xff, 0xff, 0xff, 'a' }, 6, PROTO_ERR_BAD_MESSAGE,
          "truncated: value at byte 0 needs 4294967295 more bytes, 1 left" },
        { { 0xc6, 0x7f, 0xff, 0xff, 0xff }, 5, PROTO_ERR_BAD_MESSAGE, "truncated" },
        { { 0x81, 0xa1, 'v' }, 3, PROTO_ERR_BAD_MESSAGE, "truncated at byte 3" },
        { { 0xcb, 0x00 }, 2, PROTO_ERR_BAD_MESSAGE, "truncated" },
        { { 0xd4, 0x01, 0x02 }, 3, PROTO_ERR_BAD_MESSAGE, "extension type 0xd4 at byte 0" },
        { { 0x81, 0xa1, 'x', 0xc7, 0x01, 0x05, 0x00 }, 7, PROTO_ERR_BAD_MESSAGE,
          "extension type 0xc7 at byte 3" },
        { { 0xc1 }, 1, PROTO_ERR_BAD_MESSAGE, "reserved byte 0xc1" },
        { { 0x80, 0x00 }, 2, PROTO_ERR_BAD_MESSAGE, "1 trailing bytes" },
        { { 0 }, 0, PROTO_ERR_BAD_MESSAGE, "message: empty" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char err[256];
        int rc = tp_decode_raw(cases[i].bytes, cases[i].len, err, sizeof err);
        cr_assert_eq(rc, cases[i].code, "case %zu: %s", i, err);
        cr_assert(strstr(err, cases[i].err), "case %zu: \"%s\" lacks \"%s\"", i, err,
                  cases[i].err);
    }
}

Test(proto_hostile, deep_nesting_and_value_floods_are_bounded)
{
    char err[256];
    size_t n = 100000;
    unsigned char *buf = malloc(n + 1);
    cr_assert(buf);
    memset(buf, 0x91, n); /* [[[[...]]]] */
    buf[n] = 0xc0;
    cr_assert_eq(tp_decode_raw(buf, n + 1, err, sizeof err), PROTO_ERR_TOO_LARGE);
    cr_assert(strstr(err, "exceeds PROTO_MAX_DEPTH (8)"), "%s", err);
    for (size_t i = 0; i + 3 <= n; i += 3) { /* {"a":{"a":{...}}} */
        buf[i] = 0x81, buf[i + 1] = 0xa1, buf[i + 2] = 'a';
    }
    cr_assert_eq(tp_decode_raw(buf, n - n % 3, err, sizeof err), PROTO_ERR_TOO_LARGE);
    cr_assert(strstr(err, "PROTO_MAX_DEPTH"), "%s", err);
    free(buf);

    /* Nesting exactly at the limit is structure-valid (and then fails on its fields). */
    unsigned char ok_depth[PROTO_MAX_DEPTH + 1];
    memset(ok_depth, 0x91, PROTO_MAX_DEPTH);
    ok_depth[PROTO_MAX_DEPTH] = 0xc0;
    cr_assert_eq(tp_decode_raw(ok_depth, sizeof ok_depth, err, sizeof err),
                 PROTO_ERR_BAD_MESSAGE);
    cr_assert(strstr(err, "expected a map, got array"), "%s", err);

    /* 300000 nils: well under the byte limit, over the value limit. */
    n = 300000;
    buf = malloc(n + 5);
    cr_assert(buf);
    buf[0] = 0xdd, buf[1] = 0, buf[2] = (unsigned char)(n >> 16), buf[3] = (n >> 8) & 0xff;
    buf[4] = n & 0xff;
    memset(buf + 5, 0xc0, n);
    cr_assert_eq(tp_decode_raw(buf, n + 5, err, sizeof err), PROTO_ERR_TOO_LARGE);
    cr_assert(strstr(err, "more than PROTO_MAX_OBJECTS (262144) values"), "%s", err);
    free(buf);

    n = (size_t)PROTO_MAX_MESSAGE_BYTES + 1;
    buf = calloc(n, 1);
    cr_assert(buf);
    cr_assert_eq(tp_decode_raw(buf, n, err, sizeof err), PROTO_ERR_TOO_LARGE);
    cr_assert(strstr(err, "16777217 bytes exceeds PROTO_MAX_MESSAGE_BYTES (16777216)"), "%s",
              err);
    free(buf);
}

Test(proto_hostile, non_string_keys_and_odd_types_are_field_errors)
{
    /* {"v":1,"type":"get",1:"x"} and {"v":1,"type":"get","id":["x"]} */
    static const unsigned char intkey[] = { 0x83, 0xa1, 'v', 0x01, 0xa4, 't', 'y', 'p', 'e',
                                            0xa3, 'g', 'e', 't', 0x01, 0xa1, 'x' };
    char err[256];
    cr_assert_eq(tp_decode_raw(intkey, sizeof intkey, err, sizeof err), PROTO_ERR_BAD_FIELD);
    cr_assert(strstr(err, "get: map key #2 is a integer, not a string"), "%s", err);
    static const unsigned char arrid[] = { 0x83, 0xa1, 'v', 0x01, 0xa4, 't', 'y', 'p', 'e',
                                           0xa3, 'g', 'e', 't', 0xa2, 'i', 'd', 0x91, 0xa1,
                                           'x' };
    cr_assert_eq(tp_decode_raw(arrid, sizeof arrid, err, sizeof err), PROTO_ERR_BAD_FIELD);
    cr_assert(strstr(err, "get.id: expected string, got array"), "%s", err);
}

/* Every prefix of every example is an error (never a crash or a partial message). */
Test(proto_hostile, every_truncation_is_an_error)
{
    for (size_t i = 0; i < TP_N_EXAMPLES; i++) {
        size_t len;
        char *buf = tp_msgpack(tp_examples[i].json, &len);
        for (size_t cut = 0; cut < len; cut++) {
            char *copy = malloc(cut ? cut : 1); /* exact size: ASan sees any overread */
            cr_assert(copy);
            memcpy(copy, buf, cut);
            char err[256];
            int rc = tp_decode_raw(copy, cut, err, sizeof err);
            cr_assert_eq(rc, PROTO_ERR_BAD_MESSAGE, "%s cut at %zu: %s",
                         proto_type_name(tp_examples[i].type), cut, err);
            free(copy);
        }
        free(buf);
    }
}

/* Every byte of a valid message set to every value: an error or a message that round-trips. */
static void tp_mutate_all(const char *buf, size_t len, int values_step)
{
    char *copy = malloc(len);
    cr_assert(copy);
    for (size_t pos = 0; pos < len; pos++) {
        for (int v = 0; v < 256; v += values_step) {
            memcpy(copy, buf, len);
            copy[pos] = (char)v;
            struct proto_msg m;
            char err[512];
            int rc = proto_decode(copy, len, PROTO_ANY, &m, err, sizeof err);
            if (rc == 0) {
                tp_roundtrip(&m, "mutant");
                proto_msg_free(&m);
            } else {
                cr_assert(rc < 0 && rc >= -PROTO_ERR_COUNT, "bad code %d", rc);
                cr_assert(err[0] != '\0', "error without a message");
                /* The reply a daemon sends about it is a valid error message. */
                struct proto_peek pk;
                int prc = proto_peek(copy, len, &pk);
                void *reply;
                size_t reply_len;
                char err2[256];
                cr_assert_eq(proto_encode_error(prc == 0 ? &pk : NULL, rc, err, &reply,
                                                &reply_len, err2, sizeof err2), 0, "%s", err2);
                cr_assert_eq(proto_decode(reply, reply_len, PROTO_TO_CLIENT, &m, err2,
                                          sizeof err2), 0, "%s", err2);
                cr_assert_str_eq(m.error.message, err);
                proto_msg_free(&m);
                free(reply);
            }
        }
    }
    free(copy);
}

Test(proto_hostile, every_single_byte_mutation_is_handled)
{
    /* All 256 values at every position of two messages, a stride of values for the rest. */
    for (size_t i = 0; i < TP_N_EXAMPLES; i++) {
        size_t len;
        char *buf = tp_msgpack(tp_examples[i].json, &len);
        bool full = tp_examples[i].type == PROTO_SUBMIT || tp_examples[i].type == PROTO_SCORE;
        tp_mutate_all(buf, len, full ? 1 : 7);
        free(buf);
    }
}
