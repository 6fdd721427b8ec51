#!/usr/bin/env bash
# ringcast benchmark: starts a local release cluster (2 topic servers, 2 gateways; 4 gateways
# for the 60k-connection run), runs the load generator's workloads and prints one table.
#
#   scripts/bench.sh                 everything (about 4 minutes on 2 cores)
#   BENCH_QUICK=1 scripts/bench.sh   smaller and shorter (a smoke run, about 1 minute)
#   BENCH_P99_MS=100                 the latency bound of the fan-out ramps (10,000 subscribers also at 500)
#   BENCH_STEP_SECS=3                seconds per ramp step
#   BENCH_SERVER_THREADS=1           runtime threads per gateway / topic server (default: one per core)
#   BENCH_GATEWAY_THREADS=1          runtime threads per gateway only (default: BENCH_SERVER_THREADS)
#   BENCH_LINK_THREADS=1             GATEWAY_LINK_THREADS: the gateways' links on threads of their own
#
# Every process and the load generator run on this machine, on loopback; the generator
# stops by itself. The one-topic and connection workloads also go against `ringcast-bare`,
# a one-process broadcaster with no routing (the ceiling of this machine in this hour), and
# the table shows ringcast's figure as a share of it. Figures: deliveries/s of the highest
# ramp step with zero loss and p99 within the bound; peak RSS (VmHWM) of every process; RSS
# per idle joined connection; CPU time (user and kernel) per delivery of every process and
# the generator; and the floor: the kernel time the bare broadcaster and the generator spent
# per delivery and per connection, and what that allows on this machine's cores.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=${BENCH_QUICK:-0}
# Runtime threads per server process (TOKIO_WORKER_THREADS); empty: one per core. With four
# server processes and the generator on 2 cores, 1 helps the one-topic fan-out and hurts the
# 10,000-subscriber and many-topic runs (README, Performance).
SERVER_THREADS=${BENCH_SERVER_THREADS:-}
GATEWAY_THREADS=${BENCH_GATEWAY_THREADS:-$SERVER_THREADS}
LINK_THREADS=${BENCH_LINK_THREADS:-}
P99=${BENCH_P99_MS:-100}
STEP=${BENCH_STEP_SECS:-3}
export RUST_LOG=${RUST_LOG:-warn}

echo "building release binaries..." >&2
cargo build --release --quiet -p ringcast-gateway -p ringcast-topic-server -p ringcast-tests \
  --bin gateway --bin topic-server --bin ringcast-load --bin ringcast-bare
bin=target/release
load=$bin/ringcast-load
out=$(mktemp -d)
trap 'stop_all; rm -rf "$out"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

