#!/usr/bin/env bash
# Edge <-> central measurements on loopback, both nodes on the embedded store (fsync on both sides):
#
#   bench/link.sh                    # everything below
#   BACKLOG=200000 bench/link.sh     # a smaller backlog
#
#   1. backlog drain: BACKLOG (1,000,000) messages of 256 B accumulated while the central is down,
#      then the central starts: time until it holds all of them (msgs/s), and the edge's RSS with the
#      full backlog and its peak while draining.
#   2. end-to-end latency at RATE (1000) msgs/s for STEADY_SECONDS (20): edge 202 -> committed at the
#      central (central accepted_at minus the send time carried in the payload; ms resolution).
#   3. detection: central killed (-9: the kernel closes its sockets) -> edge `offline`, with the
#      default config and with ping_interval 1s; central frozen (SIGSTOP: sockets stay open, nothing
#      answers, like a cable cut) -> edge `offline` with ping_interval 1s, missed_pings 3; and
#      central back -> edge `online`.
# Prints one line per figure. Every process it starts is stopped on exit.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
BACKLOG="${BACKLOG:-1000000}"
RATE="${RATE:-1000}"
STEADY_SECONDS="${STEADY_SECONDS:-20}"
BIN="${BENCH_OUTPOST_BIN:-$repo/target/release/outpost}"
EDGE_PORT="${EDGE_PORT:-27500}"
CENTRAL_PORT="${CENTRAL_PORT:-27501}"
work="$(mktemp -d "${BENCH_DIR:-/tmp}/outpost-link.XXXXXX")"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -CONT "$pid" 2>/dev/null || true; kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT INT TERM

[ -x "$BIN" ] || (cd "$repo" && cargo build --release -p outpost >/dev/null)
edge_url="http://127.0.0.1:$EDGE_PORT"
central_url="http://127.0.0.1:$CENTRAL_PORT"
now_ms() { date +%s%3N; }
json_field() { python3 -c "import sys,json; d=json.load(sys.stdin); print(eval('d'+sys.argv[1]))" "$1"; }
wait_ready() { # url pid: the node we started must be the one answering
  for _ in $(seq 1 300); do
    kill -0 "$2" 2>/dev/null || { echo "the node for $1 exited (port taken?); see $work/*.log" >&2; KEEP=1; exit 1; }
    curl -sf "$1/readyz" >/dev/null && return 0
    sleep 0.05
  done
  echo "not ready: $1" >&2; exit 1
}
edge_state() { curl -sf "$edge_url/v1/status" | json_field '["state"]' 2>/dev/null || echo down; }
wait_state() { # state timeout_s -> prints ms waited
  local start; start=$(now_ms)
  while [ "$(edge_state)" != "$1" ]; do
    [ $(( $(now_ms) - start )) -gt $(( $2 * 1000 )) ] && { echo "timeout"; return; }
    sleep 0.02
  done
  echo $(( $(now_ms) - start ))
}
central_count() { curl -sf "$central_url/v1/queues" | python3 -c "import sys,json; print(sum(q['last_seq'] for q in json.load(sys.stdin) if q['name']=='$1'))" 2>/dev/null || echo 0; }
rss_kib() { awk "/^$2:/ {print \$2}" "/proc/$1/status"; }

start_central() {
  env -u OUTPOST_URL "$BIN" central --listen "127.0.0.1:$CENTRAL_PORT" --data-dir "$work/central" --node-id hq \
    >>"$work/central.log" 2>&1 &
  central_pid=$!; pids+=("$central_pid"); wait_ready "$central_url" "$central_pid"
}
start_edge() { # config file
  "$BIN" edge --listen "127.0.0.1:$EDGE_PORT" --data-dir "$work/edge-$2" --node-id "store-$2" --config "$1" \
    >>"$work/edge.log" 2>&1 &
  edge_pid=$!; pids+=("$edge_pid"); wait_ready "$edge_url" "$edge_pid"
}
edge_config() { # file [connectivity lines...]
  local file=$1; shift
  printf '[[upstream]]\nurl = "%s"\n[connectivity]\n' "$central_url" >"$file"
  printf '%s\n' "$@" >>"$file"
}

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(df -T "$work" | awk 'NR==2 {print $2" on "$1}'), load $(cut -d' ' -f1-3 /proc/loadavg)"

