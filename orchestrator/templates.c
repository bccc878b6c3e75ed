/* templates.c — role prompt templates: parses configs/prompts/<role>.tmpl files (format in
 * templates.h) and renders a role's message list for one job.
 *
 * Owns the parsed sections of the four files. Must never carry a prompt's wording itself
 * (the words live in the data files, so a newer model card needs no rebuild), never print,
 * never exit; every load error names file:line.
 */
#include "templates.h"

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proto_utf8.h"

enum templates_kind {
    TEMPLATES_CONVERSATION,
    TEMPLATES_SYSTEM,
    TEMPLATES_USER,
    TEMPLATES_ASSISTANT,
};

static const char *const templates_kind_names[] = {"conversation", "system", "user",
                                                   "assistant"};

enum templates_ph { TEMPLATES_PROMPT, TEMPLATES_RESPONSE, TEMPLATES_FEEDBACK, TEMPLATES_N_PH };

static const char *const templates_ph_names[TEMPLATES_N_PH] = {"prompt", "response", "feedback"};

#define TEMPLATES_BIT(ph) (1u << (ph))
/* Bit for "the conversation reaches the model" (an @conversation section or {prompt}). */
#define TEMPLATES_NEEDS_CONVERSATION (1u << TEMPLATES_N_PH)

/* Which placeholders a role may use, and what it must use. */
static const unsigned templates_allowed[PROTO_ROLE_COUNT] = {
    [PROTO_ROLE_INSTRUCT] = TEMPLATES_BIT(TEMPLATES_PROMPT),
    [PROTO_ROLE_FEEDBACK] = TEMPLATES_BIT(TEMPLATES_PROMPT) | TEMPLATES_BIT(TEMPLATES_RESPONSE),
    [PROTO_ROLE_EDIT] = TEMPLATES_BIT(TEMPLATES_PROMPT) | TEMPLATES_BIT(TEMPLATES_RESPONSE) |
                        TEMPLATES_BIT(TEMPLATES_FEEDBACK),
    [PROTO_ROLE_SELECT] = TEMPLATES_BIT(TEMPLATES_PROMPT) | TEMPLATES_BIT(TEMPLATES_RESPONSE),
};
static const unsigned templates_required[PROTO_ROLE_COUNT] = {
    [PROTO_ROLE_INSTRUCT] = TEMPLATES_NEEDS_CONVERSATION,
    [PROTO_ROLE_FEEDBACK] = TEMPLATES_NEEDS_CONVERSATION | TEMPLATES_BIT(TEMPLATES_RESPONSE),
    [PROTO_ROLE_EDIT] = TEMPLATES_NEEDS_CONVERSATION | TEMPLATES_BIT(TEMPLATES_RESPONSE) |
                        TEMPLATES_BIT(TEMPLATES_FEEDBACK),
    [PROTO_ROLE_SELECT] = TEMPLATES_NEEDS_CONVERSATION | TEMPLATES_BIT(TEMPLATES_RESPONSE),
};

struct templates_section {
    enum templates_kind kind;
    uint32_t line; /* of the @name line, for render errors */
    char *text;    /* NUL-terminated, trimmed, "{{" escapes still in it; NULL for conversation */
    size_t len;
};

struct templates_file {
    char *path;
    struct templates_section *sections;
    uint32_t n_sections;
};

struct templates {
    struct templates_file role[PROTO_ROLE_COUNT];
};

static int templates_fail(char *err, size_t err_len, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int templates_fail(char *err, size_t err_len, int code, const char *fmt, ...)
{
    if (err && err_len > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, err_len, fmt, ap);
        va_end(ap);
    }
    return code;
}

static bool templates_is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

static bool templates_is_ident(char c, bool first)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
           (!first && c >= '0' && c <= '9');
}

/* Trims [*s, *s + *len) of surrounding whitespace in place (pointer and length only). */
static void templates_trim(const char **s, size_t *len)
{
    while (*len > 0 && templates_is_space(**s)) {
        (*s)++;
        (*len)--;
    }
    while (*len > 0 && templates_is_space((*s)[*len - 1]))
        (*len)--;
}

/* If s[i] opens a {name} (name an identifier), returns the name's length and sets *ph to the
 * placeholder (TEMPLATES_N_PH when unknown); returns 0 when s[i] is plain text. "{{" is
 * handled by the callers before this. */
