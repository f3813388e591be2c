#!/usr/bin/env bash
# Real PostgreSQL and a real single-node Apache Kafka (KRaft) on loopback, for development,
# tests and CI. Every subcommand is idempotent: a second `start` finds both running and
# returns in well under a second.
#
#   scripts/services.sh start|stop|status|env|restart|restart-pg|restart-kafka
#   eval "$(scripts/services.sh env)"
#
# PostgreSQL comes from Debian packages (installed only if missing) as its own cluster
# "facecluster", so it never touches a "main" cluster someone else may use. Kafka runs from the
# jars of org.apache.kafka:kafka_2.13 on Maven Central (version pinned in scripts/kafka/pom.xml),
# cached under $FACECLUSTER_CACHE (default ~/.cache/facecluster); its config, data and logs live
# in var/services/ of this checkout (ignored by git).
#
# `start` also installs Debian's Chromium (only if missing; nothing runs) for the browser tests,
# which drive it through playwright: playwright's own browser downloads are not used.
set -euo pipefail
# runuser, pg_createcluster helpers and apt live in sbin, which a non-login shell may not have
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VAR="$REPO/var/services"
CACHE="${FACECLUSTER_CACHE:-$HOME/.cache/facecluster}"

PG_CLUSTER=facecluster
PG_PORT=55432
PG_DB=facecluster
PG_USER=facecluster
PG_PASSWORD=facecluster # loopback-only throwaway cluster; the password only keeps scram auth on
PG_URL="postgresql+psycopg2://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB"

KAFKA_HOST=127.0.0.1
KAFKA_PORT=59092
KAFKA_CONTROLLER_PORT=59093
KAFKA_BOOTSTRAP="$KAFKA_HOST:$KAFKA_PORT"
KAFKA_DIR="$VAR/kafka"
KAFKA_PID="$KAFKA_DIR/kafka.pid"
KAFKA_START_TIMEOUT="${FACECLUSTER_KAFKA_START_TIMEOUT:-90}"

log() { echo "services: $*" >&2; }
die() { echo "services: ERROR: $*" >&2; exit 1; }

# apt-get, pg_createcluster and pg_ctlcluster need root; developers who are not root use sudo.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}
as_postgres() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi
}