# 1. Backlog drain.
edge_config "$work/drain.toml" 'offline_probe_interval = "1s"' 'failed_transition_wait = "1s"'
start_edge "$work/drain.toml" drain
"$BIN" bench --url "$edge_url" --queue drain --messages "$BACKLOG" --size 256 --concurrency 8 --batch 1000 >/dev/null
echo "drain: edge RSS with $BACKLOG messages waiting: $(( $(rss_kib "$edge_pid" VmRSS) / 1024 )) MiB (peak so far $(( $(rss_kib "$edge_pid" VmHWM) / 1024 )) MiB)"
start=$(now_ms)
start_central
while [ "$(central_count drain)" -lt "$BACKLOG" ]; do sleep 0.1; done
elapsed=$(( $(now_ms) - start ))
echo "drain: $BACKLOG x 256 B forwarded in $elapsed ms = $(( BACKLOG * 1000 / elapsed )) msgs/s (central start included); edge peak RSS $(( $(rss_kib "$edge_pid" VmHWM) / 1024 )) MiB"
kill "$edge_pid"; wait "$edge_pid" 2>/dev/null || true

# 2. Steady end-to-end latency.
start_edge "$work/drain.toml" steady
[ "$(wait_state online 30)" != timeout ] || { echo "edge never online"; exit 1; }
python3 - "$edge_url" "$central_url" "$RATE" "$STEADY_SECONDS" <<'PY'
import json, sys, threading, time, urllib.request
from datetime import datetime
edge, central, rate, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
total = rate * seconds
def post(i):
    body = json.dumps({"t": time.time() * 1000, "i": i}).encode()
    req = urllib.request.Request(f"{edge}/v1/queues/steady/messages", data=body, headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req).read()
start = time.time()
threads = []
for i in range(total):
    target = start + i / rate
    delay = target - time.time()
    if delay > 0:
        time.sleep(delay)
    t = threading.Thread(target=post, args=(i,)); t.start(); threads.append(t)
    threads = [t for t in threads if t.is_alive()]
for t in threads: t.join()
sent_rate = total / (time.time() - start)
deadline = time.time() + 60
latencies = []
while time.time() < deadline:
    latencies, after = [], 0
    while True:
        page = json.load(urllib.request.urlopen(f"{central}/v1/queues/steady/messages?after_seq={after}&limit=1000"))
        if not page["messages"]: break
        for m in page["messages"]:
            import base64
            payload = json.loads(base64.b64decode(m["payload_base64"]))
            at = datetime.fromisoformat(m["accepted_at"].replace("Z", "+00:00")).timestamp() * 1000
            latencies.append(at - payload["t"])
        after = page["next_after_seq"]
    if len(latencies) >= total: break
    time.sleep(0.5)
latencies.sort()
p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
print(f"steady: {len(latencies)} messages at {sent_rate:.0f} msgs/s, edge->central committed latency ms: p50 {p(0.5):.0f} p90 {p(0.9):.0f} p99 {p(0.99):.0f} max {latencies[-1]:.0f}")
PY
kill "$edge_pid"; wait "$edge_pid" 2>/dev/null || true

# 3. Detection.
for variant in default ping1s; do
  if [ "$variant" = default ]; then
    edge_config "$work/$variant.toml"    # every [connectivity] default: ping 300s, probe 60s, wait 10s
  else
    edge_config "$work/$variant.toml" 'ping_interval = "1s"' 'missed_pings = 3' 'offline_probe_interval = "1s"'
  fi
  start_edge "$work/$variant.toml" "$variant"
  [ "$(wait_state online 30)" != timeout ] || { echo "edge never online"; exit 1; }
  kill -9 "$central_pid"; wait "$central_pid" 2>/dev/null || true
  echo "detection ($variant config): central kill -9 -> edge offline in $(wait_state offline 60) ms"
  start_central
  echo "detection ($variant config): central back -> edge online in $(wait_state online 120) ms"
  if [ "$variant" = ping1s ]; then
    kill -STOP "$central_pid"
    echo "detection ($variant config): central frozen (SIGSTOP) -> edge offline in $(wait_state offline 60) ms"
    kill -CONT "$central_pid"
    echo "detection ($variant config): central thawed -> edge online in $(wait_state online 120) ms"
  fi
  kill "$edge_pid"; wait "$edge_pid" 2>/dev/null || true
done
