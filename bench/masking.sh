#!/usr/bin/env bash
# Sluice masking benchmark: fetching a large result through Sluice (masking
# on) versus directly from PostgreSQL.
#
# What it measures
#   The wall time of fetching a whole customers-like table of ROWS rows
#   (id, name, email, phone, card, note: every row holds an email, a phone
#   number and a Luhn-valid card, and some notes hold one too) over two paths
#   to the same throwaway PostgreSQL cluster, over TCP on 127.0.0.1 without
#   TLS:
#     direct  client -> PostgreSQL (SCRAM as role "bench")
#     sluice  client -> sluice (service token as the password) -> PostgreSQL
#             (SCRAM as "bench"), with the default masking: no [masking]
#             section, so every content detector runs on every value
#   with two clients:
#     query   bench/fetch.rs (tokio-postgres): SELECT * FROM customers,
#             rows read one at a time from query_raw's stream (extended
#             protocol, binary results)
#     copy    psql -X -c "COPY customers TO STDOUT" > /dev/null
#   For each client it runs ROUNDS rounds; each round runs both paths one
#   after the other, the starting path alternating every round, so that drift
#   on the machine hits both alike. It prints the MEDIAN wall time of each
#   path, the ratio sluice/direct (target: <= 1.5), and Sluice's peak and
#   current resident memory (VmHWM and VmRSS of the sluice process after all
#   runs; target: peak < 64 MB whatever ROWS is).
#
#   Before measuring it checks that masking is on: one row read through
#   Sluice (simple query, and COPY) must show "****@example.com" where the
#   same row read directly shows "user1@example.com". Every query run also
#   checks the row count and the masked emails it received (all of them
#   through Sluice, none directly). Any failure stops the script.
#
# Settings (environment variables)
#   ROUNDS=3               rounds per client (median over these)
#   ROWS=1000000           rows in the table (about 150 bytes of values each)
#   ONLY_CLIENTS="query copy"  clients to run
#   WARMUP=1               unrecorded fetches per path and client before
#                          measuring (0: none)
#   SLUICE_BIN=target/release/sluice   gateway binary (built if missing)
#   FETCH_BIN=...          the query client; by default built and located
#                          with `cargo bench --bench fetch --no-run`
#   SLUICE_PG_BIN=...      PostgreSQL bin dir (default: highest version under
#                          /usr/lib/postgresql/*/bin, else pg_config --bindir)
#   SLUICE_LOG=warn        the gateway's log filter
#
#   With the defaults (on a 2-core VM): loading 1M rows takes a few seconds,
#   each fetch under a second, the whole run about a minute after building
#   the client. ROWS=5000000 makes an 800 MB table and 2-5 s fetches.
#
# Usage (from anywhere; the script works from the repository root)
#   bench/masking.sh
#   ROUNDS=1 ROWS=100000 bench/masking.sh           # quick check
#   ROUNDS=1 ROWS=5000000 bench/masking.sh          # memory stays flat?
#   ONLY_CLIENTS=copy bench/masking.sh
#
# Needs: psql, python3, sha256sum, cargo (unless FETCH_BIN is set) and the
# PostgreSQL server binaries. When run as root the PostgreSQL cluster runs as
# the "postgres" user. Everything lives in a temporary directory that is
# removed on exit, ctrl-c included. See bench/README.md for how to read the
# output.

set -euo pipefail
export LC_ALL=C

ROUNDS=${ROUNDS:-3}
ROWS=${ROWS:-1000000}
ONLY_CLIENTS=${ONLY_CLIENTS:-"query copy"}
WARMUP=${WARMUP:-1}
PATHS=(direct sluice)

PG_USER=bench
PG_PASSWORD=bench-pw
DB=bench
TOKEN=bench-token-0123456789
QUERY="SELECT * FROM customers"
COPY="COPY customers TO STDOUT"
# The targets the issue sets; the report says whether they were met.
RATIO_TARGET=1.5
RSS_TARGET_MB=64