static size_t templates_placeholder_at(const char *s, size_t len, size_t i, enum templates_ph *ph)
{
    if (s[i] != '{' || i + 1 >= len || !templates_is_ident(s[i + 1], true))
        return 0;
    size_t j = i + 2;
    while (j < len && templates_is_ident(s[j], false))
        j++;
    if (j >= len || s[j] != '}')
        return 0;
    size_t n = j - i - 1;
    *ph = TEMPLATES_N_PH;
    for (int k = 0; k < TEMPLATES_N_PH; k++) {
        if (strlen(templates_ph_names[k]) == n && memcmp(templates_ph_names[k], s + i + 1, n) == 0)
            *ph = (enum templates_ph)k;
    }
    return n;
}

/* ---- loading --------------------------------------------------------------------------------- */

struct templates_buf {
    char *p;
    size_t len, cap;
};

static int templates_buf_add(struct templates_buf *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p)
            return PROTO_ERR_NO_MEMORY;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
    return 0;
}

static int templates_read(const char *path, char **out, size_t *out_len, char *err,
                          size_t err_len)
{
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return templates_fail(err, err_len, PROTO_ERR_NOT_FOUND, "%s: cannot open: %s", path,
                              strerror(errno));
    char *buf = malloc(TEMPLATES_MAX_FILE_BYTES + 1);
    if (!buf) {
        fclose(f);
        return templates_fail(err, err_len, PROTO_ERR_NO_MEMORY, "%s: out of memory", path);
    }
    size_t len = fread(buf, 1, TEMPLATES_MAX_FILE_BYTES + 1, f);
    int rc = 0;
    if (ferror(f))
        rc = templates_fail(err, err_len, PROTO_ERR_NOT_FOUND, "%s: cannot read: %s", path,
                            strerror(errno));
    else if (len > TEMPLATES_MAX_FILE_BYTES)
        rc = templates_fail(err, err_len, PROTO_ERR_TOO_LARGE,
                            "%s:1: larger than TEMPLATES_MAX_FILE_BYTES (%u bytes)", path,
                            TEMPLATES_MAX_FILE_BYTES);
    fclose(f);
    if (rc != 0) {
        free(buf);
        return rc;
    }
    buf[len] = '\0';
    *out = buf;
    *out_len = len;
    return 0;
}

static uint32_t templates_line_of(const char *s, size_t off)
{
    uint32_t line = 1;
    for (size_t i = 0; i < off; i++)
        line += s[i] == '\n';
    return line;
}

/* Parser state for one file. */
struct templates_parser {
    const char *path;
    enum proto_role role;
    struct templates_file *file;
    struct templates_buf text; /* the open section's text */
    bool open;                 /* a section is open */
    uint32_t conversation_line;/* line of @conversation, 0 when none yet */
    unsigned used;             /* TEMPLATES_BIT()s used, plus TEMPLATES_NEEDS_CONVERSATION */
    char *err;
    size_t err_len;
};

/* Closes the open section: trims its text and checks it is not empty. */
static int templates_close_section(struct templates_parser *ps)
{
    if (!ps->open)
        return 0;
    ps->open = false;
    struct templates_section *sec = &ps->file->sections[ps->file->n_sections - 1];
    if (sec->kind == TEMPLATES_CONVERSATION)
        return 0;
    const char *s = ps->text.p ? ps->text.p : "";
    size_t len = ps->text.len;
    templates_trim(&s, &len);
    if (len == 0)
        return templates_fail(ps->err, ps->err_len, PROTO_ERR_BAD_FIELD,
                              "%s:%u: @%s section is empty (its text goes on the lines below it)",
                              ps->path, sec->line, templates_kind_names[sec->kind]);
    sec->text = malloc(len + 1);
    if (!sec->text)
        return templates_fail(ps->err, ps->err_len, PROTO_ERR_NO_MEMORY, "%s: out of memory",
                              ps->path);
    memcpy(sec->text, s, len);
    sec->text[len] = '\0';
    sec->len = len;
    ps->text.len = 0;
    return 0;
}

