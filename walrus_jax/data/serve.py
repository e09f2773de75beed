"""A small HTTP server for a local folder of Well datasets, with range requests (what HDF5 over
HTTP needs) and an optional added latency: the remote store of the tests and of
`tools/bench/data.py`, and a quick way to serve a dataset to other machines.

    python -m walrus_jax.data.serve DIR [--port 8000] [--latency-ms 0]

Then `data.root=http://HOST:8000/` reads the datasets under DIR. Python's SimpleHTTPRequestHandler
serves files and HTML directory indexes (which fsspec's HTTPFileSystem lists) but ignores the
Range header; this handler answers `Range: bytes=a-b` with 206 and those bytes only.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import http.server
import os
import re
import shutil
import threading
import time
from typing import Iterator

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler plus single byte ranges, latency, counters and forbidden paths."""

    server: "Server"
    protocol_version = "HTTP/1.1"  # keep-alive: a client's range requests reuse their connections

    def log_message(self, *args):  # quiet: tests and benchmarks
        pass

    def _count(self, n: int) -> None:
        with self.server.lock:
            self.server.counts["requests"] += 1
            self.server.counts["bytes"] += n

    def send_head(self):
        if self.server.latency_s:
            time.sleep(self.server.latency_s)
        if any(self.path.startswith(p) for p in self.server.forbidden):
            self.send_error(403, "Forbidden")
            return None
        m = _RANGE.match(self.headers.get("Range", "").strip())
        path = self.translate_path(self.path)
        if m is None or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        start = int(m.group(1))
        end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
        if start >= size or end < start:
            self.send_error(416, "Requested Range Not Satisfiable")
            return None
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._range_left = end - start + 1
        return f

    def copyfile(self, source, outputfile):
        # Counted before sending, so a client that has its bytes sees them counted.
        left = getattr(self, "_range_left", None)
        if left is None:
            try:
                n = os.fstat(source.fileno()).st_size - source.tell()
            except (AttributeError, OSError, ValueError):  # an in-memory directory listing
                n = len(source.getbuffer()) - source.tell()
            self._count(n)
            shutil.copyfileobj(source, outputfile)
            return
        self._range_left = None
        self._count(left)
        sent = 0
        while sent < left:
            buf = source.read(min(1 << 20, left - sent))
            if not buf:
                break
            outputfile.write(buf)
            sent += len(buf)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # socketserver's 5 drops concurrent range requests' connects (1 s SYN retry)

    def __init__(self, addr, handler, latency_s: float = 0.0, forbidden: tuple[str, ...] = ()):
        super().__init__(addr, handler)
        self.latency_s = float(latency_s)
        self.forbidden = tuple(forbidden)
        self.lock = threading.Lock()
        self.counts = {"requests": 0, "bytes": 0}

    def reset_counts(self) -> dict:
        with self.lock:
            out = dict(self.counts)
            self.counts = {"requests": 0, "bytes": 0}
        return out


@contextlib.contextmanager
def serving(directory: str, latency_ms: float = 0.0, forbidden: tuple[str, ...] = ()) -> Iterator[Server]:
    """Serves `directory` on 127.0.0.1 (a free port) in a thread; `server.url` is its base URL.
    Stops when the block exits."""
    handler = functools.partial(RangeHandler, directory=os.fspath(directory))
    srv = Server(("127.0.0.1", 0), handler, latency_ms / 1000.0, forbidden)
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=5)


def _server(directory: str, host: str, port: int, latency_ms: float) -> Server:
    """The server for the command line; a missing folder, a file or a busy port is a UserError."""
    from walrus_jax.errors import PathError, UserError

    if not os.path.exists(directory):
        raise PathError(f"{directory}: no such folder (expected a folder of Well datasets to serve)")
    if not os.path.isdir(directory):
        raise PathError(f"{directory}: is a file, not a folder (serve the folder holding the datasets)")
    handler = functools.partial(RangeHandler, directory=directory)
    try:
        return Server((host, port), handler, latency_ms / 1000.0)
    except OSError as e:
        why = "is in use (another server?); choose another --port" if e.errno == errno.EADDRINUSE else e.strerror
        raise UserError(f"--host {host} --port {port}: cannot listen there: {why}") from None


def main(argv=None) -> int:
    from walrus_jax.errors import run_command

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--latency-ms", type=float, default=0.0, help="added to every request")
    ap.add_argument("--verbose", action="store_true", help="print the traceback of an error")
    args = ap.parse_args(argv)

    def go():
        with _server(args.directory, args.host, args.port, args.latency_ms) as srv:
            print(f"serving {args.directory} at http://{args.host}:{srv.server_address[1]}/", flush=True)
            srv.serve_forever()

    return run_command(go, args.verbose)


if __name__ == "__main__":
    import sys

    sys.exit(main())
