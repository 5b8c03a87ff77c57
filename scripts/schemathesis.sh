#!/usr/bin/env bash
# Fuzzes the HTTP API of a running edge and central with schemathesis (PyPI), from the OpenAPI
# document each serves at GET /openapi.json (crates/outpost-api/src/openapi.json):
#
#   scripts/schemathesis.sh                     # both roles, no 5xx (not_a_server_error)
#   MAX_EXAMPLES=50 MAX_TIME=120 scripts/schemathesis.sh
#   CHECKS=all scripts/schemathesis.sh          # also the document's conformance (informative)
#
# Starts an edge (linked to the central, with a route) and a central (with a route) on loopback
# ports with no [auth], installs schemathesis into a venv ($ST_VENV, default
# target/schemathesis-venv) if missing, then runs `st run` against each role for at most MAX_TIME
# seconds (default 60) and MAX_EXAMPLES (default 25) cases per operation and phase. Exits non-zero
# when schemathesis reports a failure or an error, or a node died or panicked. The checks: no 5xx
# except a documented 503 (scripts/schemathesis.toml, and the check in schemathesis_hooks.py). The
# binary is $OUTPOST_BIN, else target/debug/outpost (built if missing). POST /v1/link is left out:
# a valid handshake answers an event stream that never ends (the link's frames and JSON are
# fuzzed by proptest, see docs/reliability.md). Every process it starts is stopped on exit.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
MAX_EXAMPLES="${MAX_EXAMPLES:-25}"
MAX_TIME="${MAX_TIME:-60}"
CHECKS="${CHECKS:-not_a_server_error,unavailable_is_documented}"
SEED="${SEED:-1}"
EDGE_PORT="${EDGE_PORT:-27700}"
CENTRAL_PORT="${CENTRAL_PORT:-27701}"
ST_VENV="${ST_VENV:-$repo/target/schemathesis-venv}"
BIN="${OUTPOST_BIN:-$repo/target/debug/outpost}"
work="$(mktemp -d "${TMPDIR:-/tmp}/outpost-schemathesis.XXXXXX")"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$work"
}
trap cleanup EXIT INT TERM

if [ ! -x "$BIN" ]; then (cd "$repo" && cargo build -q -p outpost --bin outpost); fi
if [ ! -x "$ST_VENV/bin/st" ]; then
  echo "schemathesis: installing into $ST_VENV"
  python3 -m venv "$ST_VENV"
  "$ST_VENV/bin/pip" install -q --disable-pip-version-check 'schemathesis>=4,<5'
fi
echo "schemathesis $("$ST_VENV/bin/st" --version | awk '{print $NF}'), outpost $("$BIN" --version 2>/dev/null || echo '?')"

wait_ready() { # url pid
  for _ in $(seq 1 600); do
    kill -0 "$2" 2>/dev/null || { echo "the node for $1 exited (port taken?); see $work/*.log" >&2; KEEP=1; exit 1; }
    curl -sf "$1/readyz" >/dev/null && return 0
    sleep 0.1
  done
  echo "not ready: $1" >&2; KEEP=1; exit 1
}

central_url="http://127.0.0.1:$CENTRAL_PORT"
edge_url="http://127.0.0.1:$EDGE_PORT"
# Routes to a port nobody listens on: they go to store mode and fail messages, so the route and
# failed endpoints have something to answer.
cat >"$work/central.toml" <<EOF
[[route]]
name = "to-nowhere"
queue = "orders"
urls = ["http://127.0.0.1:9/"]
EOF
cat >"$work/edge.toml" <<EOF
[[upstream]]
url = "$central_url"
[[route]]
name = "to-nowhere"
queue = "orders"
urls = ["http://127.0.0.1:9/"]
EOF
"$BIN" central --listen "127.0.0.1:$CENTRAL_PORT" --data-dir "$work/central" --node-id hq \
  --config "$work/central.toml" >>"$work/central.log" 2>&1 &
central_pid=$!; pids+=("$central_pid"); wait_ready "$central_url" "$central_pid"
"$BIN" edge --listen "127.0.0.1:$EDGE_PORT" --data-dir "$work/edge" --node-id store-1 \
  --config "$work/edge.toml" >>"$work/edge.log" 2>&1 &
edge_pid=$!; pids+=("$edge_pid"); wait_ready "$edge_url" "$edge_pid"
# Something in the queues, so reads, leases and the forwarder have messages.
for url in "$edge_url" "$central_url"; do
  curl -sf -X POST -H 'Content-Type: application/json' --data '{"n":1}' "$url/v1/queues/orders/messages" >/dev/null
done

status=0
for role in edge central; do
  url="$edge_url"; pid="$edge_pid"
  [ "$role" = central ] && { url="$central_url"; pid="$central_pid"; }
  echo "== $role: st run $url/openapi.json (checks $CHECKS, at most $MAX_EXAMPLES examples per operation, $MAX_TIME s)"
  # Run from the work directory: schemathesis keeps a cache (.schemathesis/) where it runs.
  (cd "$work" && PYTHONPATH="$here" SCHEMATHESIS_HOOKS=schemathesis_hooks "$ST_VENV/bin/st" --config-file "$here/schemathesis.toml" run "$url/openapi.json" \
    --url "$url" --checks "$CHECKS" --max-examples "$MAX_EXAMPLES" --max-time "$MAX_TIME" --seed "$SEED" \
    --exclude-path-regex '^/v1/link$' --request-timeout 10 --workers 1 --generation-database none \
    --suppress-health-check all --no-color --report junit --report-dir "$work/report-$role") \
    || { status=1; echo "== $role: schemathesis found failures (report in $work/report-$role)"; KEEP=1; }
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "== $role: the node died during the run; see $work/$role.log" >&2; status=1; KEEP=1
  fi
done
if grep -q 'panicked' "$work"/*.log; then
  echo "a node panicked:" >&2; grep -h -A3 'panicked' "$work"/*.log >&2; status=1; KEEP=1
fi
[ "$status" = 0 ] && echo "schemathesis: no failures on either role" || echo "logs and reports kept in $work"
exit "$status"
