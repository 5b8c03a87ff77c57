#!/usr/bin/env python3
"""Helpers of bench/wan.sh (issue 12): waiting for a drain, and the NATS JetStream client side.

  wan.py wait-outpost URL QUEUE COUNT START_MS
      polls an outpost node's /v1/queues until QUEUE's last_seq reaches COUNT
  wan.py wait-nats URL COUNT START_MS
      polls a nats-server's monitoring /jsz until its streams hold COUNT messages
  Both print `FIRST_MS DONE_MS`: milliseconds from START_MS (epoch ms, taken by wan.sh just before
  the line came up) until the first message and until all of them were there. One process polls
  every 50 ms, so the polling costs the measured nodes almost nothing.

  wan.py nats-backlog URL STREAM SUBJECT FILE...
      creates a file stream and publishes every line of the NDJSON files as one message, each
      publish acknowledged (JetStream publish ack), 256 unacknowledged at a time
  wan.py nats-source URL STREAM FROM_STREAM DOMAIN
      creates a file stream that sources FROM_STREAM of JetStream domain DOMAIN (cross-domain,
      through the leaf node connection)

The NATS commands need nats-py (`pip install nats-py`); the wait commands only the standard library.
"""

import asyncio
import json
import sys
import time
import urllib.request

DEADLINE_S = 1800
IN_FLIGHT = 256


def now_ms():
    return time.time() * 1000


def get_json(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return json.load(answer)
    except (OSError, ValueError):
        return None


def wait(count_now, count, start_ms):
    first = None
    while True:
        have = count_now()
        at = now_ms() - start_ms
        if have > 0 and first is None:
            first = at
        if have >= count:
            print(f"{first:.0f} {at:.0f}")
            return 0
        if at > DEADLINE_S * 1000:
            print(f"not drained in {DEADLINE_S} s: {have} of {count}", file=sys.stderr)
            return 1
        time.sleep(0.05)


def outpost_count(url, queue):
    queues = get_json(f"{url}/v1/queues") or []
    return sum(q["last_seq"] for q in queues if q["name"] == queue)


def nats_count(url):
    return (get_json(f"{url}/jsz") or {}).get("messages", 0)


async def nats_backlog(url, stream, subject, files):
    import nats
    from nats.js.api import StorageType, StreamConfig

    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    js = nc.jetstream(timeout=30)
    # File storage, every other setting the server's default (sync_interval 2 min: no fsync per
    # publish; outpost fsyncs each commit).
    await js.add_stream(StreamConfig(name=stream, subjects=[subject], storage=StorageType.FILE, num_replicas=1))
    lines = []
    for path in files:
        with open(path, "rb") as f:
            lines.extend(line.rstrip(b"\n") for line in f if line.strip())
    started = time.monotonic()
    next_line = 0
    failed = []

    async def worker():
        nonlocal next_line
        while next_line < len(lines):
            payload = lines[next_line]
            next_line += 1
            try:
                await js.publish(subject, payload, stream=stream)
            except Exception as e:  # counted and reported below
                failed.append(e)

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    seconds = time.monotonic() - started
    info = await js.stream_info(stream)
    await nc.close()
    print(
        f"nats backlog: {len(lines) - len(failed)} of {len(lines)} publishes acknowledged in {seconds:.1f} s; "
        f"stream {stream} holds {info.state.messages} messages, {info.state.bytes} B"
    )
    if failed:
        print(f"nats backlog: {len(failed)} publishes failed, first: {failed[0]!r}", file=sys.stderr)
        return 1
    return 0 if info.state.messages == len(lines) else 1


async def nats_source(url, stream, from_stream, domain):
    import nats
    from nats.js.api import ExternalStream, StorageType, StreamConfig, StreamSource

    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    js = nc.jetstream(timeout=10)
    await js.add_stream(
        StreamConfig(
            name=stream,
            storage=StorageType.FILE,
            num_replicas=1,
            sources=[StreamSource(name=from_stream, external=ExternalStream(api=f"$JS.{domain}.API"))],
        )
    )
    await nc.close()
    return 0


def main(argv):
    command, args = (argv[1], argv[2:]) if len(argv) > 1 else ("", [])
    if command == "wait-outpost" and len(args) == 4:
        url, queue, count, start = args
        return wait(lambda: outpost_count(url, queue), int(count), float(start))
    if command == "wait-nats" and len(args) == 3:
        url, count, start = args
        return wait(lambda: nats_count(url), int(count), float(start))
    if command == "nats-backlog" and len(args) >= 4:
        return asyncio.run(nats_backlog(args[0], args[1], args[2], args[3:]))
    if command == "nats-source" and len(args) == 4:
        return asyncio.run(nats_source(*args))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
