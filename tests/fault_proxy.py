"""A fault-injecting HTTP proxy in front of an S3 endpoint, for tests (own process: delta-rs keeps
Python's GIL during some of its S3 requests, which would stall a proxy thread of the caller).

    python -m tests.fault_proxy --upstream http://127.0.0.1:PORT [--every N] [--burst REGEX --burst-count K]

Prints `PORT <port>` on stdout once it listens on 127.0.0.1. Requests are forwarded byte for
byte (signatures stay valid); a faulted request is answered `503 SlowDown` with S3's XML error
body, as S3 answers a client it throttles, and is never forwarded:
  --every N        every Nth request (counted over all requests);
  --burst REGEX    the first K requests whose "METHOD /path" matches REGEX.
`GET /__proxy_stats__` returns JSON: per "METHOD /path" the forwarded and faulted counts, and
the response body bytes forwarded. The proxy stops by itself after --lifetime seconds or when
the process that started it is gone.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATS_PATH = "/__proxy_stats__"
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b'<Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>')
# hop-by-hop headers, and the framing this proxy sets itself
_NOT_FORWARDED_REQUEST = {"connection", "keep-alive", "proxy-connection", "expect"}
_NOT_FORWARDED_RESPONSE = {"connection", "keep-alive", "transfer-encoding", "content-length"}


class Faults:
    def __init__(self, every: int, burst: str | None, burst_count: int):
        self.every, self.burst, self.burst_left = every, re.compile(burst) if burst else None, burst_count
        self.lock = threading.Lock()
        self.seen = 0
        self.forwarded: dict[str, int] = {}
        self.faulted: dict[str, int] = {}
        self.bytes_out: dict[str, int] = {}

    def decide(self, what: str) -> bool:
        with self.lock:
            self.seen += 1
            fault = bool(self.every) and self.seen % self.every == 0
            if self.burst is not None and self.burst_left > 0 and self.burst.search(what):
                self.burst_left -= 1
                fault = True
            book = self.faulted if fault else self.forwarded
            book[what] = book.get(what, 0) + 1
            return fault

    def sent(self, what: str, n: int) -> None:
        with self.lock:
            self.bytes_out[what] = self.bytes_out.get(what, 0) + n

    def snapshot(self) -> dict:
        with self.lock:
            return {"requests": self.seen, "forwarded": dict(self.forwarded), "faulted": dict(self.faulted),
                    "bytes_out": dict(self.bytes_out)}


def make_handler(upstream: str, faults: Faults):
    up = urllib.parse.urlsplit(upstream)
    local = threading.local()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def log_message(self, *args) -> None:
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                raw = b""  # forwarded with its chunk framing, as the client signed it
                while True:
                    line = self.rfile.readline()
                    raw += line
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while True:  # trailers, up to the blank line
                            t = self.rfile.readline()
                            raw += t
                            if t in (b"\r\n", b"\n", b""):
                                return raw
                    raw += self.rfile.read(size + 2)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _reply(self, status: int, reason: str, headers: list, body: bytes, length: int | None = None) -> None:
            self.send_response_only(status, reason)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _upstream(self, body: bytes) -> http.client.HTTPResponse:
            for attempt in (0, 1):  # a kept-alive upstream connection may have been closed
                conn = getattr(local, "conn", None)
                if conn is None:
                    conn = local.conn = http.client.HTTPConnection(up.hostname, up.port, timeout=120)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for k, v in self.headers.items():
                        if k.lower() not in _NOT_FORWARDED_REQUEST:
                            conn.putheader(k, v)
                    conn.endheaders()
                    if body:
                        conn.send(body)
                    return conn.getresponse()
                except (http.client.HTTPException, OSError):
                    conn.close()
                    local.conn = None
                    if attempt:
                        raise
            raise AssertionError("unreachable")

        def _handle(self) -> None:
            body = self._body()
            if self.path == STATS_PATH:
                self._reply(200, "OK", [("Content-Type", "application/json")],
                            json.dumps(faults.snapshot()).encode())
                return
            what = f"{self.command} {urllib.parse.urlsplit(self.path).path}"
            if faults.decide(what):
                self._reply(503, "Slow Down", [("Content-Type", "application/xml")], SLOW_DOWN)
                return
            resp = self._upstream(body)
            data = resp.read()
            headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _NOT_FORWARDED_RESPONSE]
            # a HEAD answer carries the object's length, with no body
            length = int(resp.getheader("Content-Length") or 0) if self.command == "HEAD" else None
            faults.sent(what, len(data))
            self._reply(resp.status, resp.reason, headers, data, length)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    return Handler


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--upstream", required=True)
    p.add_argument("--every", type=int, default=0)
    p.add_argument("--burst")
    p.add_argument("--burst-count", type=int, default=0)
    p.add_argument("--lifetime", type=float, default=900.0)
    a = p.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(a.upstream, Faults(a.every, a.burst, a.burst_count)))
    server.daemon_threads = True
    parent, deadline = os.getppid(), time.time() + a.lifetime

    def watchdog() -> None:
        while time.time() < deadline and os.getppid() == parent:
            time.sleep(0.5)
        server.shutdown()

    threading.Thread(target=watchdog, daemon=True).start()
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever(poll_interval=0.2)
    sys.exit(0)


if __name__ == "__main__":
    main()
