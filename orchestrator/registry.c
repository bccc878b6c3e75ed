/* registry.c — see registry.h. Workers are few (tens, at most max_workers), so the records
 * live in an array scanned linearly; removal swaps the last record into the hole. */
#include "registry.h"

#include <stdlib.h>
#include <string.h>

struct registry {
    struct registry_worker **w;
    size_t n, cap;
    uint32_t max_workers;
    uint64_t next_serial;
};

int registry_new(uint32_t max_workers, struct registry **out)
{
    *out = NULL;
    struct registry *r = calloc(1, sizeof *r);
    if (!r)
        return PROTO_ERR_NO_MEMORY;
    r->max_workers = max_workers;
    r->next_serial = 1;
    *out = r;
    return 0;
}

void registry_set_max_workers(struct registry *r, uint32_t max_workers)
{
    r->max_workers = max_workers;
}

static void registry_worker_free(struct registry_worker *w)
{
    if (!w)
        return;
    free(w->name);
    free(w->model);
    free(w->backend);
    free(w);
}

void registry_destroy(struct registry **r)
{
    if (!r || !*r)
        return;
    for (size_t i = 0; i < (*r)->n; i++)
        registry_worker_free((*r)->w[i]);
    free((*r)->w);
    free(*r);
    *r = NULL;
}

struct registry_worker *registry_find(const struct registry *r, const void *rid, size_t rid_len)
{
    for (size_t i = 0; i < r->n; i++) {
        struct registry_worker *w = r->w[i];
        if (w->rid_len == rid_len && memcmp(w->rid, rid, rid_len) == 0)
            return w;
    }
    return NULL;
}

int registry_add(struct registry *r, const void *rid, size_t rid_len,
                 const struct proto_ready *ready, uint64_t now_ms, struct registry_worker **out)
{
    *out = NULL;
    if (rid_len == 0 || rid_len > REGISTRY_MAX_RID_BYTES)
        return PROTO_ERR_BAD_FIELD;
    if (r->n >= r->max_workers)
        return PROTO_ERR_BUSY;
    if (r->n == r->cap) {
        size_t cap = r->cap ? r->cap * 2 : 16;
        struct registry_worker **nw = realloc(r->w, cap * sizeof *nw);
        if (!nw)
            return PROTO_ERR_NO_MEMORY;
        r->w = nw;
        r->cap = cap;
    }
    struct registry_worker *w = calloc(1, sizeof *w);
    if (!w)
        return PROTO_ERR_NO_MEMORY;
    w->name = strdup(ready->worker ? ready->worker : "");
    w->model = strdup(ready->model ? ready->model : "");
    w->backend = strdup(ready->backend ? ready->backend : "");
    if (!w->name || !w->model || !w->backend) {
        registry_worker_free(w);
        return PROTO_ERR_NO_MEMORY;
    }
    memcpy(w->rid, rid, rid_len);
    w->rid_len = rid_len;
    w->serial = r->next_serial++;
    w->role = ready->role;
    w->capacity = ready->capacity;
    w->registered_ms = now_ms;
    w->last_seen_ms = now_ms;
    r->w[r->n++] = w;
    *out = w;
    return 0;
}

void registry_remove(struct registry *r, struct registry_worker *w)
{
    for (size_t i = 0; i < r->n; i++) {
        if (r->w[i] == w) {
            r->w[i] = r->w[--r->n];
            registry_worker_free(w);
            return;
        }
    }
}

static bool registry_eligible(const struct registry_worker *w, enum proto_role role)
{
    return w->role == role && !w->draining && !w->unreachable;
}

struct registry_worker *registry_pick(const struct registry *r, enum proto_role role,
                                      uint32_t cost)
{
    struct registry_worker *best = NULL;
    for (size_t i = 0; i < r->n; i++) {
        struct registry_worker *w = r->w[i];
        if (!registry_eligible(w, role))
            continue;
        uint64_t max = w->capacity.max_seqs ? w->capacity.max_seqs : 1;
        if (w->used_seqs > 0 && (uint64_t)w->used_seqs + cost > max)
            continue;
        if (!best) {
            best = w;
            continue;
        }
        /* used/max compared without division: a/b < c/d  <=>  a*d < c*b */
        uint64_t bmax = best->capacity.max_seqs ? best->capacity.max_seqs : 1;
        uint64_t lhs = (uint64_t)w->used_seqs * bmax, rhs = (uint64_t)best->used_seqs * max;
        if (lhs < rhs || (lhs == rhs && (w->n_jobs < best->n_jobs ||
                                         (w->n_jobs == best->n_jobs && w->serial < best->serial))))
            best = w;
    }
    return best;
}

uint32_t registry_count_live(const struct registry *r, enum proto_role role)
{
    uint32_t n = 0;
    for (size_t i = 0; i < r->n; i++)
        n += registry_eligible(r->w[i], role);
    return n;
}

size_t registry_size(const struct registry *r)
{
    return r->n;
}

struct registry_worker *registry_at(const struct registry *r, size_t i)
{
    return i < r->n ? r->w[i] : NULL;
}
