#!/usr/bin/env python3
"""hf_service_peer.py — the Feedback-Edit request of deploy/gpu_service_bench.sh done the way
the model cards do it: sequential Hugging Face transformers `generate` calls on one model, for a
wall-time comparison with the its service.

One request: D drafts (instruct), one feedback per draft, one edit per draft, one select score
per edit — the same prompts as itsd renders them from configs/prompts/*.tmpl, the same token
counts (EOS ignored through min_new_tokens), random weights of the same named shape (the
weights do not change the time). Every call is one prompt, one `generate` (or, for select, one
forward reading the logit of id 0 at the last position), in order, as a script following the
cards would run them; `--draft-mode batched` draws the drafts in one generate call with
num_return_sequences=D instead.

Owns nothing beyond its process: the model lives on `--device` for the run. Needs torch and
transformers; without them it exits 77 (skipped) with the reason on stderr, so the caller can
report a skip rather than a failure. Prints one JSON object on stdout (and to --json FILE).
"""

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time

# The named shapes of workers/checkpoint.c (model_shape_by_name): keep the two in step.
# name: (hidden, intermediate, layers, heads, kv_heads, head_dim, tied, rope_factor)
SHAPES = {
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 64, True, 32.0),
    "llama-3.2-3b": (3072, 8192, 28, 24, 8, 128, True, 32.0),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128, False, 8.0),
    "llama-3.1-70b": (8192, 28672, 80, 64, 8, 128, False, 8.0),
    "tiny-llama-3": (64, 176, 2, 4, 2, 16, False, 8.0),
}

SKIPPED = 77


def config_json(shape):
    """A config.json in the 4.x key layout (as the published Llama 3.1 files), which every
    transformers version reads."""
    dim, ffn, layers, heads, kv, hd, tied, factor = SHAPES[shape]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": dim,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hd,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }


# ---- role templates (the format of orchestrator/templates.h) ---------------------------------

SECTIONS = ("@conversation", "@system", "@user", "@assistant")


def load_template(path):
    """[(section, text)] of one .tmpl file."""
    out, cur, lines = [], None, []

    def close():
        if cur is not None:
            body = [("@" + l[2:]) if l.startswith("@@") else l for l in lines]
            while body and not body[0].strip():
                body.pop(0)
            while body and not body[-1].strip():
                body.pop()
            out.append((cur, "\n".join(body)))

    with open(path, encoding="utf-8") as f:
        for raw in f.read().splitlines():
            name = raw.rstrip()
            if name in SECTIONS:
                close()
                cur, lines = name, []
            elif cur is None:
                continue  # comments and blank lines before the first section
            else:
                lines.append(raw)
    close()
    return out


def fill(text, values):
    def one(m):
        return values[m.group(1)]
    # "{{" is a literal "{"; values are inserted once and not scanned again.
    parts = text.split("{{")
    return "{".join(re.sub(r"\{(prompt|response|feedback)\}", one, p) for p in parts)


def render(template, conversation, response=None, feedback=None):
    values = {"prompt": next(m["content"] for m in reversed(conversation) if m["role"] == "user"),
              "response": response or "", "feedback": feedback or ""}
    msgs = []
    for section, text in template:
        if section == "@conversation":
            msgs.extend(dict(m) for m in conversation)
        else:
            msgs.append({"role": section[1:], "content": fill(text, values)})
    return msgs


