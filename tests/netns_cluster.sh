#!/usr/bin/env bash
# netns_cluster.sh — the real its cluster across several "hosts" on one machine: network
# namespaces joined by a bridge, itsd on one host, four workers (one per role) on each of two
# worker hosts, itsctl on a fourth, everything over TCP with CurveZMQ on and allow-lists.
#
#   netns_cluster.sh BUILD_DIR MODEL_DIR
#
# BUILD_DIR holds bin/itsd, bin/itsw, bin/itsctl; MODEL_DIR is a Hugging Face checkpoint
# (the tiny reference one: ../shared/hf-reference/tiny-llama31). Needs root, iproute2 with
# netns support, tcpdump and python3.
#
# What it checks, in order:
#   1. the 8 workers register over TCP with their CURVE keys (itsctl workers: 8 ready);
#   2. encryption: tcpdump on the client's, itsd's and worker host w1's links while a request
#      with a distinctive question runs; the request succeeds, w1 got part of its work, and
#      neither the question nor the answer appears in any capture (bytes, and each TCP stream
#      reassembled), while the captures do hold TCP payload and the ZMTP greeting naming CURVE
#      (so a plain-text leak would have been seen);
#   3. link down: while a longer request has a job on a w1 worker, w1's link goes down (its
#      bridge port in the switch namespace); the request still completes (on w2's workers),
#      itsd drops all four w1 workers as silent and re-dispatches their jobs, and
#      `itsctl workers` no longer lists them;
#   4. link up: w1's workers register again (ready in `itsctl workers`) and take jobs again.
#
# Exit status: 0 pass; 1 fail, with one `netns: FAIL: <what>` line and the tails of the
# daemons' logs on stderr; 77 skip (`netns: SKIP: <reason>`) when namespaces cannot be made
# here (not root, no `ip`, no netns support).
#
# Owns: the namespaces its$$-* it creates (a veth pair per host lives and dies with them),
# the processes it starts and a scratch directory. The EXIT trap ends every process and
# deletes every namespace, also after a failure or a signal. Every wait is bounded, and every
# daemon also runs under `timeout` as a last resort. Must never: touch the caller's own network
# namespace (all links are made inside the new ones), or leave a namespace or process behind.
#
# Knobs (environment): ITS_NETNS_KEEP=1 keeps the scratch directory (logs, captures, configs);
# ITS_NETNS_VERBOSE=1 prints progress lines with timings; ITS_NETNS_CURVE=off runs the same
# cluster in plain text (plaintext_nonloopback = force), where the encryption check must FAIL
# naming the leak: the check's own control.
#
# Liveness: itsd drops a worker it has not heard from for heartbeat_ms x liveness; a worker
# reconnects with a fresh socket (and registers again) after missing itsd's heartbeats for the
# same span. Both are set to HB_MS x LIVENESS below, short enough for a quick test and long
# enough that a CPU worker's engine step on a loaded two-core machine (or under ASan) never
# looks like a lost host.
set -Eeuo pipefail
PATH=$PATH:/usr/sbin:/sbin # ip; a non-login root shell may lack them

HB_MS=200          # heartbeat interval, itsd and workers
LIVENESS=15        # missed heartbeats before a peer is lost: 3 s
MAX_TOKENS=32      # longest draft, feedback and edit, in tokens (itsd's default)
FLAP_TOKENS=160    # the same for the request that runs while a link goes down
DAEMON_LIFE_S=600  # last-resort bound on every daemon (the trap normally ends them)

me=netns
curve=${ITS_NETNS_CURVE:-on}
[[ $curve == on || $curve == off ]] || { echo "ITS_NETNS_CURVE must be on or off" >&2; exit 2; }
t0=${EPOCHREALTIME/[.,]/}
say() {
    [[ ${ITS_NETNS_VERBOSE:-0} == 1 ]] || return 0
    local us=$((${EPOCHREALTIME/[.,]/} - t0))
    printf 'netns: [%3d.%03d s] %s\n' $((us / 1000000)) $((us / 1000 % 1000)) "$*" >&2
}
skip() {
    echo "$me: SKIP: $*"
    exit 77
}
fail() {
    echo "$me: FAIL: $*" >&2
    failed=1
    exit 1
}

failed=0
nss=()      # namespaces created, in creation order
pids=()     # background processes started (each a `timeout` wrapping the real one)
pnames=()   # their names, for messages
dir=

