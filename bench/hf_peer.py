#!/usr/bin/env python3
"""hf_peer.py - the Hugging Face transformers peer of `itsw bench --backend cuda`.

Builds LlamaForCausalLM from the named shape's LlamaConfig with random bf16 weights created on
the GPU (no download, no host copy of the weights), and measures through `generate` what the
engine's GPU benchmark measures (docs/BENCHMARKS.md, "GPU"):

  - decode tok/s at batch 1, 16, 64 and 256 (256 skipped, and said so, if memory runs out):
    prompts of --context random ids; generate is run with max_new_tokens = 1 and with
    max_new_tokens = 1 + --steps (min_new_tokens the same, so EOS never stops it); the
    difference is the time of --steps decode steps. Median of --reps pairs after a warm-up;
    tok/s = batch * steps / time;
  - prefill tok/s of one --prefill-tokens prompt: generate with max_new_tokens = 1, best of 3
    after a warm-up;
  - n = 16 samples of one 2,048-token prompt (num_return_sequences, sampling at temperature 1;
    transformers expands the prompt to 16 rows before its prefill): the decode step time beside
    that of one sequence at the same context.

Prints one JSON object on stdout; progress on stderr. Uses only what the GPU image has (torch,
transformers). Times with torch.cuda.synchronize() around each generate call.
"""

import argparse
import json
import statistics
import sys
import time

import torch
import transformers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

# The engine's named shapes (workers/checkpoint.c, model_shape_by_name).
SHAPES = {
    # name: (hidden, ffn, layers, heads, kv_heads, head_dim, tied, rope_factor)
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 64, True, 32.0),
    "llama-3.2-3b": (3072, 8192, 28, 24, 8, 128, True, 32.0),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128, False, 8.0),
    "llama-3.1-70b": (8192, 28672, 80, 64, 8, 128, False, 8.0),
}


def log(msg):
    print(f"hf_peer: {msg}", file=sys.stderr, flush=True)


def make_config(shape):
    hidden, ffn, layers, heads, kv_heads, head_dim, tied, factor = SHAPES[shape]
    rope = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    kw = dict(
        vocab_size=128256,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
    )
    if int(transformers.__version__.split(".")[0]) >= 5:
        # transformers 5 keeps rope_theta inside rope_parameters
        kw["rope_parameters"] = dict(rope, rope_theta=500000.0)
    else:
        kw["rope_theta"] = 500000.0
        kw["rope_scaling"] = rope
    return LlamaConfig(**kw)


def make_model(config):
    """Random bf16 weights, created on the GPU by the model's own initialiser (normal with
    std initializer_range, norms at 1): never zeros."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    model.to(dtype=torch.bfloat16)
    model.eval()
    return model


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def gen(model, ids, new_tokens, do_sample=False, num_return_sequences=1):
    """generate exactly new_tokens ids per row (EOS suppressed by min_new_tokens); greedy, or
    sampling at temperature 1 with no top-k / top-p cut when do_sample."""
    extra = dict(temperature=1.0, top_p=1.0, top_k=0) if do_sample else {}
    cfg = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=do_sample,
        num_return_sequences=num_return_sequences,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=0,
        **extra,
    )
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)


def random_ids(gen_, batch, n, vocab):
    return torch.randint(0, vocab, (batch, n), generator=gen_, device="cpu").to("cuda")


def decode_step_s(model, ids, steps, reps, **kw):
    """Median over reps of (t(1 + steps new tokens) - t(1 new token)) / steps."""
    per_step = []
    for _ in range(reps):
        t1, _ = timed(lambda: gen(model, ids, 1, **kw))
        t2, out = timed(lambda: gen(model, ids, 1 + steps, **kw))
        expect = ids.shape[1] + 1 + steps
        if out.shape[1] != expect:
            raise RuntimeError(f"generate returned {out.shape[1]} positions, expected {expect}")
        per_step.append((t2 - t1) / steps)
    return statistics.median(per_step)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--context", type=int, default=128, help="prompt ids before decode steps")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps")
    ap.add_argument("--reps", type=int, default=3, help="timed pairs per batch (median)")
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--shared-prompt", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    if not torch.cuda.is_available():
        print("hf_peer: no CUDA device visible to torch", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    rng = torch.Generator().manual_seed(args.seed)
    config = make_config(args.shape)
    log(f"building {args.shape} with random bf16 weights on {torch.cuda.get_device_name(0)}")
    t_build, model = timed(lambda: make_model(config))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"built in {t_build:.1f} s: {n_params / 1e9:.2f} B parameters")
    V = config.vocab_size
    res = {
        "bench": "hf_peer",
        "shape": args.shape,
        "dtype": "BF16",
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "parameters": n_params,
    }

    # warm-up: kernels loaded, allocator primed
    warm = random_ids(rng, 1, 16, V)
    gen(model, warm, 4)

    # -- prefill
    ids = random_ids(rng, 1, args.prefill_tokens, V)
    gen(model, ids, 1)
    best = min(timed(lambda: gen(model, ids, 1))[0] for _ in range(3))
    res["prefill"] = {"tokens": args.prefill_tokens, "seconds": best,
                      "tok_per_s": args.prefill_tokens / best,
                      "note": "generate(max_new_tokens=1): the prefill and one sampled id"}
    log(f"prefill {args.prefill_tokens}: {args.prefill_tokens / best:.0f} tok/s")

    # -- decode at each batch size
    batches = []
    for b in [int(x) for x in args.batches.split(",") if x]:
        ids = random_ids(rng, b, args.context, V)
        try:
            gen(model, ids, 2)  # warm-up at this shape
            step = decode_step_s(model, ids, args.steps, args.reps)
            batches.append({"batch": b, "step_ms": step * 1e3, "tok_per_s": b / step})
            log(f"decode batch {b}: {step * 1e3:.2f} ms/step, {b / step:.0f} tok/s")
        except torch.cuda.OutOfMemoryError as e:
            batches.append({"batch": b, "skipped": f"out of GPU memory: {str(e)[:200]}"})
            log(f"decode batch {b}: out of memory, skipped")
            torch.cuda.empty_cache()
    res["decode"] = {"context": args.context, "steps": args.steps, "reps": args.reps,
                     "batches": batches}

    # -- n samples of one prompt vs one sequence at the same context
    ids = random_ids(rng, 1, args.shared_prompt, V)
    shared = {"prompt_tokens": args.shared_prompt, "n": args.n_samples}
    try:
        gen(model, ids, 2, do_sample=True, num_return_sequences=args.n_samples)
        s_n = decode_step_s(model, ids, args.steps, args.reps, do_sample=True,
                            num_return_sequences=args.n_samples)
        s_1 = decode_step_s(model, ids, args.steps, args.reps)
        shared.update({"samples_step_ms": s_n * 1e3, "single_step_ms": s_1 * 1e3,
                       "samples_over_single": s_n / s_1,
                       "note": "num_return_sequences expands the prompt to n rows: n "
                               "prefills and n copies of its KV"})
        log(f"n={args.n_samples} samples: {s_n * 1e3:.2f} ms/step, single {s_1 * 1e3:.2f}")
    except torch.cuda.OutOfMemoryError as e:
        shared["skipped"] = f"out of GPU memory: {str(e)[:200]}"
    res["shared_prefix"] = shared
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