pids=()
names=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=(); names=()
}
peak_rss() { awk '/VmHWM/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }

# start_cluster N_GATEWAYS: 2 topic servers and N gateways; sets $gateways (ws URLs).
start_cluster() {
  local n=$1 ring=$out/ring.toml ts_ports=() gw_ports=()
  echo "version = 1" >"$ring"
  for i in 1 2; do
    ts_ports+=("$(free_port)")
    printf '[[nodes]]\nid = "ts-%d"\naddr = "127.0.0.1:%d"\n' "$i" "${ts_ports[-1]}" >>"$ring"
  done
  for i in 1 2; do
    env ${SERVER_THREADS:+TOKIO_WORKER_THREADS=$SERVER_THREADS} TOPIC_SERVER_ID=ts-$i TOPIC_SERVER_LISTEN=127.0.0.1:${ts_ports[$((i - 1))]} RING_CONFIG=$ring $bin/topic-server 2>>"$out/topic-server.log" &
    pids+=($!); names+=("topic-server ts-$i")
  done
  gateways=""
  for i in $(seq "$n"); do
    gw_ports+=("$(free_port)")
    env ${GATEWAY_THREADS:+TOKIO_WORKER_THREADS=$GATEWAY_THREADS} ${LINK_THREADS:+GATEWAY_LINK_THREADS=$LINK_THREADS} GATEWAY_ID=gw-$i GATEWAY_LISTEN=127.0.0.1:${gw_ports[-1]} RING_CONFIG=$ring GATEWAY_MAX_CONNECTIONS=19000 \
      $bin/gateway 2>>"$out/gateway.log" &
    pids+=($!); names+=("gateway gw-$i")
    gateways+="${gateways:+,}ws://127.0.0.1:${gw_ports[-1]}"
  done
  for p in "${ts_ports[@]}" "${gw_ports[@]}"; do wait_port "$p"; done
  ts_status=("http://127.0.0.1:${ts_ports[0]}/status" "http://127.0.0.1:${ts_ports[1]}/status")
  watch="ts-1=${pids[0]},ts-2=${pids[1]}"
  for i in $(seq "$n"); do watch+=",gw-$i=${pids[$((i + 1))]}"; done
  sleep 0.5 # links connect
}

# Sums a counter over the topic servers' /status.
ts_counter() {
  python3 - "$1" "${ts_status[@]}" <<'PY'
import json, sys, urllib.request
key, urls = sys.argv[1], sys.argv[2:]
print(sum(json.load(urllib.request.urlopen(u))[key] for u in urls))
PY
}

rss_report() { # label: peak RSS of every process of the current cluster
  for i in "${!pids[@]}"; do echo "$1|${names[$i]}|$(peak_rss "${pids[$i]}")" >>"$out/rss"; done
}

run() { # name args...: runs the generator on the processes in $watch, keeps its SUMMARY line
  local name=$1; shift
  echo "== $name: ringcast-load $* --watch $watch" >&2
  "$load" "$@" --watch "$watch" | tee "$out/$name.txt" >&2
  grep '^SUMMARY ' "$out/$name.txt" | sed 's/^SUMMARY //' >"$out/$name.json"
}

if [ "$QUICK" = 1 ]; then
  SUBS_A=500; SUBS_B=2000; TOPICS=1000; CONNS=3000; CONNS4=6000; STEP=1.5
else
  SUBS_A=2000; SUBS_B=10000; TOPICS=10000; CONNS=15000; CONNS4=60000
fi

# The ceiling: the same workloads against one bare broadcaster, but for the many-topics run
# (a broadcast channel per topic is no ceiling there) and the 60,000-connection run (one
# process cannot hold them).
bare_port=$(free_port)
$bin/ringcast-bare --listen 127.0.0.1:$bare_port 2>>"$out/bare.log" &
pids+=($!); names+=("ringcast-bare")
wait_port "$bare_port"
bare=ws://127.0.0.1:$bare_port
watch="bare=${pids[0]}"
run bare_a fanout --gateways "$bare" --subscribers $SUBS_A --start-rate 100 --step-secs "$STEP" --p99-ms "$P99"
run bare_b fanout --gateways "$bare" --subscribers $SUBS_B --start-rate 10 --step-secs "$STEP" --p99-ms 500
run bare_b100 fanout --gateways "$bare" --subscribers $SUBS_B --start-rate 10 --step-secs "$STEP" --p99-ms "$P99"
run bare_latency fanout --gateways "$bare" --subscribers 1000 --start-rate 100 --fixed --step-secs 5 --p99-ms 10
run bare_conns conns --gateways "$bare" --connections $CONNS --hold-secs 1
rss_report "bare broadcaster"
stop_all

start_cluster 2
p0=$(ts_counter publishes); d0=$(ts_counter deliveries)
run fanout_a fanout --gateways "$gateways" --subscribers $SUBS_A --start-rate 100 --step-secs "$STEP" --p99-ms "$P99"
p1=$(ts_counter publishes); d1=$(ts_counter deliveries)
echo "$((d1 - d0)) $((p1 - p0))" >"$out/crossnode"
rss_report "fanout $SUBS_A"
stop_all

start_cluster 2
run fanout_b fanout --gateways "$gateways" --subscribers $SUBS_B --start-rate 10 --step-secs "$STEP" --p99-ms 500
run fanout_b100 fanout --gateways "$gateways" --subscribers $SUBS_B --start-rate 10 --step-secs "$STEP" --p99-ms "$P99"
rss_report "fanout $SUBS_B"
stop_all

start_cluster 2
run latency fanout --gateways "$gateways" --subscribers 1000 --start-rate 100 --fixed --step-secs 5 --p99-ms 10
run topics topics --gateways "$gateways" --topics $TOPICS --subscribers 10 --start-rate 2000 --step-secs "$STEP" --p99-ms "$P99"
rss_report "topics $TOPICS x 10"
stop_all

start_cluster 1
run conns conns --gateways "$gateways" --connections $CONNS --hold-secs 4
stop_all

start_cluster 4
run conns4 conns --gateways "$gateways" --connections $CONNS4 --procs 4 --hold-secs 4
rss_report "conns $CONNS4 over 4 gateways"
stop_all

python3 - "$out" "$P99" <<'PY'
import json, os, sys
out, p99 = sys.argv[1], sys.argv[2]
def load(name):
    try:
        return json.load(open(os.path.join(out, name + ".json")))
    except Exception:
        return None
def achieved(name):
    s = load(name)
    return (s.get("best") or {}).get("achieved_per_s") if s else None
def best(name, ceiling=None):
    s = load(name)
    if not s: return "n/a"
    b = s.get("best")
    if not b: return "no step passed"
    text = f"{b['achieved_per_s']:,.0f} deliveries/s (p99 {b['p99_ms']:.1f} ms, {b['rate']:.0f} msg/s)"
    c = achieved(ceiling) if ceiling else None
    return text + (f", {100 * b['achieved_per_s'] / c:.0f}% of bare" if c else "")
def light(name):
    l = load(name)
    if not l or not l["steps"]: return "n/a"
    s = l["steps"][0]
    return f"p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms, max {s['max_ms']:.1f} ms, lost {s['lost']}"
rows = []
fa, fb = load("fanout_a"), load("fanout_b")
rows.append((f"fan-out {fa['subscribers'] if fa else '?'} subscribers, p99 <= {p99} ms", best("fanout_a", "bare_a")))
rows.append((f"fan-out {fb['subscribers'] if fb else '?'} subscribers, p99 <= 500 ms", best("fanout_b", "bare_b")))
rows.append((f"fan-out {fb['subscribers'] if fb else '?'} subscribers, p99 <= {p99} ms", best("fanout_b100", "bare_b100")))
t = load("topics")
rows.append((f"topics {t['topics'] if t else '?'} x 10 subscribers, p99 <= {p99} ms", best("topics")))
rows.append(("light load: 1000 subscribers, 100 msg/s", light("latency")))
rows.append(("bare broadcaster (ringcast-bare: 1 process, no routing), same runs:", ""))
rows.append((f"  fan-out {fa['subscribers'] if fa else '?'} subscribers, p99 <= {p99} ms", best("bare_a")))
rows.append((f"  fan-out {fb['subscribers'] if fb else '?'} subscribers, p99 <= 500 ms", best("bare_b")))
rows.append((f"  fan-out {fb['subscribers'] if fb else '?'} subscribers, p99 <= {p99} ms", best("bare_b100")))
rows.append(("  light load: 1000 subscribers, 100 msg/s", light("bare_latency")))
bc = load("bare_conns")
if bc:
    rows.append((f"  {bc['connections']} idle joined connections", f"{bc['connect_join_per_s']:,.0f} connect+join/s"))
c = load("conns")
if c:
    share = f", {100 * c['connect_join_per_s'] / bc['connect_join_per_s']:.0f}% of bare" if bc else ""
    rows.append((f"{c['connections']} idle joined connections, 1 gateway", f"{c['connect_join_per_s']:,.0f} connect+join/s{share}"))
    for r in c["rss"]:
        delta = r["rss_held_kib"] - r["rss_before_kib"]
        if r["name"].startswith("gw-"):
            rows.append(("  gateway RSS per connection", f"{delta * 1024 / c['connections']:,.0f} bytes ({r['rss_before_kib']} -> {r['rss_held_kib']} KiB)"))
    ts = [r for r in c["rss"] if r["name"].startswith("ts-")]
    if ts:
        delta = sum(r["rss_held_kib"] - r["rss_before_kib"] for r in ts)
        detail = ", ".join(f"{r['name']} {r['rss_before_kib']} -> {r['rss_held_kib']} KiB" for r in ts)
        rows.append(("  topic servers RSS per subscription (all servers)", f"{delta * 1024 / c['connections']:,.0f} bytes ({detail})"))
c4 = load("conns4")
if c4:
    rows.append((f"{c4['connections']} idle joined connections, 4 gateways, {c4['procs']} client processes", f"{c4['connect_join_per_s']:,.0f} connect+join/s"))
try:
    deliveries, publishes = map(int, open(os.path.join(out, "crossnode")).read().split())
    cross = f"{deliveries / publishes:.3f} ({deliveries:,} deliveries for {publishes:,} publishes)"
except Exception:
    cross = "n/a"
rows.append(("cross-node messages per publish, fan-out run (2 gateways subscribed)", cross))

# CPU per delivery (or per connection) of every process of a run, the generator included.
cores = os.cpu_count() or 1
def step_of(name, which):
    s = load(name)
    if not s: return None
    return s.get("best") if which == "best" else (s.get("steps") or [None])[0]
def cpu(name, which="best"):
    st = step_of(name, which)
    if not st or "kernel_us_per_delivery" not in st: return "n/a"
    return f"{st['user_us_per_delivery']:.2f} us user + {st['kernel_us_per_delivery']:.2f} us kernel per delivery at {st['rate']:.0f} msg/s"
rows.append(("CPU per delivery, every process (cluster or bare, and the generator):", ""))
rows.append((f"  fan-out {fa['subscribers'] if fa else '?'}, best step: ringcast", cpu("fanout_a")))
rows.append(("                              bare", cpu("bare_a")))
rows.append((f"  topics {t['topics'] if t else '?'} x 10, best step: ringcast", cpu("topics")))
rows.append(("  light load: ringcast", cpu("latency", "first")))
rows.append(("              bare", cpu("bare_latency", "first")))
# The floor: the kernel time the bare broadcaster and the generator spent, per delivery or
# connection. Any server here must write each subscriber's socket and the client read it,
# so no server spreads one message's deliveries over the cores faster than this.
rows.append(("kernel time alone, bare broadcaster + generator (the floor on this machine):", ""))
def floor_delivery(name, label):
    st = step_of(name, "first")
    if not st or "kernel_us_per_delivery" not in st: return
    subs = load(name)["subscribers"]
    k = st["kernel_us_per_delivery"]
    whole = subs * k / 1000 / cores
    rows.append((f"  {label}, {subs} subscribers at {st['rate']:.0f} msg/s: {k:.1f} us per delivery",
                 f"one message >= {whole:.1f} ms of all {cores} cores (median subscriber >= {whole / 2:.1f} ms)"))
floor_delivery("bare_latency", "light load")
floor_delivery("bare_b100", "fan-out")
if bc and "kernel_us_per_connection" in bc:
    k = bc["kernel_us_per_connection"]
    rows.append((f"  connect+join: {k:.0f} us per connection", f"at most {cores * 1e6 / k:,.0f} connect+join/s on {cores} cores"))
w = max(len(r[0]) for r in rows)
print()
print("ringcast benchmark (" + os.uname().nodename + f", {os.cpu_count()} cores, everything on one machine)")
print("-" * (w + 60))
for k, v in rows:
    print(f"{k:<{w}}  {v}")
print()
print("peak RSS (VmHWM) per process")
for line in open(os.path.join(out, "rss")):
    label, name, kib = line.strip().split("|")
    print(f"  {label:<32} {name:<22} {int(kib) / 1024:8.1f} MiB")
PY