die() {
    echo "masking.sh: $*" >&2
    exit 1
}

# need_uint NAME VALUE MIN: VALUE must be an integer >= MIN.
need_uint() {
    if ! [[ $2 =~ ^[0-9]+$ ]] || (($2 < $3)); then
        die "$1 must be an integer >= $3, not '$2'"
    fi
}
need_uint ROUNDS "$ROUNDS" 1
need_uint ROWS "$ROWS" 1
need_uint WARMUP "$WARMUP" 0
read -ra CLIENTS <<<"$ONLY_CLIENTS"
((${#CLIENTS[@]} > 0)) || die "ONLY_CLIENTS is empty (write query, copy or both)"
for c in "${CLIENTS[@]}"; do
    [[ $c == query || $c == copy ]] || die "ONLY_CLIENTS: '$c' is not query or copy"
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
SLUICE_BIN=${SLUICE_BIN:-target/release/sluice}
FETCH_BIN=${FETCH_BIN:-}

# --- tools -------------------------------------------------------------------

for tool in psql python3 sha256sum; do
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

if [[ ! -x $SLUICE_BIN ]]; then
    echo "$SLUICE_BIN is missing: running cargo build --release"
    cargo build --release
    [[ -x $SLUICE_BIN ]] || die "cargo build --release did not produce $SLUICE_BIN"
fi
stale=$(find src shared/src Cargo.toml shared/Cargo.toml -newer "$SLUICE_BIN" -type f -print -quit 2>/dev/null || true)
if [[ -n $stale ]]; then
    echo "warning: $SLUICE_BIN is older than $stale: run cargo build --release to measure current code" >&2
fi

if [[ " ${CLIENTS[*]} " == *" query "* ]]; then
    if [[ -n $FETCH_BIN ]]; then
        [[ -x $FETCH_BIN ]] || die "FETCH_BIN=$FETCH_BIN is not an executable"
    else
        command -v cargo >/dev/null || die "cargo is not on PATH (or set FETCH_BIN to a built bench/fetch.rs)"
        echo "building the query client: cargo bench --bench fetch --no-run"
        # The executable's path comes from cargo's own report, which honours
        # CARGO_TARGET_DIR and the hash in the file name.
        FETCH_BIN=$(cargo bench --bench fetch --no-run --message-format=json-render-diagnostics |
            python3 -c '
import json, sys
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == "fetch" \
            and msg.get("executable"):
        print(msg["executable"])
') || die "cargo bench --bench fetch --no-run failed (it compiles the whole package; FETCH_BIN=PATH uses a fetch client built earlier)"
        [[ -n $FETCH_BIN && -x $FETCH_BIN ]] || die "cargo bench --bench fetch --no-run did not report an executable"
    fi
fi

# PostgreSQL refuses to run as root. Runs from $TMP so that the postgres user
# never starts in a directory it may not read.
as_pg() {
    if [[ $EUID -eq 0 ]]; then
        (cd "$TMP" && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

# --- scratch space and cleanup ---------------------------------------------

TMP=$(mktemp -d "${TMPDIR:-/tmp}/sluice-masking.XXXXXX")
[[ $EUID -eq 0 ]] && chown postgres:postgres "$TMP"
SLUICE_PID=

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [[ -n $SLUICE_PID ]] && kill -0 "$SLUICE_PID" 2>/dev/null; then
        kill -TERM "$SLUICE_PID" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$SLUICE_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SLUICE_PID" 2>/dev/null
        wait "$SLUICE_PID" 2>/dev/null
    fi
    if [[ -f $TMP/data/postmaster.pid ]]; then
        as_pg "$PG_BIN/pg_ctl" -D "$TMP/data" -m fast -w -t 30 stop >/dev/null 2>&1 ||
            kill -KILL "$(head -n 1 "$TMP/data/postmaster.pid")" 2>/dev/null
    fi
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Two distinct free TCP ports on 127.0.0.1.
read -r PG_PORT GW_PORT < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
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
max_connections = 20
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

# Every row: an email, a North American phone number and a Luhn-valid test
# card from five networks' test numbers (Visa, Mastercard, Amex, Discover).
# Notes are free text with order numbers, amounts and dates that the
# detectors must leave alone; one in ten holds a phone number and one in ten
# another email address, as a support note would.
echo "loading $ROWS rows into customers (direct)"
load_start=$EPOCHREALTIME
PGPASSWORD=$PG_PASSWORD psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d "$DB" \
    >"$TMP/load.log" 2>&1 <<EOF || { cat "$TMP/load.log" >&2; die "loading the customers table failed"; }
CREATE TABLE customers (
    id    integer PRIMARY KEY,
    name  text NOT NULL,
    email text NOT NULL,
    phone text NOT NULL,
    card  text NOT NULL,
    note  text
);
INSERT INTO customers
SELECT g,
       (ARRAY['Alice','Bruno','Chen','Dana','Emeka','Fatima','Goran','Hana','Ines','Jonas'])[1 + g % 10]
           || ' ' ||
       (ARRAY['Smith','Okafor','Nguyen','Garcia','Kowalski','Haddad','Larsen','Tanaka','Silva','Novak'])[1 + (g / 10) % 10],
       'user' || g || '@example.com',
       '+1-415-555-' || lpad((g % 10000)::text, 4, '0'),
       (ARRAY['4111111111111111','5555555555554444','378282246310005','6011111111111117','4012888888881881'])[1 + g % 5],
       CASE g % 10
           WHEN 0 THEN 'Asked to be called back on +1-212-555-' || lpad((g % 7919)::text, 4, '0') || ' after 5pm'
           WHEN 5 THEN 'Invoices go to billing' || g || '@example.org, not the account address'
           ELSE 'Order #' || (100000 + g) || ' of ' || (g % 97 + 1) || ' items, total '
                || ((g % 50000) / 100.0)::numeric(10, 2) || ' USD, shipped '
                || (date '2024-01-01' + g % 700)
       END
FROM generate_series(1, $ROWS) AS g;
VACUUM (ANALYZE) customers;
EOF
# CHECKPOINT needs a superuser; bench only owns the database.
psql -X -q -h "$TMP/sock" -p "$PG_PORT" -U postgres -d "$DB" -c CHECKPOINT >/dev/null
LOAD_SECONDS=$(python3 -c "print(f'{$EPOCHREALTIME - $load_start:.1f}')")
TABLE_SIZE=$(psql -X -At -h "$TMP/sock" -p "$PG_PORT" -U postgres -d "$DB" \
    -c "SELECT pg_size_pretty(pg_table_size('customers'))")
echo "  loaded in ${LOAD_SECONDS}s, table size $TABLE_SIZE"

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

# --- sluice ------------------------------------------------------------------

echo "starting sluice ($SLUICE_BIN) on 127.0.0.1:$GW_PORT"
TOKEN_SHA=$(printf %s "$TOKEN" | sha256sum | cut -d' ' -f1)
# No [masking] section: the defaults (every detector, on every value) are
# what is measured.
cat >"$TMP/sluice.toml" <<EOF
[server]
listen = "127.0.0.1:$GW_PORT"
allow_plaintext = true
shutdown_grace = "1s"

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

# No control API: the benchmark needs no fixed port of its own.
[api]
enabled = false
EOF
"$SLUICE_BIN" config check --config "$TMP/sluice.toml" >"$TMP/config-check.log" 2>&1 ||
    { cat "$TMP/config-check.log" >&2; die "sluice config check rejected the generated $TMP/sluice.toml"; }
# In its own session, like the postmaster (pg_ctl): a ctrl-c on the terminal
# then stops only the clients and this script, whose trap stops the servers.
SETSID=()
command -v setsid >/dev/null && SETSID=(setsid)
SLUICE_LOG=${SLUICE_LOG:-warn} "${SETSID[@]}" "$SLUICE_BIN" serve --config "$TMP/sluice.toml" \
    >"$TMP/sluice.log" 2>&1 &
SLUICE_PID=$!
# shellcheck disable=SC2016 # evaluated later by wait_for
wait_for sluice "$GW_PORT" "$TOKEN" 'kill -0 "$SLUICE_PID" 2>/dev/null' "$TMP/sluice.log"
# setsid execs in place when it need not fork; when it did fork, the gateway
# is its only child. Memory must be read from the gateway itself.
if [[ $(cat "/proc/$SLUICE_PID/comm" 2>/dev/null) != sluice ]]; then
    child=$(cat "/proc/$SLUICE_PID/task/$SLUICE_PID/children" 2>/dev/null || true)
    child=${child%% *}
    [[ -n $child && $(cat "/proc/$child/comm" 2>/dev/null) == sluice ]] ||
        die "cannot find the sluice process under pid $SLUICE_PID to read its memory"
    SLUICE_PID=$child
fi

# status_kb FIELD: a field of the gateway's /proc status, in kB.
status_kb() {
    sed -n "s/^$1:[[:space:]]*\([0-9]*\) kB$/\1/p" "/proc/$SLUICE_PID/status"
}
# cpu_ticks: user + system CPU time of the gateway so far, in clock ticks.
cpu_ticks() {
    local stat f
    stat=$(<"/proc/$SLUICE_PID/stat")
    # Fields after the command name (which may hold spaces): utime is the
    # 12th, stime the 13th.
    read -ra f <<<"${stat##*) }"
    echo $((f[11] + f[12]))
}
CLK_TCK=$(getconf CLK_TCK)
IDLE_RSS_KB=$(status_kb VmRSS)

path_port() {
    if [[ $1 == sluice ]]; then echo "$GW_PORT"; else echo "$PG_PORT"; fi
}
path_password() {
    if [[ $1 == sluice ]]; then echo "$TOKEN"; else echo "$PG_PASSWORD"; fi
}
# on PATH psql-args...: psql through a path, unaligned, tuples only.
on() {
    local path=$1
    shift
    PGPASSWORD=$(path_password "$path") psql -X -At -v ON_ERROR_STOP=1 -h 127.0.0.1 \
        -p "$(path_port "$path")" -U "$PG_USER" -d "$DB" "$@"
}
show_sluice_log() {
    echo "--- sluice log (tail)" >&2
    tail -n 20 "$TMP/sluice.log" >&2
}

# --- is masking on? ----------------------------------------------------------

echo "checking that masking is on"
SAMPLE_SQL="SELECT * FROM customers WHERE id = 1"
DIRECT_ROW=$(on direct -c "$SAMPLE_SQL") || die "reading row 1 directly failed"
SLUICE_ROW=$(on sluice -c "$SAMPLE_SQL") || { show_sluice_log; die "reading row 1 through sluice failed"; }
DIRECT_EMAIL=$(on direct -c "SELECT email FROM customers WHERE id = 1")
SLUICE_EMAIL=$(on sluice -c "SELECT email FROM customers WHERE id = 1")
SLUICE_COPY=$(on sluice -c "COPY ($SAMPLE_SQL) TO STDOUT")
echo "  direct: $DIRECT_ROW"
echo "  sluice: $SLUICE_ROW"
echo "  sluice: $SLUICE_COPY (COPY)"
[[ $DIRECT_EMAIL == user1@example.com ]] ||
    die "row 1 read directly has email '$DIRECT_EMAIL', expected user1@example.com: the table is not what this script loaded"
[[ $SLUICE_EMAIL == '****@example.com' ]] ||
    die "row 1 read through sluice has email '$SLUICE_EMAIL', expected ****@example.com: masking is NOT on, the numbers would mean nothing"
[[ $SLUICE_COPY == *$'\t****@example.com\t'* && $SLUICE_COPY != *user1@example.com* ]] ||
    die "COPY of row 1 through sluice does not show ****@example.com: COPY TO STDOUT is NOT masked"

# --- running the clients -----------------------------------------------------

# run_client CLIENT PATH: one whole fetch. Sets SECONDS_TAKEN (wall time of
# the client process, connection included), SLUICE_CPU (seconds of CPU the
# gateway used during it, "-" on the direct path) and DETAIL.
run_client() {
    local client=$1 path=$2 out=$TMP/run.out err=$TMP/run.err start end ticks=0 rows masked
    [[ $path == sluice ]] && ticks=$(cpu_ticks)
    start=$EPOCHREALTIME
    case $client in
    query)
        PGPASSWORD=$(path_password "$path") "$FETCH_BIN" \
            "host=127.0.0.1 port=$(path_port "$path") user=$PG_USER dbname=$DB sslmode=disable" \
            "$QUERY" >"$out" 2>"$err" || {
            echo "the query client failed on the $path path:" >&2
            cat "$err" "$out" >&2
            [[ $path == sluice ]] && show_sluice_log
            exit 1
        }
        ;;
    copy)
        PGPASSWORD=$(path_password "$path") psql -X -v ON_ERROR_STOP=1 -h 127.0.0.1 \
            -p "$(path_port "$path")" -U "$PG_USER" -d "$DB" -c "$COPY" >/dev/null 2>"$err" || {
            echo "psql COPY failed on the $path path:" >&2
            cat "$err" >&2
            [[ $path == sluice ]] && show_sluice_log
            exit 1
        }
        ;;
    esac
    end=$EPOCHREALTIME
    SECONDS_TAKEN=$(python3 -c "print(f'{$end - $start:.3f}')")
    SLUICE_CPU=-
    if [[ $path == sluice ]]; then
        SLUICE_CPU=$(python3 -c "print(f'{($(cpu_ticks) - $ticks) / $CLK_TCK:.2f}')")
    fi
    DETAIL=
    if [[ $client == query ]]; then
        rows=$(sed -n 's/.*rows=\([0-9]*\).*/\1/p' "$out")
        masked=$(sed -n 's/.*masked_emails=\([0-9]*\).*/\1/p' "$out")
        [[ $rows == "$ROWS" ]] || die "the query client received '$rows' rows on the $path path, expected $ROWS: $(cat "$out")"
        if [[ $path == sluice && $masked != "$ROWS" ]]; then
            die "only $masked of $ROWS emails arrived masked through sluice: masking is NOT on for every row"
        fi
        if [[ $path == direct && $masked != 0 ]]; then
            die "$masked emails arrived masked directly from PostgreSQL: the table is not what this script loaded"
        fi
        DETAIL="  rows $rows, masked emails $masked"
    fi
}

RESULTS=$TMP/results.tsv
: >"$RESULTS"

NPROC=$(nproc)
CPU=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -n 1)

for client in "${CLIENTS[@]}"; do
    for ((w = 1; w <= WARMUP; w++)); do
        for path in "${PATHS[@]}"; do
            run_client "$client" "$path"
            printf '  %-5s warm-up %d/%d  %-6s  %8.3f s%s\n' "$client" "$w" "$WARMUP" "$path" "$SECONDS_TAKEN" "$DETAIL"
        done
    done
    for ((round = 1; round <= ROUNDS; round++)); do
        for ((i = 0; i < ${#PATHS[@]}; i++)); do
            path=${PATHS[(i + round - 1) % ${#PATHS[@]}]}
            run_client "$client" "$path"
            mem=
            [[ $path == sluice ]] && mem="  sluice cpu ${SLUICE_CPU}s, VmHWM $(($(status_kb VmHWM) / 1024)) MB"
            printf '  %-5s round %d/%d  %-6s  %8.3f s%s%s\n' \
                "$client" "$round" "$ROUNDS" "$path" "$SECONDS_TAKEN" "$mem" "$DETAIL"
            printf '%s\t%s\t%s\t%s\t%s\n' "$client" "$path" "$round" "$SECONDS_TAKEN" "$SLUICE_CPU" >>"$RESULTS"
        done
    done
done

kill -0 "$SLUICE_PID" 2>/dev/null || die "sluice exited during the runs"
HWM_KB=$(status_kb VmHWM)
RSS_KB=$(status_kb VmRSS)

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
echo "masking: fetching $ROWS rows direct vs through sluice (masking on), median of $ROUNDS round(s)"
echo "================================================================================"
echo "machine:    nproc=$NPROC${CPU:+, $CPU}, $(uname -sr)"
echo "postgresql: $PG_VERSION"
echo "            fsync=off shared_buffers=256MB; customers: $ROWS rows, $TABLE_SIZE"
echo "sluice:     $SLUICE_VERSION ($SLUICE_BIN, $GIT_DESC)"
echo "            no [masking] section: every content detector on every value"
echo "clients:    query  ${FETCH_BIN:-bench/fetch.rs} 'host=127.0.0.1 port=PORT user=$PG_USER dbname=$DB sslmode=disable' '$QUERY'"
echo "                   (tokio-postgres query_raw, rows streamed one at a time, binary format)"
echo "            copy   psql -X -h 127.0.0.1 -p PORT -U $PG_USER -d $DB -c \"$COPY\" > /dev/null"
echo "            $(psql --version)"
echo "paths:      direct -p $PG_PORT  PGPASSWORD=$PG_PASSWORD (SCRAM)"
echo "            sluice -p $GW_PORT  PGPASSWORD=$TOKEN (token, SCRAM upstream)"
echo "            both with PGSSLMODE=disable over TCP on 127.0.0.1; clients run on the same machine"
echo "rounds:     $ROUNDS per client after $WARMUP warm-up fetch(es) per path, paths interleaved in alternating order"
echo

python3 - "$RESULTS" "$ROWS" "$RATIO_TARGET" <<'PY'
import sys
from statistics import median

results, rows, ratio_target = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
runs = {}
order = []
for line in open(results):
    client, path, _round, seconds, cpu = line.rstrip("\n").split("\t")
    if client not in runs:
        runs[client] = {"direct": [], "sluice": [], "cpu": []}
        order.append(client)
    runs[client][path].append(float(seconds))
    if cpu != "-":
        runs[client]["cpu"].append(float(cpu))

head = ["client", "direct s", "sluice s", "sluice/direct", "target", "direct rows/s", "sluice rows/s",
        "sluice cpu s", "direct range s", "sluice range s"]
table = []
for client in order:
    r = runs[client]
    d, s = median(r["direct"]), median(r["sluice"])
    table.append([
        client, f"{d:.3f}", f"{s:.3f}", f"{s / d:.2f}",
        f"<= {ratio_target:g} " + ("met" if s / d <= ratio_target else "MISSED"),
        f"{rows / d:,.0f}", f"{rows / s:,.0f}", f"{median(r['cpu']):.2f}",
        f"{min(r['direct']):.3f}..{max(r['direct']):.3f}",
        f"{min(r['sluice']):.3f}..{max(r['sluice']):.3f}",
    ])
widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(head)]
def fmt(cells):
    return "  ".join(c.ljust(w) if i in (0, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
print(fmt(head))
print(fmt(["-" * w for w in widths]))
for row in table:
    print(fmt(row))
PY

echo
HWM_MB=$(python3 -c "print(f'{$HWM_KB / 1024:.1f}')")
printf 'sluice memory: peak (VmHWM) %s MB, now (VmRSS) %.1f MB, idle after start %.1f MB; target peak < %d MB: %s\n' \
    "$HWM_MB" "$(python3 -c "print($RSS_KB / 1024)")" "$(python3 -c "print($IDLE_RSS_KB / 1024)")" \
    "$RSS_TARGET_MB" "$( ((HWM_KB < RSS_TARGET_MB * 1024)) && echo met || echo MISSED)"

if [[ -s $TMP/sluice.log ]]; then
    echo
    echo "note: sluice logged $(wc -l <"$TMP/sluice.log") line(s) at ${SLUICE_LOG:-warn} or above; the last ones:"
    tail -n 5 "$TMP/sluice.log"
fi
