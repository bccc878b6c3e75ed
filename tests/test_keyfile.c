/* test_keyfile.c — the CURVE key file reader shared by itsd, itsw and libits
 * (protocol/keyfile.h): every way a file is refused, with the exact message a user reads, and
 * every form it accepts (what `itsctl keygen` writes, a .pub file, a bare key, comments, CRLF),
 * checked against keys that libzmq generated. keyfile_read's own refusals (no file, not a
 * regular file, too large) on files in a scratch directory.
 *
 * Not reachable here: "cannot derive the public key" needs a libzmq built without CURVE.
 */
#include <criterion/criterion.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include "keyfile.h"
#include "testutil.h"

#define KF_NAME "k.key" /* the name messages give the parsed text */

struct kf_pair {
    char pub[KEYFILE_Z85_LEN + 1], sec[KEYFILE_Z85_LEN + 1];
    uint8_t pub_bin[KEYFILE_KEY_BYTES], sec_bin[KEYFILE_KEY_BYTES];
};

/* A fresh key pair from libzmq, as text and binary. */
static struct kf_pair kf_pair(void)
{
    struct kf_pair p;
    cr_assert_eq(zmq_curve_keypair(p.pub, p.sec), 0, "zmq_curve_keypair: %s",
                 zmq_strerror(zmq_errno()));
    cr_assert_not_null(zmq_z85_decode(p.pub_bin, p.pub));
    cr_assert_not_null(zmq_z85_decode(p.sec_bin, p.sec));
    return p;
}

/* Parses `text` and requires success with the given keys (sec_want NULL: public only). */
static void kf_accepts_len(const char *text, size_t len, const uint8_t *pub_want,
                           const uint8_t *sec_want)
{
    uint8_t pub[KEYFILE_KEY_BYTES], sec[KEYFILE_KEY_BYTES];
    char err[512] = "";
    int rc = keyfile_parse(text, len, KF_NAME, pub, sec_want ? sec : NULL, err, sizeof err);
    cr_assert_eq(rc, 0, "refused: %s\n--- text:\n%.*s", err, (int)len, text);
    cr_assert_arr_eq(pub, pub_want, KEYFILE_KEY_BYTES, "wrong public key from:\n%.*s", (int)len,
                     text);
    if (sec_want)
        cr_assert_arr_eq(sec, sec_want, KEYFILE_KEY_BYTES, "wrong secret key");
}

static void kf_accepts(const char *text, const uint8_t *pub_want, const uint8_t *sec_want)
{
    kf_accepts_len(text, strlen(text), pub_want, sec_want);
}

/* Parses `len` bytes of `text` and requires -1, exactly the message `want`, and outputs left
 * as they were. */
static void kf_rejects_len(const char *text, size_t len, bool want_secret, const char *want)
{
    uint8_t pub[KEYFILE_KEY_BYTES], sec[KEYFILE_KEY_BYTES], fill[KEYFILE_KEY_BYTES];
    memset(fill, 0xA5, sizeof fill);
    memcpy(pub, fill, sizeof pub);
    memcpy(sec, fill, sizeof sec);
    char err[1024] = "";
    int rc = keyfile_parse(text, len, KF_NAME, pub, want_secret ? sec : NULL, err, sizeof err);
    cr_assert_eq(rc, -1, "accepted (secret %s):\n%.*s", want_secret ? "wanted" : "not wanted",
                 (int)len, text);
    cr_assert_str_eq(err, want);
    cr_assert_arr_eq(pub, fill, sizeof fill, "public key written on failure");
    cr_assert_arr_eq(sec, fill, sizeof fill, "secret key written on failure");
}

static void kf_rejects(const char *text, bool want_secret, const char *want)
{
    kf_rejects_len(text, strlen(text), want_secret, want);
}

/* ---- accepted forms ------------------------------------------------------------------------ */

Test(keyfile, accepts_what_keygen_writes_and_the_pub_file_beside_it)
{
    struct kf_pair k = kf_pair();
    char text[512];
    snprintf(text, sizeof text,
             "# its CURVE key pair (itsctl keygen). Keep this file secret; give others the\n"
             "# .pub file beside it.\n"
             "public-key = %s\n"
             "secret-key = %s\n", k.pub, k.sec);
    kf_accepts(text, k.pub_bin, k.sec_bin);
    kf_accepts(text, k.pub_bin, NULL); /* the public half of a pair file */
    snprintf(text, sizeof text, "# its CURVE public key (itsctl keygen)\npublic-key = %s\n",
             k.pub);
    kf_accepts(text, k.pub_bin, NULL);
}

