"""Echo server whose handler blocks: it sleeps MS milliseconds per message, then echoes.

usage: python bench/echo_blocking.py [--workers N] [--block-ms MS] [--host H] PORT

Stands for a handler that calls a blocking library (a database driver, a sync HTTP
client): the I/O thread keeps serving while ``--workers`` threads sit in the call
(half-sync/half-async). With 16 workers and 1 ms the ceiling is 16 000 messages/s.
``--workers 0`` runs the handler on the I/O thread (everything then waits: ~1 000/s).
"""
from __future__ import annotations

import argparse
import time

import proactor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("port", type=int)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--workers", type=int, default=16)
    p.add_argument("--block-ms", type=float, default=1.0)
    a = p.parse_args()
    delay = a.block_ms / 1000.0
    sleep = time.sleep

    class BlockingEcho(proactor.Handler):
        def data_received(self, conn, data):
            sleep(delay)                  # the blocking call
            conn.send(data)

    engine = proactor.Engine()
    server = engine.serve_tcp(BlockingEcho, a.host, a.port, workers=a.workers)
    print(f"listening on {a.host}:{server.port} (workers={a.workers}, "
          f"block={a.block_ms:g} ms)", flush=True)
    engine.run()


if __name__ == "__main__":
    main()
