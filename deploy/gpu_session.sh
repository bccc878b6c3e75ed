#!/usr/bin/env bash
# gpu_session.sh — one lent-GPU session of issue 5, bounded to about 9 minutes:
# versions, build, kernel self-tests, the GPU tests, compute-sanitizer, the benchmark against
# the transformers peer, and a short table of ours vs peer vs ceilings.
#
#   deploy/gpu_session.sh [STAGE...]     on the GPU machine, from the repository root
#     all (default) = info build selftest test sanitize bench summary
#     test          = info build selftest test
#     bench         = info build bench summary
#     sanitize      = info build sanitize
#     service       = info build service   (the one-GPU service benchmark; not in all)
#     or any list of the single stages above
#   deploy/gpu_session.sh pack           HERE, before the session (no GPU needed): see below
#
# Output: every log and JSON goes under $OUT (the device tool's folder; else
# build/gpu-session), at most 8 files: session.log (everything), selftest.json, tests.log,
# sanitize.log, ours.json, peer.json, summary.txt. The summary table is printed last.
#
# Building: with ITS_BUILD set (make bench), that build is used as it is. Else a prebuilt
# .gpu/ folder (made by `pack`, carried to the device) is used when present: its binaries,
# the shared libraries they need that a CUDA image may lack (rtlib.tar.xz), and the
# hf-reference files the tests read (shared/MODEL.tar.xz), unpacked under /tmp. Else `make -j16 all` builds into build/gpu (needs the
# Debian packages of the Makefile's DEB_PKGS on the machine).
#
# Environment: ITS_COMMIT (default: git describe, else "unknown"), ITS_CUDA_DEVICE (0),
# ITS_GPU_BUDGET_S (540: stages that would start after it are skipped, each stage has its own
# timeout), ITS_SHARED (the folder holding hf-reference/; found by itself otherwise),
# PACK_MODELS (pack: which tiny models to carry; default both).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
OUT_DIR=${OUT:-$ROOT/build/gpu-session}
mkdir -p "$OUT_DIR"
BUDGET=${ITS_GPU_BUDGET_S:-540}
DEV=${ITS_CUDA_DEVICE:-0}
export ITS_CUDA_DEVICE=$DEV
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH="$PATH:$CUDA_HOME/bin"
STATUS=0

log() { printf '== %s [%ds]\n' "$*" "$SECONDS"; }
fail() { printf '!! %s\n' "$*"; STATUS=1; }
left() { echo $((BUDGET - SECONDS)); }
# run_for SECONDS CMD...: the command under a timeout no longer than the budget left
run_for() {
    local t=$1; shift
    local l; l=$(left)
    ((l < t)) && t=$l
    if ((t < 5)); then fail "budget spent: skipped $*"; return 124; fi
    timeout --kill-after=10 "$t" "$@"
}

# ---- pack (on the development machine) ---------------------------------------------------------
if [[ ${1:-} == pack ]]; then
    SHARED=${ITS_SHARED:-$ROOT/../shared}
    make -j2 BUILD=build/gpu all || exit 1
    make --no-print-directory ITS_INNER=1 BUILD=build/gpu build/gpu/tests/test_cuda || exit 1
    [[ -e build/gpu/lib/libits_cuda.so ]] || { echo "pack: no libits_cuda.so (nvcc?)"; exit 1; }
    rm -rf .gpu && mkdir -p .gpu/bin .gpu/lib .gpu/tests .gpu/shared
    cp build/gpu/bin/itsw build/gpu/bin/itsd build/gpu/bin/itsctl .gpu/bin/ &&
        cp build/gpu/lib/libits_cuda.so .gpu/lib/ &&
        cp build/gpu/tests/test_cuda .gpu/tests/ || exit 1
    # every library they load but the C/C++ runtime, which the image has in a newer version;
    # xz-packed, as the models, to stay under the tool's 64 MiB
    rt=$(mktemp -d)
    ldd .gpu/bin/itsw .gpu/bin/itsd .gpu/bin/itsctl .gpu/tests/test_cuda | awk '/=> \//{print $3}' | sort -u |
        while read -r lib; do
            case ${lib##*/} in
            libc.so* | libm.so* | libpthread.so* | libdl.so* | librt.so* | ld-linux* | \
                libstdc++.so* | libgcc_s.so* | libresolv.so*) ;;
            *) cp -L "$lib" "$rt/" ;;
            esac
        done
    (cd "$rt" && tar cf - .) | xz -T2 -6 >.gpu/rtlib.tar.xz || exit 1
    rm -rf "$rt"
    for m in ${PACK_MODELS:-tiny-llama31 tiny-llama3-tied}; do
        files="config.json generation_config.json model.safetensors reference_shared.json"
        files="$files reference_shared_last_logits.f32"
        # the sanitizer's small generate reads one model's tokenizer
        [[ $m == tiny-llama3-tied ]] && files="$files tokenizer.json tokenizer_config.json"
        (cd "$SHARED/hf-reference/$m" && tar cf - $files) | xz -T2 -3 >".gpu/shared/$m.tar.xz" ||
            exit 1
    done
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null ||
        echo "pack: add '/.gpu/' to .git/info/exclude so that it travels only as a carried path"
    du -sh .gpu
    echo "pack: carry '.gpu' (the device tool's carry argument); the working tree plus .gpu must"
    echo "      stay under 64 MiB: PACK_MODELS=tiny-llama3-tied packs one model"
    exit 0
