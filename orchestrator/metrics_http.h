/* metrics_http.h — itsd's plain-HTTP metrics endpoint: GET /metrics answers with the text a
 * callback renders (Prometheus format 0.0.4); any other path is 404, any other method 405.
 *
 * libmicrohttpd runs inside itsd's libev loop, on its thread, with no lock: MHD in external
 * polling mode with epoll; an ev_io watches MHD's epoll descriptor and an ev_timer follows
 * MHD_get_timeout, and MHD_run is called when either fires. The listening socket is made here
 * (so that a bind failure can name the address and the reason) and handed to MHD, which then
 * owns it. Owns the MHD daemon, its connections and the two watchers. Never blocks: a
 * slow or idle client is cut off after a timeout, and connections are capped.
 */
#ifndef ITS_METRICS_HTTP_H
#define ITS_METRICS_HTTP_H

#include <ev.h>
#include <stddef.h>

#define METRICS_HTTP_MAX_CONNECTIONS 16 /* a scraper or two, plus curl by hand */
#define METRICS_HTTP_TIMEOUT_S 10       /* an idle or stalled connection is closed after it */

/* Renders the body of GET /metrics. Returns 0 with *body a malloc'd buffer of *len bytes
 * (freed by the server once sent), or negative (the client gets 500). */
typedef int (*metrics_http_render_fn)(void *ctx, char **body, size_t *len);

struct metrics_http;

/* Parses "HOST:PORT" where HOST is an IPv4 literal or a bracketed IPv6 literal
 * ("[::1]:9464") and PORT is 0..65535 (0: the kernel picks one). Fills *ss (a sockaddr_in
 * or sockaddr_in6 in a struct sockaddr_storage, passed as void * to keep socket headers out
 * of this one) and *ss_len. Returns 0, or -1 with err saying what is wrong. */
int metrics_http_parse_listen(const char *addr, void *ss, size_t *ss_len, char *err,
                              size_t err_len);

/* Binds `addr` (as metrics_http_parse_listen reads it) and serves on `loop`. `render` is
 * called, with ctx, for every GET /metrics. Returns 0 with *out set, or -1 with err naming
 * the address and the failure ("metrics_listen 127.0.0.1:9464: bind: Address already in
 * use"). */
int metrics_http_start(struct ev_loop *loop, const char *addr, metrics_http_render_fn render,
                       void *ctx, struct metrics_http **out, char *err, size_t err_len);

/* The port actually bound (useful with port 0). */
unsigned metrics_http_port(const struct metrics_http *h);

/* Requests answered so far, by status: 200, 404, 405, and every other one. */
struct metrics_http_counters {
    unsigned long long ok, not_found, bad_method, failed;
};
const struct metrics_http_counters *metrics_http_counters(const struct metrics_http *h);

/* Stops the watchers and the server (open connections are closed). NULL-safe; clears *h. */
void metrics_http_stop(struct metrics_http **h);

#endif
