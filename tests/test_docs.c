/* test_docs.c — the reference docs say what the binaries do: every line of `itsd --print-docs`
 * (generated from itsd's option table) appears verbatim in docs/configuration.md, and every
 * command and option `itsctl --help` lists appears in docs/client.md. (The itsw rows are
 * checked by test_itsw_random.c.) A key or flag added to the code without its doc row fails
 * here, naming it.
 */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

/* Runs `cmd` through the shell and returns its stdout (heap, NUL-terminated); fails the test
 * when it cannot start or exits non-zero. */
static char *docs_capture(const char *cmd)
{
    FILE *p = popen(cmd, "r");
    cr_assert_not_null(p, "cannot run %s", cmd);
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    cr_assert_not_null(buf);
    size_t n;
    while ((n = fread(buf + len, 1, cap - len - 1, p)) > 0) {
        len += n;
        if (cap - len < 4096) {
            cap *= 2;
            buf = realloc(buf, cap);
            cr_assert_not_null(buf);
        }
    }
    buf[len] = '\0';
    int st = pclose(p);
    cr_assert_eq(st, 0, "%s exited with status %d", cmd, st);
    return buf;
}

Test(docs, itsd_option_reference_is_in_configuration_md)
{
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "'%s' --print-docs", tu_build("bin/itsd"));
    char *ref = docs_capture(cmd);
    char *doc = tu_read_file(tu_src("docs/configuration.md"), NULL);
    cr_assert_not_null(doc, "cannot read docs/configuration.md");
    int lines = 0;
    char *save = NULL;
    for (char *line = strtok_r(ref, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (!*line)
            continue;
        lines++;
        cr_expect_not_null(strstr(doc, line),
                           "docs/configuration.md lacks this line of itsd --print-docs:\n%s",
                           line);
    }
    cr_expect_gt(lines, 20, "itsd --print-docs printed only %d lines", lines);
    free(ref);
    free(doc);
}

/* Whether `doc` names `word` as a whole word: followed by neither a letter nor a dash. */
static int docs_names(const char *doc, const char *word)
{
    size_t n = strlen(word);
    for (const char *p = strstr(doc, word); p; p = strstr(p + 1, word)) {
        char c = p[n];
        if (!((c >= 'a' && c <= 'z') || c == '-' || c == '_'))
            return 1;
    }
    return 0;
}

/* The first word of a line of itsctl --help's "commands:" block, e.g. "  submit [QUESTION]". */
static int docs_command_word(const char *line, char *word, size_t len)
{
    if (strncmp(line, "  ", 2) != 0 || line[2] == ' ' || line[2] == '-')
        return 0;
    size_t n = strcspn(line + 2, " [");
    if (n == 0 || n >= len || line[2 + n - 1] == ',')
        return 0; /* "  status, workers, get and cancel take ..." is prose */
    memcpy(word, line + 2, n);
    word[n] = '\0';
    return 1;
}

Test(docs, itsctl_commands_and_flags_are_in_client_md)
{
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "'%s' --help", tu_build("bin/itsctl"));
    char *help = docs_capture(cmd);
    char *doc = tu_read_file(tu_src("docs/client.md"), NULL);
    cr_assert_not_null(doc, "cannot read docs/client.md");

    /* Commands: the lines of the "commands:" block that start with two spaces and a word. */
    int n_cmds = 0, in_cmds = 0;
    char *save = NULL;
    char *copy = strdup(help);
    for (char *line = strtok_r(copy, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (strcmp(line, "commands:") == 0) {
            in_cmds = 1;
            continue;
        }
        if (in_cmds && line[0] != ' ')
            in_cmds = 0;
        char word[64], want[80];
        if (in_cmds && docs_command_word(line, word, sizeof word)) {
            n_cmds++;
            snprintf(want, sizeof want, "`%s", word);
            cr_expect_not_null(strstr(doc, want), "docs/client.md never names itsctl command "
                               "'%s' (as `%s ...`)", word, word);
        }
    }
    free(copy);
    cr_expect_geq(n_cmds, 6, "found only %d commands in itsctl --help:\n%s", n_cmds, help);

    /* Flags: every --word in the help text. */
    int n_flags = 0;
    for (const char *p = strstr(help, "--"); p; p = strstr(p + 2, "--")) {
        size_t n = 2;
        while ((p[n] >= 'a' && p[n] <= 'z') || p[n] == '-')
            n++;
        if (n <= 3)
            continue;
        char flag[64];
        snprintf(flag, sizeof flag, "%.*s", (int)n, p);
        n_flags++;
        cr_expect(docs_names(doc, flag), "docs/client.md never names itsctl flag %s", flag);
    }
    cr_expect_geq(n_flags, 10, "found only %d flags in itsctl --help", n_flags);
    free(help);
    free(doc);
}
