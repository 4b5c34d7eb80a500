#!/usr/bin/env bash
# Sluice throughput benchmark: pgbench -S through three paths to one database.
#
# What it measures
#   Select-only pgbench (`pgbench -n -S`, one indexed primary-key lookup per
#   transaction) TPS and average latency over three paths to the same
#   throwaway PostgreSQL cluster, all over TCP on 127.0.0.1 without TLS:
#     direct     pgbench -> PostgreSQL (SCRAM as role "bench")
#     pgbouncer  pgbench -> pgbouncer (session pooling, cleartext auth from a
#                userlist) -> PostgreSQL
#     sluice     pgbench -> sluice (service token as the password) ->
#                PostgreSQL (SCRAM as role "bench")
#   For every clients x mode cell it runs ROUNDS rounds; each round runs the
#   paths one after the other (odd rounds forward, even rounds backward, from
#   a starting path that moves on every round) so that drift on the machine,
#   and what one run leaves behind for the next, hit all paths alike. It then
#   prints the MEDIAN of the rounds: TPS of each path, sluice/direct and
#   sluice/pgbouncer TPS ratios, and latency in ms of each path. With the
#   noaudit path it also prints sluice/noaudit within each round and the
#   median of those: the two ran in the same round (back to back, in either
#   order), so this paired figure is steadier than the ratio of
#   the two medians when the machine's throughput drifts between rounds;
#   from six rounds on, with a 95% interval for that median (sign test).
#   Last, a table of CPU time per transaction: the whole machine's, the
#   gateway's and its audit writer thread's (clock ticks from /proc around
#   each run), and the machine's context switches per transaction.
#
#   Every run is:  pgbench -n -S -c CLIENTS -j 2 -T DURATION -M MODE
#   The database is initialised once with `pgbench -i -s SCALE` (direct).
#
# Settings (environment variables)
#   ROUNDS=3               rounds per cell (median over these)
#   DURATION=10            seconds per pgbench run
#   ONLY_CLIENTS="1 10 50" client counts to run (-c)
#   ONLY_MODES="simple prepared"  query modes to run (-M; "extended" works too)
#   CONNECT=0              1 adds a row "-C" (new connection per transaction)
#                          at -c 10 -M simple: connection setup cost
#   SCALE=10               pgbench -i scale factor
#   WARMUP=2               seconds of warm-up per path before measuring (0: none)
#   POLICY=config/policy.toml  statement policy the gateway enforces (the
#                          shipped default); "none" runs without [policy]
#                          (statements are still classified, every rule is
#                          empty)
#   AUDIT=normal           the gateway's audit trail: "normal" (the default:
#                          survives a crash of the gateway, not of the
#                          machine), "full" (an fsync per group commit) or "off"
#   AUDIT_DIR=dir          where the trails go (a fresh directory in dir,
#                          a relative one from the current directory, removed
#                          at the end; default: the run's scratch directory;
#                          unused with AUDIT=off): a tmpfs (/dev/shm) takes
#                          the disk out of the trail's cost
#   NOAUDIT_PATH=1         with the audit on, also run a second gateway with
#                          the audit off (path "noaudit"), to show the
#                          trail's cost side by side; 0 skips it
#   SLUICE_BIN=target/release/sluice   gateway binary (built if missing)
#   ALT_BIN=path           another gateway binary (a build of another commit,
#                          say), run beside sluice with the same config as
#                          path "alt": two builds compared within each round
#   SLUICE_PG_BIN=...      PostgreSQL bin dir (default: highest version under
#                          /usr/lib/postgresql/*/bin, else pg_config --bindir)
#
#   With the defaults the matrix is 3 clients x 2 modes x 3 rounds x 3 paths
#   x 10 s, about 9-10 minutes.
#
# Usage (from anywhere; the script works from the repository root)
#   bench/pgbench.sh
#   ROUNDS=5 DURATION=20 bench/pgbench.sh
#   ROUNDS=1 DURATION=2 ONLY_CLIENTS="10" ONLY_MODES="simple" bench/pgbench.sh
#   CONNECT=1 bench/pgbench.sh
#
# Needs: pgbench, psql, python3, the PostgreSQL server binaries and pgbouncer
# (installed with apt-get when missing and running as root). When run as root
# the PostgreSQL cluster and pgbouncer run as the "postgres" user. Everything
# lives in a temporary directory that is removed on exit, ctrl-c included.
# See bench/README.md for how to read the output.