static int templates_open_section(struct templates_parser *ps, const char *name, size_t n,
                                  const char *rest, size_t rest_len, uint32_t line)
{
    int kind = -1;
    for (int k = 0; k < (int)(sizeof templates_kind_names / sizeof *templates_kind_names); k++) {
        if (strlen(templates_kind_names[k]) == n && memcmp(templates_kind_names[k], name, n) == 0)
            kind = k;
    }
    if (kind < 0)
        return templates_fail(ps->err, ps->err_len, PROTO_ERR_BAD_FIELD,
                              "%s:%u: unknown section '@%.*s' (expected @conversation, @system, "
                              "@user or @assistant; write '@@' for a text line starting '@')",
                              ps->path, line, (int)(n > 64 ? 64 : n), name);
    templates_trim(&rest, &rest_len);
    if (rest_len > 0)
        return templates_fail(ps->err, ps->err_len, PROTO_ERR_BAD_FIELD,
                              "%s:%u: unexpected text after @%s (the section's text goes on the "
                              "lines below it)",
                              ps->path, line, templates_kind_names[kind]);
    int rc = templates_close_section(ps);
    if (rc != 0)
        return rc;
    if (kind == TEMPLATES_CONVERSATION) {
        if (ps->conversation_line)
            return templates_fail(ps->err, ps->err_len, PROTO_ERR_BAD_FIELD,
                                  "%s:%u: a second @conversation (the first is at line %u)",
                                  ps->path, line, ps->conversation_line);
        ps->conversation_line = line;
        ps->used |= TEMPLATES_NEEDS_CONVERSATION;
    }
    if (kind == TEMPLATES_SYSTEM && ps->file->n_sections > 0)
        return templates_fail(ps->err, ps->err_len, PROTO_ERR_BAD_FIELD,
                              "%s:%u: @system must be the first section", ps->path, line);
    struct templates_section *secs =
        realloc(ps->file->sections, (ps->file->n_sections + 1) * sizeof *secs);
    if (!secs)
        return templates_fail(ps->err, ps->err_len, PROTO_ERR_NO_MEMORY, "%s: out of memory",
                              ps->path);
    ps->file->sections = secs;
    secs[ps->file->n_sections++] = (struct templates_section){.kind = kind, .line = line};
    ps->open = true;
    ps->text.len = 0;
    return 0;
}

/* Checks the placeholders of one text line. */
static int templates_check_line(struct templates_parser *ps, const char *s, size_t len,
                                uint32_t line)
{
    for (size_t i = 0; i < len; i++) {
        if (s[i] != '{')
            continue;
        if (i + 1 < len && s[i + 1] == '{') {
            i++;
            continue;
        }
        enum templates_ph ph;
        size_t n = templates_placeholder_at(s, len, i, &ph);
        if (n == 0)
            continue;
        if (ph == TEMPLATES_N_PH)
            return templates_fail(ps->err, ps->err_len, PROTO_ERR_BAD_FIELD,
                                  "%s:%u: unknown placeholder {%.*s} (known: {prompt}, "
                                  "{response}, {feedback}; write '{{' for a literal '{')",
                                  ps->path, line, (int)(n > 64 ? 64 : n), s + i + 1);
        if (!(templates_allowed[ps->role] & TEMPLATES_BIT(ph)))
            return templates_fail(ps->err, ps->err_len, PROTO_ERR_BAD_FIELD,
                                  "%s:%u: placeholder {%s} is not available to the %s role",
                                  ps->path, line, templates_ph_names[ph],
                                  proto_role_name(ps->role));
        ps->used |= TEMPLATES_BIT(ph);
        if (ph == TEMPLATES_PROMPT)
            ps->used |= TEMPLATES_NEEDS_CONVERSATION;
        i += n + 1;
    }
    return 0;
}

static int templates_parse_line(struct templates_parser *ps, const char *s, size_t len,
                                uint32_t line)
{
    if (len > 0 && s[len - 1] == '\r')
        len--;
    if (len > 0 && s[0] == '@' && !(len > 1 && s[1] == '@')) {
        size_t n = 1;
        while (n < len && !templates_is_space(s[n]))
            n++;
        return templates_open_section(ps, s + 1, n - 1, s + n, len - n, line);
    }
    const char *t = s;
    size_t tlen = len;
    templates_trim(&t, &tlen);
    if (!ps->open) {
        if (tlen == 0 || s[0] == '#')
            return 0;
        return templates_fail(ps->err, ps->err_len, PROTO_ERR_BAD_FIELD,
                              "%s:%u: text before the first section (comment lines start with "
                              "'#'; sections with @conversation, @system, @user, @assistant)",
                              ps->path, line);
    }
    const struct templates_section *sec = &ps->file->sections[ps->file->n_sections - 1];
    if (sec->kind == TEMPLATES_CONVERSATION) {
        if (tlen == 0)
            return 0;
        return templates_fail(ps->err, ps->err_len, PROTO_ERR_BAD_FIELD,
                              "%s:%u: @conversation (line %u) takes no text; start a @user or "
                              "@assistant section for it",
                              ps->path, line, sec->line);
    }
    if (len > 1 && s[0] == '@') { /* "@@..." stands for "@..." */
        s++;
        len--;
    }
    int rc = templates_check_line(ps, s, len, line);
    if (rc == 0)
        rc = templates_buf_add(&ps->text, s, len);
    if (rc == 0)
        rc = templates_buf_add(&ps->text, "\n", 1);
    if (rc == PROTO_ERR_NO_MEMORY)
        return templates_fail(ps->err, ps->err_len, rc, "%s: out of memory", ps->path);
    return rc;
}

