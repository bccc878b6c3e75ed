/* orch.c — see orch.h.
 *
 * Frames: a DEALER peer sends one msgpack frame, which the ROUTER receives as [routing id,
 * frame]. Anything else (more frames, an empty frame from a REQ socket) is a wrong envelope
 * and answered as such. The frontend monitor reports ZMQ_EVENT_DISCONNECTED with the file
 * descriptor of the connection; ZMQ_SRCFD on each client frame says which connection it came
 * over, so a closed connection maps to the clients (routing ids) that used it. The monitor is
 * drained before every frontend frame, so a disconnect is always seen before any frame of a
 * later connection that reuses the descriptor number.
 *
 * With [security] curve on, both ROUTERs are CURVE servers and zap.h's handler (one more
 * socket in the loop) admits peers by public key. libzmq attaches the key's name ("User-Id")
 * to every message of an admitted peer: it names clients and workers in the logs, a message
 * from a key that a reload removed is refused, and max_requests_per_client counts by it. The
 * frontend module knows nothing of users, so the live requests of each user are followed
 * here from the frames it sends: `accepted` during that user's submit starts one; `result` or
 * an `error` naming the id ends it; a client connection that closes (or a send to it that
 * fails) ends its requests as the frontend ends them, silently.
 */
#include "orch.h"

#include <errno.h>
#include <ev.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>
#if ITS_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

#include "dispatch.h"
#include "evzmq.h"
#include "frontend.h"
#include "itsd_log.h"
#include "keyfile.h"
#include "metrics.h"
#include "metrics_http.h"
#include "proto.h"
#include "registry.h"
#include "templates.h"
#include "zap.h"

#include <microhttpd.h>

/* The Makefile may pass the release (its_build_info's version label). */
#ifndef ITS_VERSION
#define ITS_VERSION "unknown"
#endif

/* A live request of an authenticated client (max_requests_per_client). */
struct orch_live {
    char id[PROTO_MAX_ID_BYTES + 1];
    char user[ZAP_NAME_MAX];
    uint8_t rid[REGISTRY_MAX_RID_BYTES];
    size_t rid_len;
    int fd;
    uint64_t since_ms;
};

/* The submit being handed to the frontend, so that its `accepted` can be attributed. */
struct orch_submit_ctx {
    const char *user;
    const uint8_t *rid;
    size_t rid_len;
    int fd;
};

struct orch_counters {
    uint64_t client_frames, worker_frames;
    uint64_t bad_client_frames, bad_worker_frames, unregistered_worker_frames;
    uint64_t unroutable_sends, dropped_sends;
    uint64_t over_client_limit, revoked_frames;
    uint64_t reloads, refused_reloads;
};

struct orch {
    struct itsd_config cfg; /* the running configuration; a reload changes its live keys */
    int argc;               /* the command line, read again by every reload */
    char **argv;
    struct ev_loop *loop;
    void *zctx;
    void *front, *back, *mon;
    struct zap *zap; /* with curve on */
    struct evzmq *ez;
    struct dispatch *d;
    struct frontend *fe;
    ev_timer tick;
    ev_timer drain;
    ev_timer watchdog;
    ev_signal sig_term, sig_int, sig_hup;
    bool stopping;
    struct orch_counters c;
    struct orch_live *live; /* n_live requests of authenticated clients, unordered */
    size_t n_live, cap_live;
    const struct orch_submit_ctx *submitting; /* during frontend_on_message of a submit */
    struct metrics metrics;     /* counted here and in the frontend; snapshots from it */
    struct metrics_http *http;  /* with metrics_listen set */
};

static uint64_t orch_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* ---- requests per client ------------------------------------------------------------------ */

/* With curve on every client's live requests are counted, whatever max_requests_per_client
 * says now: a reload may set the limit, and it must then see the requests already running. */
static bool orch_tracks_clients(const struct orch *o)
{
    return o->zap != NULL;
}

static uint32_t orch_live_count(const struct orch *o, const char *user)
{
    uint32_t n = 0;
    for (size_t i = 0; i < o->n_live; i++)
        n += strcmp(o->live[i].user, user) == 0;
    return n;
}

static void orch_live_remove_at(struct orch *o, size_t i)
{
    o->live[i] = o->live[--o->n_live];
}

/* A request that itsd accepted for `ctx->user`. Out of memory only loses the count of this
 * one request (the limit is then a little generous), never the request. */
static void orch_live_add(struct orch *o, const struct orch_submit_ctx *ctx, const char *id)
{
    if (o->n_live == o->cap_live) {
        size_t ncap = o->cap_live ? o->cap_live * 2 : 32;
        struct orch_live *nl = realloc(o->live, ncap * sizeof *nl);
        if (!nl) {
            ITSD_WARN("%s: out of memory counting client '%s''s requests", id, ctx->user);
            return;
        }
        o->live = nl;
        o->cap_live = ncap;
    }
    struct orch_live *l = &o->live[o->n_live++];
    snprintf(l->id, sizeof l->id, "%s", id);
    snprintf(l->user, sizeof l->user, "%s", ctx->user);
    memcpy(l->rid, ctx->rid, ctx->rid_len);
    l->rid_len = ctx->rid_len;
    l->fd = ctx->fd;
    l->since_ms = orch_now_ms();
}

static void orch_live_end_id(struct orch *o, const char *id)
{
    for (size_t i = 0; i < o->n_live; i++) {
        if (strcmp(o->live[i].id, id) == 0) {
            orch_live_remove_at(o, i);
            return;
        }
    }
}

/* The frontend ends a gone client's requests without a word: so do the counts. */
static void orch_live_end_rid(struct orch *o, const uint8_t *rid, size_t rid_len)
{
    for (size_t i = 0; i < o->n_live;) {
        if (o->live[i].rid_len == rid_len && memcmp(o->live[i].rid, rid, rid_len) == 0)
            orch_live_remove_at(o, i);
        else
            i++;
    }
}

static void orch_live_end_fd(struct orch *o, int fd)
{
    for (size_t i = 0; i < o->n_live;) {
        if (o->live[i].fd == fd)
            orch_live_remove_at(o, i);
        else
            i++;
    }
}

/* A client that reconnected under the same routing id: the frontend follows it, so do we. */
static void orch_live_set_fd(struct orch *o, const uint8_t *rid, size_t rid_len, int fd)
{
    for (size_t i = 0; i < o->n_live; i++)
        if (o->live[i].rid_len == rid_len && memcmp(o->live[i].rid, rid, rid_len) == 0)
            o->live[i].fd = fd;
}

/* Safety net: every request ends by its deadline, so a count older than the longest one was
 * missed (a path that ends requests silently) and must not hold its client back forever. */