Test(keyfile, accepts_a_secret_key_alone_and_derives_its_public_key)
{
    struct kf_pair k = kf_pair();
    char text[128];
    snprintf(text, sizeof text, "secret-key = %s\n", k.sec);
    kf_accepts(text, k.pub_bin, k.sec_bin);
    /* the two lines in either order */
    snprintf(text, sizeof text, "secret-key = %s\npublic-key = %s\n", k.sec, k.pub);
    kf_accepts(text, k.pub_bin, k.sec_bin);
}

Test(keyfile, accepts_a_bare_key_as_a_public_key)
{
    struct kf_pair k = kf_pair();
    char text[128];
    snprintf(text, sizeof text, "%s\n", k.pub);
    kf_accepts(text, k.pub_bin, NULL);
    snprintf(text, sizeof text, "  %s  ", k.pub); /* pasted, blanks around, no newline */
    kf_accepts(text, k.pub_bin, NULL);
    /* a bare public key beside a secret key is that key's public half */
    snprintf(text, sizeof text, "%s\nsecret-key = %s\n", k.pub, k.sec);
    kf_accepts(text, k.pub_bin, k.sec_bin);
}

Test(keyfile, accepts_a_bare_key_containing_an_equals_sign)
{
    /* '=' is a Z85 character: about 37% of keys keygen prints contain one. The three readers
     * before this one took such a line for `name = value` and refused it. */
    const char *key = "abcde=ghijabcde=ghijabcde=ghijabcde=ghij";
    uint8_t want[KEYFILE_KEY_BYTES];
    cr_assert_not_null(zmq_z85_decode(want, key));
    char text[128];
    snprintf(text, sizeof text, "# pasted from keygen\n%s\n", key);
    kf_accepts(text, want, NULL);
    /* and a real one, as keygen makes them */
    struct kf_pair k;
    int tries = 0;
    do
        k = kf_pair();
    while (!strchr(k.pub, '=') && ++tries < 1000);
    cr_assert(strchr(k.pub, '='), "no generated key with '=' in 1000 tries");
    snprintf(text, sizeof text, "%s\n", k.pub);
    kf_accepts(text, k.pub_bin, NULL);
    snprintf(text, sizeof text, "%s\nsecret-key = %s\n", k.pub, k.sec);
    kf_accepts(text, k.pub_bin, k.sec_bin);
}

Test(keyfile, accepts_comments_blanks_crlf_tabs_and_no_final_newline)
{
    struct kf_pair k = kf_pair();
    char text[1024];
    snprintf(text, sizeof text,
             "\r\n"
             "# comment\r\n"
             "   # indented comment = with an equals sign\r\n"
             "\t\r\n"
             "\tpublic-key\t=\t%s \t\r\n"
             "secret-key=%s",
             k.pub, k.sec);
    kf_accepts(text, k.pub_bin, k.sec_bin);
    snprintf(text, sizeof text, "public-key = %s\r\n", k.pub);
    kf_accepts(text, k.pub_bin, NULL);
}

Test(keyfile, accepts_exactly_the_size_limit)
{
    struct kf_pair k = kf_pair();
    char text[KEYFILE_MAX_BYTES + 1];
    int n = snprintf(text, sizeof text, "public-key = %s\n#", k.pub);
    memset(text + n, 'x', sizeof text - 1 - (size_t)n);
    text[KEYFILE_MAX_BYTES] = '\0';
    kf_accepts_len(text, KEYFILE_MAX_BYTES, k.pub_bin, NULL);
}

/* ---- refusals ----------------------------------------------------------------------------- */

Test(keyfile, refuses_more_than_the_size_limit)
{
    struct kf_pair k = kf_pair();
    char text[KEYFILE_MAX_BYTES + 2];
    int n = snprintf(text, sizeof text, "public-key = %s\n#", k.pub);
    memset(text + n, 'x', sizeof text - 1 - (size_t)n);
    text[KEYFILE_MAX_BYTES + 1] = '\0';
    kf_rejects_len(text, KEYFILE_MAX_BYTES + 1, false,
                   "k.key: larger than 4096 bytes: not a key file");
}

