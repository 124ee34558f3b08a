"""The Prometheus endpoint: ``GET /metrics`` on ``--metrics-port``, served from a thread."""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .metrics import Metrics

log = logging.getLogger("trims.exporter")


class MetricsServer:
    def __init__(self, metrics: Metrics, address: str, port: int) -> None:
        handler = type("Handler", (_Handler,), {"metrics": metrics})
        self._http = ThreadingHTTPServer((address, port), handler)
        self._http.daemon_threads = True
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, name="trims-metrics", daemon=True)
        self._thread.start()
        log.info("metrics at http://%s:%d/metrics", address, self.port)

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


class _Handler(BaseHTTPRequestHandler):
    metrics: Metrics

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        if self.path.split("?")[0] != "/metrics":
            self.send_error(404, "only /metrics is served here")
            return
        body = self.metrics.render().encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # scrapes every few seconds: not worth a line
        log.debug(format, *args)
