/* metrics_http.c — see metrics_http.h.
 *
 * MHD's external-polling contract: after every MHD_run, ask MHD_get_timeout; when it says a
 * timeout applies, MHD_run must be called again within it whether or not a descriptor became
 * ready (connection timeouts, data MHD already holds). The ev_io on MHD's epoll descriptor is
 * level-triggered in libev, so events MHD leaves unprocessed wake the loop again. The access
 * handler answers on its first call for every request: a GET has no body to wait for, and a
 * request with a body to a path we do not serve needs none of it read.
 */
#include "metrics_http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "itsd_log.h"

#define METRICS_HTTP_CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"
#define METRICS_HTTP_BACKLOG 64
#define METRICS_HTTP_CONN_MEMORY 32768 /* per connection: headers of a GET, nothing more */

struct metrics_http {
    struct ev_loop *loop;
    struct MHD_Daemon *mhd;
    ev_io io;
    ev_timer timer;
    metrics_http_render_fn render;
    void *ctx;
    char addr[128];
    unsigned port;
    struct metrics_http_counters counters;
};

/* ---- the address ----------------------------------------------------------------------- */

int metrics_http_parse_listen(const char *addr, void *ssp, size_t *ss_len, char *err,
                              size_t err_len)
{
    struct sockaddr_storage *ss = ssp;
    memset(ss, 0, sizeof *ss);
    const char *colon = strrchr(addr, ':');
    if (!colon || colon == addr) {
        snprintf(err, err_len, "'%s' is not HOST:PORT (an IPv4 address, or an IPv6 address in "
                 "brackets: [::1]:9464)", addr);
        return -1;
    }
    const char *host = addr;
    size_t host_len = (size_t)(colon - addr);
    bool v6 = false;
    if (host[0] == '[') {
        if (host_len < 2 || host[host_len - 1] != ']') {
            snprintf(err, err_len, "'%s': an IPv6 address needs brackets: [ADDR]:PORT", addr);
            return -1;
        }
        host++;
        host_len -= 2;
        v6 = true;
    }
    char h[INET6_ADDRSTRLEN + 1];
    if (host_len == 0 || host_len >= sizeof h) {
        snprintf(err, err_len, "'%s': no address before the port", addr);
        return -1;
    }
    memcpy(h, host, host_len);
    h[host_len] = '\0';
    const char *p = colon + 1;
    unsigned long port = 0;
    if (!*p || strlen(p) > 5) {
        snprintf(err, err_len, "'%s': the port must be a number 0..65535", addr);
        return -1;
    }
    for (; *p; p++) {
        if (*p < '0' || *p > '9') {
            snprintf(err, err_len, "'%s': the port must be a number 0..65535", addr);
            return -1;
        }
        port = port * 10 + (unsigned long)(*p - '0');
    }
    if (port > 65535) {
        snprintf(err, err_len, "'%s': port %lu is above 65535", addr, port);
        return -1;
    }
    if (v6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
        if (inet_pton(AF_INET6, h, &a->sin6_addr) != 1) {
            snprintf(err, err_len, "'%s': '%s' is not an IPv6 address", addr, h);
            return -1;
        }
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)port);
        *ss_len = sizeof *a;
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)ss;
        if (inet_pton(AF_INET, h, &a->sin_addr) != 1) {
            snprintf(err, err_len, "'%s': '%s' is not an IPv4 address (an IPv6 one goes in "
                     "brackets; host names are not resolved)", addr, h);
            return -1;
        }
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)port);
        *ss_len = sizeof *a;
    }
    return 0;
}

/* ---- requests -------------------------------------------------------------------------- */

static enum MHD_Result metrics_http_static(struct MHD_Connection *conn, unsigned status,
                                           const char *text, const char *allow)
{
    struct MHD_Response *resp = MHD_create_response_from_buffer(strlen(text), (void *)text,
                                                                MHD_RESPMEM_PERSISTENT);
    if (!resp)
        return MHD_NO; /* MHD closes the connection */
    enum MHD_Result rc = MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE,
                                                 "text/plain; charset=utf-8");
    if (rc == MHD_YES && allow)
        rc = MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, allow);
    if (rc == MHD_YES)
        rc = MHD_queue_response(conn, status, resp);
    MHD_destroy_response(resp);
    return rc;
}