Test(keyfile, refuses_a_nul_byte_naming_its_line)
{
    struct kf_pair k = kf_pair();
    char text[128];
    int n = snprintf(text, sizeof text, "public-key = %s\n# x", k.pub);
    text[n - 1] = '\0'; /* "# \0" on line 2 */
    kf_rejects_len(text, (size_t)n, false, "k.key:2: NUL byte: not a key file");
    /* before any other problem: binary garbage is "not a key file", not "unknown key" */
    kf_rejects_len("\x7f" "ELF=\x01\x00\x00", 7, true, "k.key:1: NUL byte: not a key file");
}

Test(keyfile, refuses_an_unknown_key)
{
    struct kf_pair k = kf_pair();
    char text[256];
    snprintf(text, sizeof text, "public-key = %s\ncolour = blue\n", k.pub);
    kf_rejects(text, false, "k.key:2: unknown key 'colour' (public-key, secret-key)");
    kf_rejects("Public-Key = x\n", false,
               "k.key:1: unknown key 'Public-Key' (public-key, secret-key)");
    kf_rejects("= x\n", true, "k.key:1: unknown key '' (public-key, secret-key)");
    /* the name is quoted in printable ASCII only, and at most 40 bytes of it */
    kf_rejects("a\033[2Jb\x80 = x\n", false,
               "k.key:1: unknown key 'a?[2Jb?' (public-key, secret-key)");
    kf_rejects("0123456789012345678901234567890123456789ABC = x\n", false,
               "k.key:1: unknown key '0123456789012345678901234567890123456789...' "
               "(public-key, secret-key)");
    /* a 40-character line with '=' that is not Z85 is an unknown key, not a bare key */
    kf_rejects("abcde=ghijabcde=ghijabcde=ghijabcde=ghi~\n", false,
               "k.key:1: unknown key 'abcde' (public-key, secret-key)");
}

Test(keyfile, refuses_a_key_given_twice)
{
    struct kf_pair k = kf_pair(), o = kf_pair();
    char text[512];
    snprintf(text, sizeof text, "public-key = %s\n\npublic-key = %s\n", k.pub, k.pub);
    kf_rejects(text, false, "k.key:3: a second public-key (the first is on line 1)");
    snprintf(text, sizeof text, "secret-key = %s\nsecret-key = %s\n", k.sec, o.sec);
    kf_rejects(text, true, "k.key:2: a second secret-key (the first is on line 1)");
    /* a bare key is a public-key too */
    snprintf(text, sizeof text, "# c\n%s\npublic-key = %s\n", k.pub, k.pub);
    kf_rejects(text, false, "k.key:3: a second public-key (the first is on line 2)");
    snprintf(text, sizeof text, "%s\n%s\n", k.pub, o.pub);
    kf_rejects(text, false, "k.key:2: a second public-key (the first is on line 1)");
}

Test(keyfile, refuses_a_value_that_is_not_40_characters_of_z85)
{
    struct kf_pair k = kf_pair();
    char text[256];
    const char *pub_bad = "k.key:1: public-key is not 40 characters of Z85 text";
    const char *sec_bad = "k.key:1: secret-key is not 40 characters of Z85 text";
    kf_rejects("public-key = not-a-key\n", false, pub_bad);
    kf_rejects("public-key =\n", false, pub_bad);
    kf_rejects("secret-key = \n", true, sec_bad);
    snprintf(text, sizeof text, "public-key = %.39s\n", k.pub); /* one short */
    kf_rejects(text, false, pub_bad);
    snprintf(text, sizeof text, "public-key = %s0\n", k.pub); /* one long */
    kf_rejects(text, false, pub_bad);
    snprintf(text, sizeof text, "public-key = %s # mine\n", k.pub); /* no trailing comments */
    kf_rejects(text, false, pub_bad);
    snprintf(text, sizeof text, "secret-key = %.20s %.19s\n", k.sec, k.sec + 20); /* a blank */
    kf_rejects(text, true, sec_bad);
    /* 40 characters, one outside the alphabet ('~', a quote, a high byte) */
    const char *odd[] = {"~", "\"", "\xc3"};
    for (size_t i = 0; i < sizeof odd / sizeof *odd; i++) {
        snprintf(text, sizeof text, "secret-key = %.17s%s%.22s\n", k.sec, odd[i], k.sec + 18);
        kf_rejects(text, true, sec_bad);
    }
    /* the alphabet, but a 5-character group above 2^32 ('%nSc1' is 2^32) */
    snprintf(text, sizeof text, "public-key = %%nSc1%.35s\n", k.pub + 5);
    kf_rejects(text, false, pub_bad);
    /* a bare line that is not a key; a CR alone does not end a line */
    kf_rejects("hello\n", false, pub_bad);
    snprintf(text, sizeof text, "public-key = %s\rsecret-key = %s\n", k.pub, k.sec);
    kf_rejects(text, true, pub_bad);
}

