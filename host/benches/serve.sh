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
# 4. Hits under 500 slow misses: wrk (16 connections) on the cached 4 KiB
#    and 64 MiB images of a second server whose upstream is a slow
#    Glance-like store (slow_upstream.py: records with size and MD5, 64 MiB
#    bodies at 64 KiB/s each), first with no misses in flight, then while
#    500 clients each hold a miss of another uncached image (fetching past
#    --max-fetches, 64 by default, is refused with 503; the others read
#    their bodies at 4 KiB/s); p50/p99 and req/s compared.
#
# Environment: BIN (the image-cache binary; default: the release build),
# DURATION (seconds per wrk cell, default 5), RUNS (runs of each cached
# cell, ours and nginx alternating; median and spread; default 3),
# SWAP_SECONDS (default 30),
# SLOW_MISSES (default 500).
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-5}
RUNS=${RUNS:-3}
SWAP_SECONDS=${SWAP_SECONDS:-30}
SLOW_MISSES=${SLOW_MISSES:-500}
for tool in wrk nginx curl python3; do
    command -v "$tool" >/dev/null || { echo "needs $tool: apt-get install wrk nginx curl python3" >&2; exit 2; }
done
# The interpreter itself (not a pyenv shim), so that $! is its pid.
PY=$(python3 -c 'import sys; print(sys.executable)')
if [ -z "${BIN:-}" ]; then
    cargo build --quiet --release -p image-cache-cli --bin image-cache
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
    "$BIN" --dir "$1" serve --listen "127.0.0.1:$3" --upstream "$2" --public-downloads \
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
echo "## image-cache serve vs nginx (sendfile on), loopback, $(nproc) cores, ${DURATION}s per cell, $RUNS runs each (ours and nginx alternating), server build: $PROFILE"
echo
echo "Median of the runs; the ratio's spread is its lowest and highest over the runs (each run's ours / that run's nginx)."
echo
echo "| image | conns | ours req/s | nginx req/s | ratio (min-max) | ours MB/s | nginx MB/s | ratio (min-max) | ours p50/p99 ms | nginx p50/p99 ms |"
echo "|---|---|---|---|---|---|---|---|---|---|"
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) printf "%s", v[(NR + 1) / 2]; else printf "%.2f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
spread() { tr ' ' '\n' | grep -v '^$' | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%s-%s", lo, hi }'; }
for id in small-4k big-64m; do
    for c in 1 16 64; do
        orps_all=""; nrps_all=""; omb_all=""; nmb_all=""; rr_all=""; mr_all=""
        op50_all=""; op99_all=""; np50_all=""; np99_all=""; note=""
        for run in $(seq 1 "$RUNS"); do
            read -r orps omb op50 op99 oerr < <(wrk_row "http://127.0.0.1:$OUR_PORT/v2/images/$id/file" "$c")
            read -r nrps nmb np50 np99 nerr < <(wrk_row "http://127.0.0.1:$NGINX_PORT/v2/images/$id/file" "$c")
            orps_all+=" $orps"; nrps_all+=" $nrps"; omb_all+=" $omb"; nmb_all+=" $nmb"
            op50_all+=" $op50"; op99_all+=" $op99"; np50_all+=" $np50"; np99_all+=" $np99"
            rr_all+=" $(awk -v a="$orps" -v b="$nrps" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')"
            mr_all+=" $(awk -v a="$omb" -v b="$nmb" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')"
            [ "$oerr" != 0 ] && note="$note (ours: $oerr errors in run $run)"
            [ "$nerr" != 0 ] && note="$note (nginx: $nerr errors in run $run)"
        done
        echo "| $id | $c | $(median <<< "$orps_all") | $(median <<< "$nrps_all") | $(median <<< "$rr_all") ($(spread <<< "$rr_all")) | $(median <<< "$omb_all") | $(median <<< "$nmb_all") | $(median <<< "$mr_all") ($(spread <<< "$mr_all")) | $(median <<< "$op50_all") / $(median <<< "$op99_all") | $(median <<< "$np50_all") / $(median <<< "$np99_all") |$note"
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

echo
echo "## Hits under $SLOW_MISSES slow misses: 16 connections, ${DURATION}s per cell; $SLOW_MISSES clients each miss another uncached 64 MiB image, the upstream sends 64 KiB/s per download, --max-fetches 64 (the default)"
echo
# A second server, on its own cache root, in front of the slow Glance-like
# upstream; the two hit images are cached into its root beforehand.
SLOW_UP_PORT=19299; SLOW_PORT=19298; SLOW_ROOT="$WORK/slow-cache"; mkdir -p "$SLOW_ROOT"
"$PY" host/benches/slow_upstream.py serve --port $SLOW_UP_PORT --size $((64 << 20)) --rate $((64 << 10)) \
    > "$WORK/slow-upstream.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do
    curl -sf -o /dev/null "http://127.0.0.1:$SLOW_UP_PORT/stats" && break
    sleep 0.1
done
curl -sf -o /dev/null "http://127.0.0.1:$SLOW_UP_PORT/stats" \
    || { echo "slow upstream did not start:" >&2; cat "$WORK/slow-upstream.out" >&2; exit 1; }
for id in small-4k big-64m; do
    "$BIN" --dir "$SLOW_ROOT" cache -q "$id" --from "$STORE/$id" > /dev/null
done
start_server "$SLOW_ROOT" "http://127.0.0.1:$SLOW_UP_PORT" $SLOW_PORT
for id in small-4k big-64m; do
    curl -sf -o "$WORK/check" "http://127.0.0.1:$SLOW_PORT/v2/images/$id/file" \
        || { echo "port $SLOW_PORT does not serve $id" >&2; exit 1; }
    cmp -s "$WORK/check" "$STORE/$id" || { echo "port $SLOW_PORT: $id differs" >&2; exit 1; }
done
up_stat() { # name -> the slow upstream's counter
    curl -s "http://127.0.0.1:$SLOW_UP_PORT/stats" | "$PY" -c "import json,sys; print(json.load(sys.stdin)['$1'])"
}
[ "$(up_stat file_requests)" = 0 ] || { echo "hits reached the slow upstream" >&2; exit 1; }

read -r a4rps a4mb a4p50 a4p99 a4err < <(wrk_row "http://127.0.0.1:$SLOW_PORT/v2/images/small-4k/file" 16)
read -r a64rps a64mb a64p50 a64p99 a64err < <(wrk_row "http://127.0.0.1:$SLOW_PORT/v2/images/big-64m/file" 16)

# The slow misses: every client asks for its own image, reads the response
# head, then its body at 4 KiB/s; the status file counts the heads.
"$PY" host/benches/slow_upstream.py clients --count "$SLOW_MISSES" --read-rate 4096 --head-timeout 60 \
    --url "http://127.0.0.1:$SLOW_PORT/v2/images/slow-miss-{i}/file" --status "$WORK/misses.json" \
    > "$WORK/misses.out" 2>&1 &
misses_pid=$!
PIDS+=($misses_pid)
for _ in $(seq 1 700); do [ -f "$WORK/misses.json" ] && break; sleep 0.1; done
[ -f "$WORK/misses.json" ] || { echo "the slow clients got no heads:" >&2; cat "$WORK/misses.out" >&2; exit 1; }
miss() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['$1'])" "$WORK/misses.json"; }
m200=$(miss 200); m503=$(miss 503); mother=$(miss other); mnohead=$(miss no_head); mretry=$(miss retry_after)
active_before=$(metric $SLOW_PORT image_cache_upstream_fetches_active)

