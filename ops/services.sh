#!/usr/bin/env bash
# Start (idempotently) every service the sessionq test suite needs, wait until each
# answers, and create the test databases. Safe and fast to run repeatedly.
#
#   bash ops/services.sh
#
# Services (see shared/SERVICES.md): PostgreSQL 15, Redis 7, MariaDB 10.11, and the
# MongoDB-wire-compatible SecantusDB (pinned, in its own venv), and RabbitMQ.
#
# Environment knobs:
#   SESSIONQ_MONGO_VENV     venv for SecantusDB (default ~/.cache/sessionq/venv-mongo)
#   SESSIONQ_WITH_RABBITMQ  0 to skip RabbitMQ (its test then skips locally and fails in CI)
#   SESSIONQ_WAIT_SECONDS   bound for each wait loop (default 60)
#
# Prints the URLs the tests use; exports nothing (it runs as a subprocess).
set -euo pipefail

# Daemons and their helpers live in sbin directories, which a minimal PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

WAIT_SECONDS="${SESSIONQ_WAIT_SECONDS:-60}"
STATE_DIR="${SESSIONQ_STATE_DIR:-$HOME/.cache/sessionq}"
MONGO_VENV="${SESSIONQ_MONGO_VENV:-$STATE_DIR/venv-mongo}"
MONGO_LOG="$STATE_DIR/secantusd.log"
MONGO_PIN="secantusdb==0.7.0b3"
MONGO_VERSION="0.7.0b3"
TEST_DB="sessionq_test"

mkdir -p "$STATE_DIR"

log() { printf 'services: %s\n' "$*" >&2; }
die() { printf 'services: ERROR: %s\n' "$*" >&2; exit 1; }

# Serialise concurrent runs (two test runs at once must not both pip-install or
# both start a server). Every daemon we spawn gets fd 9 closed (9>&-), otherwise it
# would hold the lock forever.
exec 9>"$STATE_DIR/services.lock"
if ! flock -w 300 9; then
    die "could not take $STATE_DIR/services.lock within 300 s (another services.sh stuck?)"
fi

IS_ROOT=0
[ "$(id -u)" = 0 ] && IS_ROOT=1