static void orch_live_expire(struct orch *o, uint64_t now)
{
    uint64_t max_age = (uint64_t)o->cfg.max_deadline_ms + 60000u;
    for (size_t i = 0; i < o->n_live;) {
        if (now - o->live[i].since_ms > max_age) {
            ITSD_WARN("%s: client '%s''s request count expired without an end seen",
                      o->live[i].id, o->live[i].user);
            orch_live_remove_at(o, i);
        } else {
            i++;
        }
    }
}

/* Looks at a frame the frontend sends to a client, for the counts. */
static void orch_live_watch(struct orch *o, const uint8_t *rid, size_t rid_len, const void *buf,
                            size_t len, bool sent)
{
    if (!sent) {
        orch_live_end_rid(o, rid, rid_len);
        return;
    }
    struct proto_peek pk;
    if (proto_peek(buf, len, &pk) != 0 || !pk.id[0])
        return;
    if (pk.type == PROTO_ACCEPTED && o->submitting &&
        o->submitting->rid_len == rid_len && memcmp(o->submitting->rid, rid, rid_len) == 0) {
        ITSD_INFO("%s submitted by client '%s'", pk.id, o->submitting->user);
        orch_live_add(o, o->submitting, pk.id);
    } else if (pk.type == PROTO_RESULT || pk.type == PROTO_ERROR) {
        orch_live_end_id(o, pk.id);
    }
}

/* ---- sending ------------------------------------------------------------------------------ */

/* Sends [rid, buf] without blocking. ROUTER_MANDATORY makes a vanished peer EHOSTUNREACH and
 * a full pipe EAGAIN instead of a silent drop: both are counted and reported. */
