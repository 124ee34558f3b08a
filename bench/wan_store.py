"""A read-only S3 endpoint that answers the way a bucket across a network does: each request
waits a first-byte latency, and each connection streams at a bounded rate.

moto, the S3 server the tests and the other benchmarks use, loads the whole object for every
ranged GET, so on loopback a read costs time in proportion to the object, not to the range:
it rewards few large requests, and a benchmark on it measures moto. Real object stores
answer a range in a first-byte latency plus its length over the connection's bandwidth, and
scale with parallel connections (AWS's guidance: 8-16 MB ranges, many at once). This server
does exactly that, over files in a directory, for HEAD and ranged GET of
``/<bucket>/<key>`` (path-style; signatures are not checked), enough for boto3 and trims to
read models from it.
"""

from __future__ import annotations

import re
import threading
import urllib.parse
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")
_SLICE = 256 * 1024  # bytes sent between rate checks


class WanStore:
    """``with WanStore(root, first_byte_s, bytes_per_s) as url:``: objects are the files under
    ``root/<bucket>/``; ``url`` is the endpoint."""

    def __init__(self, root: Path, first_byte_s: float, bytes_per_s: float) -> None:
        handler = type("Handler", (_Handler,), {"root": root, "first_byte_s": first_byte_s,
                                                "bytes_per_s": bytes_per_s})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> str:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self.url

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    root: Path
    first_byte_s: float
    bytes_per_s: float
    protocol_version = "HTTP/1.1"  # keep-alive: a connection's setup is paid once, as with a real pool

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def _answer(self, send_body: bool) -> None:
        path = self._object()
        if path is None:
            self._empty(404)
            return
        stat = path.stat()
        size = stat.st_size
        start, end = self._range(size)
        if start is None:
            self._empty(416)
            return
        time.sleep(self.first_byte_s)
        self.send_response(206 if "Range" in self.headers else 200)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("ETag", f'"{stat.st_mtime_ns}-{size}"')
        self.send_header("Last-Modified", self.date_time_string(stat.st_mtime))
        self.send_header("Accept-Ranges", "bytes")
        if "Range" in self.headers:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if send_body:
            self._stream(path, start, end)

    def _object(self) -> Path | None:
        parts = urllib.parse.unquote(self.path.split("?", 1)[0]).lstrip("/").split("/")
        if len(parts) < 2 or ".." in parts:  # a bucket and a key, inside the root
            return None
        path = self.root.joinpath(*parts)
        return path if path.is_file() else None

    def _range(self, size: int) -> tuple[int | None, int]:
        if "Range" not in self.headers:
            return 0, size
        match = _RANGE.match(self.headers["Range"])
        start = int(match.group(1)) if match else size
        end = min(int(match.group(2)) + 1, size) if match and match.group(2) else size
        return (start, end) if start < end else (None, 0)

    def _stream(self, path: Path, start: int, end: int) -> None:
        began = time.perf_counter()
        with open(path, "rb") as f:
            f.seek(start)
            sent = 0
            while sent < end - start:
                data = f.read(min(_SLICE, end - start - sent))
                if not data:  # the file shrank while it was served
                    break
                self.wfile.write(data)
                sent += len(data)
                ahead = sent / self.bytes_per_s - (time.perf_counter() - began)
                if ahead > 0:
                    time.sleep(ahead)

    def _empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


def main() -> None:
    """``python bench/wan_store.py DIR FIRST_BYTE_S BYTES_PER_S``: serve DIR, print the URL;
    a process of its own, so its threads do not share a GIL with the clients it serves."""
    import sys

    root, first_byte_s, bytes_per_s = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    with WanStore(root, first_byte_s, bytes_per_s) as url:
        print(url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
