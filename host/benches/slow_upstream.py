#!/usr/bin/env python3
"""A slow Glance-like image store, and slow clients, for host/benches/serve.sh.

    slow_upstream.py serve --port 19299 [--size 67108864] [--rate 65536]
    slow_upstream.py clients --url http://127.0.0.1:19298/v2/images/slow-{i}/file \\
        --count 500 --status FILE [--read-rate 4096]

`serve` answers, for any image id:

- ``GET /v2/images/{id}``: a JSON record ``{"id", "size", "checksum" (MD5
  hex), "status": "active"}``, as Glance does;
- ``GET /v2/images/{id}/file``: ``size`` bytes with ``Content-Length``,
  sent at ``rate`` bytes per second (a slow network or store); the body is
  the same deterministic bytes for every id, so the record's checksum is
  right for all of them;
- ``GET /stats``: ``{"file_requests", "files_active", "record_requests"}``.

`clients` opens ``count`` connections at once, each asking for the URL with
``{i}`` replaced by 0..count-1, reads the response head and then keeps
reading the body at ``read-rate`` bytes per second (0: not at all) until it
is killed. When every head is in (or after --head-timeout), it writes
``{"200": n, "503": n, "other": n, "no_head": n, "retry_after": n}`` to the
status file (and keeps holding the 200s).
"""

import argparse
import asyncio
import hashlib
import json
import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BLOCK = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(2048))  # 64 KiB
TWO_BLOCKS = BLOCK + BLOCK


def body_md5(size):
    h = hashlib.md5()
    whole, rest = divmod(size, len(BLOCK))
    for _ in range(whole):
        h.update(BLOCK)
    h.update(BLOCK[:rest])
    return h.hexdigest()


def serve(args):
    size, rate = args.size, args.rate
    checksum = body_md5(size)
    lock = threading.Lock()
    stats = {"file_requests": 0, "files_active": 0, "record_requests": 0}
    file_path = re.compile(r"^/v2/images/([^/?]+)/file$")
    record_path = re.compile(r"^/v2/images/([^/?]+)$")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def send_json(self, code, obj):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            path = self.path.split("?", 1)[0]
            m = record_path.match(path)
            if m:
                with lock:
                    stats["record_requests"] += 1
                return self.send_json(200, {"id": m.group(1), "size": size,
                                            "checksum": checksum, "status": "active"})
            if path == "/stats":
                with lock:
                    return self.send_json(200, dict(stats))
            if not file_path.match(path):
                return self.send_json(404, {"message": "not found"})
            with lock:
                stats["file_requests"] += 1
                stats["files_active"] += 1
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                self.wfile.flush()
                piece = max(1, min(len(BLOCK), rate // 8))  # 8 writes a second
                sent, start = 0, time.monotonic()
                while sent < size:
                    n = min(piece, size - sent)
                    off = sent % len(BLOCK)
                    chunk = TWO_BLOCKS[off:off + n]
                    self.wfile.write(chunk)
                    sent += n
                    ahead = sent / rate - (time.monotonic() - start)
                    if ahead > 0:
                        time.sleep(ahead)
            except OSError:
                self.close_connection = True
            finally:
                with lock:
                    stats["files_active"] -= 1

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024

    httpd = Server(("127.0.0.1", args.port), Handler)
    print(f"slow upstream on 127.0.0.1:{args.port}: {size} bytes per image at {rate} B/s, md5 {checksum}",
          flush=True)
    httpd.serve_forever()


async def clients(args):
    m = re.match(r"^http://([^/:]+):(\d+)(/.*)$", args.url)
    if not m:
        sys.exit("--url must be http://HOST:PORT/PATH with {i} in it")
    host, port, path = m.group(1), int(m.group(2)), m.group(3)
    counts = {"200": 0, "503": 0, "other": 0, "no_head": 0, "retry_after": 0}
    heads = asyncio.Event()
    pending = [args.count]

    def head_done():
        pending[0] -= 1
        if pending[0] == 0:
            heads.set()

    async def one(i):
        got_head = False
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET {path.replace('{i}', str(i))} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                         f"Connection: close\r\n\r\n".encode())
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            got_head = True
            lines = head.decode("latin-1").split("\r\n")
            code = lines[0].split(" ")[1]
            counts[code if code in ("200", "503") else "other"] += 1
            if any(line.lower().startswith("retry-after:") for line in lines[1:]):
                counts["retry_after"] += 1
            head_done()
            if code != "200":
                writer.close()
                return
            while True:  # a slow reader: read-rate bytes a second, or nothing
                if args.read_rate <= 0:
                    await asyncio.sleep(3600)
                    continue
                data = await reader.read(args.read_rate)
                if not data:
                    return
                await asyncio.sleep(1)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, IndexError):
            if not got_head:
                counts["no_head"] += 1
                head_done()

    tasks = [asyncio.create_task(one(i)) for i in range(args.count)]
    try:
        await asyncio.wait_for(heads.wait(), args.head_timeout)
    except asyncio.TimeoutError:
        pass
    snapshot = dict(counts)
    snapshot["no_head"] += pending[0]  # still waiting at the timeout
    with open(args.status + ".tmp", "w") as f:
        json.dump(snapshot, f)
    os.replace(args.status + ".tmp", args.status)
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(3600 * 24)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--size", type=int, default=64 << 20)
    s.add_argument("--rate", type=int, default=64 << 10, help="bytes per second per download")
    c = sub.add_parser("clients")
    c.add_argument("--url", required=True)
    c.add_argument("--count", type=int, default=500)
    c.add_argument("--status", required=True)
    c.add_argument("--read-rate", type=int, default=4096)
    c.add_argument("--head-timeout", type=float, default=60)
    args = p.parse_args()
    if args.cmd == "serve":
        serve(args)
    else:
        asyncio.run(clients(args))


if __name__ == "__main__":
    main()
