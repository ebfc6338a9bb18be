"""Echo server: every byte received is sent back.

usage: python examples/echo_server.py [--host H] [--workers N] [--backend B] PORT
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Run as a script, this folder comes first on sys.path, and examples/copy.py would
    # shadow the standard library's ``copy`` module (which trio imports).
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse  # noqa: E402

import proactor  # noqa: E402


class Echo(proactor.Handler):
    def data_received(self, conn, data):
        conn.send(data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("port", type=int)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--workers", type=int, default=0,
                   help="run handlers on N worker threads (0: on the I/O thread)")
    p.add_argument("--backend", default=None, choices=["auto", "uring", "trio"],
                   help="engine backend (default: $PROACTOR_BACKEND or auto)")
    a = p.parse_args()
    engine = proactor.Engine(backend=a.backend)
    server = engine.serve_tcp(Echo, a.host, a.port, workers=a.workers)
    print(f"listening on {a.host}:{server.port}", flush=True)
    engine.run()


if __name__ == "__main__":
    main()
