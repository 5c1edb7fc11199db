#!/usr/bin/env bash
# Benchmark sibling fill: the second node's miss, read from a sibling that
# holds the image against read from a 200 MB/s upstream, in the same run.
#
#   bash host/benches/siblings.sh     # needs: postgresql-15, nginx, curl
#
# A throwaway PostgreSQL 15 holds the shared metadata (Glance's two cache
# tables, `image-cache db init`; the nodes' role gets what `db grants`
# prints). nginx serves the image store at 200 MB/s per connection
# (limit_rate 200m, as host/benches/serve.sh's remote image store). Node A
# fetches a 256 MiB image from the upstream; then, RUNS times each, a fresh
# node B misses it with sibling fill on (a peer token: read from A) and a
# fresh node C misses it with sibling fill off (from the upstream). The
# table gives each one's time to the last byte (min / median / max), the
# bytes each took from the upstream, and the ratio.
#
# Environment: BIN (the image-cache binary; default: the release build),
# RUNS (default 3), SIZE_MIB (default 256).
set -euo pipefail
cd "$(dirname "$0")/../.."

RUNS=${RUNS:-3}
SIZE_MIB=${SIZE_MIB:-256}
PG_BIN=/usr/lib/postgresql/15/bin
for tool in nginx curl python3 "$PG_BIN/initdb"; do
    command -v "$tool" >/dev/null || [ -x "$tool" ] \
        || { echo "needs $tool: apt-get install nginx curl python3 postgresql-15" >&2; exit 2; }
done
if [ -z "${BIN:-}" ]; then
    cargo build --quiet --release -p image-cache-cli --bin image-cache
    BIN="${CARGO_TARGET_DIR:-target}/release/image-cache"
