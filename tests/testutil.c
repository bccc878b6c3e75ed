/* testutil.c — see testutil.h. */
#include "testutil.h"

#include <criterion/criterion.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define TU_SLOTS 32
#define TU_PATH_MAX 4096

static char *tu_slot(void)
{
    static char slots[TU_SLOTS][TU_PATH_MAX];
    static unsigned next;
    return slots[next++ % TU_SLOTS];
}

static const char *tu_join(const char *base, const char *rel)
{
    char *p = tu_slot();
    snprintf(p, TU_PATH_MAX, "%s/%s", base, rel);
    return p;
}

const char *tu_shared(const char *rel)
{
    const char *base = getenv("ITS_SHARED");
    if (!base)
        base = "../shared";
    struct stat st;
    if (stat(base, &st) != 0 || !S_ISDIR(st.st_mode))
        cr_assert_fail("reference data folder %s is missing (set ITS_SHARED): cannot compare", base);
    return tu_join(base, rel);
}

const char *tu_build(const char *rel)
{
    const char *base = getenv("ITS_BUILD");
    return tu_join(base ? base : "build", rel);
}

const char *tu_src(const char *rel)
{
    const char *base = getenv("ITS_SRC");
    return tu_join(base ? base : ".", rel);
}

char *tu_read_file(const char *path, size_t *len_out)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len + 65536 + 1 > cap) {
            cap = cap ? cap * 2 : 131072;
            char *nb = realloc(buf, cap);
            if (!nb) {
                free(buf);
                fclose(f);
                return NULL;
            }
            buf = nb;
        }
        size_t got = fread(buf + len, 1, cap - len - 1, f);
        len += got;
        if (got == 0)
            break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        return NULL;
    }
    buf[len] = '\0';
    if (len_out)
        *len_out = len;
    return buf;
}

int tu_write_file(const char *path, const void *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    size_t put = fwrite(data, 1, len, f);
    int rc = fclose(f);
    return (put == len && rc == 0) ? 0 : -1;
}

const char *tu_tmpdir(void)
{
    const char *base = getenv("TMPDIR");
    char *p = tu_slot();
    snprintf(p, TU_PATH_MAX, "%s/its-test-XXXXXX", base ? base : "/tmp");
    if (!mkdtemp(p))
        cr_assert_fail("mkdtemp %s: %s", p, strerror(errno));
    return p;
}

void tu_rmtree(const char *path)
{
    if (!path || !*path || strcmp(path, "/") == 0)
        return;
    char cmd[TU_PATH_MAX + 32];
    snprintf(cmd, sizeof cmd, "rm -rf -- '%s'", path);
    if (system(cmd) != 0)
        fprintf(stderr, "testutil: could not remove %s\n", path);
}

uint64_t tu_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

const char *tu_file_tail(const char *path, size_t max)
{
    static char bufs[4][4096];
    static unsigned next;
    char *tail = bufs[next++ % 4];
    if (max > sizeof bufs[0] - 1)
        max = sizeof bufs[0] - 1;
    char *all = tu_read_file(path, NULL);
    if (!all)
        return "(no log)";
    size_t n = strlen(all);
    snprintf(tail, max + 1, "%s", n > max ? all + n - max : all);
    free(all);
    return tail;
}

void tu_write_in(const char *dir, const char *name, const char *text)
{
    const char *path = tu_join(dir, name);
    cr_assert_eq(tu_write_file(path, text, strlen(text)), 0, "cannot write %s", path);
}

int tu_free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    cr_assert_geq(fd, 0, "socket: %s", strerror(errno));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    cr_assert_eq(bind(fd, (struct sockaddr *)&a, sizeof a), 0, "bind: %s", strerror(errno));
    socklen_t len = sizeof a;
    cr_assert_eq(getsockname(fd, (struct sockaddr *)&a, &len), 0, "getsockname: %s",
                 strerror(errno));
    close(fd);
    return ntohs(a.sin_port);
}
