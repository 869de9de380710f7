#!/bin/bash
# The farm's block store and work sharing (issue 12, items 1 to 3):
#
#   bench/farm-store.sh [MIB] [--rounds N] [--largest-only]
#                                  # results in target/farm-store-bench.txt
#   sudo bench/farm-store.sh [MIB] --link RATE  # the workers behind a link capped at RATE
#                                               # (tc tbf, e.g. 100mbit), in network namespaces
#
# A release of 3 sources (sample releases with a library of MIB MiB, default
# 64, that changes in every release, like Tor Browser's libxul.so: the
# blocks every IUK of a release shares). Three farms build it side by side,
# each worker a separate process pinned to a core of its own (taskset) with
# one compression thread:
#   1 worker;  2 workers sharing the coordinator's block store;  2 workers
#   without it (--block-store-size 0).
# Then the largest IUK alone (6.0 -> 6.3), on 1 worker and on 2 workers
# (the second one helps: work sharing), N rounds (default 5) of the pair
# one after the other, the pair's order swapped every round: these hosts'
# speed drifts by 10 to 20% over a minute, so the ratio reported is the
# median of the rounds' ratios, and every round's walls and CPU seconds
# are printed. --largest-only runs only these rounds. Before and after the
# rounds, the host's own scaling: the same IUK built by `iukfarm build
# --threads 1` (no farm) alone on core 0, then twice at once on cores 0 and
# 1 -- what two independent single-core builders would give here.
# Printed per farm: wall time, CPU seconds of the whole farm (workers and
# coordinator), blocks compressed by the jobs and by helpers (summed over
# the kits), blocks compressed twice, MiB of blocks that crossed the
# network (to and from the store and the helpers; the workers have the ISO
# archive, and kits go up either way), the coordinator's peak resident
# memory (store index and queued offers), the ratios the issue asks for. Kits
# must be the same bytes in every farm. The farms' logs (workers -vv, with
# each helper batch's time) are kept in target/farm-store-logs/.
set -euo pipefail
cd "$(dirname "$0")/.."
mib=64 link= rounds=5 release=yes
while [ $# -gt 0 ]; do
    case $1 in
        --link) link=${2:?--link needs a rate, e.g. 100mbit}; shift 2 ;;
        --rounds) rounds=${2:?--rounds needs a number}; shift 2 ;;
        --largest-only) release=; shift ;;
        [0-9]*) mib=$1; shift ;;
        *) echo "usage: farm-store.sh [MIB] [--link RATE] [--rounds N] [--largest-only]" >&2; exit 2 ;;
    esac
done
[[ $mib =~ ^[1-9][0-9]*$ ]] || { echo "farm-store.sh: MIB is a whole number of MiB" >&2; exit 2; }
[[ $rounds =~ ^[1-9][0-9]?$ ]] || { echo "farm-store.sh: --rounds takes 1 to 99" >&2; exit 2; }
[ -z "$link" ] || [ "$(id -u)" = 0 ] || { echo "farm-store.sh: --link needs root (network namespaces)" >&2; exit 2; }
out=target/farm-store-bench.txt
logs=$PWD/target/farm-store-logs
for t in gpg taskset /usr/bin/time python3; do
    command -v "$t" >/dev/null || { echo "farm-store.sh: $t is missing" >&2; exit 2; }
done
[ -z "$link" ] || for t in ip tc; do
    command -v "$t" >/dev/null || { echo "farm-store.sh: $t is missing (iproute2)" >&2; exit 2; }