fi
BIN=$(realpath "$BIN")
AS_ROOT=0; [ "$(id -u)" = 0 ] && AS_ROOT=1
as_postgres() { if [ $AS_ROOT = 1 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

WORK=$(mktemp -d /var/tmp/image-cache-siblings.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
    [ -d "$WORK/pg/data" ] && as_postgres "$PG_BIN/pg_ctl" stop -m fast -D "$WORK/pg/data" >/dev/null 2>&1 || true
    sleep 0.3
    rm -rf "$WORK"
}
trap cleanup EXIT
chmod 755 "$WORK"

# PostgreSQL: the shared metadata.
mkdir -p "$WORK/pg"; [ $AS_ROOT = 1 ] && chown postgres: "$WORK/pg"
as_postgres "$PG_BIN/initdb" -U postgres -E UTF8 -A trust -D "$WORK/pg/data" >/dev/null
PG_PORT=$(free_port)
as_postgres "$PG_BIN/pg_ctl" start -w -D "$WORK/pg/data" -l "$WORK/pg/log" \
    -o "-p $PG_PORT -k $WORK/pg -c listen_addresses=127.0.0.1" >/dev/null
psql_admin() { "$PG_BIN/psql" "host=$WORK/pg port=$PG_PORT user=postgres dbname=$1" -X -q -v ON_ERROR_STOP=1 -c "$2"; }
PW=bench-password-0123456789
psql_admin postgres "CREATE ROLE owner LOGIN PASSWORD '$PW'; CREATE ROLE image_cache LOGIN PASSWORD '$PW'"
psql_admin postgres "CREATE DATABASE cache OWNER owner"
IMAGE_CACHE_DATABASE_URL="postgresql://owner:$PW@127.0.0.1:$PG_PORT/cache" \
    "$BIN" --dir "$WORK/init" --driver centralized_db db init >/dev/null
psql_admin cache "$("$BIN" db grants --role image_cache --database cache | grep -v '^--')"
export IMAGE_CACHE_DATABASE_URL="postgresql://image_cache:$PW@127.0.0.1:$PG_PORT/cache"
export IMAGE_CACHE_ADMIN_TOKEN=bench-admin-token-0123456789abcdef
PEER_TOKEN=bench-peer-token-0123456789abcdef

# nginx: the image store at 200 MB/s per connection.
STORE="$WORK/store"; mkdir -p "$STORE" "$WORK/ngx-tmp"
head -c $((SIZE_MIB << 20)) /dev/urandom > "$STORE/img"
chmod 755 "$STORE"; chmod 644 "$STORE/img"
UP_PORT=$(free_port)
cat > "$WORK/nginx.conf" <<NGINX
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 256; }
http {
    access_log off; sendfile on; default_type application/octet-stream;
    client_body_temp_path $WORK/ngx-tmp; proxy_temp_path $WORK/ngx-tmp;
    fastcgi_temp_path $WORK/ngx-tmp; uwsgi_temp_path $WORK/ngx-tmp; scgi_temp_path $WORK/ngx-tmp;
    server {
        listen 127.0.0.1:$UP_PORT;
        limit_rate 200m;
        location ~ ^/v2/images/([^/]+)/file\$ { alias $STORE/\$1; }
    }
}
NGINX
nginx -c "$WORK/nginx.conf" -e "$WORK/nginx-error.log"

node() { # name peer(yes|no) -> "port"
    local port; port=$(free_port)
    local root="$WORK/$1"; mkdir -p "$root"
    local peer=()
    [ "$2" = yes ] && peer=(env IMAGE_CACHE_PEER_TOKEN=$PEER_TOKEN)
    "${peer[@]}" "$BIN" --dir "$root/cache" --driver centralized_db --no-fallback \
        --worker-self-reference-url "http://127.0.0.1:$port" \
        serve --listen "127.0.0.1:$port" --public-downloads --upstream "http://127.0.0.1:$UP_PORT" \
        --prefetch-interval 0 --prune-interval 0 --clean-interval 0 --max-size 100G -q \
        > "$root/out" 2> "$root/err" &
    PIDS+=($!)
    for _ in $(seq 1 300); do
        grep -q "listening on" "$root/out" 2>/dev/null && { echo "$port"; return; }
        sleep 0.1
    done
    echo "node $1 did not start:" >&2; cat "$root/err" >&2; exit 1
}
metric() { curl -s "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n { print $2 }'; }
fetch() { # port -> seconds to the last byte (the body checked complete)
    local size
    read -r t size < <(curl -s -o /dev/null -w '%{time_total} %{size_download}\n' "http://127.0.0.1:$1/v2/images/img/file")
    [ "$size" = $((SIZE_MIB << 20)) ] || { echo "incomplete body ($size bytes)" >&2; exit 1; }
    echo "$t"
}
wait_cached() { # port
    for _ in $(seq 1 600); do
        [ "$(metric "$1" image_cache_images_cached_total)" = 1 ] && return
        sleep 0.1
    done
    echo "node $1 did not cache the image" >&2; exit 1
}

A=$(node a yes)
fetch "$A" > /dev/null
wait_cached "$A"

sib=(); up=(); sib_up_bytes=(); up_up_bytes=()
for r in $(seq 1 "$RUNS"); do
    B=$(node "b$r" yes)
    sib+=("$(fetch "$B")")
    [ "$(metric "$B" image_cache_sibling_fills_total)" = 1 ] || { echo "node B did not read from A" >&2; exit 1; }
    sib_up_bytes+=("$(metric "$B" image_cache_upstream_bytes_total)")
    wait_cached "$B"
    C=$(node "c$r" no)
    up+=("$(fetch "$C")")
    up_up_bytes+=("$(metric "$C" image_cache_upstream_bytes_total)")
    wait_cached "$C"
done
stats() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { printf "%.2f / %.2f / %.2f", v[1], v[int((NR + 1) / 2)], v[NR] }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

echo
echo "## The second node's miss: from a sibling against from a 200 MB/s upstream, one ${SIZE_MIB} MiB image, ${RUNS} runs each, $(nproc) cores"
echo
echo "| second node's miss | to the last byte s (min / median / max) | bytes from the upstream | vs from the upstream |"
echo "|---|---|---|---|"
ms=$(median "${sib[@]}"); mu=$(median "${up[@]}")
echo "| from the upstream (nginx, limit_rate 200m; sibling fill off) | $(stats "${up[@]}") | ${up_up_bytes[0]} | 1.00 |"
echo "| from a sibling (node A, sibling fill on) | $(stats "${sib[@]}") | ${sib_up_bytes[0]} | $(awk -v a="$ms" -v b="$mu" 'BEGIN { printf "%.2f", a / b }') |"