static enum MHD_Result metrics_http_on_request(void *cls, struct MHD_Connection *conn,
                                               const char *url, const char *method,
                                               const char *version, const char *upload_data,
                                               size_t *upload_data_size, void **req_cls)
{
    (void)version;
    (void)upload_data;
    (void)upload_data_size;
    (void)req_cls;
    struct metrics_http *h = cls;
    if (strcmp(url, "/metrics") != 0) {
        h->counters.not_found++;
        return metrics_http_static(conn, MHD_HTTP_NOT_FOUND,
                                   "not found: itsd serves only /metrics\n", NULL);
    }
    bool head = strcmp(method, MHD_HTTP_METHOD_HEAD) == 0;
    if (!head && strcmp(method, MHD_HTTP_METHOD_GET) != 0) {
        h->counters.bad_method++;
        return metrics_http_static(conn, MHD_HTTP_METHOD_NOT_ALLOWED,
                                   "method not allowed: /metrics takes GET (or HEAD)\n",
                                   "GET, HEAD");
    }
    char *body = NULL;
    size_t len = 0;
    if (h->render(h->ctx, &body, &len) != 0 || !body) {
        free(body);
        h->counters.failed++;
        ITSD_WARN("metrics: cannot render the metrics (out of memory)");
        return metrics_http_static(conn, MHD_HTTP_INTERNAL_SERVER_ERROR,
                                   "itsd could not render its metrics (out of memory)\n", NULL);
    }
    /* MHD frees the body with free() once it is sent (or the connection is gone) */
    struct MHD_Response *resp = MHD_create_response_from_buffer(len, body,
                                                                MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(body);
        h->counters.failed++;
        return MHD_NO;
    }
    enum MHD_Result rc = MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE,
                                                 METRICS_HTTP_CONTENT_TYPE);
    if (rc == MHD_YES)
        rc = MHD_queue_response(conn, MHD_HTTP_OK, resp);
    MHD_destroy_response(resp);
    if (rc == MHD_YES)
        h->counters.ok++;
    else
        h->counters.failed++;
    return rc;
}

static void metrics_http_log(void *cls, const char *fmt, va_list ap)
{
    struct metrics_http *h = cls;
    char line[512];
    vsnprintf(line, sizeof line, fmt, ap);
    size_t n = strlen(line);
    while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
        line[--n] = '\0';
    ITSD_DEBUG("metrics %s: libmicrohttpd: %s", h->addr, line);
}

/* ---- the loop -------------------------------------------------------------------------- */

/* Runs MHD and re-arms the timer from MHD_get_timeout. */
static void metrics_http_run(struct metrics_http *h)
{
    if (MHD_run(h->mhd) != MHD_YES)
        ITSD_WARN("metrics %s: MHD_run failed", h->addr);
    ev_timer_stop(h->loop, &h->timer);
    MHD_UNSIGNED_LONG_LONG ms = 0;
    if (MHD_get_timeout(h->mhd, &ms) == MHD_YES) {
        ev_timer_set(&h->timer, (double)ms / 1000.0, 0.0);
        ev_timer_start(h->loop, &h->timer);
    }
}

static void metrics_http_on_io(struct ev_loop *loop, ev_io *w, int revents)
{
    (void)loop;
    (void)revents;
    metrics_http_run(w->data);
}

static void metrics_http_on_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    metrics_http_run(w->data);
}

/* ---- lifecycle ------------------------------------------------------------------------- */

