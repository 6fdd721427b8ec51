#!/usr/bin/env bash
# Compares two builds on the split 2+2 cluster (scripts/cluster.sh), alternating them in one
# run: fan-out to 2,000 subscribers with both clients (tasks, like ordinary clients; epoll,
# the fastest), as a ramp (best step with no loss and p99 <= 100 ms) and at a fixed load
# (the servers' CPU per delivery, the finer measure). Prints each run and the new/old ratios.
#
#   OLD_BIN=dir NEW_BIN=dir scripts/bench-ab.sh
#   ROUNDS=3 (alternations)  FIXED_RATE=400 (messages/s of the fixed load)  PORT_BASE=4650
#
# Build each side with `cargo build --release -p ringcast-gateway -p ringcast-topic-server
# -p ringcast-tests` and copy gateway, topic-server and ringcast-load out of target/release.
# Loopback only; every process stops by itself or at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OLD_BIN:?set OLD_BIN to the old build's binaries}" "${NEW_BIN:?set NEW_BIN to the new build's binaries}"
ROUNDS=${ROUNDS:-3}
FIXED_RATE=${FIXED_RATE:-400}
base=${PORT_BASE:-4650}
gw="$base,$((base + 1))"
ts="$((base + 3000)),$((base + 3001))"
export GATEWAY_CLIENT_RATE=0 RUST_LOG=${RUST_LOG:-warn}
out=$(mktemp -d)
log="$out/summaries"

cluster=""
stop_cluster() {
  if [ -n "$cluster" ]; then kill -TERM "$cluster" 2>/dev/null || true; wait "$cluster" 2>/dev/null || true; fi
  cluster=""
}
trap stop_cluster EXIT

for round in $(seq "$ROUNDS"); do
  for side in old new; do
    bin=$OLD_BIN
    [ "$side" = new ] && bin=$NEW_BIN
    GATEWAY_PORTS=$gw TOPIC_SERVER_PORTS=$ts RINGCAST_BIN_DIR=$bin \
      bash scripts/cluster.sh >"$out/cluster.log" 2>&1 &
    cluster=$!
    for _ in $(seq 150); do grep -q READY "$out/cluster.log" && break; sleep 0.2; done
    grep -q READY "$out/cluster.log" || { cat "$out/cluster.log" >&2; exit 1; }
    watch=$(for p in $(pgrep -f "^$bin/(gateway|topic-server)"); do printf 'p%s=%s,' "$p" "$p"; done)
    urls="ws://127.0.0.1:${gw%,*},ws://127.0.0.1:${gw#*,}"
    for client in tasks epoll; do
      for mode in ramp fixed; do
        args=(--start-rate 100 --step-secs 3 --p99-ms 100)
        [ "$mode" = fixed ] && args=(--start-rate "$FIXED_RATE" --fixed --step-secs 10 --p99-ms 1000)
        echo "=== $round $side $client $mode" >>"$log"
        timeout 300 "$bin/ringcast-load" fanout --gateways "$urls" --subscribers 2000 \
          --client "$client" --watch "${watch%,}" "${args[@]}" 2>/dev/null | grep SUMMARY >>"$log" || true
        echo "round $round $side $client $mode done" >&2
      done
    done
    stop_cluster
  done
done

python3 - "$log" <<'PY'
import collections, json, sys
runs, head = [], None
for line in open(sys.argv[1]):
    if line.startswith("==="):
        head = line.split()[1:]
    elif line.startswith("SUMMARY"):
        d = json.loads(line[len("SUMMARY "):])
        step = d["best"] or d["steps"][0]
        servers = sum(p["user_s"] + p["sys_s"] for p in step["cpu"]["procs"] if p["name"] != "generator")
        runs.append((head, step["achieved_per_s"], step["p99_ms"], step["lost"], servers * 1e6 / step["delivered"]))
by = collections.defaultdict(list)
for (rnd, side, client, mode), rate, p99, lost, us in runs:
    print(f"round {rnd} {side:3} {client:5} {mode:5} {rate:12,.0f} deliveries/s  p99 {p99:6.1f} ms  lost {lost}  servers {us:.3f} us/delivery")
    by[(side, client, mode)].append(rate if mode == "ramp" else us)
print()
for client in ("tasks", "epoll"):
    for mode, what in (("ramp", "deliveries/s, best step"), ("fixed", "servers' CPU per delivery")):
        old, new = by[("old", client, mode)], by[("new", client, mode)]
        if old and new:
            per = ", ".join(f"{n / o:.0%}" for n, o in zip(new, old))
            print(f"{client:5} {what:26} new/old: {sum(new) / sum(old):.0%} (rounds: {per})")
PY
