/* keyfile.c — see keyfile.h.
 *
 * The parser walks the text by length and never writes to it, so the file reader and the
 * fuzz target hand it their bytes as they are. Z85 decoding and key derivation are libzmq's
 * (the library that will use the keys); this file only checks the alphabet first, because
 * some libzmq versions read a character outside it as if it were one inside.
 */
#include "keyfile.h"

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#define KEYFILE_NAME_SHOWN 40 /* bytes of an unknown key's name quoted in a message */

static const char keyfile_z85_chars[] =
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";

/* One of the two keys a file may hold. */
struct keyfile_slot {
    const char *what; /* "public-key" or "secret-key", as messages name it */
    int line;         /* where it was given; 0 = not given */
    uint8_t key[KEYFILE_KEY_BYTES];
};

int keyfile_z85_decode(const char *text, size_t len, uint8_t out[KEYFILE_KEY_BYTES])
{
    if (!text || len != KEYFILE_Z85_LEN)
        return -1;
    char buf[KEYFILE_Z85_LEN + 1];
    memcpy(buf, text, KEYFILE_Z85_LEN);
    buf[KEYFILE_Z85_LEN] = '\0';
    int rc = strspn(buf, keyfile_z85_chars) == KEYFILE_Z85_LEN && zmq_z85_decode(out, buf)
                 ? 0 : -1;
    explicit_bzero(buf, sizeof buf); /* it may be a secret key */
    return rc;
}

int keyfile_derive_public(const uint8_t secret_key[KEYFILE_KEY_BYTES],
                          uint8_t public_key[KEYFILE_KEY_BYTES])
{
    char sec85[KEYFILE_Z85_LEN + 1], pub85[KEYFILE_Z85_LEN + 1];
    int rc = -1;
    if (zmq_z85_encode(sec85, secret_key, KEYFILE_KEY_BYTES) &&
        zmq_curve_public(pub85, sec85) == 0 && zmq_z85_decode(public_key, pub85))
        rc = 0;
    int e = errno;
    explicit_bzero(sec85, sizeof sec85);
    errno = e;
    return rc;
}

static bool keyfile_blank(char c)
{
    return c == ' ' || c == '\t';
}

/* Narrows [*b, *e) past leading blanks and before trailing blanks and CRs (a CRLF file). */
static void keyfile_trim(const char **b, const char **e)
{
    while (*b < *e && keyfile_blank(**b))
        (*b)++;
    while (*e > *b && (keyfile_blank((*e)[-1]) || (*e)[-1] == '\r'))
        (*e)--;
}

static bool keyfile_is(const char *b, const char *e, const char *word)
{
    size_t n = strlen(word);
    return (size_t)(e - b) == n && memcmp(b, word, n) == 0;
}