show_logs() {
    [[ -n $dir && -d $dir ]] || return 0
    local f
    for f in "$dir"/*.log; do
        [[ -f $f ]] || continue
        echo "---- $(basename "$f") (last 25 lines, heartbeat traces left out) ----" >&2
        grep -v 'debug: worker message heartbeat' "$f" | tail -n 25 >&2 || true
    done
}

# Ends the processes: SIGTERM (a daemon drains, timeout forwards the signal), up to 5 s, then
# SIGKILL. Returns when all are gone.
stop_all() {
    local p i alive
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for ((i = 0; i < 50; i++)); do
        alive=0
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    pids=()
    pnames=()
}

cleanup() {
    local rc=$?
    trap - EXIT ERR INT TERM
    set +e
    if ((rc != 0 && rc != 77)); then
        ((failed)) || echo "$me: FAIL: exited with status $rc" >&2
        show_logs
    fi
    stop_all
    # Processes left in a namespace would keep it alive after `ip netns del`: say so.
    local ns left
    for ns in "${nss[@]}"; do
        left=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
        if [[ -n $left ]]; then
            echo "$me: processes still in $ns: $left; killing them" >&2
            # shellcheck disable=SC2086
            kill -KILL $left 2>/dev/null
        fi
        ip netns del "$ns" 2>/dev/null || echo "$me: could not delete namespace $ns" >&2
    done
    if [[ -n $dir && -d $dir ]]; then
        if [[ ${ITS_NETNS_KEEP:-0} == 1 ]]; then
            echo "$me: scratch directory kept: $dir" >&2
        else
            rm -rf -- "$dir"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "$me: FAIL: interrupted (SIGINT)" >&2; failed=1; exit 130' INT
trap 'echo "$me: FAIL: stopped by SIGTERM" >&2; failed=1; exit 143' TERM
trap 'fail "line $LINENO: \`$BASH_COMMAND\` failed"' ERR

# ---- arguments and preconditions -----------------------------------------------------------

(($# == 2)) || { echo "usage: $0 BUILD_DIR MODEL_DIR" >&2; exit 2; }
build=$(cd "$1" 2>/dev/null && pwd) || fail "build directory $1 does not exist"
model=$(cd "$2" 2>/dev/null && pwd) || fail "model directory $2 does not exist"
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
for b in itsd itsw itsctl; do
    [[ -x $build/bin/$b ]] || fail "$build/bin/$b is missing: build first (make BUILD=...)"
done
[[ -f $model/config.json ]] || fail "$model is not a Hugging Face model directory (no config.json)"
[[ -f $repo/configs/prompts/instruct.tmpl ]] || fail "no role templates in $repo/configs/prompts"

(($(id -u) == 0)) || skip "not root (network namespaces need CAP_NET_ADMIN and CAP_SYS_ADMIN)"
command -v ip >/dev/null || skip "no \`ip\` command (iproute2)"
command -v tcpdump >/dev/null || fail "tcpdump is missing (make deps installs it)"
command -v python3 >/dev/null || fail "python3 is missing (make deps installs it)"
command -v timeout >/dev/null || fail "timeout (coreutils) is missing"

ns_sw=its$$-sw ns_d=its$$-d ns_w1=its$$-w1 ns_w2=its$$-w2 ns_c=its$$-c
if ! err=$(ip netns add "$ns_sw" 2>&1); then
    skip "cannot create a network namespace: $err"
fi
nss+=("$ns_sw")

dir=$(mktemp -d "${TMPDIR:-/tmp}/its-netns-XXXXXX")

# ---- the network: a bridge in its$$-sw, one veth pair per host ------------------------------

declare -A addr=([$ns_d]=10.231.0.1 [$ns_w1]=10.231.0.11 [$ns_w2]=10.231.0.12
                 [$ns_c]=10.231.0.100)
declare -A port=([$ns_d]=p-d [$ns_w1]=p-w1 [$ns_w2]=p-w2 [$ns_c]=p-c)

# A kernel without bridge or veth support cannot build the topology at all: a skip, like no
# netns support. Past these two, any failure is the test's.
err=$(timeout 10 ip -n "$ns_sw" link add br0 type bridge 2>&1) ||
    skip "cannot create a bridge in a network namespace: $err"
err=$(timeout 10 ip -n "$ns_sw" link add probe0 type veth peer name probe1 2>&1) ||
    skip "cannot create a veth pair in a network namespace: $err"
timeout 10 ip -n "$ns_sw" link del probe0
timeout 10 ip -n "$ns_sw" link set br0 up
timeout 10 ip -n "$ns_sw" link set lo up
for ns in "$ns_d" "$ns_w1" "$ns_w2" "$ns_c"; do
    timeout 10 ip netns add "$ns" || fail "cannot create namespace $ns"
    nss+=("$ns")
    # Both ends are made inside the new namespaces: the caller's namespace never sees them.
    timeout 10 ip -n "$ns_sw" link add "${port[$ns]}" type veth peer name eth0 netns "$ns"
    timeout 10 ip -n "$ns_sw" link set "${port[$ns]}" master br0 up
    timeout 10 ip -n "$ns" link set lo up
    timeout 10 ip -n "$ns" addr add "${addr[$ns]}/24" dev eth0
    timeout 10 ip -n "$ns" link set eth0 up
done
say "namespaces and links up"

front=tcp://${addr[$ns_d]}:7700
back=tcp://${addr[$ns_d]}:7701
# Reachability first, so that a broken bridge is reported as such and not as a worker timeout:
# a TCP connection to a port nobody listens on is refused at once by a reachable host.
reach() {
    timeout 5 ip netns exec "$1" python3 -c '
import socket, sys
s = socket.socket()
s.settimeout(1)
try:
    s.connect((sys.argv[1], 9))
except ConnectionRefusedError:
    sys.exit(0)
except OSError:
    sys.exit(1)
sys.exit(0)' "$2" 2>/dev/null
}
for ns in "$ns_w1" "$ns_w2" "$ns_c"; do
    ok=0
    for _ in $(seq 20); do
        if reach "$ns" "${addr[$ns_d]}"; then
            ok=1
            break
        fi
        sleep 0.1
    done
    ((ok)) || fail "$ns cannot reach itsd's host ${addr[$ns_d]} over the bridge"
done

# ---- keys and configurations -------------------------------------------------------------------

mkdir -m 0700 "$dir/keys" "$dir/clients" "$dir/workers"
for k in itsd w1 w2 client; do
    timeout 10 "$build/bin/itsctl" keygen --out "$dir/keys/$k" >"$dir/keygen.out" 2>&1 ||
        fail "itsctl keygen --out $dir/keys/$k failed: $(tr '\n' ' ' <"$dir/keygen.out")"
done
cp "$dir/keys/client.pub" "$dir/clients/client.pub"
cp "$dir/keys/w1.pub" "$dir/workers/w1.pub"
cp "$dir/keys/w2.pub" "$dir/workers/w2.pub"

if [[ $curve == on ]]; then
    itsd_security="curve = on
secret_key = keys/itsd.key
client_keys = clients
worker_keys = workers
plaintext_nonloopback = refuse"
    ctl_keys=(--server-key "$dir/keys/itsd.pub" --key "$dir/keys/client.key")
else
    itsd_security="curve = off
plaintext_nonloopback = force"
    ctl_keys=()
fi
cat >"$dir/itsd.conf" <<EOF
# itsd of the netns test: TCP on its host's address, CURVE $curve, allow-lists, fast heartbeats.
[itsd]
frontend = $front
backend = $back
templates = $repo/configs/prompts
# debug: one line per job sent to a worker, which the test reads
log_level = debug
heartbeat_ms = $HB_MS
liveness = $LIVENESS
shutdown_ms = 2000

[limits]
# a lost job may be retried on the surviving host more than once
job_retries = 4
no_worker_grace_ms = 30000
default_deadline_ms = 120000

[instruct]
max_tokens = $MAX_TOKENS
[feedback]
max_tokens = $MAX_TOKENS
[edit]
max_tokens = $MAX_TOKENS

[security]
$itsd_security
EOF
timeout 30 "$build/bin/itsd" -t --config "$dir/itsd.conf" >"$dir/itsd-check.out" 2>&1 ||
    fail "itsd -t refuses the test's configuration: $(tr '\n' ' ' <"$dir/itsd-check.out")"

roles=(instruct feedback edit select)
for h in w1 w2; do
    for r in "${roles[@]}"; do
        cat >"$dir/itsw-$h-$r.conf" <<EOF
# itsw on worker host $h, role $r: connects to itsd over TCP with host $h's key.
[worker]
connect = $back
role = $r
model = $model
name = $h-$r
# eight workers share this machine's cores
threads = 1
max_seqs = 16
heartbeat_ms = $HB_MS
liveness = $LIVENESS
# debug: one line per job received, which the test reads
log_level = 3
EOF
        if [[ $curve == on ]]; then
            printf 'server_key = keys/itsd.pub\nkey = keys/%s.key\n' "$h" \
                >>"$dir/itsw-$h-$r.conf"
        fi
    done
done

# ---- processes ---------------------------------------------------------------------------------

# start NAME NAMESPACE CMD...: runs CMD in NAMESPACE in the background, output to NAME.log.
start() {
    local name=$1 ns=$2
    shift 2
    timeout -s KILL "$DAEMON_LIFE_S" ip netns exec "$ns" "$@" >"$dir/$name.log" 2>&1 &
    pids+=($!)
    pnames+=("$name")
}

# Fails when a started process has ended (a daemon crashed or refused to start).
check_alive() {
    local i
    for i in "${!pids[@]}"; do
        [[ ${pnames[$i]} == *-submit ]] && continue
        kill -0 "${pids[$i]}" 2>/dev/null ||
            fail "${pnames[$i]} exited unexpectedly (log: $dir/${pnames[$i]}.log)"
    done
}

ctl() {
    timeout 30 ip netns exec "$ns_c" "$build/bin/itsctl" --endpoint "$front" \
        "${ctl_keys[@]}" "$@"
}

# Workers whose id starts with PREFIX, and how many of them are ready, from `itsctl workers`
# run on the client host: prints "LISTED READY", or "-1 -1" when itsctl fails.
count_workers() {
    local out
    out=$(ctl workers --json --timeout 5 2>"$dir/ctl-workers.err") || {
        echo "-1 -1"
        return 0
    }
    python3 -c '
import json, sys
ws = [w for w in json.loads(sys.argv[1]) if w["id"].startswith(sys.argv[2])]
print(len(ws), sum(1 for w in ws if w["state"] == "ready"))' "$out" "$1"
}

# wait_for SECONDS WHAT CMD...: until CMD succeeds, checking the daemons are alive; fails
# naming WHAT when SECONDS pass.
wait_for() {
    local secs=$1 what=$2
    shift 2
    local end=$((SECONDS + secs))
    until "$@"; do
        check_alive
        ((SECONDS < end)) || fail "$what (waited ${secs} s)"
        sleep 0.2
    done
}

log_has() { grep -qE -- "$2" "$dir/$1.log" 2>/dev/null; }
# log_since NAME LINE REGEX: prints the first line after line LINE of NAME.log matching REGEX
# (awk's dialect); fails when there is none. One process: no pipe to break early.
log_since() {
    awk -v from="$2" -v re="$3" 'NR > from && $0 ~ re { print; found = 1; exit }
        END { exit !found }' "$dir/$1.log"
}
log_count() { grep -cE -- "$2" "$dir/$1.log" 2>/dev/null || true; }

# tcpdump on NS's eth0 into NAME.pcap; returns once it is capturing.
capture_start() {
    local name=$1 ns=$2
    # --immediate-mode and -U: each packet reaches the file at once, not when a kernel ring
    # block fills (a short capture would otherwise be empty); -Z root keeps the file writable
    # in our 0700 directory.
    start "$name" "$ns" tcpdump -i eth0 -n --immediate-mode -U -s 0 -Z root \
        -w "$dir/$name.pcap" tcp
    wait_for 10 "tcpdump in $ns did not start capturing" log_has "$name" "listening on"
}

capture_stop() {
    local name=$1 i
    for i in "${!pnames[@]}"; do
        if [[ ${pnames[$i]} == "$name" ]]; then
            kill -INT "${pids[$i]}" 2>/dev/null || true
            timeout 10 tail --pid="${pids[$i]}" -f /dev/null || true
            wait "${pids[$i]}" 2>/dev/null || true
            unset 'pids[i]' 'pnames[i]'
            pids=("${pids[@]}")
            pnames=("${pnames[@]}")
            return 0
        fi
    done
    fail "no capture named $name"
}

# ---- itsd and 8 workers ----------------------------------------------------------------------

start itsd "$ns_d" "$build/bin/itsd" --config "$dir/itsd.conf"
wait_for 20 "itsd did not bind $front and $back" log_has itsd "serving: "
if [[ $curve == on ]]; then
    log_has itsd "CURVE on: " || fail "itsd did not say CURVE is on"
fi
say "itsd serving"

# w1's and itsd's links are captured from before the workers connect, so that the captures
# hold the ZMTP greetings (which name the security mechanism in clear).
capture_start cap-w1 "$ns_w1"
capture_start cap-d "$ns_d"

for h in w1 w2; do
    ns_var=ns_$h
    for r in "${roles[@]}"; do
        start "$h-$r" "${!ns_var}" "$build/bin/itsw" serve --config "$dir/itsw-$h-$r.conf"
    done
done
# Eight workers listed and ready; their names are w1-ROLE and w2-ROLE, each registered once.
all_ready() { [[ $(count_workers w) == "8 8" ]]; }
# Loading the model takes seconds per worker, a minute under ASan on a busy machine.
wait_for 120 "the 8 workers did not all show ready in \`itsctl workers\` from $ns_c" all_ready
for h in w1 w2; do
    for r in "${roles[@]}"; do
        [[ $curve == on ]] || break 2
        log_has itsd "worker $h-$r authenticated by key '$h'" ||
            fail "itsd did not log worker $h-$r authenticated by key '$h'"
    done
done
say "8 workers ready"

# ---- 2. encryption: nothing readable on the wire ---------------------------------------------

secret="NETNS-SECRET-$$-$RANDOM-ultramarine-kumquat"
capture_start cap-c "$ns_c"
# itsd spreads a request's jobs over both hosts' workers (least loaded first), but which host
# gets what depends on timing: ask again (at most 5 times) until w1 has had a job, so that its
# capture covers prompts too.
results=()
w1_jobs_before=$(log_count itsd "-> worker w1-")
for ((i = 0; i < 5; i++)); do
    ctl submit --json --drafts 2 --feedbacks 2 --edits 1 --seed $((7 + i)) --timeout 60 \
        "Please explain $secret in one sentence." >"$dir/secret-$i.json" 2>"$dir/secret.err" ||
        fail "the request with the distinctive question failed (exit $?): $(cat "$dir/secret.err")"
    results+=("$dir/secret-$i.json")
    (($(log_count itsd "-> worker w1-") > w1_jobs_before)) && break
done
w1_jobs_after=$(log_count itsd "-> worker w1-")
capture_stop cap-c
capture_stop cap-w1
capture_stop cap-d
((w1_jobs_after > w1_jobs_before)) ||
    fail "no job of ${#results[@]} requests went to host w1, so its capture shows no prompt"
say "${#results[@]} request(s) with the secret done; analysing captures"

# For each capture: TCP payload bytes and streams (each direction of each connection,
# reassembled by sequence number), whether the ZMTP greeting names CURVE, and whether the
# question's string or the answer's text occurs in the raw file or in any stream.
analysis=$(python3 - "$dir" "$secret" "${results[@]}" <<'EOF'
import json, struct, sys

class Bad(Exception):
    pass

d, secret, result_paths = sys.argv[1], sys.argv[2].encode(), sys.argv[3:]
problems = []
needles = {"the question's string": secret}
for i, path in enumerate(result_paths):
    result = json.load(open(path))
    answer = (result.get("answer") or "").encode()
    if result.get("partial"):
        problems.append(f"the result of request {i + 1} is partial")
    # The answer (random-weight gibberish) travels worker -> itsd -> client; a slice of 16
    # bytes or more cannot occur in ciphertext by chance.
    if len(answer) >= 16:
        needles[f"the answer text of request {i + 1}"] = answer[:64]

def streams(path):
    raw = open(path, "rb").read()
    if len(raw) < 24:
        raise Bad(f"{path}: not a pcap file ({len(raw)} bytes)")
    magic = struct.unpack("<I", raw[:4])[0]
    if magic == 0xA1B2C3D4:
        end = "<"
    elif magic == 0xD4C3B2A1:
        end = ">"
    else:
        raise Bad(f"{path}: unknown pcap magic {magic:#x}")
    linktype = struct.unpack(end + "I", raw[20:24])[0]
    if linktype != 1:
        raise Bad(f"{path}: link type {linktype}, expected Ethernet")
    flows, payload, off = {}, 0, 24
    while off + 16 <= len(raw):
        incl = struct.unpack(end + "I", raw[off + 8:off + 12])[0]
        pkt = raw[off + 16:off + 16 + incl]
        off += 16 + incl
        if len(pkt) < 14 + 20 or pkt[12:14] != b"\x08\x00":
            continue
        ip = pkt[14:]
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack(">H", ip[2:4])[0]
        if ip[9] != 6 or len(ip) < ihl + 20:
            continue
        tcp = ip[ihl:total]
        doff = (tcp[12] >> 4) * 4
        data = tcp[doff:]
        if not data:
            continue
        key = (ip[12:16], tcp[0:2], ip[16:20], tcp[2:4])
        seq = struct.unpack(">I", tcp[4:8])[0]
        flows.setdefault(key, {})[seq] = data
        payload += len(data)
    joined = [b"".join(segs[s] for s in sorted(segs)) for segs in flows.values()]
    return raw, joined, payload

for name in ("cap-c", "cap-d", "cap-w1"):
    try:
        raw, joined, payload = streams(f"{d}/{name}.pcap")
    except (Bad, OSError, IndexError, struct.error) as e:
        problems.append(f"{name}.pcap: {e}")
        continue
    if payload < 1024:
        problems.append(f"{name}.pcap holds only {payload} bytes of TCP payload: the capture "
                        "does not see the traffic, so it proves nothing")
    if not any(b"CURVE" in s[:64] for s in joined):
        problems.append(f"{name}.pcap has no ZMTP greeting naming CURVE")
    for what, needle in needles.items():
        if needle in raw or any(needle in s for s in joined):
            problems.append(f"{what} is readable in {name}.pcap (plain text on the wire)")
    print(f"netns: {name}.pcap: {len(joined)} TCP streams, {payload} payload bytes",
          file=sys.stderr)

print("; ".join(problems))
sys.exit(1 if problems else 0)
EOF
) || fail "${analysis:-the capture analysis failed}"
say "captures hold TCP payload and CURVE greetings, no question or answer text"

# ---- 3. link down under a running request ------------------------------------------------------

# Drafts, feedbacks and edits with longer generations than the other requests: jobs on both
# hosts, each running far longer than the 20 ms between two looks at w1's worker logs, and
# more work left when the link goes down than itsd's liveness span. The link goes down as soon
# as a w1 worker logs that it started a generate job of this request: that job is then
# certainly running on w1, and its result cannot reach itsd.
mark=$(wc -l <"$dir/itsd.log")
declare -A wmark
for r in "${roles[@]}"; do wmark[$r]=$(wc -l <"$dir/w1-$r.log"); done
w1_running() {
    local r
    for r in "${roles[@]}"; do
        if started=$(log_since "w1-$r" "${wmark[$r]}" 'job [0-9]+: generate'); then
            started="w1-$r ${started#*: }"
            return 0
        fi
    done
    return 1
}
ctl submit --json --drafts 2 --feedbacks 2 --edits 1 --max-tokens "$FLAP_TOKENS" --seed 11 \
    --timeout 120 "Describe the water cycle step by step." >"$dir/flap.json" 2>"$dir/flap.err" &
submit_pid=$!
pids+=("$submit_pid")
pnames+=(flap-submit)
end=$((SECONDS + 60))
until w1_running; do
    kill -0 "$submit_pid" 2>/dev/null ||
        fail "the request ended before any w1 worker started one of its jobs:" \
            "$(head -c 300 "$dir/flap.err")"
    ((SECONDS < end)) || fail "no w1 worker started a job of the long request within 60 s"
    sleep 0.02
done
timeout 10 ip -n "$ns_sw" link set "${port[$ns_w1]}" down
down_at=$SECONDS
say "w1's link down while $started"

# The submit's own --timeout bounds this wait; `timeout` in ctl bounds it again.
set +e
wait "$submit_pid"
submit_rc=$?
set -e
unset 'pids[-1]' 'pnames[-1]'
((submit_rc == 0)) ||
    fail "the request running when w1's link went down failed (exit $submit_rc):" \
        "$(cat "$dir/flap.err")"
python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
ok = not r["partial"] and r["candidates"] and isinstance(r["score"], (int, float))
sys.exit(0 if ok else 1)' "$dir/flap.json" ||
    fail "the request's result is partial or malformed: $(head -c 400 "$dir/flap.json")"
say "request done $((SECONDS - down_at)) s after the link went down"

# All four w1 workers dropped by itsd (silent: the TCP connections stay open on a dead link),
# with their running jobs re-dispatched; none of w2's. The request ended after the first drop:
# it needed the work that was re-dispatched.
lost_re='worker w1-[a-z]+ \([a-z]+\) (silent for [0-9]+ ms|unreachable): dropped'
w1_all_dropped() {
    local r
    for r in "${roles[@]}"; do
        log_since itsd "$mark" "worker w1-$r [(][a-z]+[)] (silent for|unreachable)" >/dev/null ||
            return 1
    done
}
wait_for $((LIVENESS * HB_MS / 1000 + 10)) "itsd did not drop all four w1 workers" w1_all_dropped
rid=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["id"])' "$dir/flap.json")
first_drop=$(grep -nE -m1 -- "$lost_re" "$dir/itsd.log" | cut -d: -f1)
done_at=$(grep -nF -m1 -- "$rid done:" "$dir/itsd.log" | cut -d: -f1) ||
    fail "itsd logged no '$rid done:' line for the request"
((done_at > first_drop)) ||
    fail "request $rid was done (itsd.log line $done_at) before itsd dropped w1's workers" \
        "(line $first_drop): it did not depend on the lost host"
if log_has itsd 'worker w2-[a-z]+ \([a-z]+\) (silent for|unreachable)'; then
    fail "itsd dropped a w2 worker although only w1's link went down"
fi
redispatched=$(grep -oE -- "$lost_re, [0-9]+ jobs re-dispatched" "$dir/itsd.log" |
    grep -oE '[0-9]+ jobs' | awk '{n += $1} END {print n + 0}')
((redispatched >= 1)) ||
    fail "itsd dropped w1's workers but re-dispatched no job, though one was running on w1"
listed=$(count_workers w1-)
[[ $listed == "0 0" ]] ||
    fail "\`itsctl workers\` after the drop: w1 workers listed and ready: $listed (expected 0 0)"
listed=$(count_workers w2-)
[[ $listed == "4 4" ]] ||
    fail "\`itsctl workers\` after the drop: w2 workers listed and ready: $listed (expected 4 4)"
say "w1's workers dropped, $redispatched job(s) re-dispatched"

# ---- 4. link up: w1 registers again and takes work --------------------------------------------

up_mark=$(wc -l <"$dir/itsd.log")
timeout 10 ip -n "$ns_sw" link set "${port[$ns_w1]}" up
up_at=$SECONDS
w1_back() { [[ $(count_workers w1-) == "4 4" ]]; }
# A worker notices itsd's silence after liveness intervals and reconnects with a fresh socket
# every such interval until a connection gets through.
wait_for 60 "w1's workers did not register again after the link came back" w1_back
for r in "${roles[@]}"; do
    log_since itsd "$up_mark" "worker w1-$r registered" >/dev/null ||
        fail "itsctl lists w1-$r again but itsd logged no new registration of it"
done
say "w1's workers registered again $((SECONDS - up_at)) s after the link came back"

jobs_mark=$(wc -l <"$dir/itsd.log")
took=0
for ((i = 0; i < 10 && !took; i++)); do
    ctl submit --json --drafts 2 --feedbacks 2 --edits 1 --seed $((100 + i)) --timeout 60 \
        "What is a rainbow?" >"$dir/after.json" 2>"$dir/after.err" ||
        fail "a request after the link came back failed: $(cat "$dir/after.err")"
    if log_since itsd "$jobs_mark" '-> worker w1-' >/dev/null; then
        took=1
    fi
done
((took)) || fail "w1's workers are registered again but got no job in 10 requests"
say "w1's workers take jobs again"

# ---- clean stop: every daemon exits cleanly (a sanitizer build reports here) -----------------

stop_all
san=$(grep -lE 'ERROR: (Address|Leak)Sanitizer|runtime error:' "$dir"/*.log 2>/dev/null || true)
[[ -z $san ]] || fail "sanitizer report in: $(echo "$san" | tr '\n' ' ')"
echo "$me: PASS: 8 workers on 2 hosts over TCP with CURVE; nothing readable on the wire;" \
    "a request survived w1's link going down; w1 came back and took work"
