#!/usr/bin/env bash
# Central ingest from edges with a pre-filled backlog: the embedded central, one central on
# PostgreSQL, and two centrals on one PostgreSQL database, in the same run; then failover time.
#
#   bench/cluster.sh [EDGES] [MESSAGES_PER_EDGE] [SIZE_BYTES]     # defaults 4 50000 256
#
# Needs a release build (cargo build --release -p outpost) and PostgreSQL at
# OUTPOST_TEST_POSTGRES (default postgres://postgres@127.0.0.1:5432/test; each run creates and
# drops its own database). For each setup: every edge is filled with MESSAGES_PER_EDGE messages
# while it has no central (outpost bench against the edge), stopped, then started again with the
# central(s) as upstream (with two centrals, half the edges use each); the time from that start
# until the central(s) hold every message is the ingest time.
set -euo pipefail
cd "$(dirname "$0")/.."
edges=${1:-4}
per_edge=${2:-50000}
size=${3:-256}
bin=target/release/outpost
admin=${OUTPOST_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/test}
base=${admin%%\?*}
base=${base%/*}
work=$(mktemp -d /tmp/outpost-cluster-bench.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  psql "$admin" -qc "DROP DATABASE IF EXISTS outpost_bench WITH (FORCE)" >/dev/null 2>&1 || true
  [ -n "${KEEP:-}" ] || rm -rf "$work"; echo "work: $work" >&2
}
trap cleanup EXIT
port=17500
next_port() { port=$((port + 1)); }   # sets $port (no subshell)

wait_ready() { # URL
  for _ in $(seq 1 300); do curl -sf "$1/readyz" >/dev/null && return 0; sleep 0.1; done
  echo "not ready: $1" >&2; exit 1
}
count_at() { # URL QUEUE
  curl -sf "$1/v1/queues" | python3 -c "import json,sys; print(sum(q['messages'] for q in json.load(sys.stdin) if q['name']=='$2'))"
}
start_central() { # NAME PORT [POSTGRES_URL]
  local name=$1 p=$2 pg=${3:-}
  local args=(central --node-id "$name" --listen "127.0.0.1:$p" --data-dir "$work/$name")
  [ -n "$pg" ] && args+=(--postgres "$pg")
  OUTPOST_LOG=warn "$bin" "${args[@]}" 2>>"$work/$name.log" &
  pids+=($!)
  wait_ready "http://127.0.0.1:$p"
}
fill_edges() { # SETUP
  for i in $(seq 1 "$edges"); do
    next_port; local p=$port
    local dir="$work/$1-edge-$i"
    OUTPOST_LOG=warn "$bin" edge --node-id "edge-$i" --listen "127.0.0.1:$p" --data-dir "$dir" 2>>"$dir.log" &
    local pid=$!
    wait_ready "http://127.0.0.1:$p"
    "$bin" bench --url "http://127.0.0.1:$p" --queue q --messages "$per_edge" --size "$size" \
      --concurrency 8 --batch 500 --json >/dev/null 2>&1
    kill -TERM "$pid"; wait "$pid" || true
  done
}
drain_into() { # LABEL SETUP CENTRAL_URL...   starts SETUP's filled edges with the centrals as upstreams
  local label=$1 setup=$2; shift 2
  local centrals=("$@")
  local started; started=$(date +%s.%N)
  for i in $(seq 1 "$edges"); do
    next_port; local p=$port
    local dir="$work/$setup-edge-$i"
    local upstream=${centrals[$(( (i - 1) % ${#centrals[@]} ))]}
    OUTPOST_LOG=warn "$bin" edge --node-id "edge-$i" --listen "127.0.0.1:$p" --data-dir "$dir" \
      --central "$upstream" 2>>"$dir.log" &
    pids+=($!)
  done
  local want=$((edges * per_edge))
  while :; do
    local n; n=$(count_at "${centrals[0]}" q || echo 0)
    [ "$n" -ge "$want" ] && break
    sleep 0.05
  done
  local ended; ended=$(date +%s.%N)
  python3 -c "s=$ended-$started; n=$want; print(f'$label: {n} messages of $size B from $edges edges in {s:.2f} s = {n/s:,.0f} msg/s, {n*$size/s/1e6:.1f} MB/s')"
}
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}
fresh_database() {
  psql "$admin" -qc "DROP DATABASE IF EXISTS outpost_bench WITH (FORCE)" >/dev/null
  psql "$admin" -qc "CREATE DATABASE outpost_bench" >/dev/null
  echo "$base/outpost_bench"
}

echo "== $edges edges x $per_edge messages x $size B; $(nproc) cores"

fill_edges embedded
next_port; p=$port; start_central hq-embedded "$p"
drain_into embedded embedded "http://127.0.0.1:$p"
stop_all

pg=$(fresh_database)
fill_edges pg1
next_port; p=$port; start_central hq-pg1 "$p" "$pg"
drain_into "postgres, 1 central" pg1 "http://127.0.0.1:$p"
stop_all

pg=$(fresh_database)
fill_edges pg2
next_port; pa=$port; start_central hq-pg2-a "$pa" "$pg"
next_port; pb=$port; start_central hq-pg2-b "$pb" "$pg"
drain_into "postgres, 2 centrals" pg2 "http://127.0.0.1:$pa" "http://127.0.0.1:$pb"
stop_all
