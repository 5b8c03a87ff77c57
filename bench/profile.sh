#!/usr/bin/env bash
# Where the node's time goes under `outpost bench` load: perf profile of the node, and the writer
# thread's system calls (strace -c), one run each (strace slows the node down, so its throughput
# is not a benchmark figure).
#
#   bench/profile.sh OUTPOST_BIN [BATCH] [MESSAGES]     # BATCH 1 (default) or e.g. 100
#
# Prints the top of the perf report (self time by symbol, all threads, and the writer thread on its
# own) and the writer's syscall summary. Data dir and perf data under a temp dir in $BENCH_DIR
# (default /tmp), removed at the end unless KEEP=1.
set -euo pipefail
outpost="${1:?usage: bench/profile.sh OUTPOST_BIN [BATCH] [MESSAGES]}"
batch="${2:-1}"
messages="${3:-200000}"
port="${BENCH_OUTPOST_PORT:-17400}"
BENCH_DIR="${BENCH_DIR:-/tmp}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
work="$(mktemp -d "$BENCH_DIR/outpost-profile.XXXXXX")"
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill -0 "$pid" 2>/dev/null || continue
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    if [[ "${KEEP:-0}" == 1 ]]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

clean_env=(env)
for v in $(compgen -e); do [[ "$v" == OUTPOST_* ]] && clean_env+=(-u "$v"); done

start_node() { # dir
    "${clean_env[@]}" "$outpost" edge --listen "127.0.0.1:$port" --data-dir "$1" --node-id bench \
        >"$1.log" 2>&1 &
    node=$!
    pids+=("$node")
    for _ in $(seq 300); do curl -fsS -o /dev/null "http://127.0.0.1:$port/readyz" 2>/dev/null && return 0; sleep 0.1; done
    echo "node did not start" >&2; cat "$1.log" >&2; exit 1
}
stop_node() {
    kill -TERM "$node"; wait "$node" 2>/dev/null || true
}
bench() {
    "$outpost" bench --url "http://127.0.0.1:$port" --messages "$messages" --size 1024 --concurrency 64 \
        --batch "$batch" 2>/dev/null
}

echo "== perf (cpu-clock, ${PERF_FREQ:-499} Hz, dwarf call graphs; slows the node down) of the node, batch $batch, $messages messages; load $(cut -d' ' -f1-3 /proc/loadavg)"
start_node "$work/perf-data"
perf record -e cpu-clock -F "${PERF_FREQ:-499}" --call-graph dwarf,32768 -p "$node" -o "$work/perf.data" 2>"$work/perf.err" &
perf_pid=$!
pids+=("$perf_pid")
sleep 1
bench
kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true
stop_node
report() { perf report -i "$work/perf.data" --stdio "$@" 2>/dev/null | grep -E '^ +[0-9]' || true; }
echo "-- samples by thread"
report --no-children --sort comm | head -10
echo "-- self time by symbol, all threads (top 40)"
report --no-children --sort comm,dso,sym | head -40
echo "-- writer thread only, inclusive time (children) by symbol (top 70; % of all samples)"
report --children --comms outpost-writer --sort sym -g none | head -70
echo "-- tokio workers only, inclusive time by symbol (top 50; % of all samples)"
report --children --comms tokio-rt-worker --sort sym -g none | head -50

echo
echo "== strace -c of the writer thread, batch $batch, $messages messages (slowed down by strace)"
start_node "$work/strace-data"
writer_tid="$(grep -l '^outpost-writer$' /proc/"$node"/task/*/comm | head -1 | cut -d/ -f5)"
strace -c -w -p "$writer_tid" -o "$work/strace.txt" &
strace_pid=$!
pids+=("$strace_pid")
sleep 0.5
bench | sed 's/^/  (under strace) /'
kill -INT "$strace_pid"; wait "$strace_pid" 2>/dev/null || true
curl -fsS "http://127.0.0.1:$port/metrics" | grep -E '^outpost_store_commit_seconds_count|^outpost_messages_accepted_total'
stop_node
cat "$work/strace.txt"
ls -la "$work"/strace-data/ 2>/dev/null | sed 's/^/  /'
