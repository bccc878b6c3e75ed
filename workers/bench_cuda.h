/* bench_cuda.h — engine throughput on the GPU: the cuda backend with random weights of a real
 * model shape created on the device, driven directly (block tables managed here, as in the
 * CPU bench), against the device's measured ceilings (kern_ceilings).
 *
 * What it measures (docs/BENCHMARKS.md, "GPU"):
 * - decode tokens/s at several batch sizes: each sequence prefills a short context (untimed),
 *   then every step forwards one token per sequence with FWD_SAMPLE greedy (only ids cross to
 *   the host); the median step time over the timed steps after a warm-up; tok/s = batch /
 *   step time;
 * - prefill tokens/s of one prompt in one call (best of a few after a warm-up);
 * - n samples of one prompt: the prompt prefilled ONCE, n sequences sharing its full blocks
 *   (its partly filled last block copied per sample with copy_block, as the engine does), the
 *   median decode step time; beside it the step time of a single sequence at the same context
 *   and of n sequences with private copies of the prompt (unshared);
 * - the ceilings and the ratios: batch-1 tok/s over (copy GB/s / weight bytes per step), and
 *   per batch the weight-GEMM FLOP rate over the measured bf16 GEMM rate.
 * Never prints (`itsw bench --backend cuda` prints the JSON). Owns, for one call, the backend
 * it opens and the host buffers; the caller owns a backend it passes to bench_cuda_drive.
 */
#ifndef ITS_BENCH_CUDA_H
#define ITS_BENCH_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "kern.h"
#include "model.h"

#define BENCH_CUDA_MAX_BATCHES 8

/* Zero fields take the defaults in brackets. */
struct bench_cuda_params {
    const char *shape;      /* model_shape_by_name name [llama-3.1-8b] (bench_cuda_run only) */
    int device;             /* cuda device ordinal [0] */
    uint64_t seed;          /* weights and tokens [1] */
    int n_batches;          /* entries of decode_batches [0: the default list] */
    int decode_batches[BENCH_CUDA_MAX_BATCHES]; /* [1, 16, 64, 256] */
    int decode_context;     /* tokens prefilled per sequence before decode steps [128] */
    int warmup_steps;       /* untimed decode steps before the timed ones [5] */
    int steps;              /* timed decode steps per measurement [32] */
    int prefill_tokens;     /* the timed prompt [2048] */
    int prefill_reps;       /* timed prefills after one warm-up; the best counts [3] */
    int n_samples;          /* samples sharing one prompt [16] */
    int shared_prompt;      /* tokens of that prompt [2048] */
    int skip_ceilings;      /* nonzero: leave res->ceil zero (tests of the driver) */
};

struct bench_cuda_decode {
    int batch;
    double step_ms;   /* median step */
    double tok_s;     /* batch / median step */
    double gemm_util; /* weight-GEMM FLOP/s at this step time / measured bf16 GEMM FLOP/s */
};

struct bench_cuda_result {
    char shape[64];
    int device;
    struct kern_ceilings ceil;     /* measured before the model is created */
    int kv_blocks;                 /* KV pool the measurements used */
    int prefill_tokens;
    double prefill_s;              /* best of prefill_reps */
    double prefill_tok_s;
    int decode_context, warmup_steps, steps;
    int n_batches;
    struct bench_cuda_decode decode[BENCH_CUDA_MAX_BATCHES];
    int n_samples, shared_prompt;
    int copied_blocks;             /* copy_block calls of the shared fan-out */
    double shared_step_ms;         /* n samples sharing the prompt's blocks, median step */
    double single_step_ms;         /* one sequence at the same context */
    double unshared_step_ms;       /* n sequences with private copies of the prompt */
    double shared_over_single;     /* the target: <= 1.3 */
    double unshared_over_single;
    double weight_bytes_per_step;  /* roofline_decode_bytes in bf16 */
    double flops_per_token;        /* 2 * weight elements of every matrix, LM head included */
    double roofline_b1_tok_s;      /* copy GB/s / weight bytes per step (0 without ceilings) */
    double b1_ratio;               /* batch-1 tok/s / roofline_b1_tok_s */
};

/* Fills in the defaults of *p (copied to *out) and the backend parameters a run of it needs
 * on `cfg`: KV blocks for the largest phase, max_batch_tokens and max_batch_seqs. Returns 0,
 * or negative with err naming a bad parameter (a context past cfg->max_seq_len, ...). */
int bench_cuda_plan(const struct model_config *cfg, const struct bench_cuda_params *p,
                    struct bench_cuda_params *out, struct backend_params *bp, char *err,
                    size_t err_len);

/* Runs every measurement of *p on an open backend with BACKEND_CAP_SAMPLE, opened with at
 * least bench_cuda_plan's parameters. Fills everything in *res but the ceilings (left as they
 * are; the ratios use res->ceil if its figures are set). Returns 0, or negative with err naming
 * the phase and the backend's error. */
int bench_cuda_drive(struct backend *be, const struct bench_cuda_params *p,
                     struct bench_cuda_result *res, char *err, size_t err_len);

/* The whole benchmark for p->shape on p->device: ceilings (cuda_ceilings), then a cuda backend
 * with random weights (backend_open_random), then bench_cuda_drive. Returns 0 with *res
 * filled, or negative with err (unknown shape with the known names, no plugin or device,
 * out of device memory, backend errors). */
int bench_cuda_run(const struct bench_cuda_params *p, struct bench_cuda_result *res, char *err,
                   size_t err_len);

/* Same for an explicit config (tests use a shrunken shape); `label` is copied into res->shape. */
int bench_cuda_run_config(const struct model_config *cfg, const char *label,
                          const struct bench_cuda_params *p, struct bench_cuda_result *res,
                          char *err, size_t err_len);

#endif
