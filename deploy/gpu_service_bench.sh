#!/usr/bin/env bash
# gpu_service_bench.sh — the whole its service on one GPU against its critical path and against
# the model cards' way (issue 5, "the whole service on one GPU").
#
# Starts itsd and one `itsw serve` per role (instruct, feedback, edit, select), each with random
# weights of one named shape (model = random:SHAPE, a real tokenizer, EOS ignored), all on one
# device; runs a D x 1 x 1 request (default 4 drafts x 1 feedback x 1 edit of 256/128/256
# tokens) through itsctl, untimed once to warm up and then --runs times, and reports:
#   wall            itsctl's submit, end to end
#   critical path   what the request cannot beat on these workers: per stage (draft, feedback,
#                   edit) the fastest job's time to its first token (one prefill, no queueing)
#                   plus (tokens - 1) decode steps at that stage's measured time per step, plus
#                   the fastest select job. The workers measure both (itsw serve at log level
#                   debug: "job N done: ... first_token_ms=... decode_ms_per_step=..."); with
#                   --step-ms the decode steps are counted at that time instead (e.g. from
#                   `itsw bench`).
#   wall / critical path (the goal: <= 1.25)
#   as run          the same sum with each stage's SLOWEST job (its queueing behind the other
#                   jobs of the stage included): wall / as-run near 1 means the gap to the
#                   critical path is inside the workers (prefills queued one after another), a
#                   larger one that it is between stages (orchestration, messages, text).
# Then it stops the service and runs bench/hf_service_peer.py: the same request as sequential
# transformers generate calls on the same shape, and prints its wall time and the ratio
# peer / its. With $OUT set, writes $OUT/gpu_service_bench.json (and the peer's JSON and the
# daemons' logs beside it).
#
# On the GPU (defaults): deploy/gpu_service_bench.sh --tokenizer DIR
#   four 8B bf16 models are 4 x 16 GB; --kv-tokens (default 8192 positions = 1 GiB each for
#   the 8B shape) leaves room for the CUDA contexts and scratch on an 80 GB H100. The default
#   tokenizer is ../shared/hf-reference/tokenizer beside the checkout; where that folder is not
#   there (a lent GPU machine gets the checkout alone), copy it into the checkout (an ignored
#   folder) and name it with --tokenizer. The peer needs torch and transformers (python3).
# On a CPU, to check the script end to end in seconds:
#   deploy/gpu_service_bench.sh --shape tiny-llama-3 --backend cpu --threads 1
#
# Owns: the processes it starts and a scratch directory; both are gone when it exits (trap on
# EXIT, also after an error or Ctrl-C). Must never leave a process behind or touch anything
# outside the scratch directory and $OUT.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${ITS_BUILD:-$repo/build}
shape=llama-3.1-8b
backend=cuda
device=0
tokenizer=$(realpath -m "$repo/../shared/hf-reference/tokenizer")
kv_tokens=8192
threads=0
drafts=4
draft_tokens=256
feedback_tokens=128
edit_tokens=256
runs=2
step_ms=
peer=1
peer_device=
peer_draft_mode=sequential
question="Why is the sky blue? Answer in two sentences."

usage() {
    cat <<EOF
usage: $0 [options]
  --shape NAME          model shape of every worker (default $shape; see itsw serve --help)
  --backend cpu|cuda    (default $backend)
  --device N            cuda device of every worker (default $device)
  --tokenizer DIR       tokenizer.json + tokenizer_config.json (default $tokenizer)
  --kv-tokens N         KV cache positions per worker (default $kv_tokens)
  --threads N           cpu threads per worker (default: the cores / 4)
  --drafts N            drafts of the request (default $drafts; 1 feedback and 1 edit each)
  --draft-tokens N --feedback-tokens N --edit-tokens N
                        tokens generated per draft / feedback / edit, EOS ignored
                        (default $draft_tokens / $feedback_tokens / $edit_tokens)
  --runs N              timed requests after the warm-up (default $runs)
  --step-ms MS          count decode steps at MS each (default: as the workers measured)
  --no-peer             skip the transformers peer
  --peer-device DEV     torch device of the peer (default: cuda:N for cuda, cpu for cpu)
  --peer-draft-mode M   sequential (default: one generate per draft) or batched
  --question TEXT
Environment: ITS_BUILD (build directory, default build), OUT (folder for the JSON results).
EOF
}

