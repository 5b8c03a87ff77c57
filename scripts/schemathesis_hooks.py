"""Schemathesis hooks for outpost (loaded by scripts/schemathesis.sh through SCHEMATHESIS_HOOKS).

Teaches schemathesis to send the two media types of the API it does not know: NDJSON batches
(`application/x-ndjson`) and the link's binary batch frames (`application/vnd.outpost.batch.v1`).
Whatever was generated is sent as bytes: a string as UTF-8, anything else as its JSON text.
"""
import json

import schemathesis


def _as_bytes(value):
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return json.dumps(value).encode()


@schemathesis.serializer("application/x-ndjson", "application/vnd.outpost.batch.v1")
def raw_bytes(ctx, value):
    return _as_bytes(value)


@schemathesis.check
def unavailable_is_documented(ctx, response, case):
    """A 503 is the API's documented "retry later" (CONTRACT section 3), so schemathesis.toml lets
    not_a_server_error pass it; this check holds it to that: the error shape, a `Retry-After`, and
    the code `maintenance` (a central the fuzzer put into maintenance) or `unavailable` (writes
    blocked while an edge transitions). Any other 5xx still fails not_a_server_error."""
    if response.status_code != 503:
        return None
    assert response.headers.get("retry-after") or response.headers.get("Retry-After"), "503 without Retry-After"
    body = json.loads(response.content)
    code = body["error"]["code"]
    assert code in ("maintenance", "unavailable"), f"503 with code {code!r}"
    assert "shutting down" not in body["error"]["message"], "503 'shutting down' from a running node"
    return None
