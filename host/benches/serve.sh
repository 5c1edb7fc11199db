#!/usr/bin/env bash
# Benchmark `image-cache serve` against nginx (sendfile on) on loopback,
# in the same run, and print a Markdown table.
#
#   bash host/benches/serve.sh            # needs: apt-get install wrk nginx curl
#
# 1. Cached images, 4 KiB and 64 MiB, at 1/16/64 connections: wrk against
#    our server and against nginx serving the very same cache files.
# 2. Cold misses: 16 clients ask for one uncached 256 MiB image; the
#    upstream is nginx serving the image store, unthrottled and throttled
#    to 200 MB/s (a remote image store); we count upstream fetches and
#    compare the total time with one direct fetch.
# 3. Swap under load: 64 connections for 30 s on a cached image with a
#    driver swap every second; failed requests counted.
#
# Environment: BIN (the image-cache binary; default: the release build),
# DURATION (seconds per wrk cell, default 5), SWAP_SECONDS (default 30).
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-5}
SWAP_SECONDS=${SWAP_SECONDS:-30}
for tool in wrk nginx curl; do
    command -v "$tool" >/dev/null || { echo "needs $tool: apt-get install wrk nginx curl" >&2; exit 2; }
done
if [ -z "${BIN:-}" ]; then
    cargo build --quiet --release -p image-cache --bin image-cache
    BIN="${CARGO_TARGET_DIR:-target}/release/image-cache"
fi
PROFILE=${BUILD_LABEL:-$(basename "$(dirname "$BIN")")}

WORK=$(mktemp -d /var/tmp/image-cache-bench.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
    [ -f "$WORK/nginx-up.pid" ] && kill "$(cat "$WORK/nginx-up.pid")" 2>/dev/null || true
    sleep 0.5
    rm -rf "$WORK"
}
trap cleanup EXIT

STORE="$WORK/store"; ROOT="$WORK/cache"; mkdir -p "$STORE" "$ROOT"
head -c 4096 /dev/urandom > "$STORE/small-4k"
head -c $((64 << 20)) /dev/urandom > "$STORE/big-64m"
head -c $((256 << 20)) /dev/urandom > "$STORE/cold-256m"
TOKEN=bench-admin-token-0123456789abcdef
export IMAGE_CACHE_ADMIN_TOKEN=$TOKEN

OUR_PORT=19292; NGINX_PORT=19293; UP_PORT=19294; UP_SLOW_PORT=19295

