"""Echo server on proactor's trio backend (TrioEngine), for compare.py.

usage: python bench/trio_engine_echo.py [--workers N] PORT
"""
from __future__ import annotations

import argparse

import proactor
from proactor._trio import TrioEngine


class Echo(proactor.Handler):
    def data_received(self, conn, data):
        conn.send(data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("port", type=int)
    p.add_argument("--workers", type=int, default=0)
    a = p.parse_args()
    engine = TrioEngine()
    srv = engine.serve_tcp(Echo, "127.0.0.1", a.port, workers=a.workers)
    print(f"listening on 127.0.0.1:{srv.port}", flush=True)
    engine.run()


if __name__ == "__main__":
    main()
