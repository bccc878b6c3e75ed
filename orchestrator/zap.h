/* zap.h — itsd's CurveZMQ gatekeeper: the key files (itsd's own key pair, the allow-lists of
 * client and worker public keys) and the ZAP handler (RFC 27) that libzmq asks, for every
 * CURVE handshake on the frontend and backend sockets, whether the peer's public key may in.
 *
 * The handler is the inproc REP socket "inproc://zeromq.zap.01" of itsd's ZeroMQ context; the
 * caller joins it to its event loop (evzmq) and calls zap_on_request while it is readable.
 * The socket's ZMQ_ZAP_DOMAIN tells the two allow-lists apart: ZAP_DOMAIN_CLIENTS for the
 * frontend, ZAP_DOMAIN_WORKERS for the backend. An accepted peer's ZAP user id is the name of
 * its key (the key file's name without ".pub"), which libzmq attaches to each of its messages
 * as the "User-Id" property.
 *
 * Owns the REP socket and the loaded lists. Logs refusals through itsd_log, rate-limited to
 * one line per key per ZAP_LOG_INTERVAL_MS with a count of the lines held back. Never exits,
 * never blocks (ZMQ_DONTWAIT everywhere), never trusts a ZAP frame's size.
 */
#ifndef ITS_ZAP_H
#define ITS_ZAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define ZAP_ENDPOINT "inproc://zeromq.zap.01"
#define ZAP_DOMAIN_CLIENTS "frontend"
#define ZAP_DOMAIN_WORKERS "backend"
#define ZAP_KEY_BYTES 32          /* a CURVE key, binary */
#define ZAP_Z85_LEN 40            /* the same as Z85 text, without the NUL */
#define ZAP_NAME_MAX 128          /* bytes of a key's name, with the NUL */
#define ZAP_MAX_KEYS 65536        /* keys in one allow-list */
#define ZAP_LOG_INTERVAL_MS 10000 /* least time between two refusal lines about one key */

struct zap_list;

/* Loads an allow-list: `path` is a directory, whose regular files named *.pub (not starting
 * with '.') each hold one public key named by the file name without ".pub", or one such file.
 * A key listed twice, an unreadable or malformed file, or more than ZAP_MAX_KEYS keys are
 * errors naming the file. Returns 0 with *out set (an empty directory is an empty list), or
 * -1 with err set. */
int zap_list_load(const char *path, struct zap_list **out, char *err, size_t err_len);

/* Keys in the list. */
size_t zap_list_count(const struct zap_list *l);

/* The name of `key` in the list, or NULL when it is not there. */
const char *zap_list_find(const struct zap_list *l, const uint8_t key[ZAP_KEY_BYTES]);

/* Whether a key named `name` is in the list. */
bool zap_list_has_name(const struct zap_list *l, const char *name);

/* NULL-safe; clears *l. */
void zap_list_destroy(struct zap_list **l);

struct zap_counters {
    uint64_t requests, accepted, refused, malformed;
    uint64_t refusals_logged, refusals_suppressed;
    uint64_t reloads, failed_reloads;
};

struct zap;

/* Loads both allow-lists from the given paths (copied) and binds the handler's REP socket in
 * `zctx` (which must have no other ZAP handler). Call before any CURVE server socket binds, so
 * that no handshake goes unchecked. Returns 0 with *out set, or -1 with err naming the list
 * file or the socket problem. */
int zap_new(void *zctx, const char *client_keys, const char *worker_keys, struct zap **out,
            char *err, size_t err_len);

/* The REP socket, for the caller's event loop. */
void *zap_socket(struct zap *z);

/* Answers one ZAP request if one is waiting (suits evzmq_cb with ctx = the zap). */
void zap_on_request(void *z);

/* Loads both lists again from their paths and swaps them in only when both load; otherwise
 * the old lists stay and err says why. Returns 0, or -1. */
int zap_reload(struct zap *z, char *err, size_t err_len);

/* zap_reload in two steps, so that a caller can make it part of a larger all-or-nothing
 * change: zap_reload_stage loads both lists from the given paths (copied) without touching
 * the ones in use (0 with *out set, or -1 with err naming the list file; a failure counts
 * as a failed reload); zap_reload_commit then puts them in use (it cannot fail, takes *staged
 * and clears it), and later reloads read the new paths. zap_staged_destroy drops staged
 * lists instead (NULL-safe, clears *staged). */
struct zap_staged;
int zap_reload_stage(struct zap *z, const char *client_keys, const char *worker_keys,
                     struct zap_staged **out, char *err, size_t err_len);
void zap_reload_commit(struct zap *z, struct zap_staged **staged);
void zap_staged_destroy(struct zap_staged **staged);

/* Whether `name` (a ZAP user id given out earlier) is still in the client (workers = false)
 * or worker list: after a reload removed a key, its open connections are still there, and
 * their messages must be refused from then on. */
bool zap_allows(const struct zap *z, bool workers, const char *name);

/* Keys in the client and worker lists now. */
size_t zap_client_keys(const struct zap *z);
size_t zap_worker_keys(const struct zap *z);

const struct zap_counters *zap_counters(const struct zap *z);

/* Closes the socket and frees the lists. NULL-safe; clears *z. */
void zap_destroy(struct zap **z);

#endif