# Run a command as root: directly when we are root, else through sudo -n if allowed.
as_root() {
    if [ "$IS_ROOT" = 1 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        return 1
    fi
}

port_open() { # port_open PORT  -> 0 when something accepts on 127.0.0.1:PORT
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

tail_log() { # tail_log FILE...  -> last lines of the first existing file
    local f
    for f in "$@"; do
        if [ -r "$f" ]; then
            printf -- '--- last lines of %s ---\n' "$f" >&2
            tail -n 30 "$f" >&2 || true
            return 0
        fi
    done
    printf -- '--- (no log found: %s) ---\n' "$*" >&2
}

# wait_for NAME "LOGFILE ..." CMD...  -> poll CMD until it succeeds, bounded.
wait_for() {
    local name="$1" logs="$2"
    shift 2
    local deadline=$((SECONDS + WAIT_SECONDS))
    while :; do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            printf 'services: ERROR: %s did not come up within %s s\n' "$name" "$WAIT_SECONDS" >&2
            # shellcheck disable=SC2086
            tail_log $logs
            exit 1
        fi
        sleep 0.5
    done
}

# --------------------------------------------------------------------------
# Missing binaries: on a fresh Debian box, install the packages once.
# --------------------------------------------------------------------------
APT_TRIED=0
apt_install_once() {
    [ "$APT_TRIED" = 1 ] && return 1
    APT_TRIED=1
    command -v apt-get >/dev/null 2>&1 || return 1
    [ -r /etc/debian_version ] || return 1
    local pkgs=(redis-server postgresql mariadb-server)
    [ "${SESSIONQ_WITH_RABBITMQ:-1}" = 1 ] && pkgs+=(rabbitmq-server)
    log "installing missing service packages: ${pkgs[*]} (apt-get)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 || return 1
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${pkgs[@]}" >&2 || return 1
}

have_bin() { command -v "$1" >/dev/null 2>&1 || [ -x "$1" ]; }

need_bins() { # need_bins SERVICE BIN...
    local service="$1" b missing=0
    shift
    for b in "$@"; do have_bin "$b" || missing=1; done
    if [ "$missing" = 1 ]; then
        apt_install_once || true
        for b in "$@"; do
            have_bin "$b" || die "$service: '$b' not found; install it (Debian: apt-get install -y redis-server postgresql mariadb-server)"
        done
    fi
}

# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------
pg_ready() { pg_isready -q -h 127.0.0.1 -p 5432 -t 2; }
pg_psql() { psql -X -q -h 127.0.0.1 -p 5432 -U postgres -d postgres -v ON_ERROR_STOP=1 "$@"; }

start_postgres() {
    need_bins postgresql pg_isready psql pg_ctlcluster
    local ver logs rc=0
    ver="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1 || true)"
    [ -n "$ver" ] || die "postgresql: no cluster under /etc/postgresql (try: pg_createcluster 15 main)"
    logs="/var/log/postgresql/postgresql-$ver-main.log"
    pg_isready -q -h 127.0.0.1 -p 5432 -t 2 || rc=$?
    if [ "$rc" = 2 ] || [ "$rc" = 3 ]; then # 2 = no response, 3 = no attempt
        log "starting postgresql $ver"
        as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start 9>&- >&2 \
            || log "postgresql: start command failed (maybe already starting); waiting anyway"
    fi
    wait_for postgresql "$logs" pg_ready

    # Fresh Debian installs use scram for TCP; the tests connect as postgres with no
    # password over 127.0.0.1, so allow trust on loopback (this is a test machine).
    if ! pg_psql -tAc 'select 1' >/dev/null 2>&1; then
        local hba="/etc/postgresql/$ver/main/pg_hba.conf"
        if [ -w "$hba" ] || [ "$IS_ROOT" = 1 ]; then
            log "postgresql: enabling trust auth for 127.0.0.1 and ::1 in $hba"
            as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
            as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main reload 9>&- >&2 || true
            sleep 1
        fi
        pg_psql -tAc 'select 1' >/dev/null \
            || die "postgresql: cannot log in as postgres@127.0.0.1 without a password (needs trust auth in pg_hba.conf)"
    fi

    if [ "$(pg_psql -tAc "select 1 from pg_database where datname = '$TEST_DB'")" != 1 ]; then
        log "postgresql: creating database $TEST_DB"
        pg_psql -c "create database $TEST_DB" >&2 \
            || [ "$(pg_psql -tAc "select 1 from pg_database where datname = '$TEST_DB'")" = 1 ] \
            || die "postgresql: could not create database $TEST_DB"
    fi

    # The tests rely on durable commits; leave synchronous_commit at its default.
    local sc
    sc="$(pg_psql -tAc 'show synchronous_commit' 2>/dev/null || true)"
    if [ -n "$sc" ] && [ "$sc" != on ]; then
        log "postgresql: WARNING synchronous_commit is '$sc' (default is 'on'); not changing it"
    fi
}

# --------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------
redis_ready() { [ "$(timeout 3 redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; }

start_redis() {
    need_bins redis redis-server redis-cli
    if ! redis_ready; then
        as_root mkdir -p /var/lib/redis /var/log/redis || die "redis: cannot create /var/lib/redis /var/log/redis"
        log "starting redis"
        as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
            --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log 9>&- >&2 \
            || log "redis: start command failed; waiting anyway"
    fi
    wait_for redis /var/log/redis/ci.log redis_ready
}

# --------------------------------------------------------------------------
# MariaDB
# --------------------------------------------------------------------------
MYSQL_LOGS="/var/log/mysql/error.log /var/lib/mysql/$(hostname 2>/dev/null || echo localhost).err"
mysql_alive() { mysqladmin --no-defaults --protocol=tcp -h127.0.0.1 -P3306 --connect-timeout=2 ping >/dev/null 2>&1; }
mysql_tcp() { mariadb --protocol=tcp -uroot -h127.0.0.1 -P3306 --connect-timeout=3 "$@"; }

start_mariadb() {
    need_bins mariadb mariadb mysqladmin /usr/sbin/mariadbd start-stop-daemon
    if ! mysql_alive; then
        # mariadbd refuses to run as root; it runs as mysql and needs /run/mysqld.
        as_root mkdir -p /run/mysqld || true
        as_root chown mysql:mysql /run/mysqld 2>/dev/null || true
        if [ ! -d /var/lib/mysql/mysql ] && have_bin mariadb-install-db; then
            log "mariadb: initialising /var/lib/mysql"
            as_root mariadb-install-db --user=mysql --datadir=/var/lib/mysql >&2 \
                || die "mariadb: mariadb-install-db failed"
        fi
        log "starting mariadb"
        as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd \
            -- --user=mysql 9>&- >&2 \
            || log "mariadb: start command failed; waiting anyway"
    fi
    # shellcheck disable=SC2086
    wait_for mariadb "$MYSQL_LOGS" mysql_alive

    # Debian's default root@localhost uses unix_socket auth; the tests log in as root
    # with an empty password over TCP. Fix that up through the socket if needed.
    if ! mysql_tcp -e 'select 1' >/dev/null 2>&1; then
        log "mariadb: root over TCP refused; allowing root@127.0.0.1/localhost with empty password"
        as_root mariadb -uroot -e "
            CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '';
            GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;
            ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD('') OR unix_socket;
            FLUSH PRIVILEGES;" >&2 || true
        mysql_tcp -e 'select 1' >/dev/null \
            || die "mariadb: cannot log in as root@127.0.0.1 with an empty password"
    fi

    mysql_tcp -e "CREATE DATABASE IF NOT EXISTS \`$TEST_DB\` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci" \
        || die "mariadb: could not create database $TEST_DB"
}

# --------------------------------------------------------------------------
# SecantusDB (MongoDB wire protocol) in its own venv
# --------------------------------------------------------------------------
MONGO_PY="$MONGO_VENV/bin/python"
mongo_ping() {
    "$MONGO_PY" - <<'EOF'
import pymongo
c = pymongo.MongoClient("mongodb://127.0.0.1:27017/?retryWrites=false",
                        serverSelectionTimeoutMS=1500, connectTimeoutMS=1500)
try:
    c.admin.command("ping")
finally:
    c.close()
EOF
}

ensure_mongo_venv() {
    if [ ! -x "$MONGO_PY" ]; then
        log "creating venv $MONGO_VENV"
        python3 -m venv "$MONGO_VENV" >&2 || die "mongodb: python3 -m venv $MONGO_VENV failed (Debian: apt-get install python3-venv)"
    fi
    if [ ! -x "$MONGO_VENV/bin/secantusd-py" ] \
        || [ "$("$MONGO_PY" -c 'import importlib.metadata as m; print(m.version("secantusdb"))' 2>/dev/null)" != "$MONGO_VERSION" ]; then
        log "installing $MONGO_PIN into $MONGO_VENV"
        local t0=$SECONDS
        "$MONGO_PY" -m pip install -q --disable-pip-version-check "$MONGO_PIN" >&2 \
            || die "mongodb: pip install $MONGO_PIN failed"
        log "installed $MONGO_PIN in $((SECONDS - t0)) s"
    fi
    if ! "$MONGO_PY" -c 'import pymongo' >/dev/null 2>&1; then
        log "installing pymongo into $MONGO_VENV"
        "$MONGO_PY" -m pip install -q --disable-pip-version-check pymongo >&2 \
            || die "mongodb: pip install pymongo failed"
    fi
}

mongo_pid_alive() {
    local pid
    pid="$(cat "$STATE_DIR/secantusd.pid" 2>/dev/null || true)"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

start_mongo() {
    if port_open 27017 && [ -x "$MONGO_PY" ] && "$MONGO_PY" -c 'import pymongo' >/dev/null 2>&1 \
        && mongo_ping >/dev/null 2>&1; then
        return 0 # already up (SecantusDB or a real mongod): nothing to install or start
    fi
    ensure_mongo_venv
    # Start it when nothing listens on 27017. A server that is shutting down keeps the
    # port for a few seconds: keep polling, and start ours once the port is free.
    local deadline=$((SECONDS + WAIT_SECONDS)) started=0
    while :; do
        if port_open 27017 && mongo_ping >/dev/null 2>&1; then
            return 0
        fi
        if [ "$started" = 0 ] && ! port_open 27017 && ! mongo_pid_alive; then
            log "starting SecantusDB on 127.0.0.1:27017 (log: $MONGO_LOG)"
            setsid nohup "$MONGO_VENV/bin/secantusd-py" --host 127.0.0.1 --port 27017 \
                --storage-path :memory: --log-level WARNING \
                </dev/null >"$MONGO_LOG" 2>&1 9>&- &
            echo $! >"$STATE_DIR/secantusd.pid"
            started=1
        elif [ "$started" = 1 ] && ! mongo_pid_alive; then
            printf 'services: ERROR: mongodb (SecantusDB) exited during startup\n' >&2
            tail_log "$MONGO_LOG"
            exit 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            printf 'services: ERROR: mongodb (SecantusDB) did not answer ping within %s s\n' "$WAIT_SECONDS" >&2
            tail_log "$MONGO_LOG"
            exit 1
        fi
        sleep 0.5
    done
}

# --------------------------------------------------------------------------
# RabbitMQ (optional)
# --------------------------------------------------------------------------
start_rabbitmq() {
    need_bins rabbitmq rabbitmq-server
    if ! port_open 5672; then
        log "starting rabbitmq"
        as_root rabbitmq-server -detached 9>&- >/dev/null 2>&1 \
            || log "rabbitmq: start command failed; waiting anyway"
    fi
    wait_for rabbitmq "$(ls -t /var/log/rabbitmq/*.log 2>/dev/null | head -n 1 || true)" port_open 5672
}

# --------------------------------------------------------------------------
start_postgres
start_redis
start_mariadb
start_mongo
with_rabbit=0
if [ "${SESSIONQ_WITH_RABBITMQ:-1}" = 1 ]; then
    start_rabbitmq
    with_rabbit=1
fi

echo "ok  postgresql 127.0.0.1:5432 (database $TEST_DB)"
echo "ok  redis      127.0.0.1:6379 (tests flush database 15 only)"
echo "ok  mariadb    127.0.0.1:3306 (database $TEST_DB)"
echo "ok  mongodb    127.0.0.1:27017 (SecantusDB or mongod)"
[ "$with_rabbit" = 1 ] && echo "ok  rabbitmq   127.0.0.1:5672"
echo "SESSIONQ_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:5432/$TEST_DB"
echo "SESSIONQ_TEST_MYSQL_URL=mysql://root@127.0.0.1:3306/$TEST_DB"
echo "SESSIONQ_TEST_REDIS_URL=redis://127.0.0.1:6379/15"
echo "SESSIONQ_TEST_MONGO_URL=mongodb://127.0.0.1:27017/$TEST_DB?retryWrites=false"
