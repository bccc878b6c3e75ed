/* itsd_config.h — itsd's configuration: defaults, an INI file (inih) and command-line flags
 * that override it, all driven by one table in itsd_config.c that also writes the reference
 * documentation (`itsd --print-config`, docs/configuration.md, configs/itsd.conf).
 *
 * Each key is marked reloadable (SIGHUP applies it to the running daemon) or restart-only in
 * the same table. Owns nothing beyond the struct it fills (fixed-size, no heap). Never prints,
 * never exits: every problem found is appended to the caller's buffer as one line naming
 * FILE:LINE and the key, or the flag, so that `itsd -t` can report all of them at once.
 */
#ifndef ITS_ITSD_CONFIG_H
#define ITS_ITSD_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "proto.h"

#define ITSD_CONFIG_PATH_MAX 1024 /* endpoints and paths, bytes with the NUL */

/* Where `templates` points when neither the file nor a flag sets it: the installed prompts.
 * A build may override it (-DITSD_TEMPLATES_DIR=...). */
#ifndef ITSD_TEMPLATES_DIR
#define ITSD_TEMPLATES_DIR "/usr/local/share/its/prompts"
#endif

/* [security] plaintext_nonloopback: what curve = off does on an endpoint other hosts can reach. */
enum itsd_plaintext {
    ITSD_PLAINTEXT_REFUSE = 0, /* itsd does not start (and -t fails) */
    ITSD_PLAINTEXT_FORCE = 1,  /* the operator knows: plain text on any endpoint */
};

/* Sampling defaults of one generating role (sections [instruct], [feedback], [edit]). */
struct itsd_config_sampling {
    double temperature;  /* 0 = greedy */
    double top_p;        /* (0, 1] */
    uint32_t top_k;      /* 0 = off */
    uint32_t max_tokens; /* new tokens per sample */
};

struct itsd_config {
    /* [itsd]: sockets, peers, logging */
    char frontend[ITSD_CONFIG_PATH_MAX]; /* ROUTER for clients, tcp:// or ipc:// */
    char backend[ITSD_CONFIG_PATH_MAX];  /* ROUTER for workers */
    char metrics_listen[ITSD_CONFIG_PATH_MAX]; /* HOST:PORT of the HTTP /metrics, "" = off */
    char templates[ITSD_CONFIG_PATH_MAX]; /* directory of <role>.tmpl */
    char template_file[PROTO_ROLE_COUNT][ITSD_CONFIG_PATH_MAX]; /* "" = templates/<role>.tmpl */
    int log_level;                 /* enum itsd_log_level */
    uint32_t heartbeat_ms;         /* itsd <-> worker heartbeat interval */
    uint32_t liveness;             /* missed intervals before a worker is dropped */
    uint32_t client_heartbeat_ms;  /* ZMTP heartbeat on client connections, 0 = off */
    uint32_t client_timeout_ms;    /* a client connection silent this long is closed */
    uint32_t hwm;                  /* ZeroMQ high-water mark (messages per peer) */
    uint32_t linger_ms;            /* how long unsent messages may delay exit */
    uint32_t shutdown_ms;          /* SIGTERM: time running requests get to finish */
    uint32_t max_workers;          /* registered workers at once */
    /* [limits] */
    uint32_t max_inflight;         /* requests running at once */
    uint32_t max_queued;           /* requests waiting to start; beyond: busy */
    uint32_t max_candidates;       /* candidates of one request (drafts x edits ...) */
    uint32_t max_sequences;        /* generated sequences of one request */
    uint32_t max_queued_jobs;      /* jobs waiting per role for a worker; beyond: busy */
    uint32_t default_deadline_ms;  /* when submit has no deadline_ms */
    uint32_t max_deadline_ms;      /* larger submit.deadline_ms values are cut to this */
    uint32_t no_worker_grace_ms;   /* a job waits this long for a worker of its role */
    uint32_t job_retries;          /* re-dispatches of a job after worker loss/failure */
    uint32_t keep_results;         /* finished requests kept for `get` */
    uint32_t keep_results_mib;     /* ... in at most this many MiB of encoded results */
    uint32_t result_ttl_ms;        /* ... and for how long */
    uint32_t progress_interval_ms; /* least time between two progress events of a request */
    uint32_t max_requests_per_client; /* live requests of one authenticated client, 0 = any */
    /* [pipeline]: defaults of every submit setting */
    uint32_t drafts, feedbacks, edits, feedbacks_per_edit;
    bool include_drafts;
    uint64_t seed; /* 0 = a fresh random seed per request */
    struct itsd_config_sampling instruct, feedback, edit;
    /* [security] (docs/security.md) */
    bool curve;                             /* CurveZMQ on both sockets */
    char secret_key[ITSD_CONFIG_PATH_MAX];  /* itsd's key pair file (itsctl keygen) */
    char client_keys[ITSD_CONFIG_PATH_MAX]; /* directory of *.pub (or one file) */
    char worker_keys[ITSD_CONFIG_PATH_MAX];
    int plaintext_nonloopback;              /* enum itsd_plaintext */
};

