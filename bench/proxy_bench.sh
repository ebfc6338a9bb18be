#!/usr/bin/env bash
# Requests through examples/proxy.py to a local upstream: the upstream connections pooled
# (kept alive and reused) vs a fresh upstream connection per request (--pool-size 0).
#
# usage: bench/proxy_bench.sh [compare.py options: --seconds 3 --rounds 3 --conns 100 ...]
#
# The upstream is the shared harness's keep-alive HTTP hello on uvloop (78-byte reply), on a
# fixed port ($UPSTREAM_PORT, default 18999), pinned to CPU 1 with the load generator so
# the proxy has CPU 0 to itself (compare.py pins the server it measures there). The proxy
# forwards the reply unchanged, so the load generator still expects 78 bytes.
# BACKENDS="uring trio" measures each backend (default: the one the engine picks).
# Run from anywhere; needs uvloop (`make bench-deps`) and taskset.
set -euo pipefail
cd "$(dirname "$0")/.."

P=${PYTHON:-.venv/bin/python}
B=${BENCH_DIR:-../shared/bench}
UPORT=${UPSTREAM_PORT:-18999}
BACKENDS=${BACKENDS:-auto}

if "$P" -c "import socket; socket.create_connection(('127.0.0.1', $UPORT), 0.5).close()" \
        2>/dev/null; then
    echo "port $UPORT is taken: set UPSTREAM_PORT" >&2
    exit 1
fi

taskset -c 1 "$P" "$B/peers/asyncio_http.py" --loop uvloop "$UPORT" >/dev/null 2>&1 &
UPID=$!
trap 'kill "$UPID" 2>/dev/null || true; wait "$UPID" 2>/dev/null || true' EXIT
trap 'exit 130' INT TERM

for _ in $(seq 100); do
    if "$P" -c "import socket; socket.create_connection(('127.0.0.1', $UPORT), 0.5).close()" \
            2>/dev/null; then
        break
    fi
    kill -0 "$UPID" 2>/dev/null || { echo "the upstream did not start" >&2; exit 1; }
    sleep 0.1
done

servers=()
for be in $BACKENDS; do
    suffix=""
    [ "$BACKENDS" = auto ] || suffix="-$be"
    cmd="$P examples/proxy.py --backend $be --upstream 127.0.0.1:$UPORT"
    servers+=("pooled$suffix=$cmd" "fresh$suffix=$cmd --pool-size 0")
done

"$P" "$B/compare.py" --request "$B/get.http" --reply 78 "$@" "${servers[@]}"