Test(keyfile, refuses_a_public_key_that_is_not_the_secret_keys)
{
    struct kf_pair k = kf_pair(), o = kf_pair();
    char text[256];
    snprintf(text, sizeof text, "# pair\npublic-key = %s\nsecret-key = %s\n", o.pub, k.sec);
    const char *want = "k.key:2: public-key does not belong to the secret-key on line 3";
    kf_rejects(text, true, want);
    kf_rejects(text, false, want); /* whichever half is wanted */
}

Test(keyfile, refuses_a_file_without_the_key_asked_for)
{
    struct kf_pair k = kf_pair();
    char text[256];
    const char *no_sec = "k.key: no secret-key line (a key pair file from itsctl keygen, not a "
                         ".pub file, is needed here)";
    const char *no_pub = "k.key: no public key in the file (a public-key line or a bare Z85 key)";
    snprintf(text, sizeof text, "public-key = %s\n", k.pub);
    kf_rejects(text, true, no_sec);
    snprintf(text, sizeof text, "%s\n", k.pub);
    kf_rejects(text, true, no_sec);
    kf_rejects("", true, no_sec);
    kf_rejects("", false, no_pub);
    kf_rejects("# only\n\n   \r\n", false, no_pub);
    /* a secret key alone answers for the pair, but is not a public key file */
    snprintf(text, sizeof text, "secret-key = %s\n", k.sec);
    kf_rejects(text, false, no_pub);
    /* a comment is never a key: no valid key starts with '#' */
    snprintf(text, sizeof text, "#%.39s\n", k.pub);
    kf_rejects(text, false, no_pub);
}

Test(keyfile, names_the_text_key_file_when_given_no_name_and_takes_no_error_buffer)
{
    uint8_t pub[KEYFILE_KEY_BYTES];
    char err[128];
    cr_assert_eq(keyfile_parse("x = y\n", 6, NULL, pub, NULL, err, sizeof err), -1);
    cr_assert_str_eq(err, "key file:1: unknown key 'x' (public-key, secret-key)");
    cr_assert_eq(keyfile_parse("x = y\n", 6, NULL, pub, NULL, NULL, 0), -1);
    cr_assert_eq(keyfile_parse(NULL, 0, NULL, pub, NULL, err, sizeof err), -1);
    cr_assert_str_eq(err, "key file: no public key in the file (a public-key line or a bare "
                     "Z85 key)");
    /* a short buffer gets a truncated, terminated message */
    char tiny[8];
    cr_assert_eq(keyfile_parse("x = y\n", 6, NULL, pub, NULL, tiny, sizeof tiny), -1);
    cr_assert_str_eq(tiny, "key fil");
}

/* ---- helpers -------------------------------------------------------------------------------- */

Test(keyfile, z85_decode_takes_exactly_40_characters_of_the_alphabet)
{
    struct kf_pair k = kf_pair();
    uint8_t out[KEYFILE_KEY_BYTES];
    cr_assert_eq(keyfile_z85_decode(k.pub, KEYFILE_Z85_LEN, out), 0);
    cr_assert_arr_eq(out, k.pub_bin, KEYFILE_KEY_BYTES);
    char longer[64];
    snprintf(longer, sizeof longer, "%sXYZ", k.pub); /* by length, not by NUL */
    cr_assert_eq(keyfile_z85_decode(longer, KEYFILE_Z85_LEN, out), 0);
    cr_assert_arr_eq(out, k.pub_bin, KEYFILE_KEY_BYTES);
    cr_assert_eq(keyfile_z85_decode(longer, KEYFILE_Z85_LEN + 1, out), -1);
    cr_assert_eq(keyfile_z85_decode(k.pub, KEYFILE_Z85_LEN - 1, out), -1);
    cr_assert_eq(keyfile_z85_decode(NULL, KEYFILE_Z85_LEN, out), -1);
    char bad[KEYFILE_Z85_LEN + 1];
    memcpy(bad, k.pub, sizeof bad);
    bad[39] = '\0'; /* a NUL inside the 40 */
    cr_assert_eq(keyfile_z85_decode(bad, KEYFILE_Z85_LEN, out), -1);
    bad[39] = ',';
    cr_assert_eq(keyfile_z85_decode(bad, KEYFILE_Z85_LEN, out), -1);
}

