"""Standalone protocol client for tests that act as other users.

Runs on Debian's /usr/bin/python3 with only the stdlib and msgpack, so it works for
any uid and checks the wire format independently of sandboxd.client.

    peer_call.py SOCKET  < requests.json  > responses.json

stdin: a JSON list of requests (bytes given as {"b64": ...}); stdout: a JSON object
{"responses": [...]} or {"connect_error": "..."}.  With "hold": true in a request,
the helper sends it and exits without reading (to test disconnects).
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import sys
from typing import Any

import msgpack


def enc(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"b64"}:
            return base64.b64decode(obj["b64"])
        return {k: enc(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [enc(v) for v in obj]
    return obj


def dec(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return {"b64": base64.b64encode(obj).decode()}
    if isinstance(obj, dict):
        return {str(k): dec(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [dec(v) for v in obj]
    return obj


def read_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def main() -> None:
    path = sys.argv[1]
    requests = json.load(sys.stdin)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as e:
        json.dump({"connect_error": e.strerror or str(e), "errno": e.errno}, sys.stdout)
        return
    out: list[Any] = []
    for req in requests:
        hold = req.pop("hold", False)
        body = msgpack.packb(enc(req), use_bin_type=True)
        sock.sendall(struct.pack(">I", len(body)) + body)
        if hold:
            sys.stdout.write(json.dumps({"responses": out, "held": True}))
            sys.stdout.flush()
            return
        try:
            n = struct.unpack(">I", read_exact(sock, 4))[0]
            out.append(dec(msgpack.unpackb(read_exact(sock, n), raw=False)))
        except ConnectionError:
            out.append({"closed": True})
            break
    json.dump({"responses": out}, sys.stdout)


if __name__ == "__main__":
    main()
