/* kenv.h — the plugin's environment switches, read one way everywhere.
 *
 * A switch is "on" when the variable is set to anything but "" or "0", and "off" only when it is
 * exactly "0" (so an unset default-on switch such as ITS_CUDA_GRAPHS stays on). The switches:
 * ITS_CUDA_GRAPHS=0, ITS_CUDA_GEMV=0, ITS_CUDA_SIMPLE (graphs off, cuBLAS for every product,
 * the plain attention and sampling kernels), ITS_CUDA_SIMPLE_ATTN (the plain attention only).
 */
#ifndef ITS_KENV_H
#define ITS_KENV_H

#include <stdlib.h>
#include <string.h>

static inline int kenv_on(const char *name)
{
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

static inline int kenv_off(const char *name)
{
    const char *v = getenv(name);
    return v && strcmp(v, "0") == 0;
}

#endif
