#!/usr/bin/env bash
# ringcast benchmark: the cluster against one embedded gateway, and one embedded gateway
# against a bare broadcaster, as ratios measured in one run, with two kinds of client.
#
#   scripts/bench.sh                 everything (about 15 minutes on 2 cores)
#   BENCH_QUICK=1 scripts/bench.sh   smaller and shorter, ordinary clients only (a smoke run)
#   BENCH_P99_MS=100                 the latency bound of the 2,000-subscriber and topics ramps
#   BENCH_STEP_SECS=3                seconds per ramp step
#   BENCH_CLIENTS="tasks epoll"      which clients to run (ringcast-load --client)
#   BENCH_SERVER_THREADS=1           TOKIO_WORKER_THREADS of every server process (default: one per core)
#   BENCH_BIN=dir                    binaries to measure (default: build target/release)
#   BENCH_ONLY="presence conns"      only these sections (fanout_a crossnode fanout_b topics
#                                    latency conns presence; default: all)
#
# Servers, each started afresh for every workload, one after another, so that the two sides
# of a ratio run minutes apart at most:
#   embedded   one gateway with no ring (the topic-server core in-process)
#   split      the 2+2 cluster: 2 topic servers, 2 gateways, subscribers on both, publisher on the second
#   one        the 2+2 cluster with every client on one gateway
#   bare       ringcast-bare: one process, nothing between publisher and sockets
#   bare-split two ringcast-bare processes, subscribers split over them, each message published
#              to both: what splitting subscribers over two processes costs on this machine
# Clients (ringcast-load --client):
#   tasks  like ordinary clients and load tools: a task per socket reading one frame at a
#          time, an evenly paced publisher sending one publish per frame
#   epoll  the fastest client: reader threads with epoll, publishes in 1 ms bursts
#
# Everything runs on this machine, on loopback; the generator stops by itself. Gateways run
# with GATEWAY_CLIENT_RATE=0: one publisher connection sends up to thousands of messages a
# second, past the default per-socket frame rate; everything else is the defaults. Fan-out and
# topics figures: deliveries/s of the highest ramp step (rates x1.5) with zero loss and p99
# within the bound. The ratios are the headline: absolute figures swing by 2-3x from one
# hour to the next on a shared VM.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=${BENCH_QUICK:-0}
P99=${BENCH_P99_MS:-100}
STEP=${BENCH_STEP_SECS:-3}
CLIENTS=${BENCH_CLIENTS:-tasks epoll}
SERVER_THREADS=${BENCH_SERVER_THREADS:-}
ONLY=${BENCH_ONLY:-}
want() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }
export RUST_LOG=${RUST_LOG:-warn}

if [ -n "${BENCH_BIN:-}" ]; then
  bin=$BENCH_BIN
else
  echo "building release binaries..." >&2
  cargo build --release --quiet -p ringcast-gateway -p ringcast-topic-server -p ringcast-tests \
    --bin gateway --bin topic-server --bin ringcast-load --bin ringcast-bare
  bin=target/release
fi
load=$bin/ringcast-load
# Every run's SUMMARY lines and its table stay in target/bench/<date>/.
out=target/bench/$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$out"
trap 'stop_all' EXIT

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
threads() { echo ${SERVER_THREADS:+TOKIO_WORKER_THREADS=$SERVER_THREADS}; }

# start SERVER [N_GATEWAYS]: starts one of the servers above; sets $url (the --gateways
# argument, with --publish-each for bare-split), $watch (name=pid of every process) and
# $ts_status (topic servers' /status URLs, cluster only).
start() {
  local kind=$1 n=${2:-2} ring=$out/ring.toml ts_ports=() gw_ports=() p
  url=""; watch=""; ts_status=()
  case $kind in
    bare | bare-split)
      local count=1
      if [ "$kind" = bare-split ]; then count=2; fi
      for i in $(seq $count); do
        p=$(free_port)
        # The gateway's slow-consumer bound (GATEWAY_CLIENT_QUEUE), so both cut the same clients.
        env $(threads) "$bin/ringcast-bare" --listen "127.0.0.1:$p" --queue 1024 2>>"$out/bare.log" &
        pids+=($!); names+=("ringcast-bare $i")
        wait_port "$p"
        url+="${url:+,}ws://127.0.0.1:$p"; watch+="${watch:+,}bare-$i=$!"
      done
      if [ "$kind" = bare-split ]; then url+=" --publish-each"; fi
      ;;
    embedded)
      p=$(free_port)
      env $(threads) GATEWAY_ID=gw-embedded GATEWAY_LISTEN="127.0.0.1:$p" GATEWAY_ADMIN_LISTEN="127.0.0.1:$(free_port)" \
        GATEWAY_MAX_CONNECTIONS=19000 GATEWAY_CLIENT_RATE=0 \
        "$bin/gateway" 2>>"$out/gateway.log" &
      pids+=($!); names+=("gateway (embedded)")
      wait_port "$p"
      url="ws://127.0.0.1:$p"; watch="gw=$!"
      ;;
    split | one | cluster)
      echo "version = 1" >"$ring"
      for i in 1 2; do
        ts_ports+=("$(free_port)")
        printf '[[nodes]]\nid = "ts-%d"\naddr = "127.0.0.1:%d"\n' "$i" "${ts_ports[-1]}" >>"$ring"
      done
      for i in 1 2; do
        local admin; admin=$(free_port)
        env $(threads) TOPIC_SERVER_ID=ts-$i TOPIC_SERVER_LISTEN=127.0.0.1:${ts_ports[$((i - 1))]} \
          TOPIC_SERVER_ADMIN_LISTEN=127.0.0.1:$admin RING_CONFIG=$ring \
          "$bin/topic-server" 2>>"$out/topic-server.log" &
        pids+=($!); names+=("topic-server ts-$i"); watch+="${watch:+,}ts-$i=$!"
        ts_status+=("http://127.0.0.1:$admin/status")
      done
      if [ "$kind" != cluster ]; then n=2; fi
      for i in $(seq "$n"); do
        gw_ports+=("$(free_port)")
        env $(threads) GATEWAY_ID=gw-$i GATEWAY_LISTEN=127.0.0.1:${gw_ports[-1]} GATEWAY_ADMIN_LISTEN="127.0.0.1:$(free_port)" \
          RING_CONFIG=$ring GATEWAY_MAX_CONNECTIONS=19000 GATEWAY_CLIENT_RATE=0 \
          "$bin/gateway" 2>>"$out/gateway.log" &
        pids+=($!); names+=("gateway gw-$i"); watch+=",gw-$i=$!"
        url+="${url:+,}ws://127.0.0.1:${gw_ports[-1]}"
      done
      # `one`: every client on the second gateway.
      if [ "$kind" = one ]; then url="ws://127.0.0.1:${gw_ports[1]}"; fi
      for p in "${ts_ports[@]}" "${gw_ports[@]}"; do wait_port "$p"; done
      sleep 0.5 # links connect
      ;;
  esac
}

