#!/bin/sh
# A 4 KiB static file over keep-alive, examples/http_server.py vs nginx (one process),
# side by side with ../shared/bench/compare.py:
#   sh bench/static_vs_nginx.sh [compare.py options, e.g. --seconds 3 --rounds 3]
# The load generator needs one reply size for all servers, and the two servers' headers
# differ in length; so nginx serves a 4096-byte file and proactor a file longer or shorter
# by the difference of the header lengths (measured here first, and printed).
set -eu
P=${P:-.venv/bin/python}
B=${B:-../shared/bench}
here=$(dirname "$0")
w=$(mktemp -d /tmp/static-bench.XXXXXX)
trap 'rm -rf "$w"' EXIT
mkdir -p "$w/nginx" "$w/proactor"
head -c 4096 /dev/urandom > "$w/nginx/4k.bin"

head_len() {  # head_len URL: bytes of the response head
    curl -s -o /dev/null -D - "$1" | wc -c
}
serve_once() {  # serve_once PORT COMMAND...: run a server, print its 4k.bin head length
    port=$1; shift
    "$@" "$port" > "$w/out" 2>&1 &
    pid=$!
    for _ in $(seq 50); do
        curl -s -o /dev/null "http://127.0.0.1:$port/4k.bin" && break
        sleep 0.1
    done
    head_len "http://127.0.0.1:$port/4k.bin"
    kill "$pid"; wait "$pid" 2>/dev/null || true
}

head -c 4096 /dev/urandom > "$w/proactor/4k.bin"
ngx=$(serve_once 18911 sh "$here/nginx_static.sh" "$w/nginx")
# proactor's ETag and Content-Length digits depend on the file: size it, then check
px=$(serve_once 18912 "$P" "$here/../examples/http_server.py" --root "$w/proactor")
size=$((4096 + ngx - px))
head -c "$size" /dev/urandom > "$w/proactor/4k.bin"
px=$(serve_once 18912 "$P" "$here/../examples/http_server.py" --root "$w/proactor")
reply=$((ngx + 4096))
if [ $((px + size)) -ne "$reply" ]; then
    echo "reply sizes differ: nginx $reply, proactor $((px + size))" >&2; exit 1
fi
echo "# reply $reply bytes: nginx head $ngx + 4096 body; proactor head $px + $size body"
"$P" "$B/compare.py" --request "$here/get_4k.http" --reply "$reply" "$@" \
    "nginx=sh $here/nginx_static.sh $w/nginx" \
    "proactor=$P $here/../examples/http_server.py --root $w/proactor"
