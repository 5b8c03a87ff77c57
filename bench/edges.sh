#!/usr/bin/env bash
# Many simulated edges against one central or a cluster (issue 13): starts the central(s), runs
# outpost-edgesim (testkit::edgesim) and measures the central(s) during the generation window.
#
#   bench/edges.sh SETUP EDGES RATE [SECONDS] [PING]
#     SETUP    one   = one central on the embedded store (SQLite)
#              pg1   = one central on PostgreSQL
#              pg2   = two centrals on one PostgreSQL database (half the edges on each)
#     EDGES    simulated edges (each with its own HTTP client, like a real edge's: HTTP/2, so the link
#              stream, batches and reports are streams of one connection per edge; with
#              EXTRA="--http1" HTTP/1.1 as edges before that: the link stream, one connection for
#              batches, one more while a report overlaps a batch)
#     RATE     messages per second per edge
#     SECONDS  generation time (default 60)
#     PING     ping interval the edges ask for (default 10s; an edge's default is 300s)
#
# Environment: BIN_DIR (default target/release; needs `cargo build --release -p outpost -p testkit`),
# OUTPOST_TEST_POSTGRES (admin URL, default postgres://postgres@127.0.0.1:5432/test; each run creates
# and drops the database outpost_edges_bench), SIMS (simulator processes sharing the edges, default 1:
# each simulated edge holds one socket (about 2 with --http1), and one process may not open more
# than its `ulimit -n`, which a machine without CAP_SYS_RESOURCE cannot raise past the hard limit; the
# simulator also needs descriptors of its own), SIZE (payload bytes,
# default 256), QUEUES (queue names, default 64), EXTRA (more outpost-edgesim arguments), CENTRAL_ENV
# (environment for the central(s), e.g. "OUTPOST_LIMITS__MAX_CONNECTIONS=50000": each edge holds one
# connection (about 2 with --http1) and the default limits.max_connections = 4096 would refuse the
# rest past ~4,000 edges), KEEP=1 keeps the work directory.
#
# Prints one summary block: the simulator's figures (end-to-end latency = message due at the edge →
# the central's acknowledgement, which follows its commit; ping lateness = gap between two pings
# minus the interval), and per central: CPU (% of one core) and RSS during generation, open
# descriptors and TCP connections on its port halfway through generation (established, and per edge
# over what the idle central held before the edges came), PostgreSQL
# commits/s (pg_stat_database.xact_commit) and the CPU of every postgres process, the machine's
# busy share, the load average before the run.
set -euo pipefail
cd "$(dirname "$0")/.."
setup=${1:?SETUP: one, pg1 or pg2}
edges=${2:?EDGES}
rate=${3:?RATE}
seconds=${4:-60}
ping=${5:-10s}
sims=${SIMS:-1}
size=${SIZE:-256}
queues=${QUEUES:-64}
bin_dir=${BIN_DIR:-target/release}
admin=${OUTPOST_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/test}
base=${admin%%\?*}
base=${base%/*}
db=outpost_edges_bench
work=$(mktemp -d /tmp/outpost-edges-bench.XXXXXX)
pids=()
# Ten thousand edges are 10,000+ sockets on each side of loopback (20,000+ with --http1).
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ "$setup" == pg* ]]; then psql "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true; fi
  [ -n "${KEEP:-}" ] || rm -rf "$work"
  echo "work: $work${KEEP:+ (kept)}" >&2
}
trap cleanup EXIT

wait_ready() { # URL
  for _ in $(seq 1 300); do curl -sf "$1/readyz" >/dev/null && return 0; sleep 0.1; done
  echo "not ready: $1" >&2; exit 1
}
start_central() { # NAME PORT [POSTGRES_URL]
  local name=$1 port=$2 pg=${3:-}
  local args=(central --node-id "$name" --listen "127.0.0.1:$port" --data-dir "$work/$name")
  [ -n "$pg" ] && args+=(--postgres "$pg")
  env OUTPOST_LOG=${OUTPOST_LOG:-warn} ${CENTRAL_ENV:-} "$bin_dir/outpost" "${args[@]}" 2>>"$work/$name.log" &
  pids+=($!)
  central_pids+=($!)
  wait_ready "http://127.0.0.1:$port"
}
# CPU ticks of each central, of all postgres processes, and the machine's busy/total jiffies.
snap() {
  python3 - "$@" <<'PY'
import os, sys
def ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        raw = f.read()
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])
pg = 0
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            with open(f"/proc/{p}/comm") as f:
                if f.read().strip() == "postgres":
                    pg += ticks(p)
        except OSError:
            pass
with open("/proc/stat") as f:
    cpu = [int(x) for x in f.readline().split()[1:]]
busy = cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6]
print(" ".join(str(ticks(p)) for p in sys.argv[1:]), pg, busy, sum(cpu[:8]))
PY
}
rss_of() { awk '/VmRSS/ {printf "%.0f MiB", $2/1024}' "/proc/$1/status"; }
hwm_of() { awk '/VmHWM/ {printf "%.0f MiB", $2/1024}' "/proc/$1/status"; }
fds_of() { ls "/proc/$1/fd" | wc -l; }
established_on() { ss -Htn state established "( sport = :$1 )" | wc -l; }
pg_commits() { psql "$admin" -Atc "SELECT xact_commit FROM pg_stat_database WHERE datname = '$db'"; }

central_pids=()
urls=()
ports=(17601 17602)
case "$setup" in
  one)
    start_central hq 17601; urls=(http://127.0.0.1:17601) ;;
  pg1|pg2)
    psql "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null
    psql "$admin" -qc "CREATE DATABASE $db" >/dev/null
    start_central hq-a 17601 "$base/$db"; urls=(http://127.0.0.1:17601)
    if [ "$setup" = pg2 ]; then start_central hq-b 17602 "$base/$db"; urls+=(http://127.0.0.1:17602); fi ;;
  *) echo "SETUP must be one, pg1 or pg2" >&2; exit 2 ;;
esac

fds_idle=(); for p in "${central_pids[@]}"; do fds_idle+=("$(fds_of "$p")"); done
# Links open over the ramp (about 500 handshakes a second, at least 5 s).
ramp=$(( edges / 500 > 5 ? edges / 500 : 5 ))
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
central_args=()
for u in "${urls[@]}"; do central_args+=(--central "$u"); done
echo "== $setup: $edges edges x $rate msg/s, ${seconds}s, ping $ping, $size B, $queues queues; ramp ${ramp}s; load before $load_before; $(date -u +%FT%TZ)" >&2
# SIMS simulator processes share the edges (each process has its own open-file limit).
sim_pids=()
for ((k = 0; k < sims; k++)); do
  n=$(( edges / sims + (k < edges % sims ? 1 : 0) ))
  "$bin_dir/outpost-edgesim" "${central_args[@]}" --edges "$n" --rate "$rate" --duration "${seconds}s" \
    --ramp "${ramp}s" --ping-interval "$ping" --size "$size" --queue-names "$queues" --json ${EXTRA:-} \
    >"$work/sim$k.json" 2>"$work/sim$k.log" &
  sim_pids+=($!)
  pids+=($!)
done
sleep "$ramp"
commits_before=0; [[ "$setup" == pg* ]] && commits_before=$(pg_commits)
read -r -a before < <(snap "${central_pids[@]}")
t0=$(date +%s.%N)
# Resident memory sampled through the generation window; the largest sample is reported.
rss_max=()
fds=()
conns=()
for ((s = 0; s < seconds; s += 5)); do
  sleep $(( seconds - s < 5 ? seconds - s : 5 ))
  for i in "${!central_pids[@]}"; do
    r=$(awk '/VmRSS/ {print $2}' "/proc/${central_pids[$i]}/status")
    (( r > ${rss_max[$i]:-0} )) && rss_max[$i]=$r
  done
  if (( ${#fds[@]} == 0 && s + 5 >= seconds / 2 )); then
    for i in "${!central_pids[@]}"; do
      fds+=("$(fds_of "${central_pids[$i]}")"); conns+=("$(established_on "${ports[$i]}")")
    done
  fi
done
read -r -a after < <(snap "${central_pids[@]}")
t1=$(date +%s.%N)
commits_after=0; [[ "$setup" == pg* ]] && commits_after=$(pg_commits)
load_during=$(cut -d' ' -f1-3 /proc/loadavg)
status=0
for k in "${!sim_pids[@]}"; do
  wait "${sim_pids[$k]}" || status=$?
  tail -2 "$work/sim$k.log" >&2
done

python3 - "$(ls "$work"/sim*.json | paste -sd,)" "$t0" "$t1" "$commits_before" "$commits_after" "${#central_pids[@]}" \
  "${before[*]}" "${after[*]}" "${rss_max[*]}" "${fds[*]}" "$load_before" "$load_during" "$setup" "$status" \
  "${fds_idle[*]}" "${conns[*]}" <<'PY'
import json, os, sys
(sim_path, t0, t1, cb, ca, n, before, after, rss, fds, load_before, load_during, setup, status,
 fds_idle, conns) = sys.argv[1:]
wall = float(t1) - float(t0)
n = int(n)
before = [int(x) for x in before.split()]
after = [int(x) for x in after.split()]
tick = os.sysconf("SC_CLK_TCK")
try:
    reports = [json.loads(open(p).read().strip().splitlines()[-1]) for p in sim_path.split(",")]
except Exception as e:
    print(f"no simulator report ({e}); exit status {status}")
    sys.exit(1)

def merge(reports):
    """One report from several simulators: counts add up; times and percentiles are the worst."""
    if len(reports) == 1:
        return reports[0]
    r = dict(reports[0])
    for key, value in r.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [x[key] for x in reports]
            worst = key.endswith("seconds") and key != "simulator_cpu_seconds"
            r[key] = max(values) if worst or key in ("rate_per_edge", "payload_bytes") else sum(values)
        elif isinstance(value, dict):
            r[key] = {k: (max if k.endswith("_ms") else sum)(x[key].get(k, 0) for x in reports)
                      for k, v in value.items() if isinstance(v, (int, float))}
        elif isinstance(value, list):
            r[key] = [item for x in reports for item in x[key]]
    return r

r = merge(reports)
if len(reports) > 1:
    print(f"({len(reports)} simulator processes: counts are summed, latency percentiles are the worst process's)")
v = r.get("verification") or {}
print(f"setup {setup}: {r['edges']} edges x {r['rate_per_edge']} msg/s = {r['offered_per_second']:.0f} msg/s offered, "
      f"{r['payload_bytes']} B, {r['generation_seconds']:.0f} s")
print(f"  acknowledged while generating: {r['acknowledged_per_second_while_generating']:.0f} msg/s; "
      f"backlog max {r['backlog_max_while_generating']}, at end {r['backlog_at_generation_end']}; drain {r['drain_seconds']:.1f} s")
e, p, l = r["end_to_end_latency"], r["ping_lateness"], r["link_open_latency"]
print(f"  end-to-end latency ms: p50 {e['p50_ms']:.1f} p99 {e['p99_ms']:.1f} max {e['max_ms']:.1f}")
print(f"  ping lateness ms: p50 {p['p50_ms']:.1f} p99 {p['p99_ms']:.1f} max {p['max_ms']:.1f} ({r['pings']} pings)")
print(f"  link open ms: p50 {l['p50_ms']:.1f} p99 {l['p99_ms']:.1f}; links {r['links_opened']} opened, "
      f"{r['link_open_failures']} failed opens, {r['links_lost']} lost")
print(f"  batches {r['batches']} ({r['batch_failures']} failed, {r['gaps']} gaps, {r['replays']} replays), "
      f"reports {r['reports_sent']} ({r['report_failures']} failed, {r['reports_skipped']} skipped)")
cpu_central = [(after[i] - before[i]) / tick / wall * 100 for i in range(n)]
pg_cpu = (after[n] - before[n]) / tick / wall * 100
busy = (after[n + 1] - before[n + 1]) / max(1, after[n + 2] - before[n + 2]) * 100
rss = [int(x) // 1024 for x in rss.split()]
fds = [int(x) for x in fds.split()]
fds_idle = [int(x) for x in fds_idle.split()]
conns = [int(x) for x in conns.split()]
for i in range(n):
    edges_here = r["edges"] // n + (1 if i < r["edges"] % n else 0)
    print(f"  central {i}: CPU {cpu_central[i]:.0f} % of a core, RSS max {rss[i]} MiB, {fds[i]} open fds "
          f"({(fds[i] - fds_idle[i]) / max(1, edges_here):.2f} per edge over {fds_idle[i]} idle), "
          f"{conns[i]} established connections on its port")
if setup.startswith("pg"):
    print(f"  postgres: {(int(ca) - int(cb)) / wall:.0f} commits/s (xact_commit), CPU {pg_cpu:.0f} % of a core")
print(f"  simulator CPU {r['simulator_cpu_seconds'] / r['total_seconds'] * 100:.0f} % of a core over its run; "
      f"machine busy {busy:.0f} % of both cores; load before {load_before}, at end {load_during}")
print(f"  check: {'OK' if r['problems'] == 0 and r['messages_acknowledged'] == r['messages_generated'] else 'FAILED'}; "
      f"{r['problems']} problems; verified {v.get('messages_checked', 0)} messages of {v.get('pairs_checked', 0)} "
      f"(edge, queue) pairs, ok={v.get('repeated_or_reordered', 1) == 0 and v.get('acknowledged_but_missing', 1) == 0 and v.get('gaps', 1) == 0}")
for s in r["problem_samples"][:5]:
    print(f"    {s}")
PY