fi

STAGES=("$@")
((${#STAGES[@]})) || STAGES=(all)
expand() {
    case $1 in
    all) echo info build selftest test sanitize bench summary ;;
    test) echo info build selftest test ;;
    bench) echo info build bench summary ;;
    sanitize) echo info build sanitize ;;
    service) echo info build service ;;
    info | build | selftest | summary) echo "$1" ;;
    *) return 1 ;;
    esac
}
PLAN=()
for s in "${STAGES[@]}"; do
    xs=$(expand "$s") || {
        echo "gpu_session: unknown stage '$s' (all test bench sanitize service info build" \
             "selftest summary pack)" >&2
        exit 2
    }
    for x in $xs; do
        [[ " ${PLAN[*]} " == *" $x "* ]] || PLAN+=("$x")
    done
done

exec > >(tee -a "$OUT_DIR/session.log") 2>&1
log "gpu session: stages ${PLAN[*]}; budget ${BUDGET}s; device $DEV; logs in $OUT_DIR"

# ---- where the binaries and the reference data are -------------------------------------------
BUILD_DIR=""
PREBUILT=0
if [[ -n ${ITS_BUILD:-} ]]; then
    BUILD_DIR=$ITS_BUILD
    PREBUILT=1
elif [[ -x .gpu/bin/itsw ]]; then
    BUILD_DIR=$ROOT/.gpu
    PREBUILT=1
    mkdir -p /tmp/its-rtlib && xz -dc .gpu/rtlib.tar.xz | tar xf - -C /tmp/its-rtlib ||
        fail "cannot unpack .gpu/rtlib.tar.xz"
    export LD_LIBRARY_PATH="/tmp/its-rtlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
    BUILD_DIR=$ROOT/build/gpu