die() { echo "gpu_service_bench: $*" >&2; exit 1; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

while (($#)); do
    case $1 in
    --shape) shape=$2; shift ;;
    --backend) backend=$2; shift ;;
    --device) device=$2; shift ;;
    --tokenizer) tokenizer=$2; shift ;;
    --kv-tokens) kv_tokens=$2; shift ;;
    --threads) threads=$2; shift ;;
    --drafts) drafts=$2; shift ;;
    --draft-tokens) draft_tokens=$2; shift ;;
    --feedback-tokens) feedback_tokens=$2; shift ;;
    --edit-tokens) edit_tokens=$2; shift ;;
    --runs) runs=$2; shift ;;
    --step-ms) step_ms=$2; shift ;;
    --no-peer) peer=0 ;;
    --peer-device) peer_device=$2; shift ;;
    --peer-draft-mode) peer_draft_mode=$2; shift ;;
    --question) question=$2; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown option '$1'" ;;
    esac
    shift
done
[[ $# -eq 0 ]] || die "stray arguments"
for n in "$drafts" "$draft_tokens" "$feedback_tokens" "$edit_tokens" "$runs" "$kv_tokens"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || die "'$n' is not a positive integer"
done
for b in itsd itsw itsctl; do
    [[ -x $build/bin/$b ]] || die "$build/bin/$b is missing: build first (make), or set ITS_BUILD"
done
[[ -f $tokenizer/tokenizer.json && -f $tokenizer/tokenizer_config.json ]] ||
    die "--tokenizer $tokenizer lacks tokenizer.json or tokenizer_config.json"
command -v python3 >/dev/null || die "python3 is needed to read the results"
tokenizer=$(cd "$tokenizer" && pwd)
if [[ $threads == 0 && $backend == cpu ]]; then
    threads=$(($(nproc) / 4))
    ((threads > 0)) || threads=1
fi
[[ -n $peer_device ]] || { [[ $backend == cuda ]] && peer_device=cuda:$device || peer_device=cpu; }

dir=$(mktemp -d "${TMPDIR:-/tmp}/its-gpubench-XXXXXX")
pids=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_service
    if [[ -n ${OUT:-} ]]; then
        mkdir -p "$OUT/gpu_service_bench_logs"
        cp "$dir"/*.log "$OUT/gpu_service_bench_logs/" 2>/dev/null || true
    fi
    rm -rf "$dir"
    exit "$rc"
}
# Workers first, then itsd, each asked politely (SIGTERM drains) and then told.
stop_service() {
    ((${#pids[@]})) || return 0
    local p
    for p in "${pids[@]:1}" "${pids[@]:0:1}"; do kill -TERM "$p" 2>/dev/null || true; done
    for _ in $(seq 100); do
        local alive=0
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    wait "${pids[@]}" 2>/dev/null || true
    pids=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

front=ipc://$dir/front.sock
back=ipc://$dir/back.sock
ctl=("$build/bin/itsctl" --endpoint "$front")

echo "== its service bench: $shape (random weights), backend $backend, device $device"
echo "   request: $drafts drafts x 1 feedback x 1 edit, $draft_tokens/$feedback_tokens/$edit_tokens tokens, EOS ignored"
"$build/bin/itsd" --frontend "$front" --backend "$back" --templates "$repo/configs/prompts" \
    --log-level warn --heartbeat-ms 1000 --liveness 30 \
    --drafts "$drafts" --feedbacks 1 --edits 1 --feedbacks-per-edit 1 \
    --instruct-max-tokens "$draft_tokens" --feedback-max-tokens "$feedback_tokens" \
    --edit-max-tokens "$edit_tokens" >"$dir/itsd.log" 2>&1 &
pids+=($!)

# One worker at a time, each waiting for the last to register: their weights and KV pools
# are made one after another, so none sizes itself while another is half-built.
registered() { # ROLE: has ROLE a worker?
    "${ctl[@]}" status --json --timeout 2 2>/dev/null |
        python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["roles"].get(sys.argv[1],0) >= 1 else 1)' "$1"
}
seed=1
for role in instruct feedback edit select; do
    t0=$(date +%s.%N)
    "$build/bin/itsw" serve --connect "$back" --role "$role" --model "random:$shape" \
        --tokenizer "$tokenizer" --random-seed "$seed" --backend "$backend" --device "$device" \
        --kv-tokens "$kv_tokens" --max-seqs 16 --threads "$threads" --ignore-eos true \
        --name "bench-$role" --heartbeat-ms 1000 --liveness 30 --log-level 3 \
        >"$dir/$role.log" 2>&1 &
    pids+=($!)
    seed=$((seed + 1))
    for ((i = 0; ; i++)); do
        registered "$role" && break
        kill -0 "${pids[-1]}" 2>/dev/null || { tail -n 5 "$dir/$role.log" >&2; die "the $role worker exited during start-up"; }
        ((i < 3000)) || { tail -n 5 "$dir/$role.log" >&2; die "the $role worker did not register within 300 s"; }
        sleep 0.1
    done
    printf '   %-8s worker ready in %s s\n' "$role" "$(elapsed "$t0" "$(date +%s.%N)")"
done

# Offsets of the worker logs, so that a run reads only its own jobs' lines.
offsets() { for role in instruct feedback edit select; do stat -c %s "$dir/$role.log"; done | paste -sd,; }

results=()
for ((run = 0; run <= runs; run++)); do
    label=$([[ $run == 0 ]] && echo "warm-up" || echo "run $run")
    off=$(offsets)
    t0=$(date +%s.%N)
    # A fresh question and seed per run: no run's prefill or drafts are in the prefix cache.
    "${ctl[@]}" submit --json --seed $((100 + run)) --timeout 3000 \
        "Question $run. $question" >"$dir/result-$run.json" || {
        rc=$?
        tail -n 5 "$dir"/*.log >&2
        die "itsctl submit failed in the $label (exit $rc)"
    }
    t1=$(date +%s.%N)
    results+=("$run $t0 $t1 $off")
    printf '   %-8s wall %s s\n' "$label" "$(elapsed "$t0" "$t1")"
done
stop_service

peer_json=$dir/peer.json
peer_status=skipped
peer_note="--no-peer"
if ((peer)); then
    echo "== transformers peer: sequential generate calls ($peer_draft_mode drafts) on $peer_device"
    set +e
    python3 "$repo/bench/hf_service_peer.py" --shape "$shape" --tokenizer "$tokenizer" \
        --templates "$repo/configs/prompts" --device "$peer_device" --drafts "$drafts" \
        --draft-tokens "$draft_tokens" --feedback-tokens "$feedback_tokens" \
        --edit-tokens "$edit_tokens" --draft-mode "$peer_draft_mode" --runs "$runs" \
        --question "$question" --json "$peer_json" >"$dir/peer.log" 2>"$dir/peer.err"
    prc=$?
    set -e
    if ((prc == 0)); then
        peer_status=ok
    elif ((prc == 77)); then
        peer_note=$(tail -n 1 "$dir/peer.err")
    else
        peer_status=failed
        peer_note="exit $prc: $(tail -n 1 "$dir/peer.err")"
        tail -n 20 "$dir/peer.err" >&2
    fi
fi

printf '%s\n' "${results[@]}" >"$dir/runs.txt"
python3 - "$dir" "$shape" "$backend" "$drafts" \
    "$draft_tokens" "$feedback_tokens" "$edit_tokens" "${step_ms:-}" "$peer_status" \
    "$peer_note" "$peer_json" "${OUT:-}" <<'EOF'
import json, os, re, statistics, sys

(d, shape, backend, drafts, t_draft, t_fb, t_edit, step_ms, peer_status, peer_note, peer_json,
 out) = sys.argv[1:]
drafts, t_draft, t_fb, t_edit = int(drafts), int(t_draft), int(t_fb), int(t_edit)
step_override = float(step_ms) if step_ms else None
roles = ["instruct", "feedback", "edit", "select"]
tokens = {"instruct": t_draft, "feedback": t_fb, "edit": t_edit}
line_re = re.compile(r"job (\d+) done: (generate|score) n=(\d+) (.*)")

def jobs(role, start, end):
    with open(os.path.join(d, role + ".log"), "rb") as f:
        f.seek(start)
        text = f.read(end - start if end is not None else -1).decode("utf-8", "replace")
    out = []
    for line in text.splitlines():
        m = line_re.search(line)
        if m:
            kv = dict(p.split("=", 1) for p in m.group(4).split())
            out.append({k: int(v) if v.isdigit() else float(v) for k, v in kv.items()} |
                       {"n": int(m.group(3))})
    return out

runs = [l.split() for l in open(os.path.join(d, "runs.txt")).read().splitlines()]
report = []
for i, (run, t0, t1, offs) in enumerate(runs):
    starts = [int(x) for x in offs.split(",")]
    ends = ([int(x) for x in runs[i + 1][3].split(",")] if i + 1 < len(runs) else [None] * 4)
    wall = float(t1) - float(t0)
    res = json.load(open(os.path.join(d, f"result-{run}.json")))
    stages, critical, as_run = {}, 0.0, 0.0
    for k, role in enumerate(roles):
        js = jobs(role, starts[k], ends[k])
        if not js:
            raise SystemExit(f"gpu_service_bench: no {role} job lines in run {run}: is the "
                             "worker at log level 3?")
        if role == "select":
            ms = min(j["total_ms"] for j in js)
            slow = max(j["total_ms"] for j in js)
            stages[role] = {"jobs": len(js), "ms": ms, "as_run_ms": slow}
        else:
            steps = [j["decode_ms_per_step"] for j in js if j["steps"] > 1]
            step = step_override if step_override else statistics.median(steps)
            first = min(j["first_token_ms"] for j in js)
            last = max(j["first_token_ms"] for j in js)
            ms = first + (tokens[role] - 1) * step
            slow = last + (tokens[role] - 1) * step
            completion = sum(j["completion_tokens"] for j in js)
            stages[role] = {"jobs": len(js), "first_token_ms_min": first,
                            "first_token_ms_max": last, "step_ms": step,
                            "steps_max": max(j["steps"] for j in js),
                            "completion_tokens": completion, "ms": ms, "as_run_ms": slow}
            want = tokens[role] * drafts
            if completion != want:
                print(f"   note: run {run} {role}: {completion} tokens generated, {want} "
                      "expected", file=sys.stderr)
        critical += ms
        as_run += slow
    report.append({"run": int(run), "wall_s": wall, "critical_path_s": critical / 1e3,
                   "ratio": wall / (critical / 1e3), "as_run_s": as_run / 1e3,
                   "ratio_as_run": wall / (as_run / 1e3), "stages": stages,
                   "itsd_timings_ms": res.get("timings"), "usage": res.get("usage")})

timed = [r for r in report if r["run"] > 0]
best = min(timed, key=lambda r: r["ratio"])
med_wall = statistics.median(r["wall_s"] for r in timed)
med_crit = statistics.median(r["critical_path_s"] for r in timed)
gpu = os.popen("nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null").read().strip()
summary = {
    "shape": shape, "backend": backend, "gpu": gpu, "drafts": drafts,
    "tokens_per_stage": {"draft": t_draft, "feedback": t_fb, "edit": t_edit},
    "step_ms_source": "--step-ms" if step_override else "workers",
    "runs": report,
    "its_wall_s": med_wall, "critical_path_s": med_crit, "ratio": med_wall / med_crit,
    "goal_ratio": 1.25,
    "peer": {"status": peer_status, "note": peer_note},
}
print("== its: wall / critical path (median of %d timed run%s)" % (len(timed),
      "" if len(timed) == 1 else "s"))
for r in timed:
    s = r["stages"]
    print("   run %d: wall %.3f s, critical path %.3f s (draft %.0f + feedback %.0f + edit %.0f"
          " + select %.0f ms; step %.2f/%.2f/%.2f ms), ratio %.3f; as run %.3f s, ratio %.3f" % (
              r["run"], r["wall_s"], r["critical_path_s"], s["instruct"]["ms"],
              s["feedback"]["ms"], s["edit"]["ms"], s["select"]["ms"],
              s["instruct"]["step_ms"], s["feedback"]["step_ms"], s["edit"]["step_ms"],
              r["ratio"], r["as_run_s"], r["ratio_as_run"]))
print("   its wall %.3f s, critical path %.3f s, ratio %.3f (goal <= 1.25: %s)" % (
    med_wall, med_crit, med_wall / med_crit, "met" if med_wall / med_crit <= 1.25 else "NOT met"))
if peer_status == "ok":
    p = json.load(open(peer_json))
    summary["peer"].update(p)
    summary["peer_over_its"] = p["wall_s"] / med_wall
    print("== transformers peer (%s drafts): wall %.3f s; peer / its = %.2f" % (
        p["draft_mode"], p["wall_s"], p["wall_s"] / med_wall))
else:
    print("== transformers peer: %s (%s)" % (peer_status, peer_note))
if out:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_service_bench.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print("   results in %s" % os.path.join(out, "gpu_service_bench.json"))
if peer_status == "failed":
    sys.exit(1)
EOF
