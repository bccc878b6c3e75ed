/* zap.c — see zap.h.
 *
 * An allow-list is an array of (key, name) sorted by key, searched with bsearch; a reload
 * builds new arrays beside the old ones and swaps them in only when both lists loaded, so a
 * broken edit of the key directory never locks everyone out. The refusal log keeps a small
 * table of recently refused keys (the oldest entry is reused) so that a peer retrying its
 * handshake every 100 ms costs one line per ZAP_LOG_INTERVAL_MS, not ten a second.
 */
#include "zap.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <zmq.h>

#include "itsd_log.h"
#include "keyfile.h"

#define ZAP_MAX_FRAMES 8        /* RFC 27 CURVE requests have 7 */
#define ZAP_RECENT 64           /* refused keys remembered for the rate limit */

struct zap_entry {
    uint8_t key[ZAP_KEY_BYTES];
    char name[ZAP_NAME_MAX];
};

struct zap_list {
    struct zap_entry *e; /* n entries sorted by key */
    const struct zap_entry **by_name; /* the same n, sorted by name */
    size_t n;
};

struct zap_recent {
    uint8_t key[ZAP_KEY_BYTES];
    uint64_t logged_ms; /* when its last line went out; 0 = unused slot */
    uint64_t held_back; /* refusals since then without a line */
};

struct zap {
    void *sock;
    char *client_path, *worker_path;
    struct zap_list *clients, *workers;
    struct zap_recent recent[ZAP_RECENT];
    struct zap_counters c;
};

static uint64_t zap_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* ---- key files ------------------------------------------------------------------------------ */

_Static_assert(ZAP_KEY_BYTES == KEYFILE_KEY_BYTES && ZAP_Z85_LEN == KEYFILE_Z85_LEN,
               "zap.h and keyfile.h disagree on the size of a key");

/* ---- allow-lists ------------------------------------------------------------------------------ */

static int zap_entry_cmp(const void *a, const void *b)
{
    return memcmp(((const struct zap_entry *)a)->key, ((const struct zap_entry *)b)->key,
                  ZAP_KEY_BYTES);
}

static int zap_name_cmp(const void *a, const void *b)
{
    return strcmp((*(const struct zap_entry *const *)a)->name,
                  (*(const struct zap_entry *const *)b)->name);
}

static bool zap_has_suffix(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n > k && strcmp(s + n - k, suffix) == 0;
}

/* Appends the key of file `path` named after `file` (its last component). */
static int zap_list_add_file(struct zap_list *l, size_t *cap, const char *path, const char *file,
                             char *err, size_t err_len)
{
    if (l->n >= ZAP_MAX_KEYS) {
        snprintf(err, err_len, "%s: more than %d keys", path, ZAP_MAX_KEYS);
        return -1;
    }
    if (l->n == *cap) {
        size_t ncap = *cap ? *cap * 2 : 16;
        struct zap_entry *ne = realloc(l->e, ncap * sizeof *ne);
        if (!ne) {
            snprintf(err, err_len, "%s: out of memory", path);
            return -1;
        }
        l->e = ne;
        *cap = ncap;
    }
    struct zap_entry *e = &l->e[l->n];
    if (keyfile_read(path, e->key, NULL, err, err_len) != 0)
        return -1;
    size_t stem = strlen(file);
    if (zap_has_suffix(file, ".pub"))
        stem -= 4;
    if (stem == 0 || stem >= ZAP_NAME_MAX) {
        snprintf(err, err_len, "%s: a key's name (the file name without .pub) must be 1..%d "
                 "bytes", path, ZAP_NAME_MAX - 1);
        return -1;
    }
    /* the name goes into logs and ZAP user ids: printable ASCII only */
    for (size_t i = 0; i < stem; i++) {
        unsigned char ch = (unsigned char)file[i];
        e->name[i] = ch > 0x20 && ch < 0x7f ? (char)ch : '?';
    }
    e->name[stem] = '\0';
    l->n++;
    return 0;
}