apt_install() {
    log "installing $* with apt-get"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# ------------------------------------------------------------------------------ PostgreSQL

pg_newest_installed() {
    local d v=""
    for d in /usr/lib/postgresql/*/bin/postgres; do
        [ -x "$d" ] && v="$(printf '%s\n' "$v" "$(basename "$(dirname "$(dirname "$d")")")" | sort -V | tail -n 1)"
    done
    echo "$v"
}

# Sets PG_VER and PG_STATE (online/down, empty if the cluster does not exist yet) with one
# pg_lsclusters call (a perl start-up each, the bulk of a warm `start`).
pg_lookup() {
    PG_VER="" PG_STATE=""
    command -v pg_lsclusters >/dev/null || return 0
    read -r PG_VER PG_STATE < <(pg_lsclusters -h 2>/dev/null \
        | awk -v c="$PG_CLUSTER" '$2 == c { print $1, $4; exit }') || true
}

pg_start() {
    if ! command -v pg_ctlcluster >/dev/null || [ -z "$(pg_newest_installed)" ]; then
        apt_install postgresql
    fi
    pg_lookup
    if [ -z "$PG_VER" ]; then
        # A new cluster uses the newest installed major; an existing one keeps its own.
        PG_VER="$(pg_newest_installed)"
        [ -n "$PG_VER" ] || die "postgresql is installed but no server binary is under /usr/lib/postgresql"
        log "creating PostgreSQL $PG_VER cluster $PG_CLUSTER on 127.0.0.1:$PG_PORT"
        as_root pg_createcluster "$PG_VER" "$PG_CLUSTER" -p "$PG_PORT" --start-conf=manual \
            -- --auth-local=peer --auth-host=scram-sha-256 >/dev/null
        PG_STATE=down
    fi
    # Rewritten when it differs, so an existing cluster picks up changes made here.
    # fsync/full_page_writes/synchronous_commit off: this cluster only holds test and dev data,
    # so losing it on an OS crash is fine, and commits skip the disk flush.
    local conf="/etc/postgresql/$PG_VER/$PG_CLUSTER/conf.d/50-facecluster.conf" want
    want="# written by scripts/services.sh
listen_addresses = '127.0.0.1'
port = $PG_PORT
max_connections = 200
shared_buffers = 128MB
fsync = off
synchronous_commit = off
full_page_writes = off"
    if [ "$(cat "$conf" 2>/dev/null)" != "$want" ]; then
        printf '%s\n' "$want" | as_root tee "$conf" >/dev/null
        if [ "$PG_STATE" = online ]; then
            log "PostgreSQL settings changed; restarting $PG_CLUSTER"
            as_root pg_ctlcluster "$PG_VER" "$PG_CLUSTER" restart 9>&-
        fi
    fi
    if [ "$PG_STATE" != online ]; then
        # A container's /run may be wiped between boots; the socket dir must exist to start.
        as_root install -d -o postgres -g postgres -m 2775 /var/run/postgresql
        log "starting PostgreSQL cluster $PG_VER/$PG_CLUSTER"
        as_root pg_ctlcluster "$PG_VER" "$PG_CLUSTER" start 9>&- \
            || die "PostgreSQL did not start; see /var/log/postgresql/postgresql-$PG_VER-$PG_CLUSTER.log"
        pg_isready -q -t 30 -h 127.0.0.1 -p "$PG_PORT" || die "PostgreSQL is not accepting TCP connections"
    fi
    # Role and database are asserted every time: cheap, and repairs a half-finished setup.
    as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$PG_PORT" -d postgres >/dev/null <<SQL \
        || die "could not create role/database $PG_USER/$PG_DB"
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') THEN
    CREATE ROLE $PG_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
  END IF;
END \$\$;
SELECT 'CREATE DATABASE $PG_DB OWNER $PG_USER'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PG_DB') \gexec
SQL
}

pg_stop() {
    pg_lookup
    if [ "$PG_STATE" = online ]; then
        log "stopping PostgreSQL cluster $PG_CLUSTER"
        as_root pg_ctlcluster "$PG_VER" "$PG_CLUSTER" stop -m fast
    fi
}

pg_status() {
    pg_lookup
    echo "postgresql: ${PG_STATE:-not created} ($PG_URL)"
    [ "$PG_STATE" = online ]
}

# ------------------------------------------------------------------------------ Kafka

kafka_version() {
    sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$REPO/scripts/kafka/pom.xml"
}

kafka_libs() { echo "$CACHE/kafka-$(kafka_version)/libs"; }

kafka_ensure_java() {
    command -v java >/dev/null || apt_install openjdk-17-jre-headless
    JAVA_VERSION="$(java -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n 1)"
    [ "${JAVA_VERSION%%.*}" -ge 17 ] 2>/dev/null \
        || die "Kafka $(kafka_version) needs Java 17+, found '${JAVA_VERSION:-none}'"
}

kafka_ensure_libs() {
    local libs
    libs="$(kafka_libs)"
    [ -f "$libs/.complete" ] && return
    command -v mvn >/dev/null || apt_install maven
    log "fetching Kafka $(kafka_version) jars from Maven Central into $libs"
    # Download into a temp dir and rename, so an interrupted fetch never looks complete.
    rm -rf "$libs.tmp"
    mkdir -p "$libs.tmp"
    mvn -B -Dstyle.color=never -f "$REPO/scripts/kafka/pom.xml" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$libs.tmp" >"$libs.tmp/mvn.log" 2>&1 \
        || { tail -n 40 "$libs.tmp/mvn.log" >&2; die "mvn could not fetch the Kafka jars"; }
    touch "$libs.tmp/.complete"
    rm -rf "$libs"
    mv "$libs.tmp" "$libs"
}

proc_alive() {
    # Not kill -0: a JVM that died is our unreaped zombie and would pass it. Not kafka_pid: right
    # after the fork the child is still bash/setsid, without kafka.Kafka in its command line.
    local state
    state="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)"
    [ -n "$state" ] && [ "$state" != Z ]
}

kafka_pid() {
    # The pid file counts only while that pid is still a Kafka JVM (pids get reused).
    local pid
    pid="$(cat "$KAFKA_PID" 2>/dev/null || true)"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null \
        && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka' \
        && echo "$pid"
}

# True once the broker answers a Metadata request listing at least one broker. The broker only
# serves requests after it has joined the KRaft quorum and been unfenced, so this means
# "ready for clients". Plain bash + coreutils, so it needs no Python or Kafka CLI.
kafka_answers() {
    local reply
    reply="$(timeout 3 bash -c '
        exec 3<>"/dev/tcp/$0/$1" || exit 1
        # Metadata v0, correlation id 1, client id "hc", empty topic list (= all topics)
        printf "\x00\x00\x00\x10\x00\x03\x00\x00\x00\x00\x00\x01\x00\x02hc\x00\x00\x00\x00" >&3
        head -c 12 <&3 | od -An -tx1' "$KAFKA_HOST" "$KAFKA_PORT" 2>/dev/null | tr -d ' \n')" || return 1
    # size(4) correlation id(4) = 1, broker count(4) >= 1
    [ "${#reply}" -eq 24 ] && [ "${reply:8:8}" = 00000001 ] && [ "${reply:16:8}" != 00000000 ]
}

port_in_use() {
    # A connect that succeeds means something listens (no dependency on ss/netstat).
    timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0"' "$1" 2>/dev/null
}

kafka_write_config() {
    mkdir -p "$KAFKA_DIR/data" "$KAFKA_DIR/logs"
    # Regenerated on every start so the running broker always matches this script.
    cat >"$KAFKA_DIR/server.properties" <<EOF
# generated by scripts/services.sh; edit the script, not this file
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=$KAFKA_HOST:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$KAFKA_HOST:$KAFKA_PORT,CONTROLLER://$KAFKA_HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$KAFKA_HOST:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$KAFKA_DIR/data
# topics are created by the code that owns them, with explicit partition counts
auto.create.topics.enable=false
num.partitions=4
# one node: every internal topic has a single replica
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# fewer internal partitions: the first consumer group / transaction comes up faster
offsets.topic.num.partitions=4
transaction.state.log.num.partitions=4
# consumers in tests join at once instead of waiting 3 s for more members
group.initial.rebalance.delay.ms=0
EOF
    cat >"$KAFKA_DIR/log4j2.properties" <<EOF
# generated by scripts/services.sh: broker log to a size-capped file instead of stdout
status = warn
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = $KAFKA_DIR/logs/server.log
appender.file.filePattern = $KAFKA_DIR/logs/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
EOF
}

kafka_cmd() {
    # Small heap: a dev/test broker on a 2-core machine that also runs the tests.
    KAFKA_CMD=(java -Xms256m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true
        -Dlog4j2.configurationFile="$KAFKA_DIR/log4j2.properties" -Dkafka.logs.dir="$KAFKA_DIR/logs"
        -cp "$(kafka_libs)/*")
}

kafka_broker_cmd() {
    kafka_cmd
    # Class-data sharing: the first broker run dumps the classes it loaded when it exits, later
    # starts map them and answer ~2 s sooner (each restart in the tests, on 2 cores). One archive
    # per JDK build and per jar set (it lives beside the jars): the JVM ignores an archive that
    # does not match. Delete it to have the next broker run write a new one.
    local jsa
    jsa="$(kafka_libs)/cds-java-$JAVA_VERSION.jsa"
    if [ -s "$jsa" ]; then
        KAFKA_CMD+=(-XX:SharedArchiveFile="$jsa")
    else
        KAFKA_CMD+=(-XX:ArchiveClassesAtExit="$jsa")
    fi
    KAFKA_CMD+=(kafka.Kafka "$KAFKA_DIR/server.properties")
}

kafka_log_tail() {
    echo "---- $KAFKA_DIR/logs/server.log (tail) ----" >&2
    tail -n 40 "$KAFKA_DIR/logs/server.log" >&2 2>/dev/null || true
    echo "---- $KAFKA_DIR/kafka.out (tail) ----" >&2
    tail -n 20 "$KAFKA_DIR/kafka.out" >&2 2>/dev/null || true
}

kafka_start() {
    if [ -n "$(kafka_pid)" ] && kafka_answers; then return; fi
    kafka_ensure_java
    kafka_ensure_libs
    local pid
    pid="$(kafka_pid || true)"
    if [ -z "$pid" ]; then
        for p in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"; do
            if port_in_use "$p"; then
                die "port $p is taken by another process, not this checkout's Kafka: $(ss -Hltnp "sport = :$p" 2>/dev/null || true)"
            fi
        done
        kafka_write_config
        if [ ! -f "$KAFKA_DIR/data/meta.properties" ]; then
            log "formatting Kafka storage (KRaft, standalone controller)"
            local cluster_id
            # What `StorageTool random-uuid` prints (16 random bytes, URL-safe base64, no
            # padding, no leading "-"), without starting a second JVM.
            until [ -n "${cluster_id:-}" ] && [ "${cluster_id:0:1}" != - ]; do
                cluster_id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')"
            done
            kafka_cmd
            "${KAFKA_CMD[@]}" kafka.tools.StorageTool format --cluster-id "$cluster_id" --standalone \
                --config "$KAFKA_DIR/server.properties" >"$KAFKA_DIR/format.out" 2>&1 \
                || { cat "$KAFKA_DIR/format.out" >&2; die "Kafka storage format failed"; }
        fi
        log "starting Kafka $(kafka_version) on $KAFKA_BOOTSTRAP"
        # New session: the broker outlives this shell and ignores a Ctrl-C or hangup in the
        # caller's terminal (the pytest fixture starts it and leaves it running).
        # This script runs without job control, so the background job shares our process group
        # and setsid can exec in place: $! is the JVM's own pid.
        kafka_broker_cmd
        setsid nohup "${KAFKA_CMD[@]}" \
            >"$KAFKA_DIR/kafka.out" 2>&1 </dev/null 9>&- &
        pid=$!
        echo "$pid" >"$KAFKA_PID"
    fi
    local deadline=$((SECONDS + KAFKA_START_TIMEOUT))
    until kafka_answers; do
        if ! proc_alive "$pid"; then
            kafka_log_tail
            die "Kafka exited during startup"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            kafka_log_tail
            die "Kafka did not answer on $KAFKA_BOOTSTRAP within ${KAFKA_START_TIMEOUT}s (pid $pid still running)"
        fi
        sleep 0.3
    done
}

kafka_stop() {
    local pid
    pid="$(kafka_pid || true)"
    if [ -n "$pid" ]; then
        log "stopping Kafka (pid $pid)"
        kill -TERM "$pid"
        # SIGTERM runs the broker's controlled shutdown (flushes logs, no recovery next start);
        # SIGKILL only if it hangs.
        local i
        for ((i = 0; i < 300; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "Kafka did not stop in 30 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$KAFKA_PID"
}

kafka_status() {
    local pid
    pid="$(kafka_pid || true)"
    if [ -n "$pid" ] && kafka_answers; then
        echo "kafka: online, pid $pid ($KAFKA_BOOTSTRAP, version $(kafka_version))"
    elif [ -n "$pid" ]; then
        echo "kafka: running but not answering, pid $pid ($KAFKA_BOOTSTRAP)"
        return 1
    else
        echo "kafka: down ($KAFKA_BOOTSTRAP)"
        return 1
    fi
}

# ------------------------------------------------------------------------------ Chromium

# tests/browser.py finds the browser the same way: $FACECLUSTER_CHROMIUM, else chromium or
# chromium-browser on PATH.
chromium_found() {
    if [ -n "${FACECLUSTER_CHROMIUM:-}" ]; then
        [ -x "$FACECLUSTER_CHROMIUM" ] || die "FACECLUSTER_CHROMIUM=$FACECLUSTER_CHROMIUM is not an executable file"
        return 0
    fi
    command -v chromium >/dev/null || command -v chromium-browser >/dev/null
}

chromium_ensure() {
    chromium_found && return
    apt_install chromium
    command -v chromium >/dev/null || die "apt-get installed chromium but there is no chromium on PATH"
    log "installed $(chromium --version 2>/dev/null | head -n 1) at $(command -v chromium)"
}

# ------------------------------------------------------------------------------ main

print_env() {
    echo "export FACECLUSTER_PG_URL='$PG_URL';"
    echo "export FACECLUSTER_KAFKA='$KAFKA_BOOTSTRAP';"
}

# start/stop/restart take a lock: pytest sessions and developers may call them concurrently.
# Daemons are started with `9>&-` so they do not inherit (and hold) the lock.
case "${1:-}" in
    start | stop | restart | restart-pg | restart-kafka)
        mkdir -p "$VAR"
        exec 9>"$VAR/.lock"
        flock -w 600 9 || die "another scripts/services.sh held $VAR/.lock for 10 minutes"
        ;;
esac

case "${1:-}" in
    start) pg_start; kafka_start; chromium_ensure ;;
    stop) kafka_stop; pg_stop ;;
    restart) kafka_stop; pg_stop; pg_start; kafka_start; chromium_ensure ;;
    restart-pg) pg_stop; pg_start ;;
    restart-kafka) kafka_stop; kafka_start ;;
    status)
        rc=0
        pg_status || rc=1
        kafka_status || rc=1
        exit "$rc"
        ;;
    env) print_env ;;
    *)
        echo "usage: $0 start|stop|status|env|restart|restart-pg|restart-kafka" >&2
        exit 2
        ;;
esac