static void templates_file_free(struct templates_file *f)
{
    for (uint32_t i = 0; i < f->n_sections; i++)
        free(f->sections[i].text);
    free(f->sections);
    free(f->path);
    memset(f, 0, sizeof *f);
}

static int templates_load_file(const char *path, enum proto_role role, struct templates_file *f,
                               char *err, size_t err_len)
{
    char *data = NULL;
    size_t len = 0;
    int rc = templates_read(path, &data, &len, err, err_len);
    if (rc != 0)
        return rc;
    struct templates_parser ps = {
        .path = path, .role = role, .file = f, .err = err, .err_len = err_len};
    f->path = strdup(path);
    if (!f->path) {
        rc = templates_fail(err, err_len, PROTO_ERR_NO_MEMORY, "%s: out of memory", path);
        goto done;
    }
    size_t bad_at = 0;
    if (proto_utf8_check(data, len, &bad_at) != 0) {
        rc = templates_fail(err, err_len, PROTO_ERR_BAD_FIELD, "%s:%u: invalid UTF-8", path,
                            templates_line_of(data, bad_at));
        goto done;
    }
    const char *nul = memchr(data, '\0', len);
    if (nul) {
        rc = templates_fail(err, err_len, PROTO_ERR_BAD_FIELD, "%s:%u: NUL byte", path,
                            templates_line_of(data, (size_t)(nul - data)));
        goto done;
    }
    uint32_t line = 0;
    for (size_t at = 0; at < len && rc == 0;) {
        const char *nl = memchr(data + at, '\n', len - at);
        size_t end = nl ? (size_t)(nl - data) : len;
        rc = templates_parse_line(&ps, data + at, end - at, ++line);
        at = end + 1;
    }
    if (rc == 0)
        rc = templates_close_section(&ps);
    if (rc != 0)
        goto done;
    uint32_t last = line ? line : 1;
    if (f->n_sections == 0) {
        rc = templates_fail(err, err_len, PROTO_ERR_BAD_FIELD,
                            "%s:%u: empty template: no @conversation, @system, @user or "
                            "@assistant section",
                            path, last);
        goto done;
    }
    unsigned missing = templates_required[role] & ~ps.used;
    if (missing & TEMPLATES_NEEDS_CONVERSATION) {
        rc = templates_fail(err, err_len, PROTO_ERR_BAD_FIELD,
                            "%s:%u: the %s template never shows the user's conversation (add "
                            "@conversation or {prompt})",
                            path, last, proto_role_name(role));
        goto done;
    }
    for (int k = 0; k < TEMPLATES_N_PH; k++) {
        if (missing & TEMPLATES_BIT(k)) {
            rc = templates_fail(err, err_len, PROTO_ERR_BAD_FIELD,
                                "%s:%u: the %s template never uses {%s}, which that role needs",
                                path, last, proto_role_name(role), templates_ph_names[k]);
            goto done;
        }
    }
done:
    free(ps.text.p);
    free(data);
    return rc;
}

