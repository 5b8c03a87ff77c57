#!/usr/bin/env bash
# Catch-up over a WAN line (issue 12), release binaries, embedded store on both sides:
#
#   bench/wan.sh                          # everything below
#   MESSAGES=20000 bench/wan.sh           # a smaller backlog
#   RATE=64kbit LATENCY=300ms bench/wan.sh
#
#   1. Drain of a MESSAGES (100,000) backlog of order documents (JSON, ~600 B each) accumulated
#      while the edge could not reach its central, through the link-shaping proxy (linkproxy) at
#      RATE (10Mbit each way) with LATENCY (50ms one way): time from the line coming up until the
#      central holds all of them, with [forwarding] compression = "none" and then "zstd" (a fresh
#      edge each, the same central), and the batch frame bytes each sent
#      (outpost_forward_bytes_total).
#   2. Route delivery to a local downstream that answers at once (max_in_flight 1 / 8 / 32,
#      batch 100): the ignored test `measure_route_windows`, run last if ROUTES=1 (default).
# Prints one line per figure. Every process it starts is stopped on exit.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
MESSAGES="${MESSAGES:-100000}"
RATE="${RATE:-10Mbit}"
LATENCY="${LATENCY:-50ms}"
ROUTES="${ROUTES:-1}"
BIN="${BENCH_OUTPOST_BIN:-$repo/target/release/outpost}"
PROXY_BIN="${BENCH_PROXY_BIN:-$repo/target/release/linkproxy}"
EDGE_PORT="${EDGE_PORT:-27600}"
CENTRAL_PORT="${CENTRAL_PORT:-27601}"
PROXY_PORT="${PROXY_PORT:-27602}"
work="$(mktemp -d "${BENCH_DIR:-/tmp}/outpost-wan.XXXXXX")"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT INT TERM

[ -x "$BIN" ] && [ -x "$PROXY_BIN" ] || (cd "$repo" && cargo build --release -p outpost -p testkit --bins >/dev/null)
edge_url="http://127.0.0.1:$EDGE_PORT"
central_url="http://127.0.0.1:$CENTRAL_PORT"
now_ms() { date +%s%3N; }
wait_ready() { # url pid
  for _ in $(seq 1 300); do
    kill -0 "$2" 2>/dev/null || { echo "the node for $1 exited (port taken?); see $work/*.log" >&2; KEEP=1; exit 1; }
    curl -sf "$1/readyz" >/dev/null && return 0
    sleep 0.05
  done
  echo "not ready: $1" >&2; exit 1
}
queue_last_seq() { # url queue
  curl -sf "$1/v1/queues" | python3 -c "import sys,json; print(sum(q['last_seq'] for q in json.load(sys.stdin) if q['name']=='$2'))" 2>/dev/null || echo 0
}
metric() { # url name label
  curl -sf "$1/metrics" | awk -v n="$2" -v l="$3" '$1 ~ "^"n"[{]" && index($1, l) {print $2}' | head -1
}

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(df -T "$work" | awk 'NR==2 {print $2" on "$1}'), load $(cut -d' ' -f1-3 /proc/loadavg)"

# The backlog: order documents as NDJSON files of 1,000 lines.
python3 - "$work" "$MESSAGES" <<'PY'
import json, sys
work, total = sys.argv[1], int(sys.argv[2])
skus = ["SKU-10042-BLK", "SKU-20077-WHT", "SKU-31415-RED", "SKU-27182-GRN", "SKU-16180-BLU"]
def order(i):
    return json.dumps({
        "type": "order.created", "order_id": f"ORD-2026-{i:08d}", "store": "store-042",
        "register": 1 + i % 6, "cashier": f"C{(i * 17) % 9000:04d}",
        "created_at": f"2026-11-26T{(i // 3600) % 24:02d}:{(i // 60) % 60:02d}:{i % 60:02d}.{(i * 37) % 1000:03d}Z",
        "currency": "EUR",
        "customer": {"loyalty_id": f"LY{(i * 7919) % 1000000000:09d}", "segment": ["regular", "gold", "staff"][i % 3]},
        "lines": [{"sku": skus[(i + l) % 5], "qty": 1 + (i * 7 + l) % 4,
                   "unit_price": round(3 + (i * 13 + l * 5) % 90 + ((i * 31 + l) % 100) / 100, 2), "vat_rate": 0.19}
                  for l in range(3)],
        "payment": {"method": ["card", "cash", "voucher"][i % 3], "status": "captured", "terminal": f"T-{i % 40:03d}"},
        "shipping": {"method": "click_and_collect", "pickup_store": "store-042", "slot": f"2026-11-27T{10 + i % 8:02d}:00Z"},
        "total": round(10 + (i * 29) % 400 + ((i * 11) % 100) / 100, 2),
    }, separators=(",", ":"))