static int orch_send_raw(struct orch *o, void *sock, const uint8_t *rid, size_t rid_len,
                         const void *buf, size_t len)
{
    if (zmq_send(sock, rid, rid_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0 ||
        zmq_send(sock, buf, len, ZMQ_DONTWAIT) < 0) {
        if (errno == EHOSTUNREACH)
            o->c.unroutable_sends++;
        else
            o->c.dropped_sends++;
        ITSD_DEBUG("send to a %s peer failed: %s", sock == o->front ? "client" : "worker",
                   zmq_strerror(errno));
        return -1;
    }
    return 0;
}

static int orch_send_msg(struct orch *o, void *sock, const uint8_t *rid, size_t rid_len,
                         const struct proto_msg *m)
{
    void *buf = NULL;
    size_t len = 0;
    char err[256];
    if (proto_encode(m, &buf, &len, err, sizeof err) != 0) {
        ITSD_ERROR("cannot encode %s: %s", proto_type_name(m->type), err);
        return -1;
    }
    int rc = orch_send_raw(o, sock, rid, rid_len, buf, len);
    free(buf);
    return rc;
}

static void orch_send_error(struct orch *o, void *sock, const uint8_t *rid, size_t rid_len,
                            const struct proto_peek *pk, int code, const char *fmt, ...)
    __attribute__((format(printf, 7, 8)));
static void orch_send_error(struct orch *o, void *sock, const uint8_t *rid, size_t rid_len,
                            const struct proto_peek *pk, int code, const char *fmt, ...)
{
    char text[PROTO_MAX_ERROR_BYTES];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    /* the error text must itself encode: replace what is not printable ASCII */
    for (char *p = text; *p; p++)
        if ((unsigned char)*p < 0x20 || (unsigned char)*p >= 0x7f)
            *p = '?';
    struct proto_msg m = {.type = PROTO_ERROR};
    m.error.code = (enum proto_err)code;
    m.error.message = text;
    if (pk && pk->has_tag) {
        m.error.tag = pk->tag;
        m.error.has_tag = true;
    }
    if (pk && pk->id[0])
        m.error.id = (char *)pk->id;
    (void)orch_send_msg(o, sock, rid, rid_len, &m);
}

static void orch_send_disconnect(struct orch *o, const uint8_t *rid, size_t rid_len,
                                 const char *reason)
{
    struct proto_msg m = {.type = PROTO_DISCONNECT};
    m.disconnect.reason = (char *)reason;
    (void)orch_send_msg(o, o->back, rid, rid_len, &m);
}

/* ---- ops for the modules -------------------------------------------------------------------- */

static int orch_dispatch_send(void *ctx, const uint8_t *rid, size_t rid_len,
                              const struct proto_msg *m)
{
    struct orch *o = ctx;
    return orch_send_msg(o, o->back, rid, rid_len, m);
}

static void orch_dispatch_job_failed(void *ctx, void *owner, uint64_t job_id,
                                     enum proto_role role, int code, const char *message)
{
    struct orch *o = ctx;
    if (o->fe)
        frontend_on_job_failed(o->fe, owner, job_id, role, code, message);
}

static int orch_frontend_send(void *ctx, const uint8_t *rid, size_t rid_len, const void *buf,
                              size_t len)
{
    struct orch *o = ctx;
    int rc = orch_send_raw(o, o->front, rid, rid_len, buf, len);
    if (orch_tracks_clients(o))
        orch_live_watch(o, rid, rid_len, buf, len, rc == 0);
    return rc;
}

static uint64_t orch_frontend_now(void *ctx)
{
    (void)ctx;
    return orch_now_ms();
}

/* ---- metrics ------------------------------------------------------------------------------- */

/* The counters kept in o->metrics plus a snapshot of the modules' own state: what /metrics
 * and status_reply.metrics both show. */
static void orch_metrics_collect(const struct orch *o, struct metrics *out)
{
    *out = o->metrics;
    const struct dispatch_counters *dc = dispatch_counters(o->d);
    const struct frontend_counters *fc = frontend_counters(o->fe);
    out->heartbeat_misses = dc->heartbeat_expiries;
    out->job_retries = dc->jobs_retried;
    out->jobs_started = dc->jobs_started;
    out->jobs_failed = dc->jobs_failed;
    out->workers_registered = dc->workers_registered;
    out->workers_lost = dc->workers_lost;
    out->frames[METRICS_FRONTEND] = o->c.client_frames;
    out->frames[METRICS_BACKEND] = o->c.worker_frames;
    /* frames that did not decode or had a wrong envelope, decoded messages of a type that
     * side may not send, and error messages from peers (the frontend counts the last two
     * for clients; for workers all of it is counted here) */
    out->protocol_errors[METRICS_FRONTEND] = o->c.bad_client_frames + fc->bad_messages;
    out->protocol_errors[METRICS_BACKEND] = o->c.bad_worker_frames;
    out->sends_unroutable = o->c.unroutable_sends;
    out->sends_dropped = o->c.dropped_sends;
    out->auth_refusals = o->c.revoked_frames;
    if (o->zap)
        out->auth_refusals += zap_counters(o->zap)->refused;
    out->requests_queued = frontend_queued(o->fe);
    out->requests_in_flight = frontend_running(o->fe);
    for (int r = 0; r < PROTO_ROLE_COUNT; r++) {
        out->queue_depth[r] = dispatch_queued(o->d, (enum proto_role)r);
        out->jobs_in_flight[r] = dispatch_running_role(o->d, (enum proto_role)r);
    }
    dispatch_worker_states(o->d, out->workers);
}

static int orch_metrics_render(void *ctx, char **body, size_t *len)
{
    const struct orch *o = ctx;
    struct metrics snap;
    orch_metrics_collect(o, &snap);
    char libzmq[32];
    int major, minor, patch;
    zmq_version(&major, &minor, &patch);
    snprintf(libzmq, sizeof libzmq, "%d.%d.%d", major, minor, patch);
    const char *mhd = MHD_get_version();
    struct metrics_build b = {.version = ITS_VERSION, .libzmq = libzmq,
                              .microhttpd = mhd ? mhd : ""};
    return metrics_render(&snap, &b, body, len);
}

static void orch_frontend_metrics(void *ctx, struct proto_metrics *out)
{
    const struct orch *o = ctx;
    struct metrics snap;
    orch_metrics_collect(o, &snap);
    metrics_to_proto(&snap, out);
}

/* ---- receiving ------------------------------------------------------------------------------ */

#define ORCH_MAX_PARTS 4

struct orch_frames {
    zmq_msg_t part[ORCH_MAX_PARTS];
    int n;     /* parts kept (at most ORCH_MAX_PARTS) */
    int total; /* parts the message had */
};

/* Receives one whole multipart message; extra parts beyond ORCH_MAX_PARTS are read and
 * dropped. Returns 0, or -1 when nothing was there. */
static int orch_recv(void *sock, struct orch_frames *f)
{
    f->n = 0;
    f->total = 0;
    for (;;) {
        zmq_msg_t tmp;
        zmq_msg_init(&tmp);
        if (zmq_msg_recv(&tmp, sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&tmp);
            if (f->total == 0)
                return -1;
            break; /* cannot happen: parts of a message arrive together */
        }
        bool more = zmq_msg_more(&tmp);
        if (f->n < ORCH_MAX_PARTS) {
            f->part[f->n++] = tmp;
        } else {
            zmq_msg_close(&tmp);
        }
        f->total++;
        if (!more)
            break;
    }
    return 0;
}

static void orch_frames_close(struct orch_frames *f)
{
    for (int i = 0; i < f->n; i++)
        zmq_msg_close(&f->part[i]);
    f->n = 0;
}

/* Reads one monitor event: [uint16 event, uint32 value][endpoint]. */
static void orch_on_monitor(void *ctx)
{
    struct orch *o = ctx;
    struct orch_frames f;
    if (orch_recv(o->mon, &f) != 0)
        return;
    if (f.n >= 1 && zmq_msg_size(&f.part[0]) >= 6) {
        const uint8_t *p = zmq_msg_data(&f.part[0]);
        uint16_t event;
        uint32_t value;
        memcpy(&event, p, sizeof event);
        memcpy(&value, p + 2, sizeof value);
        if (event == ZMQ_EVENT_DISCONNECTED) {
            ITSD_DEBUG("frontend connection fd %u closed", value);
            if (orch_tracks_clients(o))
                orch_live_end_fd(o, (int)value);
            frontend_on_disconnect(o->fe, (int)value);
        }
    }
    orch_frames_close(&f);
}

static void orch_drain_monitor(struct orch *o)
{
    for (;;) {
        int events = 0;
        size_t len = sizeof events;
        if (zmq_getsockopt(o->mon, ZMQ_EVENTS, &events, &len) != 0 || !(events & ZMQ_POLLIN))
            return;
        orch_on_monitor(o);
    }
}

/* The authenticated name of the peer that sent `frame` (with curve on), else NULL. */
static const char *orch_user(const struct orch *o, zmq_msg_t *frame)
{
    if (!o->zap)
        return NULL;
    const char *u = zmq_msg_gets(frame, "User-Id");
    return u && *u ? u : NULL;
}

static void orch_client_message(struct orch *o, const uint8_t *rid, size_t rid_len, int fd,
                                zmq_msg_t *frame, struct proto_msg *m)
{
    const char *user = orch_user(o, frame);
    if (o->zap && (!user || !zap_allows(o->zap, false, user))) {
        /* its key was taken off the list by a reload after it connected */
        o->c.revoked_frames++;
        ITSD_WARN("message from client '%s', whose key is no longer allowed, refused",
                  user ? user : "?");
        /* addressed the way the client waits for the answer: by tag or by request id */
        struct proto_peek pk = {.type = m->type};
        const char *id = NULL;
        if (m->type == PROTO_SUBMIT) {
            pk.has_tag = true;
            pk.tag = m->submit.tag;
        } else if (m->type == PROTO_STATUS) {
            pk.has_tag = m->status.has_tag;
            pk.tag = m->status.tag;
        } else if (m->type == PROTO_GET) {
            id = m->get.id;
        } else if (m->type == PROTO_CANCEL) {
            id = m->cancel.id;
        }
        if (id)
            snprintf(pk.id, sizeof pk.id, "%s", id);
        if (m->type == PROTO_SUBMIT)
            metrics_request_rejected(&o->metrics, PROTO_ERR_UNAUTHORIZED);
        if (m->type != PROTO_ERROR)
            orch_send_error(o, o->front, rid, rid_len, &pk, PROTO_ERR_UNAUTHORIZED,
                            "unauthorized: this client's key is no longer in itsd's "
                            "client_keys");
        return;
    }
    if (!orch_tracks_clients(o) || !user) {
        frontend_on_message(o->fe, rid, rid_len, fd, m);
        return;
    }
    if (fd >= 0)
        orch_live_set_fd(o, rid, rid_len, fd);
    if (m->type != PROTO_SUBMIT) {
        frontend_on_message(o->fe, rid, rid_len, fd, m);
        return;
    }
    uint32_t live = orch_live_count(o, user);
    if (o->cfg.max_requests_per_client > 0 && live >= o->cfg.max_requests_per_client) {
        o->c.over_client_limit++;
        metrics_request_rejected(&o->metrics, PROTO_ERR_BUSY);
        ITSD_INFO("submit of client '%s' refused: %u requests live (max_requests_per_client "
                  "%u)", user, live, o->cfg.max_requests_per_client);
        struct proto_peek pk = {.type = PROTO_SUBMIT, .has_tag = true, .tag = m->submit.tag};
        orch_send_error(o, o->front, rid, rid_len, &pk, PROTO_ERR_BUSY,
                        "busy: client '%s' has %u requests running or queued "
                        "(max_requests_per_client %u); retry when one has finished",
                        user, live, o->cfg.max_requests_per_client);
        return;
    }
    struct orch_submit_ctx ctx = {.user = user, .rid = rid, .rid_len = rid_len, .fd = fd};
    o->submitting = &ctx;
    frontend_on_message(o->fe, rid, rid_len, fd, m);
    o->submitting = NULL;
}

static void orch_on_frontend(void *ctx)
{
    struct orch *o = ctx;
    orch_drain_monitor(o);
    struct orch_frames f;
    if (orch_recv(o->front, &f) != 0)
        return;
    o->c.client_frames++;
    const uint8_t *rid = zmq_msg_data(&f.part[0]);
    size_t rid_len = zmq_msg_size(&f.part[0]);
    if (f.total != 2) {
        o->c.bad_client_frames++;
        ITSD_WARN("client frame with a wrong envelope (%d frames)", f.total);
        orch_send_error(o, o->front, rid, rid_len, NULL, PROTO_ERR_BAD_MESSAGE,
                        "envelope: expected one msgpack frame after the routing id (a DEALER "
                        "socket sending one frame), got %d frames",
                        f.total - 1);
        orch_frames_close(&f);
        return;
    }
    int fd = zmq_msg_get(&f.part[1], ZMQ_SRCFD);
    const void *buf = zmq_msg_data(&f.part[1]);
    size_t len = zmq_msg_size(&f.part[1]);
    struct proto_msg m;
    char err[PROTO_MAX_ERROR_BYTES - 64];
    int rc = proto_decode(buf, len, PROTO_FROM_CLIENT, &m, err, sizeof err);
    if (rc != 0) {
        o->c.bad_client_frames++;
        struct proto_peek pk;
        if (proto_peek(buf, len, &pk) != 0)
            memset(&pk, 0, sizeof pk);
        ITSD_WARN("bad message from a client: %s: %s", proto_err_name(rc), err);
        if (pk.type != PROTO_ERROR) /* an error is never answered with an error */
            orch_send_error(o, o->front, rid, rid_len, &pk, rc, "%s", err);
    } else {
        ITSD_DEBUG("client message %s", proto_type_name(m.type));
        orch_client_message(o, rid, rid_len, fd, &f.part[1], &m);
        proto_msg_free(&m);
    }
    orch_frames_close(&f);
}

static void orch_worker_message(struct orch *o, const uint8_t *rid, size_t rid_len,
                                const char *user, struct proto_msg *m)
{
    uint64_t now = orch_now_ms();
    char err[512];
    if (o->zap && (!user || !zap_allows(o->zap, true, user))) {
        /* a reload took its key off the list: the worker goes, and cannot come back */
        o->c.revoked_frames++;
        struct registry_worker *w = dispatch_touch(o->d, rid, rid_len, now);
        if (w) {
            ITSD_WARN("worker %s (key '%s') is no longer in worker_keys: dropping it", w->name,
                      user ? user : "?");
            dispatch_on_disconnect(o->d, w, "key removed from worker_keys", now);
        }
        if (m->type != PROTO_DISCONNECT && m->type != PROTO_ERROR)
            orch_send_disconnect(o, rid, rid_len, "unauthorized: key not in worker_keys");
        return;
    }
    if (m->type == PROTO_READY) {
        if (user)
            ITSD_INFO("worker %s authenticated by key '%s'", m->ready.worker, user);
        int rc = dispatch_on_ready(o->d, rid, rid_len, &m->ready, now, err, sizeof err);
        if (rc != 0) {
            /* docs/protocol.md: a refused ready gets error, then disconnect */
            ITSD_WARN("worker %s not registered: %s", m->ready.worker, err);
            orch_send_error(o, o->back, rid, rid_len, NULL, rc, "%s", err);
            orch_send_disconnect(o, rid, rid_len, "not registered");
        }
        return;
    }
    struct registry_worker *w = dispatch_touch(o->d, rid, rid_len, now);
    if (!w) {
        /* a worker itsd dropped (or never knew, e.g. after an itsd restart) is told to go
         * away and start over with ready */
        o->c.unregistered_worker_frames++;
        if (m->type == PROTO_DISCONNECT || m->type == PROTO_ERROR)
            return; /* nothing to tell it */
        ITSD_DEBUG("%s from an unregistered worker: disconnect", proto_type_name(m->type));
        orch_send_disconnect(o, rid, rid_len, "not registered: send ready");
        return;
    }
    void *owner = NULL;
    uint64_t job = 0;
    switch (m->type) {
    case PROTO_HEARTBEAT:
        dispatch_on_heartbeat(o->d, w, &m->heartbeat);
        break;
    case PROTO_DISCONNECT:
        dispatch_on_disconnect(o->d, w, m->disconnect.reason, now);
        break;
    case PROTO_SAMPLE:
        if (dispatch_on_job_message(o->d, w, m->sample.job, false, &owner, &job) == 0)
            frontend_on_sample(o->fe, owner, job, m->sample.index, &m->sample.output);
        else
            ITSD_DEBUG("sample of unknown job %llu from worker %s dropped",
                       (unsigned long long)m->sample.job, w->name);
        break;
    case PROTO_GENERATE_RESULT:
        if (dispatch_on_job_message(o->d, w, m->generate_result.job, true, &owner, &job) ==
            0) {
            uint64_t generated = 0;
            for (uint32_t i = 0; i < m->generate_result.n_outputs; i++)
                generated += m->generate_result.outputs[i].n_tokens;
            metrics_tokens(&o->metrics, w->role, generated,
                           m->generate_result.usage.prompt_tokens);
            m->generate_result.job = job; /* the pipeline knows the job by its first id */
            frontend_on_generate_result(o->fe, owner, &m->generate_result);
        } else
            ITSD_DEBUG("result of unknown job %llu from worker %s dropped",
                       (unsigned long long)m->generate_result.job, w->name);
        break;
    case PROTO_SCORE_RESULT:
        if (dispatch_on_job_message(o->d, w, m->score_result.job, true, &owner, &job) == 0) {
            metrics_tokens(&o->metrics, w->role, 0, m->score_result.usage.prompt_tokens);
            m->score_result.job = job;
            frontend_on_score_result(o->fe, owner, &m->score_result);
        } else
            ITSD_DEBUG("result of unknown job %llu from worker %s dropped",
                       (unsigned long long)m->score_result.job, w->name);
        break;
    case PROTO_JOB_ERROR:
        if (dispatch_on_job_error(o->d, w, &m->job_error, now) != 0)
            ITSD_DEBUG("job_error of unknown job %llu from worker %s dropped",
                       (unsigned long long)m->job_error.job, w->name);
        break;
    case PROTO_ERROR:
        o->c.bad_worker_frames++;
        ITSD_WARN("worker %s reported an error: %s: %s", w->name,
                  proto_err_name(m->error.code), m->error.message ? m->error.message : "");
        break;
    default:
        o->c.bad_worker_frames++;
        orch_send_error(o, o->back, rid, rid_len, NULL, PROTO_ERR_BAD_MESSAGE,
                        "%s is not a message a worker may send", proto_type_name(m->type));
        break;
    }
}

static void orch_on_backend(void *ctx)
{
    struct orch *o = ctx;
    struct orch_frames f;
    if (orch_recv(o->back, &f) != 0)
        return;
    o->c.worker_frames++;
    const uint8_t *rid = zmq_msg_data(&f.part[0]);
    size_t rid_len = zmq_msg_size(&f.part[0]);
    if (f.total != 2) {
        o->c.bad_worker_frames++;
        ITSD_WARN("worker frame with a wrong envelope (%d frames)", f.total);
        orch_send_error(o, o->back, rid, rid_len, NULL, PROTO_ERR_BAD_MESSAGE,
                        "envelope: expected one msgpack frame after the routing id (a DEALER "
                        "socket sending one frame), got %d frames",
                        f.total - 1);
        orch_frames_close(&f);
        return;
    }
    const void *buf = zmq_msg_data(&f.part[1]);
    size_t len = zmq_msg_size(&f.part[1]);
    struct proto_msg m;
    char err[PROTO_MAX_ERROR_BYTES - 64];
    int rc = proto_decode(buf, len, PROTO_FROM_WORKER, &m, err, sizeof err);
    if (rc != 0) {
        o->c.bad_worker_frames++;
        struct proto_peek pk;
        if (proto_peek(buf, len, &pk) != 0)
            memset(&pk, 0, sizeof pk);
        ITSD_WARN("bad message from a worker: %s: %s", proto_err_name(rc), err);
        /* still a sign of life from a registered worker */
        (void)dispatch_touch(o->d, rid, rid_len, orch_now_ms());
        if (pk.type != PROTO_ERROR)
            orch_send_error(o, o->back, rid, rid_len, &pk, rc, "%s", err);
    } else {
        ITSD_DEBUG("worker message %s", proto_type_name(m.type));
        orch_worker_message(o, rid, rid_len, orch_user(o, &f.part[1]), &m);
        proto_msg_free(&m);
    }
    orch_frames_close(&f);
}

/* ---- configuration --------------------------------------------------------------------------- */

static void orch_dispatch_config(const struct itsd_config *cfg, struct dispatch_config *dc)
{
    *dc = (struct dispatch_config){
        .heartbeat_ms = cfg->heartbeat_ms,
        .liveness = cfg->liveness,
        .job_retries = cfg->job_retries,
        .no_worker_grace_ms = cfg->no_worker_grace_ms,
        .max_queued_jobs = cfg->max_queued_jobs,
        .max_workers = cfg->max_workers,
    };
}

/* Housekeeping often enough for heartbeats, liveness and the grace period to be kept to within
 * a fraction of their own length (seconds). */
static double orch_tick_s(const struct itsd_config *cfg)
{
    uint32_t tick_ms = cfg->heartbeat_ms / 2;
    if (tick_ms > 100)
        tick_ms = 100;
    if (tick_ms < 5)
        tick_ms = 5;
    return tick_ms / 1000.0;
}

int orch_load_templates(const struct itsd_config *cfg, struct templates **out, char *err,
                        size_t err_len)
{
    const char *paths[PROTO_ROLE_COUNT];
    for (int r = 0; r < PROTO_ROLE_COUNT; r++)
        paths[r] = cfg->template_file[r][0] ? cfg->template_file[r] : NULL;
    return templates_load(cfg->templates, paths, out, err, err_len);
}

/* ---- timers and signals ---------------------------------------------------------------------- */

static void orch_on_tick(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    struct orch *o = w->data;
    uint64_t now = orch_now_ms();
    dispatch_tick(o->d, now);
    frontend_tick(o->fe);
    if (o->n_live)
        orch_live_expire(o, now);
    if (o->stopping && frontend_running(o->fe) == 0 && frontend_queued(o->fe) == 0)
        ev_break(loop, EVBREAK_ALL);
}

static void orch_on_drain_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    struct orch *o = w->data;
    ITSD_INFO("shutdown: %u requests still running after %u ms: ending them",
              frontend_running(o->fe), o->cfg.shutdown_ms);
    frontend_finish_all(o->fe, PROTO_ERR_SHUTTING_DOWN,
                        "itsd shut down before the request finished");
    ev_break(loop, EVBREAK_ALL);
}