int metrics_http_start(struct ev_loop *loop, const char *addr, metrics_http_render_fn render,
                       void *ctx, struct metrics_http **out, char *err, size_t err_len)
{
    *out = NULL;
    struct sockaddr_storage ss;
    size_t ss_len = 0;
    char why[256];
    if (metrics_http_parse_listen(addr, &ss, &ss_len, why, sizeof why) != 0) {
        snprintf(err, err_len, "metrics_listen: %s", why);
        return -1;
    }
    struct metrics_http *h = calloc(1, sizeof *h);
    if (!h) {
        snprintf(err, err_len, "metrics_listen %s: out of memory", addr);
        return -1;
    }
    h->loop = loop;
    h->render = render;
    h->ctx = ctx;
    snprintf(h->addr, sizeof h->addr, "%s", addr);
    ev_init(&h->io, metrics_http_on_io);
    ev_init(&h->timer, metrics_http_on_timer);
    h->io.data = h->timer.data = h;

    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, err_len, "metrics_listen %s: socket: %s", addr, strerror(errno));
        goto fail;
    }
    int one = 1;
    /* a restarted itsd rebinds at once, past the old connections in TIME_WAIT */
    (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (ss.ss_family == AF_INET6) /* [::]:P means IPv6 only; bind 0.0.0.0 for IPv4 */
        (void)setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&ss, (socklen_t)ss_len) != 0) {
        snprintf(err, err_len, "metrics_listen %s: bind: %s", addr, strerror(errno));
        close(fd);
        goto fail;
    }
    if (listen(fd, METRICS_HTTP_BACKLOG) != 0) {
        snprintf(err, err_len, "metrics_listen %s: listen: %s", addr, strerror(errno));
        close(fd);
        goto fail;
    }
    struct sockaddr_storage bound;
    socklen_t bound_len = sizeof bound;
    if (getsockname(fd, (struct sockaddr *)&bound, &bound_len) == 0)
        h->port = ntohs(bound.ss_family == AF_INET6
                            ? ((struct sockaddr_in6 *)&bound)->sin6_port
                            : ((struct sockaddr_in *)&bound)->sin_port);
    unsigned flags = MHD_USE_EPOLL | MHD_USE_ERROR_LOG;
    if (ss.ss_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    /* From here MHD owns fd: it closes it in MHD_stop_daemon. Should the start itself fail,
     * fd is left to the exit that follows (MHD may or may not have closed it, and closing a
     * number that another thread has reused would be worse than a leak). */
    h->mhd = MHD_start_daemon(flags, 0, NULL, NULL, metrics_http_on_request, h,
                              MHD_OPTION_LISTEN_SOCKET, (MHD_socket)fd,
                              MHD_OPTION_CONNECTION_LIMIT,
                              (unsigned int)METRICS_HTTP_MAX_CONNECTIONS,
                              MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)METRICS_HTTP_TIMEOUT_S,
                              MHD_OPTION_CONNECTION_MEMORY_LIMIT,
                              (size_t)METRICS_HTTP_CONN_MEMORY,
                              MHD_OPTION_EXTERNAL_LOGGER, metrics_http_log, h, MHD_OPTION_END);
    if (!h->mhd) {
        snprintf(err, err_len, "metrics_listen %s: libmicrohttpd did not start (see the log)",
                 addr);
        goto fail;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(h->mhd, MHD_DAEMON_INFO_EPOLL_FD);
    if (!info || info->epoll_fd < 0) {
        snprintf(err, err_len, "metrics_listen %s: libmicrohttpd has no epoll descriptor",
                 addr);
        goto fail;
    }
    ev_io_set(&h->io, info->epoll_fd, EV_READ);
    ev_io_start(loop, &h->io);
    metrics_http_run(h); /* arms the timer if MHD wants one */
    *out = h;
    return 0;
fail:
    metrics_http_stop(&h);
    return -1;
}

unsigned metrics_http_port(const struct metrics_http *h)
{
    return h->port;
}

const struct metrics_http_counters *metrics_http_counters(const struct metrics_http *h)
{
    return &h->counters;
}

void metrics_http_stop(struct metrics_http **hp)
{
    if (!hp || !*hp)
        return;
    struct metrics_http *h = *hp;
    if (h->loop) {
        ev_io_stop(h->loop, &h->io);
        ev_timer_stop(h->loop, &h->timer);
    }
    if (h->mhd)
        MHD_stop_daemon(h->mhd);
    free(h);
    *hp = NULL;
}