# ---- the pipeline ----------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--tokenizer", required=True,
                    help="directory of tokenizer.json and tokenizer_config.json")
    ap.add_argument("--templates", required=True, help="directory of the role .tmpl files")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--question", default="Why is the sky blue? Answer in two sentences.")
    ap.add_argument("--drafts", type=int, default=4)
    ap.add_argument("--draft-tokens", type=int, default=256)
    ap.add_argument("--feedback-tokens", type=int, default=128)
    ap.add_argument("--edit-tokens", type=int, default=256)
    ap.add_argument("--draft-mode", choices=("sequential", "batched"), default="sequential")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--runs", type=int, default=1, help="timed runs after one warm-up")
    ap.add_argument("--json", help="also write the result here")
    a = ap.parse_args()

    try:
        import torch
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        print(f"hf_service_peer: skipped: {e} (needs torch and transformers)", file=sys.stderr)
        return SKIPPED
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("hf_service_peer: skipped: torch sees no CUDA device", file=sys.stderr)
        return SKIPPED

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    tmpl = {r: load_template(os.path.join(a.templates, f"{r}.tmpl"))
            for r in ("instruct", "feedback", "edit", "select")}
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(config_json(a.shape), f)
        cfg = AutoConfig.from_pretrained(d)
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: no fp32 copy of a big model
    with dev:
        model = AutoModelForCausalLM.from_config(cfg)
    torch.set_default_dtype(old)
    model = model.to(device=dev, dtype=torch.bfloat16).eval()
    sync()
    load_s = time.perf_counter() - t0
    pad = tok.pad_token_id if tok.pad_token_id is not None else cfg.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]

    def encode(msgs, gen_prompt):
        enc = tok.apply_chat_template(msgs, add_generation_prompt=gen_prompt, tokenize=True,
                                      return_dict=True, return_tensors="pt")
        return enc["input_ids"].to(dev), enc["attention_mask"].to(dev)

    def generate(msgs, n_tokens, temperature, top_p, n=1):
        ids, mask = encode(msgs, True)
        kw = dict(max_new_tokens=n_tokens, min_new_tokens=n_tokens, pad_token_id=pad,
                  num_return_sequences=n)
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kw.update(do_sample=False)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        new = out[:, ids.shape[1]:]
        return ([tok.decode(row, skip_special_tokens=True) for row in new], ids.shape[1],
                int(new.shape[0] * new.shape[1]))

    def score(msgs):
        ids, mask = encode(msgs, False)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits
        return float(logits[0, -1, 0]), ids.shape[1]

    def one_request(question, timings):
        conv = [{"role": "user", "content": question}]
        stage = {}
        tokens = {"prompt": 0, "completion": 0}

        def timed(name, fn, *args):
            sync()
            t = time.perf_counter()
            r = fn(*args)
            sync()
            stage.setdefault(name, []).append(time.perf_counter() - t)
            return r

        sync()
        start = time.perf_counter()
        drafts = []
        if a.draft_mode == "batched":
            texts, p, c = timed("instruct", generate, render(tmpl["instruct"], conv),
                                a.draft_tokens, 0.7, 0.9, a.drafts)
            drafts, tokens["prompt"], tokens["completion"] = texts, p, c
        else:
            for _ in range(a.drafts):
                texts, p, c = timed("instruct", generate, render(tmpl["instruct"], conv),
                                    a.draft_tokens, 0.7, 0.9)
                drafts.append(texts[0])
                tokens["prompt"] += p
                tokens["completion"] += c
        edits, scores = [], []
        feedbacks = []
        for d in drafts:
            texts, p, c = timed("feedback", generate, render(tmpl["feedback"], conv, d),
                                a.feedback_tokens, 0.7, 0.9)
            feedbacks.append(texts[0])
            tokens["prompt"] += p
            tokens["completion"] += c
        for d, fb in zip(drafts, feedbacks):
            texts, p, c = timed("edit", generate,
                                render(tmpl["edit"], conv, d, "1. " + fb.strip()),
                                a.edit_tokens, 0.0, 1.0)
            edits.append(texts[0])
            tokens["prompt"] += p
            tokens["completion"] += c
        for e in edits:
            s, p = timed("select", score, render(tmpl["select"], conv, e))
            scores.append(s)
            tokens["prompt"] += p
        sync()
        wall = time.perf_counter() - start
        timings.append({"wall_s": wall,
                        "stage_s": {k: sum(v) for k, v in stage.items()},
                        "calls": {k: len(v) for k, v in stage.items()},
                        "tokens": tokens,
                        "best_score": max(scores)})
        return wall

    warm = []
    one_request("Warm-up: " + a.question, warm)
    runs = []
    for i in range(a.runs):
        torch.manual_seed(a.seed + 1 + i)
        one_request(f"Run {i + 1}: {a.question}", runs)
    walls = [r["wall_s"] for r in runs]
    res = {
        "shape": a.shape,
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "draft_mode": a.draft_mode,
        "drafts": a.drafts,
        "tokens_per_stage": {"draft": a.draft_tokens, "feedback": a.feedback_tokens,
                             "edit": a.edit_tokens},
        "model_build_s": load_s,
        "warmup_wall_s": warm[0]["wall_s"],
        "runs": runs,
        "wall_s": statistics.median(walls),
        "wall_s_min": min(walls),
    }
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