int zap_list_load(const char *path, struct zap_list **out, char *err, size_t err_len)
{
    *out = NULL;
    struct zap_list *l = calloc(1, sizeof *l);
    if (!l) {
        snprintf(err, err_len, "%s: out of memory", path);
        return -1;
    }
    size_t cap = 0;
    struct stat st;
    DIR *d = NULL;
    if (stat(path, &st) != 0) {
        snprintf(err, err_len, "%s: %s", path, strerror(errno));
        goto fail;
    }
    if (S_ISDIR(st.st_mode)) {
        d = opendir(path);
        if (!d) {
            snprintf(err, err_len, "%s: cannot open the directory: %s", path, strerror(errno));
            goto fail;
        }
        struct dirent *de;
        while ((de = readdir(d)) != NULL) {
            if (de->d_name[0] == '.' || !zap_has_suffix(de->d_name, ".pub"))
                continue;
            char file[4096];
            int n = snprintf(file, sizeof file, "%s/%s", path, de->d_name);
            if (n < 0 || (size_t)n >= sizeof file) {
                snprintf(err, err_len, "%s/%s: path too long", path, de->d_name);
                goto fail;
            }
            struct stat fst;
            if (stat(file, &fst) != 0 || !S_ISREG(fst.st_mode))
                continue; /* a dangling link or a directory named x.pub is not a key */
            if (zap_list_add_file(l, &cap, file, de->d_name, err, err_len) != 0)
                goto fail;
        }
        closedir(d);
        d = NULL;
    } else {
        const char *slash = strrchr(path, '/');
        if (zap_list_add_file(l, &cap, path, slash ? slash + 1 : path, err, err_len) != 0)
            goto fail;
    }
    if (l->n > 1)
        qsort(l->e, l->n, sizeof *l->e, zap_entry_cmp);
    for (size_t i = 1; i < l->n; i++) {
        if (memcmp(l->e[i - 1].key, l->e[i].key, ZAP_KEY_BYTES) == 0) {
            snprintf(err, err_len, "%s: the same key is listed as '%s' and '%s'", path,
                     l->e[i - 1].name, l->e[i].name);
            goto fail;
        }
    }
    l->by_name = malloc((l->n ? l->n : 1) * sizeof *l->by_name);
    if (!l->by_name) {
        snprintf(err, err_len, "%s: out of memory", path);
        goto fail;
    }
    for (size_t i = 0; i < l->n; i++)
        l->by_name[i] = &l->e[i];
    if (l->n > 1)
        qsort(l->by_name, l->n, sizeof *l->by_name, zap_name_cmp);
    /* file names are unique, but the printable forms of two odd ones may not be */
    for (size_t i = 1; i < l->n; i++) {
        if (strcmp(l->by_name[i - 1]->name, l->by_name[i]->name) == 0) {
            snprintf(err, err_len, "%s: two keys are named '%s'", path, l->by_name[i]->name);
            goto fail;
        }
    }
    *out = l;
    return 0;
fail:
    if (d)
        closedir(d);
    zap_list_destroy(&l);
    return -1;
}

size_t zap_list_count(const struct zap_list *l)
{
    return l ? l->n : 0;
}

const char *zap_list_find(const struct zap_list *l, const uint8_t key[ZAP_KEY_BYTES])
{
    if (!l || l->n == 0)
        return NULL;
    struct zap_entry probe;
    memcpy(probe.key, key, ZAP_KEY_BYTES);
    const struct zap_entry *e = bsearch(&probe, l->e, l->n, sizeof *l->e, zap_entry_cmp);
    return e ? e->name : NULL;
}

bool zap_list_has_name(const struct zap_list *l, const char *name)
{
    if (!l || l->n == 0 || !name)
        return false;
    struct zap_entry probe;
    snprintf(probe.name, sizeof probe.name, "%s", name);
    const struct zap_entry *pp = &probe;
    return bsearch(&pp, l->by_name, l->n, sizeof *l->by_name, zap_name_cmp) != NULL;
}

void zap_list_destroy(struct zap_list **lp)
{
    if (!lp || !*lp)
        return;
    free((*lp)->by_name);
    free((*lp)->e);
    free(*lp);
    *lp = NULL;
}

/* ---- the handler ---------------------------------------------------------------------------- */

static int zap_load_both(const char *client_path, const char *worker_path,
                         struct zap_list **clients, struct zap_list **workers, char *err,
                         size_t err_len)
{
    char why[1024];
    if (zap_list_load(client_path, clients, why, sizeof why) != 0) {
        snprintf(err, err_len, "[security] client_keys: %s", why);
        return -1;
    }
    if (zap_list_load(worker_path, workers, why, sizeof why) != 0) {
        zap_list_destroy(clients);
        snprintf(err, err_len, "[security] worker_keys: %s", why);
        return -1;
    }
    return 0;
}

int zap_new(void *zctx, const char *client_keys, const char *worker_keys, struct zap **out,
            char *err, size_t err_len)
{
    *out = NULL;
    struct zap *z = calloc(1, sizeof *z);
    if (!z) {
        snprintf(err, err_len, "out of memory");
        return -1;
    }
    z->client_path = strdup(client_keys);
    z->worker_path = strdup(worker_keys);
    if (!z->client_path || !z->worker_path) {
        snprintf(err, err_len, "out of memory");
        goto fail;
    }
    if (zap_load_both(z->client_path, z->worker_path, &z->clients, &z->workers, err, err_len) !=
        0)
        goto fail;
    z->sock = zmq_socket(zctx, ZMQ_REP);
    int zero = 0;
    if (!z->sock || zmq_setsockopt(z->sock, ZMQ_LINGER, &zero, sizeof zero) != 0 ||
        zmq_bind(z->sock, ZAP_ENDPOINT) != 0) {
        snprintf(err, err_len, "ZAP handler %s: %s", ZAP_ENDPOINT, zmq_strerror(errno));
        goto fail;
    }
    *out = z;
    return 0;
fail:
    zap_destroy(&z);
    return -1;
}