int keyfile_parse(const char *text, size_t len, const char *name,
                  uint8_t public_key[KEYFILE_KEY_BYTES], uint8_t *secret_key, char *err,
                  size_t err_len)
{
    if (!name)
        name = "key file";
    struct keyfile_slot pub = {.what = "public-key"}, sec = {.what = "secret-key"};
    uint8_t derived[KEYFILE_KEY_BYTES], bare[KEYFILE_KEY_BYTES];
    int rc = -1;
    if (!text)
        len = 0;
    if (len > KEYFILE_MAX_BYTES) {
        snprintf(err, err_len, "%s: larger than %d bytes: not a key file", name,
                 KEYFILE_MAX_BYTES);
        return -1;
    }
    /* binary first: a NUL says "wrong file" better than whatever the first line says */
    const char *nul = len ? memchr(text, '\0', len) : NULL;
    if (nul) {
        int line = 1;
        for (const char *c = text; c < nul; c++)
            line += *c == '\n';
        snprintf(err, err_len, "%s:%d: NUL byte: not a key file", name, line);
        return -1;
    }
    const char *end = text + len;
    int lineno = 0;
    for (const char *p = text; p < end;) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *b = p, *e = nl ? nl : end;
        p = nl ? nl + 1 : end;
        lineno++;
        keyfile_trim(&b, &e);
        if (b == e || *b == '#')
            continue;
        struct keyfile_slot *slot = &pub; /* a bare key is a public key */
        const char *vb = b, *ve = e;
        const char *eq = memchr(b, '=', (size_t)(e - b));
        if (eq) {
            const char *nb = b, *ne = eq;
            keyfile_trim(&nb, &ne);
            if (keyfile_is(nb, ne, "public-key") || keyfile_is(nb, ne, "secret-key")) {
                slot = *nb == 's' ? &sec : &pub;
                vb = eq + 1;
                keyfile_trim(&vb, &ve);
            } else if (keyfile_z85_decode(b, (size_t)(e - b), bare) != 0) {
                /* not a bare key that happens to contain '=' either */
                char shown[KEYFILE_NAME_SHOWN + 1];
                size_t n = (size_t)(ne - nb) < KEYFILE_NAME_SHOWN ? (size_t)(ne - nb)
                                                                  : KEYFILE_NAME_SHOWN;
                for (size_t i = 0; i < n; i++) /* messages reach logs: printable ASCII only */
                    shown[i] = nb[i] > 0x20 && nb[i] < 0x7f ? nb[i] : '?';
                shown[n] = '\0';
                snprintf(err, err_len, "%s:%d: unknown key '%s%s' (public-key, secret-key)", name,
                         lineno, shown, (size_t)(ne - nb) > n ? "..." : "");
                goto out;
            }
        }
        if (slot->line) {
            snprintf(err, err_len, "%s:%d: a second %s (the first is on line %d)", name, lineno,
                     slot->what, slot->line);
            goto out;
        }
        if (keyfile_z85_decode(vb, (size_t)(ve - vb), slot->key) != 0) {
            snprintf(err, err_len, "%s:%d: %s is not %d characters of Z85 text", name, lineno,
                     slot->what, KEYFILE_Z85_LEN);
            goto out;
        }
        slot->line = lineno;
    }
    if (sec.line) {
        /* checked even when only the public key is wanted: a file whose two keys disagree is
         * broken, whichever half the caller uses today */
        if (keyfile_derive_public(sec.key, derived) != 0) {
            snprintf(err, err_len, "%s:%d: cannot derive the public key from secret-key: %s",
                     name, sec.line, zmq_strerror(errno));
            goto out;
        }
        if (pub.line && memcmp(derived, pub.key, KEYFILE_KEY_BYTES) != 0) {
            snprintf(err, err_len, "%s:%d: public-key does not belong to the secret-key on "
                     "line %d", name, pub.line, sec.line);
            goto out;
        }
    }
    if (secret_key) {
        if (!sec.line) {
            snprintf(err, err_len, "%s: no secret-key line (a key pair file from itsctl keygen, "
                     "not a .pub file, is needed here)", name);
            goto out;
        }
        memcpy(public_key, derived, KEYFILE_KEY_BYTES);
        memcpy(secret_key, sec.key, KEYFILE_KEY_BYTES);
    } else {
        if (!pub.line) {
            snprintf(err, err_len, "%s: no public key in the file (a public-key line or a bare "
                     "Z85 key)", name);
            goto out;
        }
        memcpy(public_key, pub.key, KEYFILE_KEY_BYTES);
    }
    rc = 0;
out:
    explicit_bzero(&sec, sizeof sec);
    return rc;
}

int keyfile_read(const char *path, uint8_t public_key[KEYFILE_KEY_BYTES], uint8_t *secret_key,
                 char *err, size_t err_len)
{
    if (!path || !*path) {
        snprintf(err, err_len, "key file: empty path");
        return -1;
    }
    /* O_NONBLOCK: a FIFO put where a key file belongs must not hang itsd's reload */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) {
        snprintf(err, err_len, "%s: cannot open: %s", path, strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        snprintf(err, err_len, "%s: cannot stat: %s", path, strerror(errno));
        close(fd);
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        snprintf(err, err_len, "%s: not a regular file", path);
        close(fd);
        return -1;
    }
    char text[KEYFILE_MAX_BYTES + 1]; /* one byte more than allowed, to see a file too large */
    size_t len = 0;
    int e = 0;
    while (len < sizeof text) {
        ssize_t n = read(fd, text + len, sizeof text - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            e = errno;
        if (n <= 0)
            break;
        len += (size_t)n;
    }
    close(fd);
    int rc;
    if (e) {
        snprintf(err, err_len, "%s: read error: %s", path, strerror(e));
        rc = -1;
    } else {
        rc = keyfile_parse(text, len, path, public_key, secret_key, err, err_len);
    }
    explicit_bzero(text, sizeof text); /* it may hold a secret key */
    return rc;
}
