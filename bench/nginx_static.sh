#!/bin/sh
# nginx as a one-process static file server, for compare.py:
#   sh bench/nginx_static.sh ROOT PORT
# master_process off: a single process serves (nginx's "one worker"), so compare.py's
# CPU accounting of the server's pid sees all of its work. The "listening" line is
# printed just before nginx starts; compare.py waits 0.2 s and the load 1 s more.
set -eu
root=$(realpath "$1"); port=$2
w=$(mktemp -d /tmp/nginx-bench.XXXXXX)
cat > "$w/nginx.conf" <<CONF
daemon off;
master_process off;
worker_processes 1;
pid $w/nginx.pid;
error_log stderr warn;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 1000000000;
    types { application/octet-stream bin; text/html html; }
    default_type application/octet-stream;
    client_body_temp_path $w/body;
    proxy_temp_path $w/proxy;
    fastcgi_temp_path $w/fastcgi;
    uwsgi_temp_path $w/uwsgi;
    scgi_temp_path $w/scgi;
    server {
        listen 127.0.0.1:$port backlog=1024;
        root $root;
    }
}
CONF
echo "listening on 127.0.0.1:$port"
exec nginx -e stderr -c "$w/nginx.conf"
