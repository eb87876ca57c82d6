"""HTTP proxy that serves the lab's apt mirror in place of deb.debian.org.

It replaces the Qubes updates proxy that templates reach on 127.0.0.1:8082.
apt in a lab template sends proxy requests such as
``GET http://deb.debian.org/debian/dists/bookworm/InRelease``. The proxy serves them
from ``MIRROR/debian/dists/bookworm/InRelease`` and returns 403 for any other host,
for CONNECT and for any other method. It never opens a connection of its own.

Every request is logged as one JSON line (time, client, method, url, status, bytes)
to the --log file. GET and HEAD are served. If-Modified-Since gets 304 when the file
is not newer. Range is ignored: the whole file comes back with status 200, which apt
accepts.

Usage::

    python3 tests/lab/updates_proxy.py --mirror DIR --listen 127.0.0.1:8082 --log FILE
"""

from __future__ import annotations

import argparse
import email.utils
import json
import logging
import os
import shutil
import signal
import socket
import sys
import threading
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

log = logging.getLogger("updates_proxy")

SERVED_HOST = "deb.debian.org"
SERVED_PREFIX = "/debian/"


class MirrorProxyHandler(BaseHTTPRequestHandler):
    """Serve proxy requests for http://deb.debian.org/debian/ from the mirror folder."""

    protocol_version = "HTTP/1.1"
    server_version = "sysdns-lab-updates-proxy"
    server: "MirrorProxyServer"

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def do_CONNECT(self) -> None:
        self._reject(HTTPStatus.FORBIDDEN, "CONNECT is not allowed: this proxy only serves the lab mirror")

    def do_POST(self) -> None:
        self._reject(HTTPStatus.FORBIDDEN, "only GET and HEAD are served")

    do_PUT = do_DELETE = do_OPTIONS = do_PATCH = do_POST

    def _serve(self, send_body: bool) -> None:
        path = self._mirror_path()
        if path is None:
            return
        try:
            stat = path.stat()
        except (OSError, ValueError):
            # ValueError: the decoded path contains a NUL byte.
            self._reject(HTTPStatus.NOT_FOUND, "not in the lab mirror", send_body)
            return
        if not path.is_file():
            self._reject(HTTPStatus.NOT_FOUND, "not a file in the lab mirror", send_body)
            return

        modified = int(stat.st_mtime)
        since = self._if_modified_since()
        if since is not None and modified <= since:
            self.send_response(HTTPStatus.NOT_MODIFIED)
            self.send_header("Last-Modified", email.utils.formatdate(modified, usegmt=True))
            self.send_header("Content-Length", "0")
            self.end_headers()
            self._log_request(HTTPStatus.NOT_MODIFIED, 0)
            return

        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(stat.st_size))
        self.send_header("Last-Modified", email.utils.formatdate(modified, usegmt=True))
        self.end_headers()
        sent = 0
        if send_body:
            try:
                with open(path, "rb") as stream:
                    shutil.copyfileobj(stream, self.wfile)
                sent = stat.st_size
            except (BrokenPipeError, ConnectionResetError) as error:
                log.warning("%s: client closed the connection during %s: %s", self.client_address[0], self.path, error)
                self.close_connection = True
        self._log_request(HTTPStatus.OK, sent)

    def _mirror_path(self) -> Path | None:
        """Map the request URL to a file under MIRROR/debian; else send 403 and return None."""
        url = urlsplit(self.path)
        host = (url.hostname or "").lower()
        if url.scheme != "http" or host != SERVED_HOST or url.port not in (None, 80):
            self._reject(HTTPStatus.FORBIDDEN, f"only http://{SERVED_HOST}{SERVED_PREFIX} is served")
            return None
        request_path = unquote(url.path)
        if not request_path.startswith(SERVED_PREFIX):
            self._reject(HTTPStatus.FORBIDDEN, f"only http://{SERVED_HOST}{SERVED_PREFIX} is served")
            return None
        parts = [part for part in request_path.split("/") if part]
        if any(part in (".", "..") for part in parts):
            self._reject(HTTPStatus.FORBIDDEN, "path escapes the mirror")
            return None
        return self.server.mirror.joinpath(*parts)

    def _if_modified_since(self) -> int | None:
        header = self.headers.get("If-Modified-Since")
        if not header:
            return None
        try:
            parsed = email.utils.parsedate_to_datetime(header)
        except (TypeError, ValueError):
            return None
        return int(parsed.timestamp())

    def _reject(self, status: HTTPStatus, reason: str, send_body: bool = True) -> None:
        body = f"{status.value} {status.phrase}: {reason}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        sent = 0
        if send_body and self.command != "HEAD":
            self.wfile.write(body)
            sent = len(body)
        self._log_request(status, sent)

    def _log_request(self, status: HTTPStatus, sent: int) -> None:
        self.server.write_log(
            {
                "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "client": self.client_address[0],
                "method": self.command,
                "url": self.path,
                "status": int(status),
                "bytes": sent,
            }
        )

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # The JSON log written by _log_request already records every request.
        pass

    def log_message(self, format: str, *args: object) -> None:
        log.warning("%s: " + format, self.client_address[0], *args)


class MirrorProxyServer(ThreadingHTTPServer):
    """Threaded HTTP server with the mirror folder and the request log."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], mirror: Path, log_path: Path):
        # Request paths start with /debian/, so they map onto MIRROR/debian/.
        self.mirror = mirror
        self._log_lock = threading.Lock()
        self._log_stream = open(log_path, "a", buffering=1, encoding="utf-8")
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, MirrorProxyHandler)

    def write_log(self, entry: dict) -> None:
        line = json.dumps(entry, sort_keys=True)
        with self._log_lock:
            self._log_stream.write(line + "\n")

    def server_close(self) -> None:
        super().server_close()
        self._log_stream.close()


def parse_listen(value: str) -> tuple[str, int]:
    """Parse HOST:PORT or [IPV6]:PORT for --listen."""
    host, separator, port = value.rpartition(":")
    if not separator or not port.isdigit() or not host:
        raise argparse.ArgumentTypeError(f"invalid --listen {value!r}: expected HOST:PORT, for example 127.0.0.1:8082")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port_number = int(port)
    if not 0 < port_number < 65536:
        raise argparse.ArgumentTypeError(f"invalid port {port} in --listen {value!r}: expected 1-65535")
    return host, port_number


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mirror", type=Path, required=True, help="mirror folder holding debian/dists and debian/pool")
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default=("127.0.0.1", 8082),
        help="address and port to listen on (default 127.0.0.1:8082)",
    )
    parser.add_argument("--log", type=Path, required=True, help="file that gets one JSON line per request")
    arguments = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s updates_proxy %(levelname)s %(message)s", stream=sys.stderr
    )

    if not (arguments.mirror / "debian" / "dists").is_dir():
        parser.error(f"--mirror {arguments.mirror} has no debian/dists folder; pass the folder ensure_mirror() returns")

    server = MirrorProxyServer(arguments.listen, arguments.mirror.resolve(), arguments.log)

    def stop(signum: int, _frame: object) -> None:
        log.info("stopping on signal %d", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    log.info(
        "serving %s on %s:%d (pid %d), logging requests to %s", server.mirror, host, port, os.getpid(), arguments.log
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
        log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
