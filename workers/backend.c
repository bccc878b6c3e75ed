/* backend.c — backend_open(): the name -> backend registry, the loader of the cuda plugin, and
 * the plugin's tools (cuda_tools.h: probe, kernel self-tests, ceilings).
 *
 * The cpu backend is linked in. The cuda backend lives in libits_cuda.so, found next to the
 * running binary ($bindir/../lib/libits_cuda.so or $bindir/../lib/its/libits_cuda.so) or at
 * $ITS_CUDA_PLUGIN, and opened only when asked for, so itsw never needs a driver to start.
 * Owns the plugin handle for the life of the process (it is never dlclose()d: a CUDA runtime
 * unloaded under live contexts is not safe). Its entry points are looked up, and its ABI
 * checked, once per process (backend_plugin_get).
 */
#include "backend.h"

#include <dlfcn.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend_cpu.h"
#include "checkpoint.h"
#include "cuda_tools.h"
#include "kern.h"

static void *backend_dlopen_plugin(char *err, size_t err_len)
{
    const char *forced = getenv("ITS_CUDA_PLUGIN");
    if (forced && *forced) {
        void *h = dlopen(forced, RTLD_NOW | RTLD_LOCAL);
        if (!h)
            snprintf(err, err_len, "cuda backend unavailable: %s", dlerror());
        return h;
    }

    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0) {
        snprintf(err, err_len, "cuda backend unavailable: cannot locate the running binary");
        return NULL;
    }
    exe[n] = '\0';
    char *slash = strrchr(exe, '/');
    if (slash)
        *slash = '\0';

    static const char *const rel[] = {"../lib/libits_cuda.so", "../lib/its/libits_cuda.so"};
    char tried[2 * PATH_MAX] = "";
    char last_error[512] = "";
    for (size_t i = 0; i < sizeof rel / sizeof rel[0]; i++) {
        char path[PATH_MAX + 64];
        snprintf(path, sizeof path, "%s/%s", exe, rel[i]);
        if (access(path, F_OK) != 0) {
            size_t used = strlen(tried);
            snprintf(tried + used, sizeof tried - used, "%s%s", used ? ", " : "", path);
            continue;
        }
        void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        if (h)
            return h;
        /* The plugin exists but its libraries (libcublas, libcudart) do not load. */
        snprintf(last_error, sizeof last_error, "%s", dlerror());
    }
    if (last_error[0])
        snprintf(err, err_len, "cuda backend unavailable: %s", last_error);
    else
        snprintf(err, err_len,
                 "cuda backend unavailable: this build has no CUDA plugin (looked for %s; "
                 "rebuild where nvcc is found, or set ITS_CUDA_PLUGIN)", tried);
    return NULL;
}

/* The plugin's entry points, looked up once per process after its ABI is checked. */
struct backend_plugin {
    kern_probe_fn probe;
    kern_backend_open_fn open;
    kern_backend_open_random_fn open_random;
    kern_selftest_fn selftest;
    kern_ceilings_fn ceilings;
};

/* Loads the plugin on first use and returns its entry points, or NULL with err saying why
 * ("cuda backend unavailable: ..."). A failed load is retried on the next call (a user may
 * fix ITS_CUDA_PLUGIN in between); a good one is kept for the life of the process. */
static const struct backend_plugin *backend_plugin_get(char *err, size_t err_len)
{
    static struct backend_plugin plugin;
    static int loaded;
    if (loaded)
        return &plugin;
    void *h = backend_dlopen_plugin(err, err_len);
    if (!h)
        return NULL;
    kern_abi_fn abi = (kern_abi_fn)dlsym(h, "kern_plugin_abi");
    if (!abi) {
        snprintf(err, err_len, "cuda backend unavailable: plugin lacks kern_plugin_abi");
        return NULL;
    }
    if (abi() != KERN_PLUGIN_ABI) {
        snprintf(err, err_len, "cuda backend unavailable: plugin ABI %d, itsw expects %d "
                 "(stale libits_cuda.so)", abi(), KERN_PLUGIN_ABI);
        return NULL;
    }
    struct backend_plugin p;
    static const char *const names[] = {"kern_probe", "kern_backend_open",
                                        "kern_backend_open_random", "kern_selftest",
                                        "kern_ceilings"};
    void *syms[5];
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        syms[i] = dlsym(h, names[i]);
        if (!syms[i]) {
            snprintf(err, err_len, "cuda backend unavailable: plugin lacks %s", names[i]);
            return NULL;
        }
    }
    p.probe = (kern_probe_fn)syms[0];
    p.open = (kern_backend_open_fn)syms[1];
    p.open_random = (kern_backend_open_random_fn)syms[2];
    p.selftest = (kern_selftest_fn)syms[3];
    p.ceilings = (kern_ceilings_fn)syms[4];
    plugin = p;
    loaded = 1;
    return &plugin;
}