read -r b4rps b4mb b4p50 b4p99 b4err < <(wrk_row "http://127.0.0.1:$SLOW_PORT/v2/images/small-4k/file" 16)
read -r b64rps b64mb b64p50 b64p99 b64err < <(wrk_row "http://127.0.0.1:$SLOW_PORT/v2/images/big-64m/file" 16)

active_after=$(metric $SLOW_PORT image_cache_upstream_fetches_active)
up_active=$(up_stat files_active)
refused=$(metric $SLOW_PORT image_cache_fetches_refused_total)
failures=$(metric $SLOW_PORT image_cache_upstream_failures_total)
kill "$misses_pid" 2>/dev/null || true

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
echo "| load | small-4k req/s | small-4k p50 / p99 ms | big-64m req/s | big-64m MB/s | big-64m p50 / p99 ms | hit errors | misses fetching (200) | misses refused (503) |"
echo "|---|---|---|---|---|---|---|---|---|"
echo "| hits, no misses | $a4rps | $a4p50 / $a4p99 | $a64rps | $a64mb | $a64p50 / $a64p99 | $((a4err + a64err)) | 0 | 0 |"
echo "| hits, $SLOW_MISSES slow misses in flight | $b4rps | $b4p50 / $b4p99 | $b64rps | $b64mb | $b64p50 / $b64p99 | $((b4err + b64err)) | $m200 | $m503 |"
echo "| (b) / (a) | $(ratio "$b4rps" "$a4rps") | p99 x$(ratio "$b4p99" "$a4p99") | $(ratio "$b64rps" "$a64rps") | $(ratio "$b64mb" "$a64mb") | p99 x$(ratio "$b64p99" "$a64p99") | | | |"
echo
echo "Misses: $m200 answered 200 (fetching), $m503 answered 503 ($mretry with Retry-After), $mother other, $mnohead without a response head;" \
    "server: $refused fetches refused, upstream fetches active $active_before before and $active_after after the loaded cells" \
    "($up_active downloads open at the upstream), $failures upstream failures."