int templates_load(const char *dir, const char *const paths[PROTO_ROLE_COUNT],
                   struct templates **out, char *err, size_t err_len)
{
    *out = NULL;
    struct templates *t = calloc(1, sizeof *t);
    if (!t)
        return templates_fail(err, err_len, PROTO_ERR_NO_MEMORY, "templates: out of memory");
    int rc = 0;
    for (int r = 0; r < PROTO_ROLE_COUNT; r++) {
        char path[4096];
        if (paths && paths[r]) {
            if (strlen(paths[r]) >= sizeof path) {
                rc = templates_fail(err, err_len, PROTO_ERR_BAD_FIELD,
                                    "template path for the %s role is too long",
                                    proto_role_name(r));
                goto fail;
            }
            snprintf(path, sizeof path, "%s", paths[r]);
        } else if (dir) {
            int n = snprintf(path, sizeof path, "%s/%s.tmpl", dir, proto_role_name(r));
            if (n < 0 || (size_t)n >= sizeof path) {
                rc = templates_fail(err, err_len, PROTO_ERR_BAD_FIELD,
                                    "template directory path is too long");
                goto fail;
            }
        } else {
            rc = templates_fail(err, err_len, PROTO_ERR_BAD_FIELD,
                                "no template file for the %s role (no directory and no path)",
                                proto_role_name(r));
            goto fail;
        }
        rc = templates_load_file(path, r, &t->role[r], err, err_len);
        if (rc != 0)
            goto fail;
    }
    *out = t;
    return 0;
fail:
    templates_destroy(&t);
    return rc;
}

void templates_destroy(struct templates **t)
{
    if (!t || !*t)
        return;
    for (int r = 0; r < PROTO_ROLE_COUNT; r++)
        templates_file_free(&(*t)->role[r]);
    free(*t);
    *t = NULL;
}

const char *templates_path(const struct templates *t, enum proto_role role)
{
    if (!t || (unsigned)role >= PROTO_ROLE_COUNT)
        return "?";
    return t->role[role].path ? t->role[role].path : "?";
}

bool templates_same(const struct templates *a, const struct templates *b, enum proto_role role)
{
    if (!a || !b || (unsigned)role >= PROTO_ROLE_COUNT)
        return false;
    const struct templates_file *fa = &a->role[role], *fb = &b->role[role];
    if (!fa->path || !fb->path || strcmp(fa->path, fb->path) != 0 ||
        fa->n_sections != fb->n_sections)
        return false;
    for (uint32_t i = 0; i < fa->n_sections; i++) {
        const struct templates_section *x = &fa->sections[i], *y = &fb->sections[i];
        /* the line matters too: render errors name it */
        if (x->kind != y->kind || x->line != y->line || x->len != y->len ||
            (x->text == NULL) != (y->text == NULL) ||
            (x->text && memcmp(x->text, y->text, x->len) != 0))
            return false;
    }
    return true;
}

/* ---- rendering ------------------------------------------------------------------------------- */

struct templates_values {
    const char *v[TEMPLATES_N_PH];
    size_t len[TEMPLATES_N_PH];
};

/* Expands one section's text into out (when not NULL). Returns the expanded length, or
 * SIZE_MAX as soon as it would exceed `cap`. */
static size_t templates_expand(const char *s, size_t len, const struct templates_values *v,
                               char *out, size_t cap)
{
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        const char *piece = s + i;
        size_t piece_len = 1;
        if (s[i] == '{' && i + 1 < len && s[i + 1] == '{') {
            i++;
        } else if (s[i] == '{') {
            enum templates_ph ph;
            size_t name = templates_placeholder_at(s, len, i, &ph);
            if (name > 0 && ph < TEMPLATES_N_PH) {
                piece = v->v[ph] ? v->v[ph] : "";
                piece_len = v->len[ph];
                i += name + 1;
            }
        }
        if (piece_len > cap - n)
            return SIZE_MAX;
        if (out)
            memcpy(out + n, piece, piece_len);
        n += piece_len;
    }
    return n;
}

static int templates_add_msg(struct proto_chat_msg *msgs, uint32_t *n, enum proto_chat_role role,
                             char *content)
{
    if (!content)
        return PROTO_ERR_NO_MEMORY;
    msgs[*n].role = role;
    msgs[*n].content = content;
    (*n)++;
    return 0;
}

static char *templates_strdup_len(const char *s, size_t len)
{
    char *p = malloc(len + 1);
    if (p) {
        memcpy(p, s, len);
        p[len] = '\0';
    }
    return p;
}