static void orch_on_signal(struct ev_loop *loop, ev_signal *w, int revents)
{
    (void)revents;
    struct orch *o = w->data;
    if (o->stopping) {
        ITSD_INFO("second signal: ending %u running requests now", frontend_running(o->fe));
        frontend_finish_all(o->fe, PROTO_ERR_SHUTTING_DOWN,
                            "itsd shut down before the request finished");
        ev_break(loop, EVBREAK_ALL);
        return;
    }
    o->stopping = true;
#if ITS_HAVE_SYSTEMD
    sd_notify(0, "STOPPING=1");
#endif
    ITSD_INFO("%s: shutting down; %u requests running get up to %u ms",
              w->signum == SIGINT ? "SIGINT" : "SIGTERM", frontend_running(o->fe),
              o->cfg.shutdown_ms);
    frontend_stop_accepting(o->fe);
    if (frontend_running(o->fe) == 0) {
        ev_break(loop, EVBREAK_ALL);
        return;
    }
    ev_timer_init(&o->drain, orch_on_drain_timeout, o->cfg.shutdown_ms / 1000.0, 0.0);
    o->drain.data = o;
    ev_timer_start(loop, &o->drain);
}

/* ---- reload (SIGHUP) ------------------------------------------------------------------------ */

#define ORCH_RELOAD_ERR_BYTES 16384 /* problem lines of one reload */
#define ORCH_RELOAD_LIST_BYTES 4096 /* "[section] key, ..." lists */