/* What the command line asked for besides configuration values. */
struct itsd_args {
    const char *config_path; /* --config FILE, NULL when absent (points into argv) */
    bool check_only;         /* -t: validate (config and templates) and exit */
    bool print_config;       /* --print-config: write the effective config as INI */
    bool print_docs;         /* --print-docs: write the option reference as Markdown */
    bool help;               /* -h / --help */
};

/* Sets every field to its default (the table's values). Returns 0; negative only if the
 * table itself is broken (a bug), with err naming the key. */
int itsd_config_defaults(struct itsd_config *cfg, char *err, size_t err_len);

/* Applies the INI file at `path` over *cfg. Relative paths in it are taken relative to the
 * file's directory. Every problem is appended to err as a line "PATH:LINE: [section] key:
 * reason" (unknown sections and keys, bad values, duplicates, syntax errors, and an
 * unreadable file as "PATH: ..."). Returns 0, or a negative count of problems. */
int itsd_config_load_file(struct itsd_config *cfg, const char *path, char *err, size_t err_len);

/* Sets the key whose flag is `flag` (without the leading "--", e.g. "heartbeat-ms") from the
 * text `value`. Returns 0, or -1 with a line "--flag: reason" appended to err. */
int itsd_config_set_flag(struct itsd_config *cfg, const char *flag, const char *value,
                         char *err, size_t err_len);

/* Checks the rules that span keys (deadline above the no-worker grace, endpoints distinct,
 * default pipeline within the limits, plain text only on loopback endpoints unless forced,
 * with curve on: libzmq's CURVE support and every key file loading). Appends one line per
 * problem; returns 0 or the negative count. */
int itsd_config_check(const struct itsd_config *cfg, char *err, size_t err_len);

/* The whole command line: defaults, then --config FILE, then every other flag in order
 * (`--flag VALUE` or `--flag=VALUE`), then itsd_config_check. argv[0] is the program.
 * *args gets -t / --help / --print-*. Returns 0, or a negative count of problems with each
 * on its own line in err. */
int itsd_config_from_args(int argc, char **argv, struct itsd_config *cfg,
                          struct itsd_args *args, char *err, size_t err_len);

/* SIGHUP: copies into *live the value in *next of every key the table marks reloadable
 * (docs/configuration.md, column "reload") whose value differs, and leaves every other key
 * of *live alone. Lists the keys applied as "[section] key, ..." in `changed`, and each key
 * that differs but needs a restart (not applied) as one line "[section] key = NEW needs a
 * restart; it stays OLD until then" in `restart`; either may be NULL. Both configs
 * should have passed itsd_config_check; the result needs itsd_config_check again, since a
 * rule may span a reloadable and a restart-only key. Returns how many keys were applied. */
int itsd_config_apply_reloadable(struct itsd_config *live, const struct itsd_config *next,
                                 char *changed, size_t changed_len, char *restart,
                                 size_t restart_len);

/* Whether a tcp:// or ipc:// endpoint can only be reached from this host: ipc://, and tcp://
 * on 127.0.0.0/8, ::1 or localhost. Anything else (0.0.0.0, *, an interface name, another
 * address) is not. */
bool itsd_config_endpoint_is_loopback(const char *endpoint);

/* Writes *cfg as an INI file that itsd_config_load_file reads back to the same values, every
 * key preceded by its documentation. Returns 0, or -1 when writing fails. */
int itsd_config_write_ini(const struct itsd_config *cfg, FILE *out);

/* Writes the option reference (one Markdown table per section: key, flag, default, reload
 * ("live": SIGHUP applies it; "restart"), meaning) from the same table. Returns 0, or -1
 * when writing fails. */
int itsd_config_write_docs(FILE *out);

/* Writes the usage text of itsd (synopsis and every flag). Returns 0 or -1. */
int itsd_config_write_usage(FILE *out);

#endif