void *zap_socket(struct zap *z)
{
    return z->sock;
}

/* Should a refusal of `key` be logged now? Counts the ones that are not. */
static bool zap_should_log(struct zap *z, const uint8_t key[ZAP_KEY_BYTES], uint64_t now,
                           uint64_t *held_back)
{
    struct zap_recent *slot = NULL, *oldest = &z->recent[0];
    for (int i = 0; i < ZAP_RECENT; i++) {
        struct zap_recent *r = &z->recent[i];
        if (r->logged_ms && memcmp(r->key, key, ZAP_KEY_BYTES) == 0) {
            slot = r;
            break;
        }
        if (r->logged_ms < oldest->logged_ms)
            oldest = r;
    }
    if (slot && now - slot->logged_ms < ZAP_LOG_INTERVAL_MS) {
        slot->held_back++;
        z->c.refusals_suppressed++;
        return false;
    }
    if (!slot) {
        slot = oldest;
        memcpy(slot->key, key, ZAP_KEY_BYTES);
        slot->held_back = 0;
    }
    *held_back = slot->held_back;
    slot->held_back = 0;
    slot->logged_ms = now ? now : 1;
    z->c.refusals_logged++;
    return true;
}

static void zap_reply(struct zap *z, const zmq_msg_t *request_id, const char *code,
                      const char *text, const char *user)
{
    zmq_msg_t id;
    zmq_msg_init(&id);
    if (request_id)
        zmq_msg_copy(&id, (zmq_msg_t *)request_id);
    /* a REP socket that fails to answer is stuck: every send is non-blocking and the inproc
     * pipe to libzmq's ZAP client always has room for one reply */
    zmq_send(z->sock, "1.0", 3, ZMQ_SNDMORE | ZMQ_DONTWAIT);
    zmq_msg_send(&id, z->sock, ZMQ_SNDMORE | ZMQ_DONTWAIT);
    zmq_msg_close(&id);
    zmq_send(z->sock, code, strlen(code), ZMQ_SNDMORE | ZMQ_DONTWAIT);
    zmq_send(z->sock, text, strlen(text), ZMQ_SNDMORE | ZMQ_DONTWAIT);
    zmq_send(z->sock, user, strlen(user), ZMQ_SNDMORE | ZMQ_DONTWAIT);
    zmq_send(z->sock, "", 0, ZMQ_DONTWAIT);
}

static bool zap_frame_is(const zmq_msg_t *m, const char *text)
{
    size_t n = strlen(text);
    return zmq_msg_size((zmq_msg_t *)m) == n && memcmp(zmq_msg_data((zmq_msg_t *)m), text, n) == 0;
}

