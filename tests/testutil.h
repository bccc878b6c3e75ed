/* testutil.h — small helpers shared by the Criterion tests: where the build and the shared
 * reference data live, reading files, scratch directories.
 *
 * Test-only code; never linked into a product binary.
 */
#ifndef ITS_TESTUTIL_H
#define ITS_TESTUTIL_H

#include <stddef.h>
#include <stdint.h>

/* Absolute path of `rel` under ../shared (ITS_SHARED), in a static buffer rotated over 32 calls.
 * When the shared folder is missing the calling test FAILS with a message saying so: golden
 * data that is absent must never let a comparison pass silently. */
const char *tu_shared(const char *rel);

/* Path of `rel` under the build directory (ITS_BUILD, default "build"), same buffer rules. */
const char *tu_build(const char *rel);

/* Path of `rel` under the source tree (ITS_SRC, default "."), same buffer rules. */
const char *tu_src(const char *rel);

/* Reads a whole file into a NUL-terminated heap buffer (caller frees); NULL on error.
 * *len_out (if not NULL) gets the length without the NUL. */
char *tu_read_file(const char *path, size_t *len_out);

/* Writes `len` bytes to `path`; 0 on success. */
int tu_write_file(const char *path, const void *data, size_t len);

/* Creates a fresh private directory under $TMPDIR (or /tmp) and returns its path (static
 * buffer rotated over 32 calls). Fails the calling test when it cannot. */
const char *tu_tmpdir(void);

/* Removes a directory tree made by tu_tmpdir (best effort). */
void tu_rmtree(const char *path);

/* Milliseconds of CLOCK_MONOTONIC, for deadlines in tests. */
uint64_t tu_now_ms(void);

/* The last `max` bytes (at most 4095) of the file at `path`, for failure messages (a daemon's
 * log); "(no log)" when it cannot be read. Static buffer rotated over 4 calls. */
const char *tu_file_tail(const char *path, size_t max);

/* Writes `text` to dir/name; fails the calling test when it cannot. */
void tu_write_in(const char *dir, const char *name, const char *text);

/* A loopback TCP port nothing listens on right now (the kernel's pick for port 0, released). */
int tu_free_port(void);

#endif
