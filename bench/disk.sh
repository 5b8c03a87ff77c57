#!/usr/bin/env bash
# The disk's own limits, measured with fio on the file system that holds the benchmark data dirs.
#
#   bench/disk.sh [DIR]        # DIR defaults to $BENCH_DIR or /tmp; a fresh subdirectory is used
#                              # and removed afterwards
#
# Prints one line per job plus `df -T` of DIR. Jobs:
#   append-fdatasync-4k   4 KiB writes appended to a growing file, fdatasync after each
#                         (an SQLite WAL commit on a fresh WAL: write frames, then sync)
#   overwrite-fdatasync-4k / -64k   the same into an already laid-out file (a WAL being reused
#                         after a checkpoint); 64 KiB ≈ one group commit of 64 x 1 KiB messages
#   overwrite-fsync-4k    fsync instead of fdatasync
#   seq-write-1m-direct   sequential 1 MiB O_DIRECT writes, 8 in flight (raw bandwidth)
#   seq-write-1m-buffered sequential 1 MiB buffered writes with one fsync at the end
set -euo pipefail

command -v fio >/dev/null || { echo "fio not found: apt-get update && apt-get install -y fio" >&2; exit 2; }
command -v jq >/dev/null || { echo "jq not found: apt-get install -y jq" >&2; exit 2; }

base="${1:-${BENCH_DIR:-/tmp}}"
dir="$(mktemp -d "$base/outpost-fio.XXXXXX")"
trap 'rm -rf "$dir"' EXIT
RUNTIME="${FIO_RUNTIME:-15}"

echo "fio $(fio --version) in $dir; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
df -T "$dir" | sed 's/^/  /'

run() { # name, fio args...
    local name="$1"; shift
    local out
    out="$(fio --name="$name" --directory="$dir" --output-format=json --group_reporting "$@")"
    local iops bw lat_p50 lat_p99 sync_p50 sync_p99
    iops="$(jq -r '.jobs[0].write.iops' <<<"$out")"
    bw="$(jq -r '.jobs[0].write.bw_bytes / 1048576' <<<"$out")"
    # Write completion latency (clat) and, for synced jobs, the sync latency.
    lat_p50="$(jq -r '.jobs[0].write.clat_ns.percentile["50.000000"] // 0 | . / 1000' <<<"$out")"
    lat_p99="$(jq -r '.jobs[0].write.clat_ns.percentile["99.000000"] // 0 | . / 1000' <<<"$out")"
    sync_p50="$(jq -r '.jobs[0].sync.lat_ns.percentile["50.000000"] // 0 | . / 1000' <<<"$out")"
    sync_p99="$(jq -r '.jobs[0].sync.lat_ns.percentile["99.000000"] // 0 | . / 1000' <<<"$out")"
    printf '%-26s %10.0f IOPS %9.1f MiB/s  write p50 %7.0f us p99 %7.0f us  sync p50 %7.0f us p99 %7.0f us  (load %s)\n' \
        "$name" "$iops" "$bw" "$lat_p50" "$lat_p99" "$sync_p50" "$sync_p99" "$(cut -d' ' -f1 /proc/loadavg)"
    rm -f "$dir"/*
}

# Appending: an empty file that grows with each write, so every fdatasync also commits the size.
run append-fdatasync-4k   --rw=write --bs=4k  --size=256m --file_append=1 --fdatasync=1 --ioengine=sync \
    --runtime="$RUNTIME" --time_based=0
run overwrite-fdatasync-4k  --rw=write --bs=4k  --size=64m --fdatasync=1 --ioengine=sync --overwrite=1 \
    --runtime="$RUNTIME" --time_based=1
run overwrite-fdatasync-64k --rw=write --bs=64k --size=256m --fdatasync=1 --ioengine=sync --overwrite=1 \
    --runtime="$RUNTIME" --time_based=1
run overwrite-fsync-4k      --rw=write --bs=4k  --size=64m --fsync=1 --ioengine=sync --overwrite=1 \
    --runtime="$RUNTIME" --time_based=1
run seq-write-1m-direct   --rw=write --bs=1m --size=2g --direct=1 --ioengine=libaio --iodepth=8 \
    --runtime="$RUNTIME" --time_based=0
run seq-write-1m-buffered --rw=write --bs=1m --size=2g --end_fsync=1 --ioengine=sync \
    --runtime="$RUNTIME" --time_based=0
