#!/usr/bin/env bash
# One `outpost bench` run against a node whose database was created beforehand with page size PAGE
# (0: as the node creates it), printing msgs/s, latency, commits and what the node wrote (its
# write_bytes in /proc, WAL and checkpoints together) per commit. An experiment, not a change of
# the store: a node keeps the page size of an existing database.
#
#   bench/experiments/pagesize.sh OUTPOST_BIN PAGE [MESSAGES] [BATCH]
set -euo pipefail
bin=$1; ps=$2; msgs=${3:-600000}; batch=${4:-1}; port="${BENCH_OUTPOST_PORT:-17493}"
d=$(mktemp -d "${BENCH_DIR:-/tmp}/pagesize.XXXXXX"); mkdir -p $d/data
if [[ $ps != 0 ]]; then
python3 - "$d/data/outpost.db" "$ps" <<'PY'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1]); c.execute(f"PRAGMA page_size={sys.argv[2]}"); c.execute("PRAGMA journal_mode=WAL")
c.execute("CREATE TABLE _x(a)"); c.execute("DROP TABLE _x"); c.commit(); c.close()
PY
fi
env -u OUTPOST_TOKEN "$bin" edge --listen 127.0.0.1:$port --data-dir $d/data --node-id bench >$d/node.log 2>&1 &
node=$!
trap 'kill -TERM $node 2>/dev/null; wait $node 2>/dev/null; rm -rf "$d"' EXIT
for _ in $(seq 300); do curl -fsS -o /dev/null http://127.0.0.1:$port/readyz 2>/dev/null && break; sleep 0.1; done
load=$(cut -d' ' -f1 /proc/loadavg)
w0=$(awk '/^write_bytes/ {print $2}' /proc/$node/io)
out=$("$bin" bench --url http://127.0.0.1:$port --messages $msgs --size 1024 --concurrency 64 --batch $batch --json 2>/dev/null | tail -1)
w1=$(awk '/^write_bytes/ {print $2}' /proc/$node/io)
m=$(curl -fsS http://127.0.0.1:$port/metrics)
cnt=$(awk '/^outpost_store_commit_seconds_count/ {print $2}' <<<"$m")
realps=$(python3 -c "import sqlite3;print(sqlite3.connect('file:$d/data/outpost.db?mode=ro',uri=True).execute('PRAGMA page_size').fetchone()[0])")
echo "page $realps batch $batch: $(jq -r '"\(.messages_per_second|floor) msgs/s p50 \(.latency_ms.p50) p99 \(.latency_ms.p99)"' <<<"$out") | commits $cnt | written $(( (w1-w0)/1048576 )) MiB, $(( (w1-w0)/cnt/1024 )) KiB/commit | load $load"