/* Logs each line of `text` as one error line, with `suffix` appended. Returns the count. */
static int orch_log_problems(const char *text, const char *suffix)
{
    int n = 0;
    for (const char *p = text; *p;) {
        const char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        if (len > 0) {
            ITSD_ERROR("reload: %.*s%s", (int)len, p, suffix);
            n++;
        }
        p += len + (nl ? 1 : 0);
    }
    return n;
}

/* Appends `item` to the ", "-separated list in buf. */
static void orch_list_add(char *buf, size_t len, const char *item)
{
    size_t used = strnlen(buf, len - 1);
    snprintf(buf + used, len - used, "%s%s", used ? ", " : "", item);
}

/* Tells systemd a reload began (systemd >= 253 wants the CLOCK_MONOTONIC time with it, and
 * older ones ignore the field), or ended. */
static void orch_notify_reload(bool begin)
{
#if ITS_HAVE_SYSTEMD
    if (begin) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        sd_notifyf(0, "RELOADING=1\nMONOTONIC_USEC=%llu",
                   (unsigned long long)ts.tv_sec * 1000000ull +
                       (unsigned long long)ts.tv_nsec / 1000u);
    } else {
        sd_notify(0, "READY=1");
    }
#else
    (void)begin;
#endif
}

/* Reads the configuration again the way it was read at start (defaults, --config FILE, the
 * flags of the command line over it), checks it and the templates and key lists it names as
 * `itsd -t` would, and then either applies every reloadable key at once or nothing at all.
 * Every fallible step (parsing, checks, loading templates and key lists, allocations) comes
 * before the first change; what follows cannot fail. */