# Sums a counter over the topic servers' /status.
ts_counter() {
  python3 - "$1" "${ts_status[@]}" <<'PY'
import json, sys, urllib.request
key, urls = sys.argv[1], sys.argv[2:]
print(sum(json.load(urllib.request.urlopen(u))[key] for u in urls))
PY
}

rss_report() { # label: peak RSS of every process running now
  for i in "${!pids[@]}"; do echo "$1|${names[$i]}|$(peak_rss "${pids[$i]}")" >>"$out/rss"; done
}

run() { # name workload args...: runs the generator against $url, watching $watch; keeps its SUMMARY
  local name=$1; shift
  echo "== $name: ringcast-load $* --gateways $url --watch $watch" >&2
  # $url may carry --publish-each: split on purpose.
  # shellcheck disable=SC2086
  "$load" "$@" --gateways $url --watch "$watch" | tee "$out/$name.txt" >&2
  grep '^SUMMARY ' "$out/$name.txt" | sed 's/^SUMMARY //' >"$out/$name.json"
}

if [ "$QUICK" = 1 ]; then
  SUBS_A=500; SUBS_B=2000; TOPICS=1000; CONNS=3000; CONNS4=6000; STEP=1; PRESENCE_MEMBERS="1000"
  CLIENTS=${BENCH_CLIENTS:-tasks}
else
  SUBS_A=2000; SUBS_B=10000; TOPICS=10000; CONNS=15000; CONNS4=60000; PRESENCE_MEMBERS="10000 1000"
fi

# ramp WORKLOAD_NAME SERVERS... -- ARGS: for each server and client, a fresh server and one run.
ramp() {
  local name=$1; shift
  local servers=()
  while [ "$1" != "--" ]; do servers+=("$1"); shift; done
  shift
  for server in "${servers[@]}"; do
    for client in $CLIENTS; do
      start "$server"
      run "$name.$server.$client" "$@" --client "$client"
      rss_report "$name $server $client"
      stop_all
    done
  done
}

if want fanout_a; then
  ramp fanout_a embedded split one bare bare-split -- \
    fanout --subscribers $SUBS_A --start-rate 100 --step-secs "$STEP" --p99-ms "$P99"
fi
if want crossnode; then
  # Cross-node messages per publish: one delivery per gateway with subscribers.
  start split
  p0=$(ts_counter publishes); d0=$(ts_counter deliveries)
  run crossnode fanout --subscribers 200 --start-rate 200 --fixed --step-secs 2 --client tasks
  p1=$(ts_counter publishes); d1=$(ts_counter deliveries)
  echo "$((d1 - d0)) $((p1 - p0))" >"$out/crossnode"
  stop_all
fi
if want fanout_b; then
  ramp fanout_b embedded split bare bare-split -- \
    fanout --subscribers $SUBS_B --start-rate 10 --step-secs "$STEP" --p99-ms 500
fi
if want topics; then
  ramp topics embedded split -- \
    topics --topics $TOPICS --subscribers 10 --start-rate 2000 --step-secs "$STEP" --p99-ms "$P99"
fi
if want latency; then
  ramp latency split bare -- \
    fanout --subscribers 1000 --start-rate 100 --fixed --step-secs 5 --p99-ms 10
fi
if want conns; then
  start bare
  run conns.bare conns --connections $CONNS --hold-secs 1 --client epoll
  stop_all
  start cluster 1
  run conns.cluster conns --connections $CONNS --hold-secs 4 --client epoll
  stop_all
  start cluster 4
  run conns4.cluster conns --connections $CONNS4 --procs 4 --hold-secs 4 --client epoll
  rss_report "conns $CONNS4 over 4 gateways"
  stop_all
fi
if want presence; then
  # Presence on one topic across the two gateways: counted (10,000 members, above
  # TOPIC_SERVER_PRESENCE_LIST_MAX) and listed (1,000), joins then churn.
  for members in $PRESENCE_MEMBERS; do
    start split
    run "presence.$members" presence --members "$members" --churn 100 --churn-secs 5
    rss_report "presence $members members"
    stop_all
  done
fi

python3 scripts/bench_report.py "$out" "$P99" "$CLIENTS" | tee "$out/report.txt"
echo "(kept in $out)" >&2