fi
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$CUDA_HOME/lib64"
if [[ -z ${ITS_SHARED:-} ]]; then
    if compgen -G ".gpu/shared/*.tar.xz" >/dev/null; then
        ITS_SHARED=/tmp/its-shared
        for t in .gpu/shared/*.tar.xz; do
            m=$(basename "$t" .tar.xz)
            mkdir -p "$ITS_SHARED/hf-reference/$m" && xz -dc "$t" | tar xf - -C "$ITS_SHARED/hf-reference/$m"
        done
    elif [[ -d shared/hf-reference ]]; then
        ITS_SHARED=$ROOT/shared
    else
        ITS_SHARED=$ROOT/../shared
    fi
fi
export ITS_SHARED ITS_SRC=$ROOT ITS_BUILD=$BUILD_DIR
if [[ -z ${ITS_COMMIT:-} ]]; then
    ITS_COMMIT=$(git describe --always --dirty 2>/dev/null || echo unknown)
fi
export ITS_COMMIT
ITSW=$BUILD_DIR/bin/itsw
TESTS=$BUILD_DIR/tests/test_cuda

stage_info() {
    log "versions"
    nvidia-smi || fail "nvidia-smi failed"
    nvcc --version | tail -n 2 || fail "no nvcc"
    compute-sanitizer --version 2>/dev/null | head -n 2 || echo "(no compute-sanitizer)"
    python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers",
transformers.__version__)' 2>/dev/null || echo "(no torch/transformers)"
    echo "commit $ITS_COMMIT; build $BUILD_DIR; shared $ITS_SHARED"
}

stage_build() {
    if ((PREBUILT)); then
        log "build: using $BUILD_DIR as it is"
    else
        log "build: make -j16 all + the test binary into build/gpu"
        run_for 300 make -j16 BUILD=build/gpu all || { fail "make all failed"; return 1; }
        run_for 120 make --no-print-directory ITS_INNER=1 -j16 BUILD=build/gpu \
            build/gpu/tests/test_cuda || { fail "building tests/test_cuda failed"; return 1; }
    fi
    [[ -x $ITSW && -e $BUILD_DIR/lib/libits_cuda.so ]] ||
        { fail "no $ITSW or libits_cuda.so in $BUILD_DIR"; return 1; }
}

stage_selftest() {
    log "itsw selftest --backend cuda"
    run_for 120 "$ITSW" selftest --backend cuda --device "$DEV" >"$OUT_DIR/selftest.json"
    local rc=$?
    [[ -s $OUT_DIR/selftest.json ]] && python3 - "$OUT_DIR/selftest.json" <<'EOF' ||
        cat "$OUT_DIR/selftest.json"
import json, sys
d = json.load(open(sys.argv[1]))
print(f"selftest: {d['checks']} checks, {d['failures']} failed (seed {d['seed']})")
for line in d["report"]:
    print("  " + line)
EOF
    ((rc == 0)) || fail "selftest exit $rc (1: checks failed, 2: could not run)"
}

stage_test() {
    log "GPU tests: test_cuda --filter 'cuda/*'"
    [[ -x $TESTS ]] || { fail "no $TESTS"; return 1; }
    run_for 240 "$TESTS" --filter 'cuda/*' --jobs 4 --verbose >"$OUT_DIR/tests.log" 2>&1
    local rc=$?
    grep -E '^\[(FAIL|SKIP|----)\]|Synthesis|CRASH' "$OUT_DIR/tests.log" | head -n 60
    ((rc == 0)) || fail "GPU tests exit $rc (full log: tests.log)"
}

stage_sanitize() {
    log "compute-sanitizer memcheck and racecheck"
    command -v compute-sanitizer >/dev/null || { fail "no compute-sanitizer"; return 1; }
    local msg="[{\"role\":\"user\",\"content\":\"Say hello in three words.\"}]"
    local model="$ITS_SHARED/hf-reference/tiny-llama3-tied"
    : >"$OUT_DIR/sanitize.log"
    for tool in memcheck racecheck; do
        log "$tool: itsw selftest"
        run_for 150 compute-sanitizer --tool "$tool" --error-exitcode 3 \
            "$ITSW" selftest --backend cuda --device "$DEV" >>"$OUT_DIR/sanitize.log" 2>&1 ||
            fail "$tool on the self-tests: exit $? (sanitize.log)"
        if [[ -e $model/tokenizer.json ]]; then
            # a small forward through the engine: prefill, 4 samples sharing the prompt, decode
            log "$tool: itsw generate --n 4 on tiny-llama3-tied"
            echo "$msg" | run_for 120 compute-sanitizer --tool "$tool" --error-exitcode 3 \
                "$ITSW" generate --backend cuda --device "$DEV" --model "$model" \
                --messages - --max-tokens 6 --n 4 --temperature 0.7 --seed 1 \
                >>"$OUT_DIR/sanitize.log" 2>&1 ||
                fail "$tool on a small generate: exit $? (sanitize.log)"
        else
            fail "$tool: no $model/tokenizer.json for the small forward"
        fi
    done
    grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|========= (Invalid|Race|Error)' \
        "$OUT_DIR/sanitize.log" | head -n 30
}

stage_bench() {
    log "itsw bench --backend cuda --shape llama-3.1-8b"
    run_for 240 "$ITSW" bench --backend cuda --shape llama-3.1-8b --device "$DEV" \
        >"$OUT_DIR/ours.json" || fail "itsw bench: exit $?"
    log "bench/hf_peer.py --shape llama-3.1-8b"
    PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=$DEV run_for 300 python3 bench/hf_peer.py \
        --shape llama-3.1-8b >"$OUT_DIR/peer.json" || fail "hf_peer.py: exit $?"
}

# The whole service on one GPU (issue 5, deliverable 5): itsd + four random 8B workers, the
# 4x1x1 request against its critical path, then the sequential transformers pipeline.
stage_service() {
    log "deploy/gpu_service_bench.sh (4 x llama-3.1-8b random on device $DEV)"
    local tok="$ITS_SHARED/hf-reference/tiny-llama3-tied"
    [[ -e $tok/tokenizer.json ]] || tok="$ITS_SHARED/hf-reference/tokenizer"
    ITS_BUILD=$BUILD_DIR run_for 420 deploy/gpu_service_bench.sh --tokenizer "$tok" \
        --device "$DEV" || fail "gpu_service_bench.sh: exit $?"
}

stage_summary() {
    log "summary"
    python3 - "$OUT_DIR/ours.json" "$OUT_DIR/peer.json" <<'EOF' | tee "$OUT_DIR/summary.txt"
import json, sys

def load(p):
    try:
        with open(p) as f:
            return json.loads(f.read().strip().splitlines()[-1])
    except Exception as e:  # a stage that failed leaves no JSON: say so in the table
        print(f"({p}: {e})")
        return {}

o, h = load(sys.argv[1]), load(sys.argv[2])
c = o.get("ceilings", {})
r = o.get("roofline", {})
ob = {b["batch"]: b for b in o.get("decode", {}).get("batches", [])}
hb = {b["batch"]: b for b in h.get("decode", {}).get("batches", [])}
f = lambda v, fmt="{:.1f}": "—" if v is None else fmt.format(v)
print(f"GPU {o.get('gpu', '?')}  driver {o.get('driver', '?')}  runtime {o.get('runtime', '?')}  "
      f"commit {o.get('commit', '?')}  shape {o.get('shape', '?')}")
print(f"ceilings: copy {f(c.get('copy_gb_s'))} GB/s (read+write), bf16 GEMM "
      f"{f(c.get('bf16_tflops'))} TFLOP/s")
print(f"{'figure':34} {'ours':>12} {'HF peer':>12} {'ours/peer':>10} {'vs ceiling':>12}")
for b in sorted(set(ob) | set(hb)):
    ours, peer = ob.get(b, {}).get("tok_per_s"), hb.get(b, {}).get("tok_per_s")
    ratio = ours / peer if ours and peer else None
    if b == 1:
        ceil = f"{f(r.get('batch1_ratio'), '{:.2f}')} roofline"
    else:
        ceil = f"{f(ob.get(b, {}).get('gemm_util'), '{:.3f}')} GEMM"
    print(f"{'decode tok/s, batch ' + str(b):34} {f(ours):>12} {f(peer):>12} "
          f"{f(ratio, '{:.2f}x'):>10} {ceil:>12}")
op, hp = o.get("prefill", {}), h.get("prefill", {})
ours, peer = op.get("tok_per_s"), hp.get("tok_per_s")
print(f"{'prefill tok/s, ' + str(op.get('tokens', 2048)) + ' tokens':34} {f(ours):>12} "
      f"{f(peer):>12} {f(ours / peer if ours and peer else None, '{:.2f}x'):>10}")
s, hs = o.get("shared_prefix", {}), h.get("shared_prefix", {})
print(f"{'n=16 shared step ms':34} {f(s.get('shared_step_ms'), '{:.2f}'):>12} "
      f"{f(hs.get('samples_step_ms'), '{:.2f}'):>12}")
print(f"{'single seq step ms (same ctx)':34} {f(s.get('single_step_ms'), '{:.2f}'):>12} "
      f"{f(hs.get('single_step_ms'), '{:.2f}'):>12}")
print(f"{'16 unshared step ms':34} {f(s.get('unshared_step_ms'), '{:.2f}'):>12}")
print(f"{'shared / single (target <= 1.3)':34} {f(s.get('shared_over_single'), '{:.2f}'):>12} "
      f"{f(hs.get('samples_over_single'), '{:.2f}'):>12}")
EOF
}

for st in "${PLAN[@]}"; do
    if (($(left) < 10)); then
        fail "budget spent before stage $st"
        continue
    fi
    "stage_$st" || true
done
log "done: status $STATUS"
exit $STATUS
