"""Echo server: every byte received is sent back.

usage: python examples/echo_server.py [--host H] [--workers N] PORT
"""
from __future__ import annotations

import argparse

import proactor


class Echo(proactor.Handler):
    def data_received(self, conn, data):
        conn.send(data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("port", type=int)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--workers", type=int, default=0,
                   help="run handlers on N worker threads (0: on the I/O thread)")
    a = p.parse_args()
    engine = proactor.Engine()
    server = engine.serve_tcp(Echo, a.host, a.port, workers=a.workers)
    print(f"listening on {a.host}:{server.port}", flush=True)
    engine.run()


if __name__ == "__main__":
    main()
