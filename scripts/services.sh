# Loopback servers for local runs and tests, started only when nothing answers already.
# Source it, then call: ensure_venv, ensure_redis URL, ensure_postgres PORT; and, when done,
# stop_started_servers, which stops only what these functions started (a server that was
# already running is left as it was) and removes a PostgreSQL cluster they created. Started
# servers keep their data and logs under $STATE_DIR (default .local/) while they run.

STATE_DIR=${STATE_DIR:-$PWD/.local}
STARTED_SERVERS=()   # how to stop each server started here, one command line each

say() { printf '==> %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        say "need root to run: $*"; return 1; fi
}

apt_install() {
    say "installing $* (Debian packages)"
    as_root apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

ensure_venv() {
    VENV=${VENV:-$PWD/.venv}
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating virtualenv $VENV"
        python3 -m venv "$VENV"
    fi
    if [ requirements.txt -nt "$VENV/.installed" ] || [ requirements-test.txt -nt "$VENV/.installed" ]; then
        say "installing requirements"
        "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements-test.txt 2>&1 \
            | { grep -v "^WARNING: Location" || true; } >&2
        touch "$VENV/.installed"
    fi
    # The package itself, editable, so the venv has the `bouncer` command; only in a venv of this
    # checkout's own (a link to another checkout's venv is that checkout's business).
    if [ ! -x "$VENV/bin/bouncer" ] && [[ "$(realpath "$VENV")" == "$(realpath "$PWD")"/* ]]; then
        say "installing this checkout into $VENV (editable: the bouncer command)"
        "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation -e . >&2
    fi
    PY="$VENV/bin/python"
}

# ensure_redis redis://HOST:PORT/DB -- start a throwaway redis-server there if none answers.
ensure_redis() {
    local url=$1 hostport port
    hostport=${url#redis://}; hostport=${hostport%%/*}; port=${hostport##*:}
    if "$PY" -c "import redis,sys; redis.Redis.from_url(sys.argv[1], socket_connect_timeout=1).ping()" "$url" 2>/dev/null; then
        return 0
    fi
    command -v redis-server >/dev/null || apt_install redis-server
    mkdir -p "$STATE_DIR/redis-$port"
    say "starting redis-server on 127.0.0.1:$port"
    redis-server --port "$port" --bind 127.0.0.1 --daemonize yes --save "" --appendonly no \
        --dir "$STATE_DIR/redis-$port" --logfile "$STATE_DIR/redis-$port/redis.log" \
        --pidfile "$STATE_DIR/redis-$port/redis.pid" >/dev/null
    STARTED_SERVERS+=("redis-cli -p $port shutdown nosave")
    for _ in $(seq 50); do
        redis-cli -p "$port" ping >/dev/null 2>&1 && return 0; sleep 0.1
    done
    say "redis-server did not start; see $STATE_DIR/redis-$port/redis.log"; return 1
}

pg_bin() {
    if command -v pg_ctl >/dev/null && command -v initdb >/dev/null; then dirname "$(command -v pg_ctl)"; return; fi
    local found
    found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$found" ]; then apt_install postgresql; found=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1); fi
    echo "$found"
}

# ensure_postgres PORT -- a throwaway cluster on 127.0.0.1:PORT (trust auth, user postgres).
# PostgreSQL refuses to run as root, so as root the cluster runs as the `postgres` user.
ensure_postgres() {
    local port=$1 bin dir run
    if "$PY" -c "import psycopg2,sys; psycopg2.connect(host='127.0.0.1', port=sys.argv[1], user='postgres', dbname='postgres', connect_timeout=2).close()" "$port" 2>/dev/null; then
        return 0
    fi
    # Under /tmp, not the checkout: the `postgres` user must be able to reach it.
    bin=$(pg_bin); dir="${TMPDIR:-/tmp}/bouncer-postgres-$port"
    run=()
    if [ "$(id -u)" = 0 ]; then
        id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
        run=(runuser -u postgres --)
    fi
    local created=false
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        say "creating a PostgreSQL cluster in $dir"
        mkdir -p "$dir"; if [ "$(id -u)" = 0 ]; then chown postgres "$dir"; fi
        created=true
        "${run[@]}" "$bin/initdb" -D "$dir/data" -A trust -U postgres >"$dir/initdb.log" 2>&1 \
            || { say "initdb failed; see $dir/initdb.log"; return 1; }
    fi
    say "starting PostgreSQL on 127.0.0.1:$port"
    "${run[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=200" \
        start >/dev/null || { say "PostgreSQL did not start; see $dir/server.log"; return 1; }
    STARTED_SERVERS+=("${run[*]} $bin/pg_ctl -D $dir/data -m fast -w stop")
    # A cluster made here goes when it stops (hundreds of MB under the temporary directory);
    # one found there is left as it was.
    if $created; then STARTED_SERVERS+=("rm -rf $dir"); fi
}

# wait_for_port PORT NAME LOG PID -- until something answers on 127.0.0.1:PORT, or PID dies.
wait_for_port() {
    local port=$1 name=$2 log=$3 pid=$4
    for _ in $(seq 150); do
        if "$PY" -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1).close()" "$port" 2>/dev/null; then
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            say "$name did not start (is port $port taken?); see $log"; tail -n 3 "$log" >&2; exit 1
        fi
        sleep 0.2
    done
    say "$name did not answer on port $port within 30 s; see $log"; exit 1
}

# stop_started_servers -- stop what ensure_redis and ensure_postgres started in this shell, and
# remove the cluster ensure_postgres created.
stop_started_servers() {
    local command
    for command in "${STARTED_SERVERS[@]}"; do
        say "undoing what this script started: $command"
        $command >/dev/null 2>&1 || true
    done
    STARTED_SERVERS=()
}