n = 0
for f in range((total + 999) // 1000):
    with open(f"{work}/backlog-{f:04d}.ndjson", "w") as out:
        for _ in range(min(1000, total - n)):
            out.write(order(n) + "\n")
            n += 1
PY
avg=$(cat "$work"/backlog-*.ndjson | awk '{s += length($0)} END {printf "%.0f", s / NR}')
echo "backlog: $MESSAGES order documents, $avg B each on average"

"$BIN" central --listen "127.0.0.1:$CENTRAL_PORT" --data-dir "$work/central" --node-id hq >>"$work/central.log" 2>&1 &
central_pid=$!; pids+=("$central_pid"); wait_ready "$central_url" "$central_pid"

for compression in none zstd; do
  queue="orders-$compression"
  cat >"$work/edge-$compression.toml" <<EOF
[[upstream]]
url = "http://127.0.0.1:$PROXY_PORT"
[connectivity]
offline_probe_interval = "1s"
failed_transition_wait = "1s"
[forwarding]
compression = "$compression"
EOF
  # The line is down (no proxy yet): the backlog accumulates on the edge.
  "$BIN" edge --listen "127.0.0.1:$EDGE_PORT" --data-dir "$work/edge-$compression" --node-id "store-$compression" \
    --config "$work/edge-$compression.toml" >>"$work/edge-$compression.log" 2>&1 &
  edge_pid=$!; pids+=("$edge_pid"); wait_ready "$edge_url" "$edge_pid"
  for file in "$work"/backlog-*.ndjson; do
    curl -sf -X POST -H 'Content-Type: application/x-ndjson' --data-binary "@$file" \
      "$edge_url/v1/queues/$queue/batch" >/dev/null
  done
  [ "$(queue_last_seq "$edge_url" "$queue")" -ge "$MESSAGES" ] || { echo "backlog not stored" >&2; exit 1; }
  "$PROXY_BIN" --listen "127.0.0.1:$PROXY_PORT" --target "127.0.0.1:$CENTRAL_PORT" --rate "$RATE" --latency "$LATENCY" \
    >"$work/proxy-$compression.log" 2>&1 &
  proxy_pid=$!; pids+=("$proxy_pid")
  start=$(now_ms)
  until [ "$(queue_last_seq "$central_url" "$queue")" -ge "$MESSAGES" ]; do
    [ $(( $(now_ms) - start )) -gt 1800000 ] && { echo "compression=$compression: not drained in 30 min" >&2; exit 1; }
    sleep 0.1
  done
  took=$(( $(now_ms) - start ))
  sent=$(metric "$edge_url" outpost_forward_bytes_total "encoding=\"$compression\"")
  printf 'drain %s msgs over %s %s, compression=%s: %.1f s = %.0f msgs/s, %s B of batch frames sent\n' \
    "$MESSAGES" "$RATE" "$LATENCY" "$compression" "$(echo "$took / 1000" | bc -l)" \
    "$(echo "$MESSAGES * 1000 / $took" | bc -l)" "${sent:-?}"
  kill "$edge_pid" "$proxy_pid"; wait "$edge_pid" "$proxy_pid" 2>/dev/null || true
done

if [ "$ROUTES" = 1 ]; then
  echo "route delivery (cargo test --release -p outpost --test route_window measure_route_windows -- --ignored --nocapture):"
  (cd "$repo" && cargo test --release -q -p outpost --test route_window measure_route_windows -- --ignored --nocapture 2>&1) \
    | grep -E 'messages/s'
fi
