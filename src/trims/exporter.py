"""The daemon's HTTP side, on ``--metrics-port``, served from a thread:

- ``GET /metrics``: Prometheus text format;
- ``GET /healthz``: 200 while the daemon runs (for probes that speak HTTP);
- ``GET /models``: which models this node holds and in which tiers, as JSON, so a router
  can send a request where its model is already warm.

It has no notion of tenants: bind it to an address only the operator's network reaches
(the default is 127.0.0.1).
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from .metrics import Metrics

log = logging.getLogger("trims.exporter")


class MetricsServer:
    def __init__(self, metrics: Metrics, models: Callable[[], list[dict[str, Any]]], address: str, port: int) -> None:
        handler = type("Handler", (_Handler,), {"routes": {
            "/metrics": ("text/plain; version=0.0.4; charset=utf-8", lambda: metrics.render()),
            "/healthz": ("text/plain; charset=utf-8", lambda: "ok\n"),
            "/models": ("application/json", lambda: json.dumps(models(), indent=1) + "\n"),
        }})
        self._http = _BoundedServer((address, port), handler)
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, name="trims-metrics", daemon=True)
        self._thread.start()
        log.info("metrics at http://%s:%d/metrics, locality at /models", address, self.port)

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most ``CONNECTIONS`` at once: idle connections beyond that
    are closed at once, so that no one reaching the port can take the daemon's threads."""

    CONNECTIONS = 16
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(self.CONNECTIONS)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # a scraper tries again at its next interval
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        """A scraper gone mid-reply (or cut off at the deadline) is not worth a traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            log.debug("metrics connection from %s ended: %s", client_address, error)
        else:
            log.exception("the metrics port failed on a request from %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, tuple[str, Callable[[], str]]]
    timeout = 5  # seconds each read of a request may wait: an idle connection lets go of its slot
    deadline = 15.0  # seconds a whole connection may last: one trickling a byte at a time lets go too

    def setup(self) -> None:
        super().setup()
        self._was_cut = False
        self._watchdog = threading.Timer(self.deadline, self._cut)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _cut(self) -> None:
        self._was_cut = True  # what was read so far is no request to answer
        try:
            self.connection.shutdown(socket.SHUT_RDWR)  # the handler's blocked read or write returns
        except OSError:
            pass

    def finish(self) -> None:
        self._watchdog.cancel()
        super().finish()

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        if self._was_cut:
            return
        route = self.routes.get(self.path.split("?")[0])
        if route is None:
            self.send_error(404, f"served here: {', '.join(self.routes)}")
            return
        content_type, render = route
        body = render().encode()
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # scrapes every few seconds: not worth a line
        log.debug(format, *args)
