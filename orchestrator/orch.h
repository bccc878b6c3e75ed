/* orch.h — the itsd daemon assembled: one libev loop owning the ZeroMQ frontend (clients) and
 * backend (workers) ROUTER sockets, the frontend socket's monitor (to notice vanished
 * clients), the dispatcher and the frontend, the housekeeping timer, signals (SIGTERM/SIGINT
 * drain, SIGHUP reloads the configuration) and the systemd notifications.
 *
 * Owns the running configuration (a copy), the loop, the ZeroMQ context and sockets, and
 * every module instance. Reads and
 * decodes every frame itself, answers what cannot be decoded with an error naming the
 * problem (counted), and hands decoded messages on. Never exits the process and never lets a
 * peer's bytes crash it; logs through itsd_log.
 */
#ifndef ITS_ORCH_H
#define ITS_ORCH_H

#include <stddef.h>

#include "itsd_config.h"

struct templates;
struct orch;

/* Loads the role templates `cfg` names (an empty per-role file means TEMPLATES/<role>.tmpl).
 * Returns 0 with *out set, or templates_load's negative code with err naming file:line. */
int orch_load_templates(const struct itsd_config *cfg, struct templates **out, char *err,
                        size_t err_len);

/* Creates the loop, binds both sockets and sets up every watcher. *cfg is copied; *tpl (from
 * orch_load_templates) is taken and cleared on success; after an error the caller frees
 * whatever *tpl still holds.
 * argc/argv is the command line the configuration came from; it must outlive the daemon:
 * on SIGHUP the daemon reads the configuration again from it (defaults, --config FILE, the
 * flags over the file), checks it like `itsd -t`, and applies the keys marked reloadable in
 * itsd_config.c, or nothing when anything is wrong (docs/operations.md, "Changing the
 * configuration"). Returns 0 with *out set, or a negative enum proto_err with err saying what
 * failed (e.g. "frontend tcp://127.0.0.1:7700: bind: Address already in use"). */
int orch_new(const struct itsd_config *cfg, struct templates **tpl, int argc, char **argv,
             struct orch **out, char *err, size_t err_len);

/* Runs until SIGTERM/SIGINT: tells systemd READY=1 first, then serves (a reload sends
 * RELOADING=1 and READY=1 again). On the first signal
 * new requests are refused and running ones get shutdown_ms to finish; a second signal or
 * the end of that time ends them (partial results where possible). Returns 0. */
int orch_run(struct orch *o);

/* Frees everything; unsent messages get linger_ms. NULL-safe; clears *o. */
void orch_destroy(struct orch **o);

#endif