set -euo pipefail
export LC_ALL=C

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
ONLY_CLIENTS=${ONLY_CLIENTS:-"1 10 50"}
ONLY_MODES=${ONLY_MODES:-"simple prepared"}
CONNECT=${CONNECT:-0}
SCALE=${SCALE:-10}
WARMUP=${WARMUP:-2}
POLICY=${POLICY:-config/policy.toml}
AUDIT=${AUDIT:-normal}
NOAUDIT_PATH=${NOAUDIT_PATH:-1}
THREADS=2
PATHS=(direct pgbouncer sluice)
case $AUDIT in
full | normal) ((NOAUDIT_PATH == 1)) && PATHS+=(noaudit) ;;
off) ;;
*) echo "AUDIT=$AUDIT: write full, normal or off" >&2; exit 2 ;;
esac
ALT_BIN=${ALT_BIN:-}
[[ -n $ALT_BIN ]] && PATHS+=(alt)

PG_USER=bench
PG_PASSWORD=bench-pw
DB=bench
TOKEN=bench-token-0123456789

die() {
    echo "pgbench.sh: $*" >&2
    exit 1
}

# need_uint NAME VALUE MIN: VALUE must be an integer >= MIN.
need_uint() {
    if ! [[ $2 =~ ^[0-9]+$ ]] || (($2 < $3)); then
        die "$1 must be an integer >= $3, not '$2'"
    fi
}
need_uint ROUNDS "$ROUNDS" 1
need_uint DURATION "$DURATION" 1
need_uint SCALE "$SCALE" 1
need_uint WARMUP "$WARMUP" 0
[[ $CONNECT == 0 || $CONNECT == 1 ]] || die "CONNECT must be 0 or 1, not '$CONNECT'"
read -ra CLIENTS <<<"$ONLY_CLIENTS"
read -ra MODES <<<"$ONLY_MODES"
((${#CLIENTS[@]} > 0)) || die "ONLY_CLIENTS is empty"
((${#MODES[@]} > 0)) || die "ONLY_MODES is empty"
for c in "${CLIENTS[@]}"; do
    need_uint "ONLY_CLIENTS entry" "$c" 1
done
for m in "${MODES[@]}"; do
    [[ $m == simple || $m == extended || $m == prepared ]] ||
        die "ONLY_MODES: '$m' is not simple, extended or prepared"
done

# AUDIT_DIR is taken from where the script was started.
[[ -n ${AUDIT_DIR:-} && $AUDIT_DIR != /* ]] && AUDIT_DIR=$PWD/$AUDIT_DIR
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
SLUICE_BIN=${SLUICE_BIN:-target/release/sluice}

# --- tools -------------------------------------------------------------------

for tool in pgbench psql python3 sha256sum; do
    command -v "$tool" >/dev/null || die "$tool is not on PATH"
done

if [[ -n ${SLUICE_PG_BIN:-} ]]; then
    PG_BIN=$SLUICE_PG_BIN
else
    PG_BIN=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null |
        sort -V | tail -n 1 || true)
    if [[ -z $PG_BIN ]] && command -v pg_config >/dev/null; then
        PG_BIN=$(pg_config --bindir)
    fi
fi
for tool in initdb pg_ctl postgres; do
    [[ -x $PG_BIN/$tool ]] || die "no $tool in '$PG_BIN' (set SLUICE_PG_BIN to PostgreSQL's bin directory)"
done

PGBOUNCER=$(command -v pgbouncer || true)
[[ -z $PGBOUNCER && -x /usr/sbin/pgbouncer ]] && PGBOUNCER=/usr/sbin/pgbouncer
if [[ -z $PGBOUNCER ]]; then
    if [[ $EUID -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "pgbouncer is missing: installing it with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y pgbouncer >/dev/null ||
            { apt-get update >/dev/null && apt-get install -y pgbouncer >/dev/null; } ||
            die "could not install pgbouncer"
        PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
    else
        die "pgbouncer is not installed (apt-get install pgbouncer)"
    fi
fi

if [[ ! -x $SLUICE_BIN ]]; then
    echo "$SLUICE_BIN is missing: running cargo build --release"
    cargo build --release
    [[ -x $SLUICE_BIN ]] || die "cargo build --release did not produce $SLUICE_BIN"
fi
stale=$(find src shared/src Cargo.toml shared/Cargo.toml -newer "$SLUICE_BIN" -type f -print -quit 2>/dev/null || true)
if [[ -n $stale ]]; then
    echo "warning: $SLUICE_BIN is older than $stale: run cargo build --release to measure current code" >&2
fi

# PostgreSQL and pgbouncer refuse to run as root. Runs from $TMP so that the
# postgres user never starts in a directory it may not read.
as_pg() {
    if [[ $EUID -eq 0 ]]; then
        (cd "$TMP" && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

# --- scratch space and cleanup ---------------------------------------------

TMP=$(mktemp -d "${TMPDIR:-/tmp}/sluice-bench.XXXXXX")
[[ $EUID -eq 0 ]] && chown postgres:postgres "$TMP"
TRAILS=$TMP
SLUICE_PID=
NOAUDIT_PID=
ALT_PID=
PGB_PIDFILE=$TMP/pgbouncer.pid

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    local gw
    for gw in "$SLUICE_PID" "$NOAUDIT_PID" "$ALT_PID"; do
        if [[ -n $gw ]] && kill -0 "$gw" 2>/dev/null; then
            kill -TERM "$gw" 2>/dev/null
            for _ in $(seq 50); do kill -0 "$gw" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$gw" 2>/dev/null
            wait "$gw" 2>/dev/null
        fi
    done
    if [[ -s $PGB_PIDFILE ]]; then
        local pid
        pid=$(<"$PGB_PIDFILE")
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
    fi
    if [[ -f $TMP/data/postmaster.pid ]]; then
        as_pg "$PG_BIN/pg_ctl" -D "$TMP/data" -m fast -w -t 30 stop >/dev/null 2>&1 ||
            kill -KILL "$(head -n 1 "$TMP/data/postmaster.pid")" 2>/dev/null
    fi
    [[ $TRAILS != "$TMP" ]] && rm -rf "$TRAILS"
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -n ${AUDIT_DIR:-} && $AUDIT != off ]]; then
    TRAILS=$(mktemp -d "$AUDIT_DIR/sluice-trail.XXXXXX") || die "AUDIT_DIR=$AUDIT_DIR: cannot make a directory there"
fi

# Five distinct free TCP ports on 127.0.0.1.
read -r PG_PORT PGB_PORT GW_PORT NOAUDIT_PORT ALT_PORT < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
')
[[ -n ${GW_PORT:-} ]] || die "could not pick free ports with python3"

# Identical libpq behaviour on every path: no TLS or GSS negotiation round trip.
export PGSSLMODE=disable PGGSSENCMODE=disable PGCONNECT_TIMEOUT=5
unset PGHOST PGHOSTADDR PGPORT PGUSER PGDATABASE PGSERVICE PGOPTIONS PGPASSWORD

# --- PostgreSQL --------------------------------------------------------------

echo "starting PostgreSQL ($PG_BIN) on 127.0.0.1:$PG_PORT"
as_pg mkdir -p "$TMP/sock"
as_pg "$PG_BIN/initdb" -D "$TMP/data" --auth=trust -U postgres --no-sync >"$TMP/initdb.log" 2>&1 ||
    { cat "$TMP/initdb.log" >&2; die "initdb failed"; }
as_pg tee -a "$TMP/data/postgresql.conf" >/dev/null <<EOF
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$TMP/sock'
max_connections = 300
shared_buffers = 256MB
fsync = off
synchronous_commit = off
full_page_writes = off
password_encryption = scram-sha-256
EOF
as_pg tee "$TMP/data/pg_hba.conf" >/dev/null <<EOF
local all postgres trust
host  all $PG_USER 127.0.0.1/32 scram-sha-256
EOF
as_pg "$PG_BIN/pg_ctl" -D "$TMP/data" -l "$TMP/postgres.log" -w -t 60 start >/dev/null ||
    { cat "$TMP/postgres.log" >&2; die "PostgreSQL did not start"; }

psql -X -q -v ON_ERROR_STOP=1 -h "$TMP/sock" -p "$PG_PORT" -U postgres -d postgres >/dev/null <<EOF
CREATE ROLE $PG_USER LOGIN PASSWORD '$PG_PASSWORD';
CREATE DATABASE $DB OWNER $PG_USER;
EOF
PG_VERSION=$(psql -X -At -h "$TMP/sock" -p "$PG_PORT" -U postgres -d postgres -c 'SELECT version()')

echo "initialising: pgbench -i -s $SCALE (direct)"
PGPASSWORD=$PG_PASSWORD pgbench -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" "$DB" \
    >"$TMP/init.log" 2>&1 || { cat "$TMP/init.log" >&2; die "pgbench -i failed"; }
psql -X -q -h "$TMP/sock" -p "$PG_PORT" -U postgres -d "$DB" -c CHECKPOINT >/dev/null

# Waits until `select 1` works through a path, or dies showing its log.
wait_for() {
    local name=$1 port=$2 password=$3 pid_check=$4 log=$5 err
    for _ in $(seq 100); do
        if err=$(PGPASSWORD=$password psql -X -At -h 127.0.0.1 -p "$port" -U "$PG_USER" -d "$DB" \
            -c 'SELECT 1' 2>&1); then
            return 0
        fi
        if ! eval "$pid_check"; then
            cat "$log" >&2 2>/dev/null
            die "$name exited during startup"
        fi
        sleep 0.2
    done
    echo "$err" >&2
    cat "$log" >&2 2>/dev/null
    die "$name did not accept queries on 127.0.0.1:$port"
}

# --- pgbouncer ---------------------------------------------------------------

echo "starting pgbouncer on 127.0.0.1:$PGB_PORT (session pooling)"
as_pg tee "$TMP/userlist.txt" >/dev/null <<EOF
"$PG_USER" "$PG_PASSWORD"
EOF
as_pg tee "$TMP/pgbouncer.ini" >/dev/null <<EOF
[databases]
$DB = host=127.0.0.1 port=$PG_PORT dbname=$DB

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
; cleartext from the client, like the token sluice asks for; SCRAM upstream
auth_type = plain
auth_file = $TMP/userlist.txt
pool_mode = session
max_client_conn = 1000
default_pool_size = 100
ignore_startup_parameters = extra_float_digits
logfile = $TMP/pgbouncer.log
pidfile = $PGB_PIDFILE
log_connections = 0
log_disconnections = 0
EOF
# -d: daemonises (1.18 requires pidfile for that); stopped via the pidfile.
as_pg "$PGBOUNCER" -d "$TMP/pgbouncer.ini" >"$TMP/pgbouncer.out" 2>&1 ||
    { cat "$TMP/pgbouncer.out" "$TMP/pgbouncer.log" >&2 2>/dev/null; die "pgbouncer did not start"; }
# shellcheck disable=SC2016 # evaluated later by wait_for
wait_for pgbouncer "$PGB_PORT" "$PG_PASSWORD" '[[ ! -s $PGB_PIDFILE ]] || kill -0 "$(<"$PGB_PIDFILE")" 2>/dev/null' "$TMP/pgbouncer.log"

# --- sluice ------------------------------------------------------------------

echo "starting sluice ($SLUICE_BIN) on 127.0.0.1:$GW_PORT"
TOKEN_SHA=$(printf %s "$TOKEN" | sha256sum | cut -d' ' -f1)
POLICY_SECTION=
if [[ $POLICY != none ]]; then
    [[ -f $POLICY ]] || die "POLICY=$POLICY: no such file (or POLICY=none)"
    POLICY_SECTION=$(printf '[policy]\nfile = "%s"\n' "$(realpath "$POLICY")")
fi
# sluice_config PORT AUDIT_SECTION
sluice_config() {
    cat <<EOF
[server]
listen = "127.0.0.1:$1"
allow_plaintext = true
max_connections = 1000
shutdown_grace = "1s"

$POLICY_SECTION
[[identity.tokens]]
name = "bench"
sha256 = "$TOKEN_SHA"
groups = ["bench"]

[[targets]]
name = "$DB"
host = "127.0.0.1"
port = $PG_PORT
database = "$DB"
tls = "disable"

[[targets.access]]
groups = ["bench"]
role = "$PG_USER"
password = "$PG_PASSWORD"

# No control API: two gateways run side by side.
[api]
enabled = false

$2
EOF
}
if [[ $AUDIT == off ]]; then
    sluice_config "$GW_PORT" $'[audit]\nenabled = false' >"$TMP/sluice.toml"
else
    sluice_config "$GW_PORT" "$(printf '[audit]\npath = "%s"\nsync = "%s"' "$TRAILS/audit.db" "$AUDIT")" >"$TMP/sluice.toml"
fi
sluice_config "$NOAUDIT_PORT" $'[audit]\nenabled = false' >"$TMP/sluice-noaudit.toml"
# In its own session, like the postmaster (pg_ctl) and pgbouncer (-d): a ctrl-c
# on the terminal then stops only pgbench and this script, whose trap stops the
# servers (sluice handles SIGINT itself and would otherwise quit mid-run).
SETSID=()
command -v setsid >/dev/null && SETSID=(setsid)
SLUICE_LOG=${SLUICE_LOG:-warn} "${SETSID[@]}" "$SLUICE_BIN" serve --config "$TMP/sluice.toml" \
    >"$TMP/sluice.log" 2>&1 &
SLUICE_PID=$!
# shellcheck disable=SC2016 # evaluated later by wait_for
wait_for sluice "$GW_PORT" "$TOKEN" 'kill -0 "$SLUICE_PID" 2>/dev/null' "$TMP/sluice.log"
if [[ " ${PATHS[*]} " == *" noaudit "* ]]; then
    echo "starting a second sluice with the audit off on 127.0.0.1:$NOAUDIT_PORT"
    SLUICE_LOG=${SLUICE_LOG:-warn} "${SETSID[@]}" "$SLUICE_BIN" serve --config "$TMP/sluice-noaudit.toml" \
        >"$TMP/sluice-noaudit.log" 2>&1 &
    NOAUDIT_PID=$!
    # shellcheck disable=SC2016 # evaluated later by wait_for
    wait_for noaudit "$NOAUDIT_PORT" "$TOKEN" 'kill -0 "$NOAUDIT_PID" 2>/dev/null' "$TMP/sluice-noaudit.log"
fi
if [[ -n $ALT_BIN ]]; then
    [[ -x $ALT_BIN ]] || die "ALT_BIN=$ALT_BIN is not an executable"
    # The same config as sluice's, with a trail of its own.
    sed -e "s/^listen = .*/listen = \"127.0.0.1:$ALT_PORT\"/" -e "s|$TRAILS/audit.db|$TRAILS/audit-alt.db|" \
        "$TMP/sluice.toml" >"$TMP/sluice-alt.toml"
    echo "starting the other build ($ALT_BIN, path alt) on 127.0.0.1:$ALT_PORT"
    SLUICE_LOG=${SLUICE_LOG:-warn} "${SETSID[@]}" "$ALT_BIN" serve --config "$TMP/sluice-alt.toml" \
        >"$TMP/sluice-alt.log" 2>&1 &
    ALT_PID=$!
    # shellcheck disable=SC2016 # evaluated later by wait_for
    wait_for alt "$ALT_PORT" "$TOKEN" 'kill -0 "$ALT_PID" 2>/dev/null' "$TMP/sluice-alt.log"
fi

# --- running pgbench ---------------------------------------------------------

path_port() {
    case $1 in
    direct) echo "$PG_PORT" ;;
    pgbouncer) echo "$PGB_PORT" ;;
    sluice) echo "$GW_PORT" ;;
    noaudit) echo "$NOAUDIT_PORT" ;;
    alt) echo "$ALT_PORT" ;;
    esac
}
path_password() {
    if [[ $1 == sluice || $1 == noaudit || $1 == alt ]]; then echo "$TOKEN"; else echo "$PG_PASSWORD"; fi
}

# The gateway process serving PATH, if any.
path_pid() {
    case $1 in
    sluice) echo "$SLUICE_PID" ;;
    noaudit) echo "$NOAUDIT_PID" ;;
    alt) echo "$ALT_PID" ;;
    esac
}