/* "1. first\n2. second": each feedback trimmed. */
static int templates_number_feedbacks(const char *const *fb, uint32_t n, char **out,
                                      size_t *out_len)
{
    struct templates_buf b = {0};
    int rc = templates_buf_add(&b, "", 0);
    for (uint32_t i = 0; i < n && rc == 0; i++) {
        const char *s = fb[i] ? fb[i] : "";
        size_t len = strlen(s);
        templates_trim(&s, &len);
        char num[16];
        int k = snprintf(num, sizeof num, "%s%u. ", i ? "\n" : "", i + 1);
        rc = templates_buf_add(&b, num, (size_t)k);
        if (rc == 0)
            rc = templates_buf_add(&b, s, len);
        if (rc == 0 && b.len > PROTO_MAX_STRING_BYTES)
            rc = PROTO_ERR_TOO_LARGE;
    }
    if (rc != 0) {
        free(b.p);
        return rc;
    }
    *out = b.p;
    *out_len = b.len;
    return 0;
}

static char *templates_render_text(const struct templates_section *sec,
                                   const struct templates_values *v, const char *extra,
                                   size_t extra_len, int *rc)
{
    size_t n = templates_expand(sec->text, sec->len, v, NULL, PROTO_MAX_STRING_BYTES);
    size_t sep = (extra_len > 0 && n > 0) ? 2 : 0;
    if (n == SIZE_MAX || extra_len + sep > PROTO_MAX_STRING_BYTES - n) {
        *rc = PROTO_ERR_TOO_LARGE;
        return NULL;
    }
    char *out = malloc(n + sep + extra_len + 1);
    if (!out) {
        *rc = PROTO_ERR_NO_MEMORY;
        return NULL;
    }
    templates_expand(sec->text, sec->len, v, out, n);
    memcpy(out + n, "\n\n", sep);
    memcpy(out + n + sep, extra, extra_len);
    out[n + sep + extra_len] = '\0';
    return out;
}

int templates_render(const struct templates *t, enum proto_role role,
                     const struct proto_chat_msg *conversation, uint32_t n_conversation,
                     const char *response, const char *const *feedbacks, uint32_t n_feedbacks,
                     struct proto_chat_msg **out, uint32_t *n_out, char *err, size_t err_len)
{
    *out = NULL;
    *n_out = 0;
    if (!t || (unsigned)role >= PROTO_ROLE_COUNT)
        return templates_fail(err, err_len, PROTO_ERR_BAD_FIELD, "templates: bad role %d",
                              (int)role);
    const struct templates_file *f = &t->role[role];
    if (!conversation || n_conversation == 0)
        return templates_fail(err, err_len, PROTO_ERR_BAD_FIELD,
                              "%s: the conversation is empty", f->path);
    const char *prompt = NULL;
    for (uint32_t i = 0; i < n_conversation; i++) {
        if (!conversation[i].content)
            return templates_fail(err, err_len, PROTO_ERR_BAD_FIELD,
                                  "messages[%u].content is missing", i);
        if (conversation[i].role == PROTO_CHAT_USER)
            prompt = conversation[i].content;
        if (conversation[i].role == PROTO_CHAT_SYSTEM && i > 0)
            return templates_fail(err, err_len, PROTO_ERR_BAD_FIELD,
                                  "messages[%u].role: a system message may only come first", i);
    }
    if (!prompt)
        return templates_fail(err, err_len, PROTO_ERR_BAD_FIELD,
                              "messages: the conversation has no user message");
    unsigned allowed = templates_allowed[role];
    if ((allowed & TEMPLATES_BIT(TEMPLATES_RESPONSE)) && !response)
        return templates_fail(err, err_len, PROTO_ERR_BAD_FIELD,
                              "%s: rendering needs a response", f->path);
    if ((allowed & TEMPLATES_BIT(TEMPLATES_FEEDBACK)) && (n_feedbacks == 0 || !feedbacks))
        return templates_fail(err, err_len, PROTO_ERR_BAD_FIELD,
                              "%s: rendering needs at least one feedback", f->path);

    struct templates_values v = {{NULL}, {0}};
    char *numbered = NULL;
    v.v[TEMPLATES_PROMPT] = prompt;
    v.len[TEMPLATES_PROMPT] = strlen(prompt);
    if (allowed & TEMPLATES_BIT(TEMPLATES_RESPONSE)) {
        v.v[TEMPLATES_RESPONSE] = response;
        v.len[TEMPLATES_RESPONSE] = strlen(response);
    }
    int rc = 0;
    if (allowed & TEMPLATES_BIT(TEMPLATES_FEEDBACK)) {
        rc = templates_number_feedbacks(feedbacks, n_feedbacks, &numbered,
                                        &v.len[TEMPLATES_FEEDBACK]);
        if (rc != 0)
            return templates_fail(err, err_len, rc, "%s: the numbered feedbacks are %s", f->path,
                                  rc == PROTO_ERR_TOO_LARGE ? "over PROTO_MAX_STRING_BYTES"
                                                            : "out of memory");
        v.v[TEMPLATES_FEEDBACK] = numbered;
    }

