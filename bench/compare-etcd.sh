#!/usr/bin/env bash
# Compare Skiff with etcd under the same closed-loop Put load.
#
# Starts a 3-node etcd cluster and a 3-node Skiff cluster on loopback (high,
# free ports; data in a fresh temporary directory), waits until both answer
# `skiff status` with a leader, then runs `skiff bench` (128 B values) at
# clients x concurrency = 1x1, 8x16, 16x64 against each, and prints writes/s,
# p50 and p99 side by side with the ratios skiff/etcd (writes/s) and
# etcd/skiff (p99): above 1 means Skiff is ahead on both. Then the same load
# against `skiff bench --ceiling` (an in-process server that answers every
# Put at once and keeps nothing): the most this client and gRPC stack reach
# on this machine, with skiff's writes/s as a fraction of it.
#
# The same client (`skiff bench`, etcd v3 gRPC API) loads both. etcd keeps
# its own defaults (data dir on the same disk, fsync on every commit), so the
# comparison is fair. Everything started here is killed on exit.
#
# Environment:
#   SKIFF=path        skiff binary (default: <target>/release/skiff, built
#                     with `cargo build --release --bin skiff` if missing)
#   ETCD=path         etcd binary (default: etcd on PATH; Debian etcd-server)
#   DURATION=s        measured seconds per run (default 10)
#   WARMUP=s          warmup seconds per run (default 1)
#   CONFIGS="CxK .."  clients x concurrency pairs (default "1x1 8x16 16x64")
#   TARGETS="etcd skiff ceiling"  which runs to make (default all three)
#   ENDPOINTS=all|leader  load all three members round-robin (default) or
#                     only the leader; the same choice applies to both
#   KEEP=1            keep data dirs and logs (results and logs are always
#                     kept; data dirs are removed unless KEEP=1)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-1}"
CONFIGS="${CONFIGS:-1x1 8x16 16x64}"
TARGETS="${TARGETS:-etcd skiff ceiling}"
ENDPOINTS_MODE="${ENDPOINTS:-all}"
ETCD="${ETCD:-etcd}"
KEEP="${KEEP:-0}"
READY_TIMEOUT_S=60

WORK="$(mktemp -d "${TMPDIR:-/tmp}/skiff-compare.XXXXXX")"
RESULTS="$WORK/results"
mkdir -p "$RESULTS"
PIDS=()

log() { printf '[compare] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    # Only the processes this script started, by pid.
    for pid in "${PIDS[@]+"${PIDS[@]}"}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]+"${PIDS[@]}"}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ "$KEEP" != 1 ]]; then
        rm -rf "$WORK/data"
    fi
    log "results and logs: $WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

case "$ENDPOINTS_MODE" in all | leader) ;; *) die "ENDPOINTS must be all or leader" ;; esac
for target in $TARGETS; do
    case "$target" in etcd | skiff | ceiling) ;; *) die "TARGETS: unknown target '$target'" ;; esac
done

# --- the skiff binary (also the load client for etcd) -----------------------
if [[ -z "${SKIFF:-}" ]]; then
    SKIFF="${CARGO_TARGET_DIR:-$ROOT/target}/release/skiff"
    if [[ ! -x "$SKIFF" ]]; then
        log "building $SKIFF"
        (cd "$ROOT" && cargo build --release --bin skiff)
    fi
fi
[[ -x "$SKIFF" ]] || die "skiff binary not found or not executable: $SKIFF"
if [[ " $TARGETS " == *" etcd "* ]]; then
    command -v "$ETCD" >/dev/null || die "etcd not found ($ETCD); Debian: apt-get install etcd-server"
fi

# --- ports --------------------------------------------------------------------
# 15 ports: per cluster 3 client + 3 peer (+ 3 metrics for skiff).
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_base_port() {
    local tries base p ok
    for tries in $(seq 1 50); do
        base=$((20000 + (RANDOM % 400) * 100))
        ok=1
        for p in $(seq "$base" $((base + 14))); do
            if port_in_use "$p"; then ok=0; break; fi
        done
        if [[ "$ok" == 1 ]]; then echo "$base"; return 0; fi
    done
    return 1
}
BASE="$(pick_base_port)" || die "no free port range found"
log "ports $BASE..$((BASE + 14)), work dir $WORK"

ETCD_CLIENT=("$BASE" $((BASE + 1)) $((BASE + 2)))
ETCD_PEER=($((BASE + 3)) $((BASE + 4)) $((BASE + 5)))
SKIFF_CLIENT=($((BASE + 6)) $((BASE + 7)) $((BASE + 8)))
SKIFF_PEER=($((BASE + 9)) $((BASE + 10)) $((BASE + 11)))
SKIFF_METRICS=($((BASE + 12)) $((BASE + 13)) $((BASE + 14)))

join_by() { local IFS="$1"; shift; echo "$*"; }

