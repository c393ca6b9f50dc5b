"""moto's S3 app served with HTTP/1.1 keep-alive, as real S3 serves it.

`python -m moto.server` runs moto under werkzeug's development server, which answers every
request with `Connection: close` and then lingers 10 ms on the socket: each S3 call of the
services paid a new TCP connection (and moto a new thread), about a sixth of the image
service's CPU per upload in the benches, and something no S3 in production makes anyone pay.
The same moto application (moto.server builds it the same way) runs here under waitress,
which keeps connections alive. Usage: python -m tools.moto_server -H 127.0.0.1 -p 5000
"""

from __future__ import annotations

import argparse
import functools
import sys
import threading

import waitress
from moto import backends
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

# Requests served at once; the benches keep a few dozen uploads in flight.
THREADS = 16
# Bodies and answers up to this size stay in memory: waitress's defaults (512 KiB in, 1 MiB
# out) would spool every 1 MiB portrait through a temporary file.
IN_MEMORY_BYTES = 64 * 1024 * 1024


class RequestLog:
    """Writes werkzeug's request line for every request, which the tests read back.

    The line is written when the status is known and before any byte of the answer leaves,
    so a client that has its answer always finds its request in the log.
    """

    def __init__(self, app, stream=sys.stderr) -> None:
        self._app = app
        self._stream = stream
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        # The raw target, as werkzeug logs it (PATH_INFO is already decoded).
        path = environ.get("REQUEST_URI") or environ.get("PATH_INFO", "")
        request = f'"{environ["REQUEST_METHOD"]} {path} {environ.get("SERVER_PROTOCOL", "HTTP/1.1")}"'

        def logged_start_response(status, headers, exc_info=None):
            with self._lock:
                self._stream.write(f"{request} {status.split(' ', 1)[0]} -\n")
                self._stream.flush()
            return start_response(status, headers, exc_info)

        return self._app(environ, logged_start_response)


def _list_moto_modules_once() -> None:
    """moto lists its package directory (an isdir per entry) on every request to route it, a
    tenth of its CPU per upload in the benches; the directory does not change while it runs."""
    modules = tuple(backends.list_of_moto_modules())
    backends.list_of_moto_modules = functools.cache(lambda: modules)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.moto_server")
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, required=True)
    args = parser.parse_args()
    _list_moto_modules_once()
    app = RequestLog(DomainDispatcherApplication(create_backend_app))
    # Unbounded request bodies are moto's own behaviour; waitress's 1 GiB cap is far above
    # anything the services upload.
    waitress.serve(
        app, host=args.host, port=args.port, threads=THREADS, ident="moto", _quiet=True,
        inbuf_overflow=IN_MEMORY_BYTES, outbuf_overflow=IN_MEMORY_BYTES,
    )


if __name__ == "__main__":
    main()