    bool has_conv = false;
    for (uint32_t s = 0; s < f->n_sections; s++)
        has_conv |= f->sections[s].kind == TEMPLATES_CONVERSATION;
    /* The conversation's own system message is hoisted to the front (merged with the
     * template's @system) so that every rendering has its system message first, where all
     * chat formats require it. */
    const struct proto_chat_msg *conv_sys =
        (has_conv && conversation[0].role == PROTO_CHAT_SYSTEM) ? &conversation[0] : NULL;
    bool tpl_sys = f->n_sections > 0 && f->sections[0].kind == TEMPLATES_SYSTEM;

    uint64_t count = (conv_sys || tpl_sys) ? 1 : 0;
    for (uint32_t s = tpl_sys ? 1 : 0; s < f->n_sections; s++)
        count += f->sections[s].kind == TEMPLATES_CONVERSATION ? n_conversation - !!conv_sys : 1;
    if (count > PROTO_MAX_MESSAGES) {
        free(numbered);
        return templates_fail(err, err_len, PROTO_ERR_TOO_LARGE,
                              "%s: rendering makes %llu messages, over PROTO_MAX_MESSAGES (%u)",
                              f->path, (unsigned long long)count, PROTO_MAX_MESSAGES);
    }
    struct proto_chat_msg *msgs = calloc(count ? count : 1, sizeof *msgs);
    uint32_t n = 0;
    uint32_t bad_line = 0;
    if (!msgs) {
        rc = PROTO_ERR_NO_MEMORY;
        goto fail;
    }
    if (tpl_sys) {
        const char *extra = conv_sys ? conv_sys->content : "";
        size_t extra_len = strlen(extra);
        templates_trim(&extra, &extra_len);
        bad_line = f->sections[0].line;
        char *text = templates_render_text(&f->sections[0], &v, extra, extra_len, &rc);
        if (!text)
            goto fail;
        templates_add_msg(msgs, &n, PROTO_CHAT_SYSTEM, text);
    } else if (conv_sys) {
        rc = templates_add_msg(msgs, &n, PROTO_CHAT_SYSTEM, strdup(conv_sys->content));
        if (rc != 0)
            goto fail;
    }
    for (uint32_t s = tpl_sys ? 1 : 0; s < f->n_sections; s++) {
        const struct templates_section *sec = &f->sections[s];
        bad_line = sec->line;
        if (sec->kind == TEMPLATES_CONVERSATION) {
            for (uint32_t i = conv_sys ? 1 : 0; i < n_conversation; i++) {
                const char *c = conversation[i].content;
                rc = templates_add_msg(msgs, &n, conversation[i].role,
                                       templates_strdup_len(c, strlen(c)));
                if (rc != 0)
                    goto fail;
            }
            continue;
        }
        char *text = templates_render_text(sec, &v, "", 0, &rc);
        if (!text)
            goto fail;
        templates_add_msg(msgs, &n,
                          sec->kind == TEMPLATES_USER     ? PROTO_CHAT_USER
                          : sec->kind == TEMPLATES_SYSTEM ? PROTO_CHAT_SYSTEM
                                                          : PROTO_CHAT_ASSISTANT,
                          text);
    }
    free(numbered);
    *out = msgs;
    *n_out = n;
    return 0;
fail:
    free(numbered);
    templates_messages_free(&msgs, n);
    if (rc == PROTO_ERR_TOO_LARGE)
        return templates_fail(err, err_len, rc,
                              "%s:%u: the rendered message is over PROTO_MAX_STRING_BYTES (%u)",
                              f->path, bad_line, PROTO_MAX_STRING_BYTES);
    return templates_fail(err, err_len, PROTO_ERR_NO_MEMORY, "%s: out of memory while rendering",
                          f->path);
}

void templates_messages_free(struct proto_chat_msg **msgs, uint32_t n)
{
    if (!msgs || !*msgs)
        return;
    for (uint32_t i = 0; i < n; i++)
        free((*msgs)[i].content);
    free(*msgs);
    *msgs = NULL;
}