static void orch_reload(struct orch *o)
{
    orch_notify_reload(true);
    struct itsd_config *next = malloc(sizeof *next);
    struct itsd_config *merged = malloc(sizeof *merged);
    char *err = calloc(1, ORCH_RELOAD_ERR_BYTES);
    char *changed = calloc(1, ORCH_RELOAD_LIST_BYTES);
    char *restart = calloc(1, ORCH_RELOAD_LIST_BYTES);
    struct templates *tpl = NULL;
    struct zap_staged *keys = NULL;
    const char *from = "(defaults and flags)";
    int problems = 0;
    if (!next || !merged || !err || !changed || !restart) {
        ITSD_ERROR("reload: out of memory");
        problems = 1;
        goto refuse;
    }
    struct itsd_args args;
    int bad = itsd_config_from_args(o->argc, o->argv, next, &args, err, ORCH_RELOAD_ERR_BYTES);
    if (args.config_path)
        from = args.config_path;
    if (bad != 0) {
        problems = orch_log_problems(err, "");
        if (problems < -bad)
            problems = -bad; /* lines lost to a full buffer still count */
        goto refuse;
    }
    /* The daemon runs with the new live keys and the old restart-only ones: a rule spanning
     * both kinds (curve and the key lists, say) must hold for that mixture too. */
    *merged = o->cfg;
    int n_changed = itsd_config_apply_reloadable(merged, next, changed, ORCH_RELOAD_LIST_BYTES,
                                                 restart, ORCH_RELOAD_LIST_BYTES);
    err[0] = '\0';
    bad = itsd_config_check(merged, err, ORCH_RELOAD_ERR_BYTES);
    if (bad != 0) {
        problems = orch_log_problems(err, " (with the settings that need a restart kept as "
                                          "they run)");
        if (problems < -bad)
            problems = -bad;
        goto refuse;
    }
    err[0] = '\0';
    if (orch_load_templates(merged, &tpl, err, ORCH_RELOAD_ERR_BYTES) != 0) {
        ITSD_ERROR("reload: templates: %s", err);
        problems = 1;
        goto refuse;
    }
    err[0] = '\0';
    if (o->zap && zap_reload_stage(o->zap, merged->client_keys, merged->worker_keys, &keys, err,
                                   ORCH_RELOAD_ERR_BYTES) != 0) {
        ITSD_ERROR("reload: %s", err);
        problems = 1;
        goto refuse;
    }
    /* which templates changed, said before the old ones may go */
    const struct templates *old_tpl = frontend_templates(o->fe);
    for (int r = 0; r < PROTO_ROLE_COUNT; r++) {
        if (templates_same(old_tpl, tpl, (enum proto_role)r))
            continue;
        char item[64];
        snprintf(item, sizeof item, "%s template", proto_role_name((enum proto_role)r));
        orch_list_add(changed, ORCH_RELOAD_LIST_BYTES, item);
        n_changed++;
    }
    if (frontend_set_templates(o->fe, &tpl) != 0) {
        ITSD_ERROR("reload: out of memory");
        problems = 1;
        goto refuse;
    }
    /* ---- nothing below can fail ---- */
    if (keys)
        zap_reload_commit(o->zap, &keys);
    bool tick_changed = orch_tick_s(&o->cfg) != orch_tick_s(merged);
    int old_level = itsd_log_level;
    o->cfg = *merged;
    struct dispatch_config dc;
    orch_dispatch_config(&o->cfg, &dc);
    dispatch_reconfigure(o->d, &dc);
    if (tick_changed) {
        ev_timer_stop(o->loop, &o->tick);
        ev_timer_set(&o->tick, orch_tick_s(&o->cfg), orch_tick_s(&o->cfg));
        ev_timer_start(o->loop, &o->tick);
    }
    frontend_reconfigured(o->fe); /* may start queued requests: after everything is in place */
    o->c.reloads++;
    for (const char *p = restart; *p;) {
        const char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        if (len > 0)
            ITSD_WARN("reload: %.*s", (int)len, p);
        p += len + (nl ? 1 : 0);
    }
    /* said at the more talkative of the two levels, so that a reload that quiets the log
     * still reports itself */
    itsd_log_level = old_level > o->cfg.log_level ? old_level : o->cfg.log_level;
    if (o->zap)
        ITSD_INFO("SIGHUP: allow-lists reloaded: %zu client keys, %zu worker keys",
                  zap_client_keys(o->zap), zap_worker_keys(o->zap));
    ITSD_INFO("configuration reloaded from %s: %s%s; %u requests running, %u queued", from,
              n_changed ? "changed " : "no change", changed, frontend_running(o->fe),
              frontend_queued(o->fe));
    itsd_log_level = o->cfg.log_level;
    goto done;
refuse:
    o->c.refused_reloads++;
    if (o->zap)
        ITSD_ERROR("reload refused: %d problem%s, old configuration kept (keeping the old "
                   "allow-lists: %zu client keys, %zu worker keys)",
                   problems, problems == 1 ? "" : "s", zap_client_keys(o->zap),
                   zap_worker_keys(o->zap));
    else
        ITSD_ERROR("reload refused: %d problem%s, old configuration kept", problems,
                   problems == 1 ? "" : "s");
done:
    zap_staged_destroy(&keys);
    templates_destroy(&tpl);
    free(next);
    free(merged);
    free(err);
    free(changed);
    free(restart);
    orch_notify_reload(false);
}

static void orch_on_hup(struct ev_loop *loop, ev_signal *w, int revents)
{
    (void)loop;
    (void)revents;
    struct orch *o = w->data;
    if (o->stopping) {
        ITSD_WARN("SIGHUP while shutting down: not reloading");
        return;
    }
    orch_reload(o);
}

#if ITS_HAVE_SYSTEMD
static void orch_on_watchdog(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)w;
    (void)revents;
    sd_notify(0, "WATCHDOG=1");
}
#endif

/* ---- setup ----------------------------------------------------------------------------------- */

static int orch_setopt_int(void *sock, int opt, int value, const char *what, char *err,
                           size_t err_len)
{
    if (zmq_setsockopt(sock, opt, &value, sizeof value) != 0) {
        snprintf(err, err_len, "%s: zmq_setsockopt(%d): %s", what, opt, zmq_strerror(errno));
        return -1;
    }
    return 0;
}