Test(keyfile, derive_public_agrees_with_libzmq)
{
    struct kf_pair k = kf_pair();
    uint8_t pub[KEYFILE_KEY_BYTES];
    cr_assert_eq(keyfile_derive_public(k.sec_bin, pub), 0);
    cr_assert_arr_eq(pub, k.pub_bin, KEYFILE_KEY_BYTES);
}

/* ---- keyfile_read ---------------------------------------------------------------------------- */

Test(keyfile, read_names_the_path_and_line)
{
    const char *dir = tu_tmpdir();
    struct kf_pair k = kf_pair();
    char path[4200], text[256], err[4400], want[4400];
    uint8_t pub[KEYFILE_KEY_BYTES], sec[KEYFILE_KEY_BYTES];

    snprintf(path, sizeof path, "%s/alice.key", dir);
    snprintf(text, sizeof text, "# pair\npublic-key = %s\nsecret-key = %s\n", k.pub, k.sec);
    cr_assert_eq(tu_write_file(path, text, strlen(text)), 0);
    cr_assert_eq(keyfile_read(path, pub, sec, err, sizeof err), 0, "%s", err);
    cr_assert_arr_eq(pub, k.pub_bin, KEYFILE_KEY_BYTES);
    cr_assert_arr_eq(sec, k.sec_bin, KEYFILE_KEY_BYTES);

    snprintf(path, sizeof path, "%s/broken.pub", dir);
    cr_assert_eq(tu_write_file(path, "# x\npublic-key = not-a-key\n", 27), 0);
    cr_assert_eq(keyfile_read(path, pub, NULL, err, sizeof err), -1);
    snprintf(want, sizeof want, "%s:2: public-key is not 40 characters of Z85 text", path);
    cr_assert_str_eq(err, want);

    snprintf(path, sizeof path, "%s/big.pub", dir);
    char big[KEYFILE_MAX_BYTES + 100];
    memset(big, '#', sizeof big);
    cr_assert_eq(tu_write_file(path, big, sizeof big), 0);
    cr_assert_eq(keyfile_read(path, pub, NULL, err, sizeof err), -1);
    snprintf(want, sizeof want, "%s: larger than 4096 bytes: not a key file", path);
    cr_assert_str_eq(err, want);
    tu_rmtree(dir);
}

Test(keyfile, read_refuses_what_is_not_a_regular_file, .timeout = 10)
{
    const char *dir = tu_tmpdir();
    char path[4200], err[4400], want[4400];
    uint8_t pub[KEYFILE_KEY_BYTES];

    snprintf(path, sizeof path, "%s/missing.pub", dir);
    cr_assert_eq(keyfile_read(path, pub, NULL, err, sizeof err), -1);
    snprintf(want, sizeof want, "%s: cannot open: No such file or directory", path);
    cr_assert_str_eq(err, want);

    /* a directory, and a FIFO nobody writes to (which must not hang the reader) */
    cr_assert_eq(keyfile_read(dir, pub, NULL, err, sizeof err), -1);
    snprintf(want, sizeof want, "%s: not a regular file", dir);
    cr_assert_str_eq(err, want);
    snprintf(path, sizeof path, "%s/fifo.pub", dir);
    cr_assert_eq(mkfifo(path, 0600), 0);
    cr_assert_eq(keyfile_read(path, pub, NULL, err, sizeof err), -1);
    snprintf(want, sizeof want, "%s: not a regular file", path);
    cr_assert_str_eq(err, want);

    cr_assert_eq(keyfile_read("", pub, NULL, err, sizeof err), -1);
    cr_assert_str_eq(err, "key file: empty path");
    cr_assert_eq(keyfile_read(NULL, pub, NULL, err, sizeof err), -1);
    cr_assert_str_eq(err, "key file: empty path");
    tu_rmtree(dir);
}
