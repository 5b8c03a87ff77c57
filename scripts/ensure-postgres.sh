#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers at OUTPOST_TEST_POSTGRES (default
# postgres://postgres@127.0.0.1:5432/test) for the cluster tests: starts the local cluster if it is
# installed but stopped, installs Debian's package if it is missing. Prints what it did.
set -euo pipefail
url="${OUTPOST_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/test}"

answers() { command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432; }

if answers; then
  echo "postgres: answering at 127.0.0.1:5432"
  exit 0
fi
if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
  echo "postgres: not installed; installing Debian's postgresql"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  # Trust local TCP connections: a throwaway CI database.
  sed -i 's/^\(host.*all.*all.*127.0.0.1\/32\s*\).*/\1trust/' "/etc/postgresql/$version/main/pg_hba.conf"
fi
version=$(ls /etc/postgresql | sort -V | tail -n 1)
pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
for _ in $(seq 1 30); do
  if answers; then
    psql -h 127.0.0.1 -U postgres -tc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1 \
      || psql -h 127.0.0.1 -U postgres -c "CREATE DATABASE test" >/dev/null
    echo "postgres: started ($url)"
    exit 0
  fi
  sleep 1
done
echo "postgres: could not start a server; the cluster tests will fail" >&2
exit 1
