#!/usr/bin/env bash
# Runs a local ringcast cluster in the foreground: 2 topic servers and 2 gateways on
# loopback (more if you list more ports). Ctrl-C or SIGTERM stops all of them.
#
#   GATEWAY_PORTS=4000,4001        gateway ports (one gateway per port)
#   TOPIC_SERVER_PORTS=7001,7002   topic-server ports (one topic server per port)
#   GATEWAY_ADMIN_PORTS=...        the gateways' admin ports (/status, /metrics, /health/*, /ring;
#                                  default: each port + 100)
#   GATEWAY_API_PORTS=...          the gateways' backend API ports (/api/...; default: each port + 200)
#   GATEWAY_API_KEYS=...           keys for the backend API (default: a development key, printed)
#   TOPIC_SERVER_ADMIN_PORTS=...   the topic servers' admin ports (/status, /metrics, /health/*;
#                                  default: each port + 100)
#   RING_FILE=target/cluster/ring.toml   the ring config the processes share (edit it to rebalance)
#   RINGCAST_BIN_DIR=...           use these binaries instead of building target/release
#   RUST_LOG=info                  log level of every process
set -euo pipefail
cd "$(dirname "$0")/.."

GATEWAY_PORTS=${GATEWAY_PORTS:-4000,4001}
TOPIC_SERVER_PORTS=${TOPIC_SERVER_PORTS:-7001,7002}
RING_FILE=${RING_FILE:-target/cluster/ring.toml}
export RUST_LOG=${RUST_LOG:-info}

ports() { # name value array: validates a port list into the named array
  local name=$1 value=$2 port
  local -n into=$3
  IFS=',' read -r -a into <<<"$value"
  [ ${#into[@]} -gt 0 ] || { echo "cluster.sh: $name is empty" >&2; exit 2; }
  for port in "${into[@]}"; do
    if ! [[ $port =~ ^[0-9]+$ ]] || [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then
      echo "cluster.sh: $name: '$port' is not a port number (1-65535)" >&2
      exit 2
    fi
  done
}
ports GATEWAY_PORTS "$GATEWAY_PORTS" gateway_ports
ports TOPIC_SERVER_PORTS "$TOPIC_SERVER_PORTS" topic_ports
plus100() { local p out=(); for p in "$@"; do out+=($((p + 100))); done; local IFS=,; echo "${out[*]}"; }
ports GATEWAY_ADMIN_PORTS "${GATEWAY_ADMIN_PORTS:-$(plus100 "${gateway_ports[@]}")}" gateway_admin_ports
ports TOPIC_SERVER_ADMIN_PORTS "${TOPIC_SERVER_ADMIN_PORTS:-$(plus100 "${topic_ports[@]}")}" topic_admin_ports
plus200() { local p out=(); for p in "$@"; do out+=($((p + 200))); done; local IFS=,; echo "${out[*]}"; }
ports GATEWAY_API_PORTS "${GATEWAY_API_PORTS:-$(plus200 "${gateway_ports[@]}")}" gateway_api_ports
[ ${#gateway_api_ports[@]} -eq ${#gateway_ports[@]} ] || { echo "cluster.sh: GATEWAY_API_PORTS needs one port per gateway" >&2; exit 2; }
export GATEWAY_API_KEYS=${GATEWAY_API_KEYS:-dev-api-key-change-me}
[ ${#gateway_admin_ports[@]} -eq ${#gateway_ports[@]} ] || { echo "cluster.sh: GATEWAY_ADMIN_PORTS needs one port per gateway" >&2; exit 2; }
[ ${#topic_admin_ports[@]} -eq ${#topic_ports[@]} ] || { echo "cluster.sh: TOPIC_SERVER_ADMIN_PORTS needs one port per topic server" >&2; exit 2; }

if [ -n "${RINGCAST_BIN_DIR:-}" ]; then
  bin=$RINGCAST_BIN_DIR
else
  echo "building release binaries (cargo build --release)..." >&2
  cargo build --release --quiet -p ringcast-gateway -p ringcast-topic-server
  bin=target/release
fi

mkdir -p "$(dirname "$RING_FILE")"
{
  echo "# ringcast ring config: edit and save to rebalance (raise version on every edit)"
  echo "version = 1"
  for i in "${!topic_ports[@]}"; do
    printf '\n[[nodes]]\nid = "ts-%d"\naddr = "127.0.0.1:%d"\n' $((i + 1)) "${topic_ports[$i]}"
  done
} >"$RING_FILE"

pids=()
stop() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait "${pids[@]}" 2>/dev/null || true
}
trap 'stop; exit 0' INT TERM
trap stop EXIT

for i in "${!topic_ports[@]}"; do
  TOPIC_SERVER_ID="ts-$((i + 1))" TOPIC_SERVER_LISTEN="127.0.0.1:${topic_ports[$i]}" \
    TOPIC_SERVER_ADMIN_LISTEN="127.0.0.1:${topic_admin_ports[$i]}" RING_CONFIG="$RING_FILE" \
    "$bin/topic-server" &
  pids+=($!)
done
for i in "${!gateway_ports[@]}"; do
  GATEWAY_ID="gw-$((i + 1))" GATEWAY_LISTEN="127.0.0.1:${gateway_ports[$i]}" \
    GATEWAY_ADMIN_LISTEN="127.0.0.1:${gateway_admin_ports[$i]}" RING_CONFIG="$RING_FILE" \
    GATEWAY_API_LISTEN="127.0.0.1:${gateway_api_ports[$i]}" \
    "$bin/gateway" &
  pids+=($!)
done

wait_port() { # port: wait up to 10 s for a listener
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "cluster.sh: nothing listens on 127.0.0.1:$1 after 10 s" >&2
  return 1
}
links_up() { # port: the gateway there reports every topic-server link connected
  local reply
  exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
  printf 'GET /status HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
  reply=$(cat <&3)
  exec 3>&-
  [[ $reply == *'"links"'* && $reply != *'"connected":false'* ]]
}
wait_links() {
  for _ in $(seq 100); do
    links_up "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "cluster.sh: gateway on port $1 cannot reach every topic server after 10 s" >&2
  return 1
}
# Gateways are waited for on their admin ports (a bare connect to the public port would be
# logged as a refused client).
for port in "${topic_ports[@]}"; do wait_port "$port"; done
for port in "${gateway_admin_ports[@]}"; do wait_links "$port"; done

echo
echo "ringcast cluster is up (ring: $RING_FILE)"
for i in "${!topic_ports[@]}"; do echo "  topic server  127.0.0.1:${topic_ports[$i]}   (status: http://127.0.0.1:${topic_admin_ports[$i]}/status)"; done
for i in "${!gateway_ports[@]}"; do echo "  gateway       ws://127.0.0.1:${gateway_ports[$i]}/socket/websocket?vsn=2.0.0   (status: http://127.0.0.1:${gateway_admin_ports[$i]}/status, API: http://127.0.0.1:${gateway_api_ports[$i]}/api)"; done
echo "Backend API key: ${GATEWAY_API_KEYS%%,*}   e.g."
echo "  curl -H 'Authorization: Bearer ${GATEWAY_API_KEYS%%,*}' -d '{\"topic\":\"room:lobby\",\"event\":\"news\",\"payload\":{\"hi\":1}}' http://127.0.0.1:${gateway_api_ports[0]}/api/publish"
echo "Ctrl-C stops the cluster."
echo "READY"

# Stay in the foreground; if any process dies, stop the rest.
set +e
wait -n "${pids[@]}"
code=$?
echo "cluster.sh: a process exited (status $code); stopping the cluster" >&2
exit "$code"