static int backend_cuda_open(const struct checkpoint *ck, const struct backend_params *p,
                             struct backend **out, char *err, size_t err_len)
{
    const struct backend_plugin *pl = backend_plugin_get(err, err_len);
    if (!pl)
        return -1;
    char why[400] = "";
    if (pl->open(checkpoint_config(ck), checkpoint_weights(ck), p, out, why, sizeof why) != 0) {
        snprintf(err, err_len, "cuda backend unavailable: %s", why);
        return -1;
    }
    return 0;
}

int backend_open_random(const char *name, const struct model_config *cfg, uint64_t seed,
                        const struct backend_params *p, struct backend **out, char *err,
                        size_t err_len)
{
    *out = NULL;
    if (!name || strcmp(name, "cuda") != 0) {
        snprintf(err, err_len, "backend '%s' cannot create random weights on its own (only "
                 "cuda can; the cpu backend takes checkpoint_new_random weights)",
                 name ? name : "cpu");
        return -1;
    }
    const struct backend_plugin *pl = backend_plugin_get(err, err_len);
    if (!pl)
        return -1;
    char why[400] = "";
    if (pl->open_random(cfg, (unsigned long long)seed, p, out, why, sizeof why) != 0) {
        snprintf(err, err_len, "cuda backend unavailable: %s", why);
        return -1;
    }
    return 0;
}

int cuda_probe(int device, char *err, size_t err_len)
{
    const struct backend_plugin *pl = backend_plugin_get(err, err_len);
    if (!pl)
        return -1;
    char why[400] = "";
    int n = pl->probe(device, why, sizeof why);
    if (n <= 0) {
        snprintf(err, err_len, "cuda backend unavailable: %s", why[0] ? why : "no device");
        return -1;
    }
    return n;
}

int cuda_selftest(int device, unsigned long long seed, char *report, size_t report_len,
                  int *n_checks)
{
    *n_checks = 0;
    if (report_len)
        report[0] = '\0';
    if (cuda_probe(device, report, report_len) < 0)
        return -1;
    const struct backend_plugin *pl = backend_plugin_get(report, report_len);
    if (!pl)
        return -1;
    return pl->selftest(device, seed, report, report_len, n_checks);
}

int cuda_ceilings(int device, struct kern_ceilings *c, char *err, size_t err_len)
{
    memset(c, 0, sizeof *c);
    if (cuda_probe(device, err, err_len) < 0)
        return -1;
    const struct backend_plugin *pl = backend_plugin_get(err, err_len);
    if (!pl)
        return -1;
    char why[400] = "";
    if (pl->ceilings(device, c, why, sizeof why) != 0) {
        snprintf(err, err_len, "cuda ceilings: %s", why);
        return -1;
    }
    return 0;
}

int backend_open(const char *name, const struct checkpoint *ck, const struct backend_params *p,
                 struct backend **out, char *err, size_t err_len)
{
    *out = NULL;
    if (!name || strcmp(name, "cpu") == 0)
        return backend_cpu_open(ck, p, out, err, err_len);
    if (strcmp(name, "cuda") == 0)
        return backend_cuda_open(ck, p, out, err, err_len);
    snprintf(err, err_len, "unknown backend '%s' (choose cpu or cuda)", name);
    return -1;
}

void backend_destroy(struct backend **be)
{
    if (!be || !*be)
        return;
    (*be)->ops->destroy(*be);
    *be = NULL;
}