void zap_on_request(void *ctx)
{
    struct zap *z = ctx;
    zmq_msg_t f[ZAP_MAX_FRAMES];
    int n = 0, total = 0;
    for (;;) {
        zmq_msg_t tmp;
        zmq_msg_init(&tmp);
        if (zmq_msg_recv(&tmp, z->sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&tmp);
            if (total == 0)
                return;
            break;
        }
        bool more = zmq_msg_more(&tmp);
        if (n < ZAP_MAX_FRAMES)
            f[n++] = tmp;
        else
            zmq_msg_close(&tmp);
        total++;
        if (!more)
            break;
    }
    z->c.requests++;
    /* RFC 27: version, request id, domain, address, identity, mechanism, credentials... */
    if (total < 6 || !zap_frame_is(&f[0], "1.0")) {
        z->c.malformed++;
        ITSD_WARN("ZAP: malformed request of %d frames refused", total);
        zap_reply(z, n >= 2 ? &f[1] : NULL, "500", "malformed ZAP request", "");
        goto out;
    }
    char domain[32], addr[64];
    snprintf(domain, sizeof domain, "%.*s", (int)zmq_msg_size(&f[2]),
             (const char *)zmq_msg_data(&f[2]));
    snprintf(addr, sizeof addr, "%.*s", (int)zmq_msg_size(&f[3]),
             (const char *)zmq_msg_data(&f[3]));
    bool clients = strcmp(domain, ZAP_DOMAIN_CLIENTS) == 0;
    bool workers = strcmp(domain, ZAP_DOMAIN_WORKERS) == 0;
    if (!clients && !workers) {
        z->c.refused++;
        ITSD_WARN("ZAP: request for unknown domain '%s' refused", domain);
        zap_reply(z, &f[1], "400", "unknown domain", "");
        goto out;
    }
    const char *who = clients ? "client" : "worker";
    if (!zap_frame_is(&f[5], "CURVE") || total != 7 || n < 7 ||
        zmq_msg_size(&f[6]) != ZAP_KEY_BYTES) {
        z->c.refused++;
        ITSD_WARN("ZAP: %s from %s refused: not a CURVE handshake", who, addr);
        zap_reply(z, &f[1], "400", "CURVE required", "");
        goto out;
    }
    const uint8_t *key = zmq_msg_data(&f[6]);
    const char *name = zap_list_find(clients ? z->clients : z->workers, key);
    if (name) {
        z->c.accepted++;
        ITSD_DEBUG("ZAP: %s key '%s' from %s accepted", who, name, addr);
        zap_reply(z, &f[1], "200", "OK", name);
        goto out;
    }
    z->c.refused++;
    uint64_t held_back = 0;
    if (zap_should_log(z, key, zap_now_ms(), &held_back)) {
        char z85[ZAP_Z85_LEN + 1];
        if (!zmq_z85_encode(z85, key, ZAP_KEY_BYTES))
            snprintf(z85, sizeof z85, "?");
        if (held_back)
            ITSD_WARN("ZAP: refused %s key %s from %s: not in %s_keys (%s); %llu more refusals "
                      "of it in the last %d s not logged",
                      who, z85, addr, who, clients ? z->client_path : z->worker_path,
                      (unsigned long long)held_back, ZAP_LOG_INTERVAL_MS / 1000);
        else
            ITSD_WARN("ZAP: refused %s key %s from %s: not in %s_keys (%s)", who, z85, addr,
                      who, clients ? z->client_path : z->worker_path);
    }
    zap_reply(z, &f[1], "400", "key not allowed", "");
out:
    for (int i = 0; i < n; i++)
        zmq_msg_close(&f[i]);
}

/* Lists loaded for a reload, with the paths they came from, not yet in use. */
struct zap_staged {
    char *client_path, *worker_path;
    struct zap_list *clients, *workers;
};

void zap_staged_destroy(struct zap_staged **sp)
{
    if (!sp || !*sp)
        return;
    struct zap_staged *st = *sp;
    free(st->client_path);
    free(st->worker_path);
    zap_list_destroy(&st->clients);
    zap_list_destroy(&st->workers);
    free(st);
    *sp = NULL;
}

int zap_reload_stage(struct zap *z, const char *client_keys, const char *worker_keys,
                     struct zap_staged **out, char *err, size_t err_len)
{
    *out = NULL;
    struct zap_staged *st = calloc(1, sizeof *st);
    if (!st || !(st->client_path = strdup(client_keys)) ||
        !(st->worker_path = strdup(worker_keys))) {
        snprintf(err, err_len, "out of memory");
        goto fail;
    }
    if (zap_load_both(st->client_path, st->worker_path, &st->clients, &st->workers, err,
                      err_len) != 0)
        goto fail;
    *out = st;
    return 0;
fail:
    zap_staged_destroy(&st);
    z->c.failed_reloads++;
    return -1;
}

void zap_reload_commit(struct zap *z, struct zap_staged **sp)
{
    struct zap_staged *st = *sp;
    *sp = NULL;
    zap_list_destroy(&z->clients);
    zap_list_destroy(&z->workers);
    free(z->client_path);
    free(z->worker_path);
    z->clients = st->clients;
    z->workers = st->workers;
    z->client_path = st->client_path; /* what the next reload reads */
    z->worker_path = st->worker_path;
    free(st);
    z->c.reloads++;
    /* a key just added must not stay muted by an old refusal */
    memset(z->recent, 0, sizeof z->recent);
}

int zap_reload(struct zap *z, char *err, size_t err_len)
{
    struct zap_staged *st = NULL;
    if (zap_reload_stage(z, z->client_path, z->worker_path, &st, err, err_len) != 0)
        return -1;
    zap_reload_commit(z, &st);
    return 0;
}

bool zap_allows(const struct zap *z, bool workers, const char *name)
{
    return zap_list_has_name(workers ? z->workers : z->clients, name);
}

size_t zap_client_keys(const struct zap *z)
{
    return zap_list_count(z->clients);
}

size_t zap_worker_keys(const struct zap *z)
{
    return zap_list_count(z->workers);
}

const struct zap_counters *zap_counters(const struct zap *z)
{
    return &z->c;
}

void zap_destroy(struct zap **zp)
{
    if (!zp || !*zp)
        return;
    struct zap *z = *zp;
    if (z->sock)
        zmq_close(z->sock);
    zap_list_destroy(&z->clients);
    zap_list_destroy(&z->workers);
    free(z->client_path);
    free(z->worker_path);
    free(z);
    *zp = NULL;
}