/* A ROUTER with the options both sides share; a CURVE server when secret_key is not NULL. */
static void *orch_router(struct orch *o, const char *what, const uint8_t *secret_key, char *err,
                         size_t err_len)
{
    void *s = zmq_socket(o->zctx, ZMQ_ROUTER);
    if (!s) {
        snprintf(err, err_len, "%s: zmq_socket: %s", what, zmq_strerror(errno));
        return NULL;
    }
    int64_t maxmsg = PROTO_MAX_MESSAGE_BYTES;
    int hwm = o->cfg.hwm > INT32_MAX ? INT32_MAX : (int)o->cfg.hwm;
    if (orch_setopt_int(s, ZMQ_ROUTER_MANDATORY, 1, what, err, err_len) != 0 ||
        /* a peer reconnecting under the same routing id (a restarted worker) takes over */
        orch_setopt_int(s, ZMQ_ROUTER_HANDOVER, 1, what, err, err_len) != 0 ||
        orch_setopt_int(s, ZMQ_SNDHWM, hwm, what, err, err_len) != 0 ||
        orch_setopt_int(s, ZMQ_RCVHWM, hwm, what, err, err_len) != 0 ||
        orch_setopt_int(s, ZMQ_LINGER, (int)o->cfg.linger_ms, what, err, err_len) != 0) {
        zmq_close(s);
        return NULL;
    }
    if (zmq_setsockopt(s, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg) != 0) {
        snprintf(err, err_len, "%s: ZMQ_MAXMSGSIZE: %s", what, zmq_strerror(errno));
        zmq_close(s);
        return NULL;
    }
    if (secret_key) {
        /* the ZAP domain is how the handler tells the client list from the worker list */
        const char *domain = strcmp(what, "frontend") == 0 ? ZAP_DOMAIN_CLIENTS
                                                           : ZAP_DOMAIN_WORKERS;
        if (orch_setopt_int(s, ZMQ_CURVE_SERVER, 1, what, err, err_len) != 0 ||
            zmq_setsockopt(s, ZMQ_CURVE_SECRETKEY, secret_key, ZAP_KEY_BYTES) != 0 ||
            zmq_setsockopt(s, ZMQ_ZAP_DOMAIN, domain, strlen(domain)) != 0) {
            if (!err[0])
                snprintf(err, err_len, "%s: CURVE options: %s", what, zmq_strerror(errno));
            zmq_close(s);
            return NULL;
        }
    }
    return s;
}

int orch_new(const struct itsd_config *config, struct templates **tpl, int argc, char **argv,
             struct orch **out, char *err, size_t err_len)
{
    *out = NULL;
    struct orch *o = calloc(1, sizeof *o);
    if (!o) {
        snprintf(err, err_len, "out of memory");
        return PROTO_ERR_NO_MEMORY;
    }
    o->cfg = *config;
    o->argc = argc;
    o->argv = argv;
    const struct itsd_config *cfg = &o->cfg;
    int rc = PROTO_ERR_INTERNAL;
    o->loop = ev_default_loop(EVFLAG_AUTO);
    if (!o->loop) {
        snprintf(err, err_len, "libev: cannot create the event loop");
        goto fail;
    }
    struct sigaction sa = {.sa_handler = SIG_IGN};
    sigaction(SIGPIPE, &sa, NULL);
    o->zctx = zmq_ctx_new();
    if (!o->zctx) {
        snprintf(err, err_len, "zmq_ctx_new: %s", zmq_strerror(errno));
        goto fail;
    }
    uint8_t public_key[ZAP_KEY_BYTES], secret_key[ZAP_KEY_BYTES];
    if (cfg->curve) {
        char why[1200];
        if (keyfile_read(cfg->secret_key, public_key, secret_key, why, sizeof why) != 0) {
            snprintf(err, err_len, "[security] secret_key: %s", why);
            goto fail;
        }
        /* the handler first: a CURVE socket with no handler would admit anyone */
        if (zap_new(o->zctx, cfg->client_keys, cfg->worker_keys, &o->zap, err, err_len) != 0) {
            memset(secret_key, 0, sizeof secret_key);
            goto fail;
        }
    }
    o->front = orch_router(o, "frontend", cfg->curve ? secret_key : NULL, err, err_len);
    o->back = o->front ? orch_router(o, "backend", cfg->curve ? secret_key : NULL, err, err_len)
                       : NULL;
    memset(secret_key, 0, sizeof secret_key);
    if (!o->back)
        goto fail;
    if (o->zap) {
        char z85[ZAP_Z85_LEN + 1] = "?";
        zmq_z85_encode(z85, public_key, ZAP_KEY_BYTES);
        ITSD_INFO("CURVE on: server key %s; %zu client keys (%s), %zu worker keys (%s)", z85,
                  zap_client_keys(o->zap), cfg->client_keys, zap_worker_keys(o->zap),
                  cfg->worker_keys);
    } else {
        ITSD_INFO("CURVE off: plain text on %s and %s", cfg->frontend, cfg->backend);
    }
    if (cfg->client_heartbeat_ms > 0) {
        int ivl = (int)cfg->client_heartbeat_ms, timeout = (int)cfg->client_timeout_ms;
        if (orch_setopt_int(o->front, ZMQ_HEARTBEAT_IVL, ivl, "frontend", err, err_len) != 0 ||
            orch_setopt_int(o->front, ZMQ_HEARTBEAT_TIMEOUT, timeout, "frontend", err,
                            err_len) != 0 ||
            orch_setopt_int(o->front, ZMQ_HEARTBEAT_TTL, timeout, "frontend", err, err_len) !=
                0)
            goto fail;
    }
    /* the monitor first, so that no connection's events are missed */
    char mon_ep[64];
    snprintf(mon_ep, sizeof mon_ep, "inproc://itsd-frontend-monitor-%p", (void *)o);
    if (zmq_socket_monitor(o->front, mon_ep, ZMQ_EVENT_DISCONNECTED) != 0) {
        snprintf(err, err_len, "frontend: zmq_socket_monitor: %s", zmq_strerror(errno));
        goto fail;
    }
    o->mon = zmq_socket(o->zctx, ZMQ_PAIR);
    if (!o->mon || orch_setopt_int(o->mon, ZMQ_LINGER, 0, "monitor", err, err_len) != 0 ||
        zmq_connect(o->mon, mon_ep) != 0) {
        if (!err[0])
            snprintf(err, err_len, "frontend monitor: %s", zmq_strerror(errno));
        goto fail;
    }
    if (zmq_bind(o->front, cfg->frontend) != 0) {
        snprintf(err, err_len, "frontend %s: bind: %s", cfg->frontend, zmq_strerror(errno));
        goto fail;
    }
    if (zmq_bind(o->back, cfg->backend) != 0) {
        snprintf(err, err_len, "backend %s: bind: %s", cfg->backend, zmq_strerror(errno));
        goto fail;
    }
    struct dispatch_config dc;
    orch_dispatch_config(cfg, &dc);
    struct dispatch_ops dops = {.send = orch_dispatch_send, .job_failed = orch_dispatch_job_failed};
    rc = dispatch_new(&dc, &dops, o, &o->d);
    if (rc != 0) {
        snprintf(err, err_len, "dispatch: out of memory");
        goto fail;
    }
    struct frontend_ops fops = {.send = orch_frontend_send, .now_ms = orch_frontend_now,
                                .metrics = orch_frontend_metrics};
    rc = frontend_new(o->loop, cfg, tpl, o->d, &fops, o, &o->metrics, &o->fe, err, err_len);
    if (rc != 0)
        goto fail;
    rc = PROTO_ERR_INTERNAL;
    o->metrics.start_time_s = (double)time(NULL);
    /* bound before READY=1 like the ZeroMQ sockets: a scraper may rely on it being there */
    if (cfg->metrics_listen[0]) {
        if (metrics_http_start(o->loop, cfg->metrics_listen, orch_metrics_render, o, &o->http,
                               err, err_len) != 0)
            goto fail;
        ITSD_INFO("metrics: http://%s/metrics (port %u, plain HTTP)", cfg->metrics_listen,
                  metrics_http_port(o->http));
    }
    if (evzmq_new(o->loop, &o->ez) != 0) {
        snprintf(err, err_len, "out of memory");
        goto fail;
    }
    /* the monitor is drained before each frontend frame too; as its own member it also
     * catches disconnects while clients are silent */
    if ((o->zap && evzmq_add(o->ez, zap_socket(o->zap), zap_on_request, o->zap, err,
                             err_len) != 0) ||
        evzmq_add(o->ez, o->mon, orch_on_monitor, o, err, err_len) != 0 ||
        evzmq_add(o->ez, o->front, orch_on_frontend, o, err, err_len) != 0 ||
        evzmq_add(o->ez, o->back, orch_on_backend, o, err, err_len) != 0)
        goto fail;
    double tick_s = orch_tick_s(cfg);
    ev_timer_init(&o->tick, orch_on_tick, tick_s, tick_s);
    o->tick.data = o;
    ev_timer_start(o->loop, &o->tick);
    ev_signal_init(&o->sig_term, orch_on_signal, SIGTERM);
    ev_signal_init(&o->sig_int, orch_on_signal, SIGINT);
    ev_signal_init(&o->sig_hup, orch_on_hup, SIGHUP);
    o->sig_term.data = o->sig_int.data = o->sig_hup.data = o;
    ev_signal_start(o->loop, &o->sig_term);
    ev_signal_start(o->loop, &o->sig_int);
    ev_signal_start(o->loop, &o->sig_hup);
    ev_init(&o->drain, orch_on_drain_timeout);
    ev_init(&o->watchdog, NULL);
    *out = o;
    return 0;
fail:
    orch_destroy(&o);
    return rc;
}