done
cargo build --release -q -p iukfarm
cargo build --release -q -p iukfarm-tests --bin delay-proxy
bin=$PWD/target/release/iukfarm
proxy=$PWD/target/release/delay-proxy
work=$(mktemp -d /var/tmp/farm-store.XXXXXX)
nets=()
cleanup() {
    jobs -p | xargs -r kill 2>/dev/null || true
    wait 2>/dev/null || true
    for n in "${nets[@]}"; do ip netns del "$n" 2>/dev/null || true; done
    [ -z "$link" ] || ip link del iukb-br 2>/dev/null || true
    gpgconf --homedir "$work/gnupg" --kill gpg-agent 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# The sample releases are kept for the next run (like bench/run.sh's corpus).
isos=$PWD/target/farm-store-isos-$mib
if [ ! -e "$isos/done" ]; then
    echo "== sample releases (4, a ${mib} MiB library changed in each) in $isos"
    rm -rf "$isos"
    "$bin" samples --releases 4 --scale 8 --big-file-mib "$mib" --output-dir "$isos" 2>/dev/null
    touch "$isos/done"
fi
mkdir -m 700 "$work/gnupg"
g() { gpg --homedir "$work/gnupg" --batch --pinentry-mode loopback --passphrase '' "$@"; }
g --quick-gen-key "farm-store bench <bench@example.invalid>" ed25519 sign never 2>/dev/null
g --armor --export-secret-keys > "$work/key.asc"

# Workers reach the coordinator at $addr: loopback, or through the capped
# veth of their namespace (the coordinator keeps listening on loopback; a
# proxy in the root namespace forwards the bridge's port to it).
if [ -n "$link" ]; then
    ip link add iukb-br type bridge
    ip addr add 10.231.0.1/24 dev iukb-br
    ip link set iukb-br up
    for n in 1 2; do
        ns=iukb-w$n
        ip netns add "$ns"
        nets+=("$ns")
        ip link add "iukb-v$n" type veth peer name eth0 netns "$ns"
        ip link set "iukb-v$n" master iukb-br up
        ip -n "$ns" addr add "10.231.0.1$n/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
        # Both directions capped: the worker's egress, and its ingress at
        # the bridge port.
        ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate "$link" burst 64kb latency 200ms
        tc qdisc add dev "iukb-v$n" root tbf rate "$link" burst 64kb latency 200ms
    done
fi

# farm NAME WORKERS SOURCES [coordinator flags...]
farm() {
    local name=$1 workers=$2 sources=$3
    shift 3
    local d=$work/$name
    mkdir -p "$d"
    /usr/bin/time -f "%M %e %U %S" -o "$d/coordinator.time" \
        "$bin" -v coordinator --new-version 6.3 --source-versions "$sources" \
        --source-date-epoch 1730285444 --iso-root "$isos" --output-dir "$d/release" \
        --listen 127.0.0.1:0 --signing-key "$work/key.asc" --linger 60s "$@" \
        2> "$d/coordinator.log" &
    local coordinator=$!
    local port=
    for _ in $(seq 600); do
        port=$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$d/coordinator.log" | head -1)
        [ -n "$port" ] && break
        sleep 0.1
    done
    [ -n "$port" ] || { cat "$d/coordinator.log" >&2; exit 1; }
    local url=http://127.0.0.1:$port proxy_pid=
    if [ -n "$link" ]; then
        "$proxy" 10.231.0.1:$((port + 1)) "127.0.0.1:$port" 0 2> "$d/proxy.log" &
        proxy_pid=$!
        url=http://10.231.0.1:$((port + 1))
        sleep 0.3
    fi
    local t0 pids=()
    t0=$(date +%s.%N)
    for n in $(seq "$workers"); do
        local run=()
        [ -z "$link" ] || run=(ip netns exec "iukb-w$n")
        /usr/bin/time -f "%e %U %S" -o "$d/w$n.time" \
            "${run[@]}" taskset -c $((n - 1)) "$bin" -vv worker --name "w$n" --coordinator "$url" \
            --cache-dir "$d/cache-w$n" --iso-root "$isos" -j 1 --once \
            2> "$d/w$n.log" &
        pids+=($!)
    done
    # The end is the coordinator's own log line, watched with grep rather
    # than polled through `iukfarm status`: on 2 cores, a client process
    # every 0.2 s took CPU from the workers (1 to 2 s per farm), which a
    # one-worker farm absorbed on its idle core and a two-worker farm did not.
    while ! grep -q "release over; serving" "$d/coordinator.log"; do
        # Workers (--once) leave when told the release is over, which can
        # be just before the coordinator says so.
        if ! kill -0 "$coordinator" 2>/dev/null || { ! kill -0 "${pids[@]}" 2>/dev/null &&
            ! grep -q "IUKs built, verified and signed" "$d/coordinator.log"; }; then
            tail -20 "$d/coordinator.log" "$d"/w*.log >&2
            exit 1
        fi
        sleep 0.2
    done
    local t1
    t1=$(sed -n 's/^\([0-9T:.-]*Z\) .*IUKs built, verified and signed.*/\1/p' "$d/coordinator.log")
    if [ -z "$t1" ]; then
        tail -20 "$d/coordinator.log" "$d"/w*.log >&2
        exit 1
    fi
    t1=$(date -d "$t1" +%s.%N)
    "$bin" status --json --coordinator "http://127.0.0.1:$port" > "$d/status.json"
    "$bin" cancel --coordinator "http://127.0.0.1:$port" >/dev/null
    wait "${pids[@]}"
    [ -z "$proxy_pid" ] || kill "$proxy_pid"
    wait
    mkdir -p "$logs/$name"
    cp "$d"/*.log "$logs/$name/"
    python3 - "$d" "$name" "$workers" "$t0" "$t1" <<'PY' | tee -a "$work/table"
import json, sys, glob, re
d, name, workers, t0, t1 = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
s = json.load(open(f"{d}/status.json"))
cpu = 0.0
for f in glob.glob(f"{d}/*.time"):
    e, u, sy = open(f).read().split()[-3:]
    cpu += float(u) + float(sy)
jobs = s["jobs"]
comp = sum(j["blocks"]["compressed"] for j in jobs)
helped = sum(j["blocks"].get("from_helpers", 0) for j in jobs)
farm = sum(j["blocks"]["from_farm"] for j in jobs)
cache = sum(j["blocks"]["from_cache"] for j in jobs)
st = s.get("block_store") or {}
largest = max(jobs, key=lambda j: j["size"])
lb = largest["blocks"]
lall = lb["compressed"] + lb.get("from_helpers", 0) + lb["from_cache"] + lb["from_farm"]
share = lb.get("from_helpers", 0) / max(lall, 1)
rss = int(open(f"{d}/coordinator.time").read().split()[-4]) / 1024
net = (st.get("sent_bytes", 0) + st.get("received_bytes", 0) + st.get("helper_bytes", 0)) / 1048576
# Helpers' time from their debug lines: compressing, and waiting for a batch.
busy = idle = 0.0
for f in glob.glob(f"{d}/w*.log"):
    for line in open(f):
        m = re.search(r"for another job in ([\d.]+)s, after waiting ([\d.]+)s", line)
        if m:
            busy += float(m.group(1))
            idle += float(m.group(2))
helping = f"  helpers busy {100 * busy / (busy + idle):.0f}% of {busy + idle:.1f} s" if busy else ""
print(f"{name:<14} wall {t1 - t0:7.1f} s  farm CPU {cpu:7.1f} s  compressed {comp:5d}  "
      f"by helpers {helped:4d}  from caches {cache:5d}  from store {farm:5d}  "
      f"twice {st.get('duplicates', 0):4d}  network (blocks) {net:6.1f} MiB  "
      f"largest kit {largest['name']} on {largest['worker']}, {100 * share:.0f}% by helpers  "
      f"coordinator peak RSS {rss:.0f} MiB{helping}")
# Compressions: the jobs' own, plus the blocks helpers took (the store
# hands each out once; summing the kits' "from helpers" would count a
# block twice when two jobs used the same helper's form).
done = comp + (st["helped"] if "helped" in st else helped)
json.dump({"name": name, "wall": t1 - t0, "cpu": cpu, "compressed": done,
           "kits": {j["name"]: j["sha256"] for j in jobs}},
          open(f"{d}/result.json", "w"))
PY
}

: > "$work/table"
rm -rf "$logs"
echo "== farms (${link:-loopback}; each worker on a core of its own, -j 1)"
# scaling NAME: the largest IUK built alone on core 0, then twice at once.
scaling() {
    local d=$work/$1
    mkdir -p "$d"
    b() {
        /usr/bin/time -f "%e %U %S" -o "$d/$1.time" taskset -c "$2" "$bin" build -q \
            --old-iso "$isos/tails-amd64-6.0/tails-amd64-6.0.iso" \
            --new-iso "$isos/tails-amd64-6.3/tails-amd64-6.3.iso" \
            --source-date-epoch 1730285444 --threads 1 --out "$d/$1.iuk"
    }
    b alone 0
    # Each waited for by its pid: a plain `wait` would not fail with them.
    local first second
    b first 0 &
    first=$!
    b second 1 &
    second=$!
    wait "$first"
    wait "$second"
    python3 - "$d" "$1" <<'PY' | tee -a "$work/table"
import sys, hashlib
d, name = sys.argv[1], sys.argv[2]
wall = {k: float(open(f"{d}/{k}.time").read().split()[-3]) for k in ["alone", "first", "second"]}
digests = {hashlib.sha256(open(f"{d}/{k}.iuk", "rb").read()).hexdigest() for k in wall}
same = len(digests) == 1
open(f"{d}/sha256", "w").write(" ".join(sorted(digests)))
both = max(wall["first"], wall["second"])
print(f"{name:<14} iukfarm build --threads 1: alone {wall['alone']:.1f} s; two at once "
      f"{wall['first']:.1f} and {wall['second']:.1f} s: two single-core builders here do "
      f"{2 * wall['alone'] / both:.2f}x the work of one{'' if same else '  KITS DIFFER'}")
PY
    rm -f "$d"/*.iuk
}

if [ -n "$release" ]; then
    farm one-worker 1 "6.0 6.1 6.2"
    farm two-shared 2 "6.0 6.1 6.2"
    farm two-alone 2 "6.0 6.1 6.2" --block-store-size 0
fi
scaling scaling-before
for r in $(seq "$rounds"); do
    if [ $((r % 2)) = 1 ]; then
        farm "largest-one-$r" 1 6.0
        farm "largest-two-$r" 2 6.0
    else
        farm "largest-two-$r" 2 6.0
        farm "largest-one-$r" 1 6.0
    fi
done
scaling scaling-after

python3 - "$work" "$mib" "${link:-loopback}" "$rounds" "$release" <<'PY' | tee "$out"
import json, statistics, sys
work, mib, link, rounds, release = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
names = ["one-worker", "two-shared", "two-alone"] if release else []
r = {n: json.load(open(f"{work}/{n}/result.json")) for n in names}
pairs = [tuple(json.load(open(f"{work}/largest-{k}-{i}/result.json")) for k in ["one", "two"])
         for i in range(1, rounds + 1)]
print(f"farm-store bench: 3 sources, a {mib} MiB library changed in every release, link {link}")
print(open(f"{work}/table").read().rstrip())
kits = [v["kits"] for v in r.values()] + [l["kits"] for pair in pairs for l in pair]
# The largest kit's digest must be the same everywhere; so must every kit
# of the release farms.
same = len({json.dumps(v["kits"], sort_keys=True) for v in r.values()}) <= 1
same = same and len({json.dumps(k, sort_keys=True) for k in kits[len(r):]}) == 1
same = same and all(kits[-1].items() <= k.items() for k in kits)
builds = [open(f"{work}/scaling-{w}/sha256").read() for w in ["before", "after"]]
same = same and all(b == next(iter(kits[-1].values())) for b in builds)
print(f"kits identical in all {len(kits)} farms and the 6 builds alone: {'yes' if same else 'NO'}")
walls = [l1["wall"] / l2["wall"] for l1, l2 in pairs]
cpus = [l2["cpu"] / l1["cpu"] for l1, l2 in pairs]
for i, (l1, l2) in enumerate(pairs, 1):
    first = "1 worker first" if i % 2 else "2 workers first"
    print(f"  round {i} ({first}): 1 worker {l1['wall']:.1f} s wall, {l1['cpu']:.1f} s CPU; "
          f"2 workers {l2['wall']:.1f} s wall, {l2['cpu']:.1f} s CPU; {walls[i - 1]:.2f}x")
print(f"the largest IUK alone, wall 1 worker / 2 workers: {statistics.median(walls):.2f}x, median of "
      f"{rounds} ({', '.join(f'{w:.2f}' for w in walls)}); median wall 1 worker / median wall 2 workers: "
      f"{statistics.median(l1['wall'] for l1, _ in pairs) / statistics.median(l2['wall'] for _, l2 in pairs):.2f}x; "
      f"farm CPU 2 / 1: {statistics.median(cpus):.2f}x ({', '.join(f'{c:.2f}' for c in cpus)})")
if release:
    o, s, a = r["one-worker"], r["two-shared"], r["two-alone"]
    print(f"farm CPU, 2 workers / 1 worker: with the store {s['cpu'] / o['cpu']:.2f}x, without {a['cpu'] / o['cpu']:.2f}x")
    print(f"wall, 1 worker / 2 workers:     with the store {o['wall'] / s['wall']:.2f}x, without {o['wall'] / a['wall']:.2f}x")
    print(f"wall, 2 workers without / with the store: {a['wall'] / s['wall']:.2f}x")
    print(f"blocks compressed beyond the one-worker farm's {o['compressed']}: with the store "
          f"{s['compressed'] - o['compressed']}, without {a['compressed'] - o['compressed']}")
sys.exit(0 if same else 1)
PY
