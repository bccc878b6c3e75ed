/* keyfile.h — the one reader of CURVE key files (docs/security.md, "Key files"), shared by itsd
 * (its own key pair and the allow-lists), itsw (itsd's public key and the worker's pair) and
 * libits (itsd's public key and the client's pair), so that a file means the same everywhere.
 *
 * The format: text, at most KEYFILE_MAX_BYTES, no NUL bytes; lines end in "\n" or "\r\n";
 * blank lines and lines starting with '#' are skipped (leading blanks allowed); every other
 * line is `public-key = Z85` or `secret-key = Z85` (blanks around '=' optional), or one bare
 * Z85 key, which is a public key. A bare key may contain '=' (a Z85 character): a line
 * whose name is not public-key or secret-key is a bare key when the whole line is 40
 * characters of Z85 text, and an unknown key otherwise. A valid key never starts with '#' (a
 * 5-character group starting with it would exceed 32 bits), so a comment is never a key.
 * Each key at most once; when both are present the public key must be the secret key's.
 *
 * keyfile_parse is a pure function over (text, len); keyfile_read is the only function in
 * protocol/ that touches the filesystem (it opens and reads one small file) — it lives here
 * because all three programs link libitsproto. Secret key material on the stack is wiped
 * before return. Never prints, never exits, never allocates.
 */
#ifndef ITS_KEYFILE_H
#define ITS_KEYFILE_H

#include <stddef.h>
#include <stdint.h>

#define KEYFILE_KEY_BYTES 32   /* a CURVE key, binary */
#define KEYFILE_Z85_LEN 40     /* the same as Z85 text, without a NUL */
#define KEYFILE_MAX_BYTES 4096 /* a key file is two short lines and comments */

/* Parses the `len` bytes at `text` (need not be NUL-terminated) as a key file. `name` names
 * the file in messages ("NAME:LINE: problem", or "NAME: problem" for the file as a whole);
 * NULL reads as "key file".
 *
 * `secret_key` NULL: only the public key is wanted, and the file must hold one (a public-key
 * line or a bare key). Not NULL: the file must hold a secret-key line; the public key is
 * derived from it (and must equal the public-key line if there is one).
 * Either way the whole file is checked: size, NUL bytes, unknown or repeated keys, Z85 text,
 * and the pair when both keys are present.
 *
 * Returns 0 with public_key (and secret_key) set, or -1 with err (err_len bytes, may be 0)
 * set and the outputs untouched. */
int keyfile_parse(const char *text, size_t len, const char *name,
                  uint8_t public_key[KEYFILE_KEY_BYTES], uint8_t *secret_key, char *err,
                  size_t err_len);

/* Reads the key file at `path` (a regular file; a FIFO or directory is refused rather than
 * waited on) and parses it as keyfile_parse does, with `path` as the name in messages.
 * Returns 0 with the keys set, or -1 with err naming the file and the problem. */
int keyfile_read(const char *path, uint8_t public_key[KEYFILE_KEY_BYTES], uint8_t *secret_key,
                 char *err, size_t err_len);

/* Decodes exactly KEYFILE_Z85_LEN characters of Z85 text (the `len` bytes at `text`, which
 * need not be NUL-terminated; NULL text is refused). Returns 0 with `out` set, or -1 (out may
 * have been written). */
int keyfile_z85_decode(const char *text, size_t len, uint8_t out[KEYFILE_KEY_BYTES]);

/* The public key of a CURVE secret key. Returns 0, or -1 with errno set by libzmq (ENOTSUP
 * when it was built without CURVE). */
int keyfile_derive_public(const uint8_t secret_key[KEYFILE_KEY_BYTES],
                          uint8_t public_key[KEYFILE_KEY_BYTES]);

#endif