int orch_run(struct orch *o)
{
    ITSD_INFO("serving: frontend %s, backend %s, heartbeat %u ms x %u", o->cfg.frontend,
              o->cfg.backend, o->cfg.heartbeat_ms, o->cfg.liveness);
#if ITS_HAVE_SYSTEMD
    sd_notify(0, "READY=1");
    uint64_t usec = 0;
    if (sd_watchdog_enabled(0, &usec) > 0 && usec > 0) {
        ev_timer_init(&o->watchdog, orch_on_watchdog, usec / 2e6, usec / 2e6);
        ev_timer_start(o->loop, &o->watchdog);
    }
#endif
    /* the first heartbeat round and queue check right away */
    dispatch_tick(o->d, orch_now_ms());
    ev_run(o->loop, 0);
    /* requests that were still running (a signal while draining) end now */
    if (o->fe)
        frontend_finish_all(o->fe, PROTO_ERR_SHUTTING_DOWN,
                            "itsd shut down before the request finished");
    const struct dispatch_counters *dc = dispatch_counters(o->d);
    const struct frontend_counters *fc = frontend_counters(o->fe);
    ITSD_INFO("stopped: requests %llu accepted, %llu completed, %llu failed, %llu cancelled, "
              "%llu rejected; jobs %llu started, %llu retried, %llu failed; workers %llu "
              "registered, %llu lost; frames %llu/%llu bad from clients, %llu/%llu bad from "
              "workers; sends %llu unroutable, %llu dropped; reloads %llu applied, %llu refused",
              (unsigned long long)fc->accepted, (unsigned long long)fc->completed,
              (unsigned long long)fc->failed, (unsigned long long)fc->cancelled,
              (unsigned long long)fc->rejected, (unsigned long long)dc->jobs_started,
              (unsigned long long)dc->jobs_retried, (unsigned long long)dc->jobs_failed,
              (unsigned long long)dc->workers_registered, (unsigned long long)dc->workers_lost,
              (unsigned long long)o->c.bad_client_frames, (unsigned long long)o->c.client_frames,
              (unsigned long long)(o->c.bad_worker_frames + o->c.unregistered_worker_frames),
              (unsigned long long)o->c.worker_frames, (unsigned long long)o->c.unroutable_sends,
              (unsigned long long)o->c.dropped_sends, (unsigned long long)o->c.reloads,
              (unsigned long long)o->c.refused_reloads);
    if (o->zap) {
        const struct zap_counters *zc = zap_counters(o->zap);
        ITSD_INFO("security: handshakes %llu accepted, %llu refused (%llu refusal lines held "
                  "back), %llu malformed; %llu frames of revoked keys; %llu submits over "
                  "max_requests_per_client; allow-list reloads %llu, %llu failed",
                  (unsigned long long)zc->accepted, (unsigned long long)zc->refused,
                  (unsigned long long)zc->refusals_suppressed,
                  (unsigned long long)zc->malformed, (unsigned long long)o->c.revoked_frames,
                  (unsigned long long)o->c.over_client_limit, (unsigned long long)zc->reloads,
                  (unsigned long long)zc->failed_reloads);
    }
    return 0;
}

void orch_destroy(struct orch **op)
{
    if (!op || !*op)
        return;
    struct orch *o = *op;
    metrics_http_stop(&o->http);
    frontend_destroy(&o->fe); /* cancel_job for whatever still ran goes out first */
    dispatch_destroy(&o->d);
    evzmq_destroy(&o->ez);
    if (o->loop) {
        ev_timer_stop(o->loop, &o->tick);
        ev_timer_stop(o->loop, &o->drain);
        ev_timer_stop(o->loop, &o->watchdog);
        ev_signal_stop(o->loop, &o->sig_term);
        ev_signal_stop(o->loop, &o->sig_int);
        ev_signal_stop(o->loop, &o->sig_hup);
    }
    if (o->front)
        zmq_socket_monitor(o->front, NULL, 0);
    if (o->mon)
        zmq_close(o->mon);
    if (o->front)
        zmq_close(o->front);
    if (o->back)
        zmq_close(o->back);
    zap_destroy(&o->zap);
    free(o->live);
    if (o->zctx)
        zmq_ctx_term(o->zctx);
    if (o->loop)
        ev_loop_destroy(o->loop);
    free(o);
    *op = NULL;
}