ETCD_ENDPOINTS="$(join_by , "${ETCD_CLIENT[@]/#/127.0.0.1:}")"
SKIFF_ENDPOINTS="$(join_by , "${SKIFF_CLIENT[@]/#/127.0.0.1:}")"

# --- clusters -----------------------------------------------------------------
start_etcd() {
    local i initial=()
    for i in 0 1 2; do initial+=("e$((i + 1))=http://127.0.0.1:${ETCD_PEER[$i]}"); done
    for i in 0 1 2; do
        local name="e$((i + 1))" dir="$WORK/data/etcd$((i + 1))"
        mkdir -p "$dir"
        "$ETCD" --name "$name" --data-dir "$dir" \
            --listen-client-urls "http://127.0.0.1:${ETCD_CLIENT[$i]}" \
            --advertise-client-urls "http://127.0.0.1:${ETCD_CLIENT[$i]}" \
            --listen-peer-urls "http://127.0.0.1:${ETCD_PEER[$i]}" \
            --initial-advertise-peer-urls "http://127.0.0.1:${ETCD_PEER[$i]}" \
            --initial-cluster "$(join_by , "${initial[@]}")" \
            --initial-cluster-token "skiff-compare-$$" \
            --initial-cluster-state new \
            >"$RESULTS/etcd$((i + 1)).log" 2>&1 &
        PIDS+=($!)
    done
}

start_skiff() {
    local i peers=() clients=()
    for i in 0 1 2; do
        peers+=("$((i + 1))=127.0.0.1:${SKIFF_PEER[$i]}")
        clients+=("$((i + 1))=127.0.0.1:${SKIFF_CLIENT[$i]}")
    done
    for i in 0 1 2; do
        local dir="$WORK/data/skiff$((i + 1))"
        mkdir -p "$dir"
        "$SKIFF" serve --id "$((i + 1))" --data-dir "$dir" \
            --listen-client "127.0.0.1:${SKIFF_CLIENT[$i]}" \
            --listen-peer "127.0.0.1:${SKIFF_PEER[$i]}" \
            --listen-metrics "127.0.0.1:${SKIFF_METRICS[$i]}" \
            --initial-cluster "$(join_by , "${peers[@]}")" \
            --initial-cluster-clients "$(join_by , "${clients[@]}")" \
            >"$RESULTS/skiff$((i + 1)).log" 2>&1 &
        PIDS+=($!)
    done
}

# Waits until all three members answer `skiff status` and one is leader.
# `skiff status` ends its table with "members=N reachable=N leader=<id|none>".
wait_ready() {
    local name="$1" endpoints="$2" deadline=$((SECONDS + READY_TIMEOUT_S)) out=""
    while ((SECONDS < deadline)); do
        out="$("$SKIFF" status --endpoints "$endpoints" 2>&1)" || true
        if grep -q '^members=3 reachable=3 leader=' <<<"$out" &&
            ! grep -q 'leader=none' <<<"$out"; then
            log "$name ready"
            printf '%s\n' "$out" >&2
            return 0
        fi
        sleep 0.5
    done
    printf '%s\n' "$out" >&2
    die "$name did not become ready within ${READY_TIMEOUT_S} s (logs in $RESULTS)"
}

# The endpoints to load: all members, or only the leader (the status row
# whose last column, IS LEADER, is true).
load_endpoints() {
    local endpoints="$1"
    if [[ "$ENDPOINTS_MODE" == all ]]; then
        echo "$endpoints"
        return
    fi
    "$SKIFF" status --endpoints "$endpoints" 2>/dev/null |
        awk '$NF == "true" { sub("^http://", "", $1); print $1; exit }'
}

# --- runs ---------------------------------------------------------------------
# json_num FILE FIELD: a top-level number from a `skiff bench --json` report.
json_num() {
    grep -m1 -o "\"$2\": *[-0-9.eE+]*" "$1" | sed 's/.*: *//'
}
# json_errors FILE: total failed Puts (sum of the "errors" map).
json_errors() {
    awk '/"errors": *\{\}/ { print 0; exit }
         /"errors": *\{/ { inside = 1; next }
         inside && /\}/ { print sum + 0; exit }
         inside { gsub(/[^0-9]/, "", $2); sum += $2 }' "$1"
}

# run_bench TARGET ENDPOINTS CxK; ENDPOINTS "" runs `skiff bench --ceiling`.
run_bench() {
    local target="$1" endpoints="$2" config="$3"
    local clients="${config%x*}" concurrency="${config#*x}"
    local json="$RESULTS/$target-$config.json"
    local to=(--ceiling)
    [[ -n "$endpoints" ]] && to=(--endpoints "$endpoints")
    log "$target $config: $clients clients x $concurrency in flight, ${DURATION} s"
    if ! "$SKIFF" bench "${to[@]}" \
        --clients "$clients" --concurrency "$concurrency" \
        --value-size 128 --duration "$DURATION" --warmup "$WARMUP" \
        --no-progress --json "$json" >"$RESULTS/$target-$config.out" 2>&1; then
        log "$target $config failed:"
        tail -n 5 "$RESULTS/$target-$config.out" >&2
        rm -f "$json"
    else
        grep '^RESULT' "$RESULTS/$target-$config.out" >&2 || true
    fi
}

stop_all() {
    local pid
    for pid in "${PIDS[@]+"${PIDS[@]}"}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]+"${PIDS[@]}"}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}

# One cluster at a time, so that the two never compete for CPU or disk.
for target in $TARGETS; do
    if [[ "$target" == ceiling ]]; then
        for config in $CONFIGS; do
            run_bench ceiling "" "$config"
        done
        continue
    fi
    if [[ "$target" == etcd ]]; then
        start_etcd
        endpoints="$ETCD_ENDPOINTS"
    else
        start_skiff
        endpoints="$SKIFF_ENDPOINTS"
    fi
    wait_ready "$target" "$endpoints"
    load="$(load_endpoints "$endpoints")"
    [[ -n "$load" ]] || die "$target: no leader endpoint found"
    for config in $CONFIGS; do
        run_bench "$target" "$load" "$config"
    done
    stop_all
done

# --- table --------------------------------------------------------------------
cell() { # FILE FIELD -> value or "-"
    if [[ -f "$1" ]]; then json_num "$1" "$2"; else echo "-"; fi
}
round() { # V -> V rounded, or "-"
    awk -v v="$1" 'BEGIN { if (v == "-") print "-"; else printf "%.0f", v }'
}
ratio() { # A B -> A/B or "-"
    awk -v a="$1" -v b="$2" 'BEGIN {
        if (a == "-" || b == "-" || b + 0 == 0) print "-"; else printf "%.2f", a / b }'
}

printf '\nskiff vs etcd: Put, 128 B values, %s s measured (+%s s warmup), endpoints=%s\n' \
    "$DURATION" "$WARMUP" "$ENDPOINTS_MODE"
printf '%-8s | %11s %9s %9s %6s | %11s %9s %9s %6s | %10s %10s\n' \
    "CxK" "etcd w/s" "p50 us" "p99 us" "errs" "skiff w/s" "p50 us" "p99 us" "errs" \
    "w/s s/e" "p99 e/s"
for config in $CONFIGS; do
    e="$RESULTS/etcd-$config.json"
    s="$RESULTS/skiff-$config.json"
    ew="$(cell "$e" writes_per_s)"
    sw="$(cell "$s" writes_per_s)"
    ep99="$(cell "$e" p99_us)"
    sp99="$(cell "$s" p99_us)"
    eerr="-"; [[ -f "$e" ]] && eerr="$(json_errors "$e")"
    serr="-"; [[ -f "$s" ]] && serr="$(json_errors "$s")"
    printf '%-8s | %11s %9s %9s %6s | %11s %9s %9s %6s | %10s %10s\n' \
        "$config" "$(round "$ew")" "$(cell "$e" p50_us)" "$ep99" "$eerr" \
        "$(round "$sw")" "$(cell "$s" p50_us)" "$sp99" "$serr" \
        "$(ratio "$sw" "$ew")" "$(ratio "$ep99" "$sp99")"
done
printf '(w/s s/e = skiff/etcd writes per second; p99 e/s = etcd/skiff p99: above 1 = skiff ahead)\n'
if [[ " $TARGETS " == *" ceiling "* ]]; then
    printf '\nceiling: the same load against a server that answers every Put at once and keeps nothing\n'
    printf '%-8s | %11s %9s %9s %6s | %12s %12s\n' \
        "CxK" "ceiling w/s" "p50 us" "p99 us" "errs" "skiff/ceil" "10x etcd/ceil"
    for config in $CONFIGS; do
        c="$RESULTS/ceiling-$config.json"
        cw="$(cell "$c" writes_per_s)"
        cerr="-"; [[ -f "$c" ]] && cerr="$(json_errors "$c")"
        ten_etcd="$(awk -v e="$(cell "$RESULTS/etcd-$config.json" writes_per_s)" \
            'BEGIN { if (e == "-") print "-"; else print 10 * e }')"
        printf '%-8s | %11s %9s %9s %6s | %12s %12s\n' \
            "$config" "$(round "$cw")" "$(cell "$c" p50_us)" "$(cell "$c" p99_us)" "$cerr" \
            "$(ratio "$(cell "$RESULTS/skiff-$config.json" writes_per_s)" "$cw")" \
            "$(ratio "$ten_etcd" "$cw")"
    done
    printf '(10x etcd/ceil above 1: ten times etcd is more than any server reaches through this client here)\n'
fi
