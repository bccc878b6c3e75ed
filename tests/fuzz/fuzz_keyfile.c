/* fuzz_keyfile.c — libFuzzer target: arbitrary bytes as a CURVE key file, parsed from memory
 * by keyfile_parse (the core of keyfile_read) once for a public key and once for a key pair.
 *
 * Promises checked, each broken one an abort():
 * - a refusal returns -1 with a non-empty, printable-ASCII message that starts with the name
 *   given (the only input bytes quoted are sanitized), and leaves the outputs untouched;
 * - a pair that parses is a real CURVE pair (the public key is derived from the secret key);
 * - when both readings succeed they agree on the public key;
 * - what parses, written back in keygen's form, parses again to the same keys.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "keyfile.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FUZZ_NAME "fuzz"

static void fuzz_check_refusal(int rc, const char *err, const uint8_t *out, size_t n)
{
    if (rc != -1)
        abort();
    if (strncmp(err, FUZZ_NAME ":", sizeof FUZZ_NAME) != 0)
        abort();
    for (const char *c = err; *c; c++)
        if (*c < 0x20 || *c > 0x7e)
            abort();
    for (size_t i = 0; i < n; i++)
        if (out[i] != 0xA5)
            abort();
}

/* Writes the keys back as keygen would (sec NULL: a .pub file) and parses that again. */
static void fuzz_round_trip(const uint8_t pub[KEYFILE_KEY_BYTES], const uint8_t *sec)
{
    char pub85[KEYFILE_Z85_LEN + 1], sec85[KEYFILE_Z85_LEN + 1], text[256];
    if (!zmq_z85_encode(pub85, pub, KEYFILE_KEY_BYTES))
        abort();
    if (sec) {
        if (!zmq_z85_encode(sec85, sec, KEYFILE_KEY_BYTES))
            abort();
        snprintf(text, sizeof text, "# pair\npublic-key = %s\nsecret-key = %s\n", pub85, sec85);
    } else {
        snprintf(text, sizeof text, "# public\npublic-key = %s\n", pub85);
    }
    uint8_t p2[KEYFILE_KEY_BYTES], s2[KEYFILE_KEY_BYTES];
    char err[256];
    if (keyfile_parse(text, strlen(text), FUZZ_NAME, p2, sec ? s2 : NULL, err, sizeof err) != 0)
        abort();
    if (memcmp(p2, pub, KEYFILE_KEY_BYTES) != 0 ||
        (sec && memcmp(s2, sec, KEYFILE_KEY_BYTES) != 0))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *text = (const char *)data;
    uint8_t pub_only[KEYFILE_KEY_BYTES], pub[KEYFILE_KEY_BYTES], sec[KEYFILE_KEY_BYTES];
    memset(pub_only, 0xA5, sizeof pub_only);
    memset(pub, 0xA5, sizeof pub);
    memset(sec, 0xA5, sizeof sec);
    char err[512];

    err[0] = '\0';
    int rc_pub = keyfile_parse(text, size, FUZZ_NAME, pub_only, NULL, err, sizeof err);
    if (rc_pub != 0)
        fuzz_check_refusal(rc_pub, err, pub_only, sizeof pub_only);

    err[0] = '\0';
    int rc_pair = keyfile_parse(text, size, FUZZ_NAME, pub, sec, err, sizeof err);
    if (rc_pair != 0) {
        fuzz_check_refusal(rc_pair, err, pub, sizeof pub);
        fuzz_check_refusal(rc_pair, err, sec, sizeof sec);
    }

    if (rc_pair == 0) {
        uint8_t derived[KEYFILE_KEY_BYTES];
        if (keyfile_derive_public(sec, derived) != 0 ||
            memcmp(derived, pub, KEYFILE_KEY_BYTES) != 0)
            abort();
        fuzz_round_trip(pub, sec);
    }
    if (rc_pub == 0)
        fuzz_round_trip(pub_only, NULL);
    if (rc_pub == 0 && rc_pair == 0 && memcmp(pub_only, pub, KEYFILE_KEY_BYTES) != 0)
        abort();
    return 0;
}