# nginx: the cache root as static files under Glance's path (port
# NGINX_PORT), and the image store as an upstream (UP_PORT full speed,
# UP_SLOW_PORT at 200 MB/s per connection).
cat > "$WORK/nginx.conf" <<EOF
worker_processes auto;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path $WORK/ngx-tmp;
    proxy_temp_path $WORK/ngx-tmp;
    fastcgi_temp_path $WORK/ngx-tmp;
    uwsgi_temp_path $WORK/ngx-tmp;
    scgi_temp_path $WORK/ngx-tmp;
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location ~ ^/v2/images/([^/]+)/file\$ { alias $ROOT/\$1; }
    }
    server {
        listen 127.0.0.1:$UP_PORT;
        access_log $WORK/upstream-access.log;
        location ~ ^/v2/images/([^/]+)/file\$ { alias $STORE/\$1; }
    }
    server {
        listen 127.0.0.1:$UP_SLOW_PORT;
        access_log $WORK/upstream-slow-access.log;
        limit_rate 200m;
        location ~ ^/v2/images/([^/]+)/file\$ { alias $STORE/\$1; }
    }
}
EOF
mkdir -p "$WORK/ngx-tmp"
# nginx's workers run as www-data: let them read the files.
chmod 755 "$WORK" "$STORE" "$ROOT"; chmod 644 "$STORE"/*
nginx -c "$WORK/nginx.conf" -e "$WORK/nginx-error.log"

start_server() { # root upstream port
    "$BIN" --dir "$1" serve --listen "127.0.0.1:$3" --upstream "$2" \
        --prefetch-interval 0 --prune-interval 0 --clean-interval 0 -q \
        > "$WORK/serve-$3.out" 2> "$WORK/serve-$3.err" &
    PIDS+=($!)
    for _ in $(seq 1 600); do
        grep -q "listening on" "$WORK/serve-$3.out" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "server did not start:" >&2; cat "$WORK/serve-$3.err" >&2; exit 1
}
metric() { # port name
    curl -s "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n { print $2 }'
}

start_server "$ROOT" "$STORE" $OUR_PORT
# Fill the cache (misses through the upstream directory).
for id in small-4k big-64m; do
    curl -sf -o /dev/null "http://127.0.0.1:$OUR_PORT/v2/images/$id/file"
done
sleep 1
curl -sf -H "X-Auth-Token: $TOKEN" "http://127.0.0.1:$OUR_PORT/v2/cache" | grep -q big-64m
chmod 644 "$ROOT"/small-4k "$ROOT"/big-64m
# Both servers must answer 200 with the same bytes before anything is timed.
for port in $OUR_PORT $NGINX_PORT; do
    for id in small-4k big-64m; do
        curl -sf -o "$WORK/check" "http://127.0.0.1:$port/v2/images/$id/file" \
            || { echo "port $port does not serve $id" >&2; exit 1; }
        cmp -s "$WORK/check" "$STORE/$id" || { echo "port $port: $id differs" >&2; exit 1; }
    done
done

# wrk output -> "req/s MB/s p50 p99" (MB = 10^6 bytes; latencies in ms).
wrk_row() { # url conns
    local threads=$(( $2 < 2 ? 1 : 2 ))
    wrk -t"$threads" -c"$2" -d"${DURATION}s" --timeout 60s --latency "$1" 2>&1 | awk '
        function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
        function mb(v) { if (v ~ /GB$/) return v*1073.741824; if (v ~ /MB$/) return v*1.048576; if (v ~ /KB$/) return v*0.001024; return v/1e6 }
        /Requests\/sec/ { rps = $2 }
        /Transfer\/sec/ { tps = mb($2) }
        $1 == "50%" { p50 = ms($2) }
        $1 == "99%" { p99 = ms($2) }
        /Non-2xx/ { errs += $NF }
        /Socket errors/ { errs += 1 }
        END { printf "%.0f %.1f %.2f %.2f %d\n", rps, tps, p50, p99, errs }'
}

echo
echo "## image-cache serve vs nginx (sendfile on), loopback, $(nproc) cores, ${DURATION}s per cell, server build: $PROFILE"
echo
echo "| image | conns | ours req/s | nginx req/s | ratio | ours MB/s | nginx MB/s | ratio | ours p50/p99 ms | nginx p50/p99 ms |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for id in small-4k big-64m; do
    for c in 1 16 64; do
        read -r orps omb op50 op99 oerr < <(wrk_row "http://127.0.0.1:$OUR_PORT/v2/images/$id/file" "$c")
        read -r nrps nmb np50 np99 nerr < <(wrk_row "http://127.0.0.1:$NGINX_PORT/v2/images/$id/file" "$c")
        rr=$(awk -v a="$orps" -v b="$nrps" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
        mr=$(awk -v a="$omb" -v b="$nmb" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
        note=""; [ "$oerr" != 0 ] && note=" (ours: $oerr errors)"; [ "$nerr" != 0 ] && note="$note (nginx: $nerr errors)"
        echo "| $id | $c | $orps | $nrps | $rr | $omb | $nmb | $mr | $op50 / $op99 | $np50 / $np99 |$note"
    done
done

echo
echo "## Cold misses: 16 clients, one uncached 256 MiB image"
echo
echo "| upstream | one direct fetch s | 16 clients direct from the upstream s | 16 clients via image-cache s | via image-cache / one fetch | upstream fetches | all 16 bodies complete |"
echo "|---|---|---|---|---|---|---|"
SIZE=$((256 << 20))
sixteen() { # url -> seconds; every body must be complete (curl checks Content-Length)
    local start end i ok=yes
    start=$(date +%s.%N)
    for i in $(seq 1 16); do
        curl -s -o /dev/null -w '%{size_download}\n' "$1" > "$WORK/cold-size-$i" &
    done
    wait $(jobs -p | grep -v -x -F "$(printf '%s\n' "${PIDS[@]}")") 2>/dev/null || true
    end=$(date +%s.%N)
    for i in $(seq 1 16); do [ "$(cat "$WORK/cold-size-$i")" = "$SIZE" ] || ok=no; done
    echo "$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }') $ok"
}
cold() { # label upstream-port server-port
    local root="$WORK/cold-$3"; mkdir -p "$root"
    local one direct total ok fetches
    one=$(curl -sf -o /dev/null -w '%{time_total}' "http://127.0.0.1:$2/v2/images/cold-256m/file")
    read -r direct _ < <(sixteen "http://127.0.0.1:$2/v2/images/cold-256m/file")
    start_server "$root" "http://127.0.0.1:$2" "$3"
    read -r total ok < <(sixteen "http://127.0.0.1:$3/v2/images/cold-256m/file")
    fetches=$(metric "$3" image_cache_upstream_fetches_total)
    echo "| $1 | $one | $direct | $total | $(awk -v a="$total" -v b="$one" 'BEGIN { printf "%.2f", a / b }') | $fetches | $ok |"
}
cold "nginx, full speed" $UP_PORT 19296
cold "nginx, limit_rate 200m" $UP_SLOW_PORT 19297

echo
echo "## Swap under load: 64 connections, ${SWAP_SECONDS}s, a driver swap every second (sqlite <-> xattr if the file system has user xattrs, else sqlite -> sqlite)"
echo
drivers=(sqlite)
probe="$ROOT/.xattr-probe"; touch "$probe"
if setfattr -n user.probe -v 1 "$probe" 2>/dev/null || python3 -c "import os,sys; os.setxattr(sys.argv[1], 'user.probe', b'1')" "$probe" 2>/dev/null; then
    drivers=(xattr sqlite)
fi
rm -f "$probe"
(
    i=0
    end=$(( $(date +%s) + SWAP_SECONDS ))
    while [ "$(date +%s)" -lt "$end" ]; do
        sleep 1
        d=${drivers[$(( i % ${#drivers[@]} ))]}
        code=$(curl -s -o /dev/null -w '%{http_code}' -X POST -H "X-Auth-Token: $TOKEN" \
            -d "{\"driver\":\"$d\"}" "http://127.0.0.1:$OUR_PORT/v2/cache/driver")
        [ "$code" = 200 ] || echo "swap to $d: HTTP $code" >&2
        i=$((i + 1))
    done
) &
swapper=$!
wrk -t2 -c64 -d"${SWAP_SECONDS}s" "http://127.0.0.1:$OUR_PORT/v2/images/small-4k/file" > "$WORK/swap-wrk.txt" 2>&1
wait "$swapper"
requests=$(awk '/requests in/ { print $1 }' "$WORK/swap-wrk.txt")
non2xx=$(awk '/Non-2xx/ { print $NF }' "$WORK/swap-wrk.txt"); non2xx=${non2xx:-0}
sockerr=$(grep -o 'Socket errors:.*' "$WORK/swap-wrk.txt" || echo "Socket errors: none")
swaps=$(metric $OUR_PORT image_cache_driver_swaps_total)
echo "| requests | non-2xx | socket errors | swaps done |"
echo "|---|---|---|---|"
echo "| $requests | $non2xx | ${sockerr#Socket errors: } | $swaps |"
