/* rope.c — see rope.h. */
#include "rope.h"

#include <math.h>

void rope_inv_freq(const struct model_config *c, float *inv_freq)
{
    int half = c->head_dim / 2;
    for (int i = 0; i < half; i++) {
        float expo = (float)(2 * i) / (float)c->head_dim;
        float f = 1.0f / powf(c->rope_theta, expo);
        if (c->rope_kind == ROPE_LLAMA3) {
            float orig = (float)c->rope_original_max_pos;
            float low_wavelen = orig / c->rope_low_freq_factor;
            float high_wavelen = orig / c->rope_high_freq_factor;
            float wavelen = 2.0f * (float)M_PI / f;
            if (wavelen > low_wavelen) {
                f = f / c->rope_factor;
            } else if (!(wavelen < high_wavelen)) {
                float smooth = (orig / wavelen - c->rope_low_freq_factor) /
                               (c->rope_high_freq_factor - c->rope_low_freq_factor);
                f = (1.0f - smooth) * f / c->rope_factor + smooth * f;
            }
        }
        inv_freq[i] = f;
    }
}
