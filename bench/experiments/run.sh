#!/usr/bin/env bash
# What would make the writer faster? Runs `outpost bench` against variants of the store, interleaved
# (so drifting machine load hits every variant alike), and prints one line per run.
#
#   git -C <repo> archive <rev> | tar -x -C /tmp/exp && cd /tmp/exp
#   git apply <repo>/bench/experiments/sqlite-tuning.patch
#   cargo build --release -p outpost && cp target/release/outpost /tmp/outpost-exp
#   bench/experiments/run.sh BASE_BIN /tmp/outpost-exp [REPS]
#
# The patch (experiment only, not for production as is) adds environment switches to the SQLite
# store: EXP_PAGE_SIZE (page size of a new database), EXP_WAL_AUTOCHECKPOINT, EXP_CACHE_SIZE, and
# EXP_CKPT_MS (PASSIVE checkpoints every N ms from a thread and connection of their own), and builds
# uuid with `fast-rng` (message ids from a user-space RNG instead of one getrandom(2) per id).
#
# Variants (VARIANTS overrides the list; name=binary-selector:ENV=VAL,...):
#   head             BASE_BIN as is
#   fastrng          patched binary, no switches (only the uuid change)
#   ckpt             + checkpoints off the writer thread (wal_autocheckpoint=0, PASSIVE every 100 ms)
#   ckpt+page16k     + 16 KiB pages
#   ckpt+page64k     + 64 KiB pages
#   page64k          64 KiB pages, checkpoints as usual
# Each line: variant, mode, msgs/s, latency, commits, messages per commit, mean commit time, the
# WAL's size at the end of the run, node/thread/client CPU and the CPU of everything else (a run
# with much "others" ran beside someone else's work: repeat it). WAIT_LOAD=1.2 waits before each
# round until the 1-minute load average is below that.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
base="${1:?usage: run.sh BASE_BIN EXP_BIN [REPS]}"
exp="${2:?usage: run.sh BASE_BIN EXP_BIN [REPS]}"
reps="${3:-3}"
port="${BENCH_OUTPOST_PORT:-17410}"
BENCH_DIR="${BENCH_DIR:-/tmp}"
SINGLE_MESSAGES="${SINGLE_MESSAGES:-200000}"
BATCH_MESSAGES="${BATCH_MESSAGES:-1000000}"
VARIANTS="${VARIANTS:-head:base: fastrng:exp: ckpt:exp:EXP_WAL_AUTOCHECKPOINT=0,EXP_CKPT_MS=100 ckpt+page16k:exp:EXP_WAL_AUTOCHECKPOINT=0,EXP_CKPT_MS=100,EXP_PAGE_SIZE=16384 ckpt+page64k:exp:EXP_WAL_AUTOCHECKPOINT=0,EXP_CKPT_MS=100,EXP_PAGE_SIZE=65536 page64k:exp:EXP_PAGE_SIZE=65536}"
MODES="${MODES:-single batch}"

work="$(mktemp -d "$BENCH_DIR/outpost-exp.XXXXXX")"
node=""
cleanup() {
    if [[ -n "$node" ]] && kill -0 "$node" 2>/dev/null; then kill -TERM "$node"; wait "$node" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

clean_env=(env)
for v in $(compgen -e); do [[ "$v" == OUTPOST_* || "$v" == EXP_* ]] && clean_env+=(-u "$v"); done

one() { # name, binary, env list (comma-separated), mode
    local name="$1" bin="$2" envs="$3" mode="$4" batch=1 messages="$SINGLE_MESSAGES"
    [[ "$mode" == batch ]] && { batch=100; messages="$BATCH_MESSAGES"; }
    local dir="$work/run"
    rm -rf "$dir"; mkdir -p "$dir"
    local extra=()
    [[ -n "$envs" ]] && IFS=, read -r -a extra <<<"$envs"
    "${clean_env[@]}" "${extra[@]}" "$bin" edge --listen "127.0.0.1:$port" --data-dir "$dir/data" --node-id bench \
        >"$dir/node.log" 2>&1 &
    node=$!
    for _ in $(seq 300); do curl -fsS -o /dev/null "http://127.0.0.1:$port/readyz" 2>/dev/null && break; sleep 0.1; done
    local load
    load="$(cut -d' ' -f1 /proc/loadavg)"
    python3 "$here/../cpu.py" snap "$node" "$dir/before.json"
    local TIMEFORMAT='%U %S' out
    { time "$bin" bench --url "http://127.0.0.1:$port" --messages "$messages" --size 1024 --concurrency 64 \
        --batch "$batch" --json >"$dir/bench.out" 2>/dev/null; } 2>"$dir/time.txt"
    python3 "$here/../cpu.py" snap "$node" "$dir/after.json"
    out="$(tail -1 "$dir/bench.out")"
    local m acc cnt sum wal
    m="$(curl -fsS "http://127.0.0.1:$port/metrics")"
    acc="$(awk '/^outpost_messages_accepted_total/ {s += $2} END {print s}' <<<"$m")"
    cnt="$(awk '/^outpost_store_commit_seconds_count/ {print $2}' <<<"$m")"
    sum="$(awk '/^outpost_store_commit_seconds_sum/ {print $2}' <<<"$m")"
    wal="$(stat -c %s "$dir/data/outpost.db-wal" 2>/dev/null || echo 0)"
    kill -TERM "$node"; wait "$node" 2>/dev/null || true; node=""
    local cu cs
    read -r cu cs <"$dir/time.txt"
    printf '%-14s %-6s %s | commits %s, %s msgs/commit, mean %s ms | WAL at end %s MiB | load %s | %s\n' \
        "$name" "$mode" \
        "$(jq -r '"\(.messages_per_second|floor) msgs/s p50 \(.latency_ms.p50) p99 \(.latency_ms.p99) ms"' <<<"$out")" \
        "$cnt" "$(awk -v a="$acc" -v c="$cnt" 'BEGIN {printf "%.0f", a / c}')" \
        "$(awk -v s="$sum" -v c="$cnt" 'BEGIN {printf "%.2f", s / c * 1000}')" \
        "$(( wal / 1048576 ))" "$load" \
        "$(python3 "$here/../cpu.py" diff "$dir/before.json" "$dir/after.json" --client "$cu" "$cs" --name node)"
}

for rep in $(seq "$reps"); do
    if [[ -n "${WAIT_LOAD:-}" ]]; then
        for _ in $(seq 120); do
            python3 -c "import sys; sys.exit(0 if $(cut -d' ' -f1 /proc/loadavg) < $WAIT_LOAD else 1)" && break
            sleep 5
        done
    fi
    echo "== round $rep ($(date -u +%T), load $(cut -d' ' -f1-3 /proc/loadavg))"
    for mode in $MODES; do
        for v in $VARIANTS; do
            IFS=: read -r name which envs <<<"$v"
            bin="$base"; [[ "$which" == exp ]] && bin="$exp"
            one "$name" "$bin" "$envs" "$mode"
        done
    done
done