# cpu_ticks: busy clock ticks of the whole machine (user, nice, system, irq
# and softirq: not idle, iowait or the time the hypervisor took, and guests
# are counted in user already), the ticks the hypervisor took (steal), all
# ticks, and context switches, from /proc/stat.
cpu_ticks() {
    awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8, $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }
        $1 == "ctxt" { print $2 }' /proc/stat | paste -sd ' '
}

# stat_ticks FILE: user + system clock ticks in a /proc stat file (a process,
# all its threads, or one thread); 0 if it is gone.
stat_ticks() {
    local stat
    if stat=$(cat "$1" 2>/dev/null); then
        # The command name (field 2) may hold spaces: count from its ")".
        awk '{ print $12 + $13 }' <<<"${stat##*) }"
    else
        echo 0
    fi
}

# proc_ticks PID: the CPU ticks of a process, 0 without one.
proc_ticks() {
    if [[ -n $1 ]]; then stat_ticks "/proc/$1/stat"; else echo 0; fi
}

# writer_ticks PID: the CPU ticks of the gateway's audit writer thread
# ("sluice-audit"), "-" without one (the audit off).
writer_ticks() {
    local task comm
    if [[ -n $1 ]]; then
        for task in /proc/"$1"/task/*; do
            comm=$(cat "$task/comm" 2>/dev/null) || continue
            if [[ $comm == sluice-audit ]]; then
                stat_ticks "$task/stat"
                return
            fi
        done
    fi
    echo -
}

CLK_TCK=$(getconf CLK_TCK)

# run_pgbench PATH CLIENTS MODE SECONDS [extra pgbench args...]
# Sets TPS, LAT (ms) and CONN (ms, average connection time with -C, else "-"),
# MACHINE_US, GATEWAY_US and WRITER_US (CPU microseconds per transaction: the
# whole machine's, the gateway's and its audit writer thread's, "-" on paths
# without one) and CTXT (the machine's context switches per transaction).
run_pgbench() {
    local path=$1 clients=$2 mode=$3 seconds=$4
    shift 4
    local out=$TMP/run.out err=$TMP/run.err failed pid password port ran=0
    local before after gw_before gw_after wr_before wr_after txns
    pid=$(path_pid "$path")
    password=$(path_password "$path")
    port=$(path_port "$path")
    # The machine's ticks are read last before the run and first after it,
    # so that the reads' own processes stay outside its window.
    gw_before=$(proc_ticks "$pid")
    wr_before=$(writer_ticks "$pid")
    before=$(cpu_ticks)
    PGPASSWORD=$password pgbench -n -S -c "$clients" -j "$THREADS" -T "$seconds" \
        -M "$mode" "$@" -h 127.0.0.1 -p "$port" -U "$PG_USER" "$DB" >"$out" 2>"$err" && ran=1
    after=$(cpu_ticks)
    gw_after=$(proc_ticks "$pid")
    wr_after=$(writer_ticks "$pid")
    if ((ran == 0)); then
        echo "pgbench failed on the $path path (-c $clients -M $mode $*):" >&2
        cat "$err" "$out" >&2
        [[ $path == sluice ]] && { echo "--- sluice log (tail)" >&2; tail -n 20 "$TMP/sluice.log" >&2; }
        [[ $path == noaudit ]] && { echo "--- sluice (audit off) log (tail)" >&2; tail -n 20 "$TMP/sluice-noaudit.log" >&2; }
        [[ $path == pgbouncer ]] && { echo "--- pgbouncer log (tail)" >&2; tail -n 20 "$TMP/pgbouncer.log" >&2; }
        exit 1
    fi
    TPS=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$out")
    LAT=$(sed -n 's/^latency average = \([0-9.]*\) ms$/\1/p' "$out")
    CONN=$(sed -n 's/^average connection time = \([0-9.]*\) ms$/\1/p' "$out")
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$out")
    if [[ -z $TPS || -z $LAT ]] || [[ -n $failed && $failed != 0 ]]; then
        echo "pgbench on the $path path (-c $clients -M $mode $*) did not report a clean result:" >&2
        cat "$err" "$out" >&2
        exit 1
    fi
    CONN=${CONN:--}
    txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out")
    read -r MACHINE_US CTXT GATEWAY_US WRITER_US STEAL < <(
        awk -v b="$before" -v a="$after" -v gb="$gw_before" -v ga="$gw_after" -v wb="$wr_before" \
            -v wa="$wr_after" -v n="${txns:-0}" -v hz="$CLK_TCK" -v gw="${pid:+1}" 'BEGIN {
            split(b, x, " "); split(a, y, " ")
            tick = 1000000 / hz
            if (n <= 0) { print "- - - - -"; exit }
            printf "%.2f %.2f %s %s %s\n", (y[1] - x[1]) * tick / n, (y[4] - x[4]) / n,
                gw ? sprintf("%.2f", (ga - gb) * tick / n) : "-",
                gw && wa != "-" && wb != "-" ? sprintf("%.2f", (wa - wb) * tick / n) : "-",
                (y[3] > x[3]) ? sprintf("%.1f", 100 * (y[2] - x[2]) / (y[3] - x[3])) : "-"
        }'
    )
}

RESULTS=$TMP/results.tsv
: >"$RESULTS"

# measure LABEL CLIENTS MODE [extra pgbench args...]: ROUNDS interleaved rounds.
# Odd rounds take the paths forward, even ones backward, each round from the
# next starting path: every path runs in every place, and after a different
# path in turn, so what a run leaves behind (a trail writer's last batch, the
# kernel writing its pages back) does not always fall on the same next path.
# sluice and noaudit still run back to back, in both orders.
measure() {
    local label=$1 clients=$2 mode=$3 round i path n=${#PATHS[@]}
    shift 3
    for ((round = 1; round <= ROUNDS; round++)); do
        for ((i = 0; i < n; i++)); do
            if ((round % 2)); then
                path=${PATHS[(round - 1 + i) % n]}
            else
                path=${PATHS[((round - 1 - i) % n + n) % n]}
            fi
            run_pgbench "$path" "$clients" "$mode" "$DURATION" "$@"
            printf '  c=%-3s %-10s round %d/%d  %-9s  tps %11.1f  latency %8.3f ms  cpu/tx %6s us%s%s  steal %s%%\n' \
                "$clients" "$label" "$round" "$ROUNDS" "$path" "$TPS" "$LAT" "$MACHINE_US" \
                "$([[ $GATEWAY_US != - ]] && echo " (gateway $GATEWAY_US)")" \
                "$([[ $CONN != - ]] && echo "  connect $CONN ms")" "$STEAL"
            printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$clients" "$label" "$path" "$round" "$TPS" "$LAT" "$CONN" \
                "$MACHINE_US" "$GATEWAY_US" "$WRITER_US" "$CTXT" "$STEAL" >>"$RESULTS"
        done
    done
}

NPROC=$(nproc)
CPU=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -n 1)
CELLS=$((${#CLIENTS[@]} * ${#MODES[@]} + CONNECT))
ESTIMATE=$((CELLS * ROUNDS * ${#PATHS[@]} * DURATION + (WARMUP > 0 ? ${#PATHS[@]} * WARMUP : 0)))

if ((WARMUP > 0)); then
    echo "warm-up: ${WARMUP}s per path at -c 10 -M simple"
    for path in "${PATHS[@]}"; do
        run_pgbench "$path" 10 simple "$WARMUP"
        printf '  %-9s  tps %11.1f\n' "$path" "$TPS"
    done
fi

echo "measuring: $CELLS cell(s) x $ROUNDS round(s) x ${#PATHS[@]} paths x ${DURATION}s = about ${ESTIMATE}s"
for clients in "${CLIENTS[@]}"; do
    for mode in "${MODES[@]}"; do
        measure "$mode" "$clients" "$mode"
    done
done
if ((CONNECT == 1)); then
    measure "simple -C" 10 simple -C
fi

# --- report ------------------------------------------------------------------

SLUICE_VERSION=$("$SLUICE_BIN" --version 2>/dev/null || echo "sluice (unknown version)")
if GIT_DESC=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null); then
    GIT_DESC="git $GIT_DESC"
    if [[ -n $(git -C "$REPO" status --porcelain -- src shared 2>/dev/null | head -n 1) ]]; then
        GIT_DESC="$GIT_DESC + uncommitted changes"
    fi
else
    GIT_DESC="no git commit"
fi

echo
echo "================================================================================"
echo "pgbench -S: direct vs pgbouncer (session) vs sluice, median of $ROUNDS round(s)"
echo "================================================================================"
echo "machine:    nproc=$NPROC${CPU:+, $CPU}, $(uname -sr)"
echo "postgresql: $PG_VERSION"
echo "            fsync=off synchronous_commit=off shared_buffers=256MB, scale $SCALE"
echo "pgbench:    $(pgbench --version)"
echo "pgbouncer:  $("$PGBOUNCER" --version | head -n 1), pool_mode=session, auth_type=plain"
echo "sluice:     $SLUICE_VERSION ($SLUICE_BIN, $GIT_DESC)"
echo "command:    pgbench -n -S -c CLIENTS -j $THREADS -T $DURATION -M MODE -h 127.0.0.1 -p PORT -U $PG_USER $DB"
echo "            (row \"simple -C\" adds -C: a new connection per transaction)"
echo "policy:     $POLICY"
echo "audit:      sluice: $AUDIT$([[ $TRAILS != "$TMP" ]] && echo " (trails in $AUDIT_DIR)")$([[ " ${PATHS[*]} " == *" noaudit "* ]] && echo "; noaudit: a second sluice, same config, [audit] enabled = false")"
echo "paths:      direct    -p $PG_PORT  PGPASSWORD=$PG_PASSWORD (SCRAM)"
echo "            pgbouncer -p $PGB_PORT  PGPASSWORD=$PG_PASSWORD (cleartext to pgbouncer, SCRAM upstream)"
echo "            sluice    -p $GW_PORT  PGPASSWORD=$TOKEN (token, SCRAM upstream)"
[[ -n $ALT_BIN ]] && echo "            alt       -p $ALT_PORT  as sluice, the other build: $ALT_BIN"
echo "            all with PGSSLMODE=disable over TCP on 127.0.0.1; pgbench runs on the same machine"
echo "rounds:     $ROUNDS x ${DURATION}s per path per row, paths interleaved, forward and backward in turn"
echo

python3 - "$RESULTS" "${PATHS[*]}" <<'PY'
import sys
from math import comb
from statistics import median

rows = {}
order = []
for line in open(sys.argv[1]):
    clients, label, path, round_, tps, lat, conn, machine, gateway, writer, ctxt, steal = line.rstrip("\n").split("\t")
    key = (int(clients), label)
    if key not in rows:
        rows[key] = {}
        order.append(key)
    r = rows[key].setdefault(path, {"tps": [], "lat": [], "conn": [], "by_round": {},
                                    "machine": [], "gateway": [], "writer": [], "ctxt": [], "steal": []})
    r["tps"].append(float(tps))
    r["by_round"][round_] = float(tps)
    r["lat"].append(float(lat))
    if conn != "-":
        r["conn"].append(float(conn))
    if machine != "-":
        r["machine"].append(float(machine))
        r["ctxt"].append(float(ctxt))
    if gateway != "-":
        r["gateway"].append(float(gateway))
    if writer != "-":
        r["writer"].append(float(writer))
    if steal != "-":
        r["steal"].append(float(steal))

def med(key, path, what):
    values = rows[key].get(path, {}).get(what, [])
    return median(values) if values else None

paths = sys.argv[2].split()
noaudit = "noaudit" in paths
head = ["clients", "mode", "direct tps", "pgbouncer tps", "sluice tps"]
head += ["noaudit tps"] if noaudit else []
head += ["sluice/direct", "sluice/pgbouncer"]
head += ["sluice/noaudit"] if noaudit else []
head += [f"{x} ms" for x in paths]
table = []
for key in order:
    d, p, s = (med(key, x, "tps") for x in ("direct", "pgbouncer", "sluice"))
    n = med(key, "noaudit", "tps") if noaudit else None
    row = [str(key[0]), key[1], f"{d:.0f}", f"{p:.0f}", f"{s:.0f}"]
    row += [f"{n:.0f}"] if noaudit else []
    row += [f"{s / d:.2f}", f"{s / p:.2f}"]
    row += [f"{s / n:.2f}"] if noaudit else []
    row += [f"{med(key, x, 'lat'):.3f}" for x in paths]
    table.append(row)
widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(head)]
def fmt(cells):
    return "  ".join(c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
print(fmt(head))
print(fmt(["-" * w for w in widths]))
for r in table:
    print(fmt(r))

def median_interval(xs, level=0.95):
    """A distribution-free interval for the median (the sign test's): the
    k-th smallest and k-th largest of the rounds, k as large as keeps the
    chance that the true median lies outside below 1 - level. None with
    fewer than six rounds, which cannot give 95%."""
    n, best = len(xs), None
    for k in range(1, n // 2 + 1):
        tail = sum(comb(n, i) for i in range(k)) / 2**n
        if 1 - 2 * tail < level:
            break
        best = k
    if best is None:
        return None
    s = sorted(xs)
    return s[best - 1], s[n - best]

def paired(a, b, what):
    print()
    print(f"{a}/{b} within each round ({what}, paired), their median and its 95% interval:")
    for key in order:
        on, off = (rows[key].get(x, {}).get("by_round", {}) for x in (a, b))
        ratios = [on[r] / off[r] for r in sorted(on, key=int) if r in off and off[r] > 0]
        if ratios:
            interval = median_interval(ratios)
            shown = f" ({interval[0]:.3f}-{interval[1]:.3f})" if interval else " (6 rounds or more for an interval)"
            print(f"  -c {key[0]} {key[1]}: {' '.join(f'{x:.3f}' for x in ratios)}  median {median(ratios):.3f}{shown}")

if noaudit:
    paired("sluice", "noaudit", "the trail's cost")
if "alt" in paths:
    paired("alt", "sluice", "the other build against this one")
    if noaudit:
        paired("alt", "noaudit", "the other build's trail cost")

print()
print("CPU per transaction, medians in us: the whole machine's (pgbench and PostgreSQL")
print("included), the gateway's, and of that its audit writer thread's; and the")
print("machine's context switches per transaction; and the share of the machine's")
print("time the hypervisor took (steal; rounds where it is high are the noisy ones):")
cpu_head = ["clients", "mode", "path", "machine us", "gateway us", "writer us", "switches", "steal %"]
cpu_rows = []
for key in order:
    for x in paths:
        m, g, w, c, st = (med(key, x, what) for what in ("machine", "gateway", "writer", "ctxt", "steal"))
        if m is None:
            continue
        show = lambda v, f: "-" if v is None else format(v, f)
        cpu_rows.append([str(key[0]), key[1], x, f"{m:.1f}", show(g, ".2f"), show(w, ".2f"), f"{c:.2f}", show(st, ".1f")])
if cpu_rows:
    widths = [max(len(h), *(len(r[i]) for r in cpu_rows)) for i, h in enumerate(cpu_head)]
    for cells in [cpu_head, ["-" * w for w in widths]] + cpu_rows:
        print("  ".join(c.ljust(w) if i in (1, 2) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))))

for key in order:
    conn = [med(key, x, "conn") for x in ("direct", "pgbouncer", "sluice")]
    if all(c is not None for c in conn):
        print()
        print(f"connection setup (-c {key[0]} {key[1]}), median average connection time: "
              f"direct {conn[0]:.3f} ms, pgbouncer {conn[1]:.3f} ms, sluice {conn[2]:.3f} ms")
PY

if [[ -s $TMP/sluice.log ]]; then
    echo
    echo "note: sluice logged $(wc -l <"$TMP/sluice.log") line(s) at ${SLUICE_LOG:-warn} or above; the last ones:"
    tail -n 5 "$TMP/sluice.log"
fi
