/* itsd.c — main() of the orchestrator daemon: configuration (defaults, --config FILE, flags),
 * `-t` (check the configuration and the prompt templates, report every problem, exit 0/1),
 * then the daemon (orch.h) in the foreground until SIGTERM/SIGINT; SIGHUP reloads.
 *
 * Owns the configuration as parsed at start and the templates until the daemon takes them
 * (the daemon keeps its own copy of the configuration, which reloads change). Exit codes:
 * 0 clean exit or good check, 1 bad configuration or templates, 2 cannot start (bind
 * failure, ...). Never runs anything but the daemon: no fork, no pid file (systemd and the
 * tests supervise it).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "itsd_config.h"
#include "itsd_log.h"
#include "orch.h"
#include "templates.h"

#define ITSD_ERR_BYTES 16384

/* Prints each line of `text` prefixed with "itsd: ". */
static void itsd_print_lines(const char *text)
{
    const char *p = text;
    while (*p) {
        const char *nl = strchr(p, '\n');
        size_t n = nl ? (size_t)(nl - p) : strlen(p);
        if (n > 0)
            fprintf(stderr, "itsd: %.*s\n", (int)n, p);
        p += n + (nl ? 1 : 0);
    }
}

int main(int argc, char **argv)
{
    static struct itsd_config cfg; /* ~10 KiB of paths: not on the stack */
    struct itsd_args args;
    char *err = calloc(1, ITSD_ERR_BYTES);
    if (!err) {
        fputs("itsd: out of memory\n", stderr);
        return 2;
    }
    int bad = itsd_config_from_args(argc, argv, &cfg, &args, err, ITSD_ERR_BYTES);
    if (args.help) {
        itsd_config_write_usage(stdout);
        free(err);
        return bad ? 1 : 0;
    }
    if (args.print_docs) {
        int rc = itsd_config_write_docs(stdout);
        free(err);
        return rc == 0 ? 0 : 1;
    }
    if (bad != 0) {
        itsd_print_lines(err);
        fprintf(stderr, "itsd: %d problem%s in the configuration%s\n", -bad, bad == -1 ? "" : "s",
                args.check_only ? "" : "; not starting");
        free(err);
        return 1;
    }
    if (args.print_config) {
        int rc = itsd_config_write_ini(&cfg, stdout);
        free(err);
        return rc == 0 ? 0 : 1;
    }
    itsd_log_level = cfg.log_level;
    struct templates *tpl = NULL;
    err[0] = '\0';
    int rc = orch_load_templates(&cfg, &tpl, err, ITSD_ERR_BYTES);
    if (rc != 0) {
        fprintf(stderr, "itsd: templates: %s\n", err);
        if (args.check_only)
            fprintf(stderr, "itsd: 1 problem in the configuration\n");
        free(err);
        return 1;
    }
    if (args.check_only) {
        fprintf(stderr, "itsd: configuration %s is good (templates from %s)\n",
                args.config_path ? args.config_path : "(defaults and flags)",
                templates_path(tpl, PROTO_ROLE_INSTRUCT));
        templates_destroy(&tpl);
        free(err);
        return 0;
    }
    struct orch *o = NULL;
    err[0] = '\0';
    rc = orch_new(&cfg, &tpl, argc, argv, &o, err, ITSD_ERR_BYTES);
    if (rc != 0) {
        ITSD_ERROR("cannot start: %s", err);
        templates_destroy(&tpl);
        free(err);
        return 2;
    }
    rc = orch_run(o);
    orch_destroy(&o);
    free(err);
    return rc == 0 ? 0 : 2;
}
