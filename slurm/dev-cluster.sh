#!/usr/bin/env bash
# A real single-host Slurm cluster (slurmctld + N slurmd + slurmdbd/MariaDB accounting + munged) for
# development and CI. Everything it starts lives in a private state dir and is stopped through pid files,
# never by process name, so it cannot touch another Slurm or MariaDB on the machine.
#
#   slurm/dev-cluster.sh start [--nodes N]   start (idempotent; prints SLURM_CONF=... on the last line)
#   slurm/dev-cluster.sh stop                cancel our jobs, stop our daemons, drop our /etc/hosts line
#   slurm/dev-cluster.sh status              exit 0 when up; prints SLURM_CONF=... when up
#   slurm/dev-cluster.sh env                 print `export SLURM_CONF=...` for eval in a shell
#   slurm/dev-cluster.sh install             only install the Debian packages (CI does this before tests)
#
# Needs root (Slurm runs as SlurmUser=root; node names go into /etc/hosts). Tested on Debian 12 (Slurm
# 22.05, MariaDB 10.11) without systemd. Environment: EBT_DEV_CLUSTER_DIR (state dir, default
# /tmp/ebt-dev-cluster), EBT_DEV_CLUSTER_PORT_BASE (default 17000: slurmd ports BASE+1..BASE+N,
# slurmctld BASE+817, slurmdbd BASE+819, MariaDB BASE+306).
set -euo pipefail

DIR="${EBT_DEV_CLUSTER_DIR:-/tmp/ebt-dev-cluster}"
PORT_BASE="${EBT_DEV_CLUSTER_PORT_BASE:-17000}"
CLUSTER=ebtdev
PARTITION=debug
HOSTS_MARK="# ebt-dev-cluster ${DIR}"
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

CONF="$DIR/etc/slurm.conf"
MUNGE_SOCK="$DIR/munge/munge.socket"
MYSQL_SOCK="$DIR/mysql.sock"
MYSQL_PORT=$((PORT_BASE + 306))
CTLD_PORT=$((PORT_BASE + 817))
DBD_PORT=$((PORT_BASE + 819))
DB_PASS=ebtdev-local-only

log() { echo "dev-cluster: $*" >&2; }
die() { echo "dev-cluster: error: $*" >&2; exit 1; }

# ---------------------------------------------------------------- pid-file helpers (never kill by name)
pid_alive() {  # pid_alive FILE -> 0 if FILE names a live process
    local f=$1 pid
    [[ -s $f ]] || return 1
    pid=$(tr -dc '0-9' <"$f")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null
}

stop_pidfiles() {  # stop_pidfiles FILE...: TERM all, wait up to 15 s, then KILL; only the pids in the FILEs
    local f pid i pids=()
    for f in "$@"; do
        if pid_alive "$f"; then pid=$(tr -dc '0-9' <"$f"); kill -TERM "$pid" 2>/dev/null || true; pids+=("$pid"); fi
    done
    for pid in "${pids[@]}"; do
        for i in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then log "pid $pid ignored TERM; killing"; kill -KILL "$pid" || true; fi
    done
    rm -f "$@"
}

wait_for() {  # wait_for SECONDS DESCRIPTION CMD...: poll CMD every 0.2 s
    local secs=$1 what=$2 i
    shift 2
    for i in $(seq $((secs * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    die "$what did not come up within ${secs}s (logs in $DIR/log)"
}

node_names() { local i; for i in $(seq "$1"); do printf 'n%d ' "$i"; done; }

# ---------------------------------------------------------------- packages
# apt/dpkg hold fcntl locks on these while they run (another install, unattended-upgrades): wait, do not fail.
APT_LOCKS="${EBT_DEV_CLUSTER_APT_LOCKS:-/var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock /var/cache/apt/archives/lock}"
APT_WAIT_S="${EBT_DEV_CLUSTER_APT_WAIT_S:-900}"

apt_locks_free() {  # 0 when no process holds any of APT_LOCKS (probed the way apt takes them: fcntl, no wait)
    python3 - "$@" <<'PY'
import fcntl, os, sys
for path in sys.argv[1:]:
    if not os.path.exists(path):
        continue
    with open(path, "a") as handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            sys.exit(1)
        fcntl.lockf(handle, fcntl.LOCK_UN)
PY
}

wait_apt_locks() {
    local waited=0
    # shellcheck disable=SC2086
    until apt_locks_free $APT_LOCKS; do
        ((waited == 0)) && log "another apt/dpkg holds its lock; waiting up to ${APT_WAIT_S}s"
        ((waited >= APT_WAIT_S)) && die "apt/dpkg lock still held after ${APT_WAIT_S}s ($APT_LOCKS)"
        sleep 2; waited=$((waited + 2))
    done
}

ensure_packages() {
    local missing=0 b
    for b in slurmctld slurmd slurmdbd sbatch sacct munged mariadbd mariadb-install-db; do
        command -v "$b" >/dev/null 2>&1 || missing=1
    done
    ((missing)) || return 0
    [[ $EUID -eq 0 ]] || die "Slurm packages are missing and installing them needs root: apt-get install ${PACKAGES[*]}"
    log "installing ${PACKAGES[*]} (apt, --no-install-recommends)"
    # policy-rc.d keeps the packages' own services from starting: this script runs private instances.
    local policy=${EBT_DEV_CLUSTER_POLICY_RC:-/usr/sbin/policy-rc.d} created_policy=0
    if [[ ! -e $policy ]]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created_policy=1; fi
    # Wait for a running apt/dpkg first; DPkg::Lock::Timeout covers one that starts between the two.
    wait_apt_locks
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout="$APT_WAIT_S" update -qq >"$DIR/log/apt.log" 2>&1 &&
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout="$APT_WAIT_S" install -y -qq \
            --no-install-recommends "${PACKAGES[@]}" \
            >>"$DIR/log/apt.log" 2>&1 || { ((created_policy)) && rm -f "$policy"; die "apt-get failed; see $DIR/log/apt.log"; }
    ((created_policy)) && rm -f "$policy"
    return 0
}

# ---------------------------------------------------------------- daemons
start_munge() {
    pid_alive "$DIR/munge/munged.pid" && return 0
    local d=$DIR
    while [[ $d != / ]]; do  # munged refuses a socket below a directory others cannot traverse
        [[ $(( 0$(stat -c '%a' "$d") & 01 )) -ne 0 ]] || die "munged needs every directory above its socket to be traversable by all (o+x): $d is not; choose another EBT_DEV_CLUSTER_DIR"
        d=$(dirname "$d")
    done
    if [[ ! -s $DIR/munge/munge.key ]]; then
        head -c 1024 /dev/urandom >"$DIR/munge/munge.key"
        chmod 400 "$DIR/munge/munge.key"
    fi
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
    munged --socket="$MUNGE_SOCK" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/munge/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" --num-threads=2 \
        || die "munged failed to start (see $DIR/log/munged.log)"
    wait_for 10 munged test -S "$MUNGE_SOCK"
}

mysql_q() { mariadb --no-defaults --socket="$MYSQL_SOCK" -u root -e "$1"; }

start_mariadb() {
    if ! pid_alive "$DIR/mysql.pid"; then
        if [[ ! -d $DIR/mysql/mysql ]]; then
            log "initialising MariaDB in $DIR/mysql"
            rm -rf "$DIR/mysql"
            mariadb-install-db --no-defaults --datadir="$DIR/mysql" --user=root --skip-test-db \
                --auth-root-authentication-method=socket >"$DIR/log/mariadb-install.log" 2>&1 \
                || die "mariadb-install-db failed (see $DIR/log/mariadb-install.log)"
        fi
        rm -f "$MYSQL_SOCK"
        # mariadbd does not daemonise: setsid detaches it from this shell; it writes its own pid file.
        setsid mariadbd --no-defaults --datadir="$DIR/mysql" --socket="$MYSQL_SOCK" --pid-file="$DIR/mysql.pid" \
            --port="$MYSQL_PORT" --bind-address=127.0.0.1 --user=root --log-error="$DIR/log/mariadb.log" \
            --innodb-buffer-pool-size=64M --innodb-log-file-size=16M --performance-schema=OFF \
            </dev/null >/dev/null 2>&1 &
        wait_for 60 MariaDB mysql_q "SELECT 1"
    fi
    mysql_q "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
             GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || die "could not create the slurm DB user"
}

write_configs() {
    local nodes=$1 names cpus_line mem real_mem
    # `slurmd -C` describes this host; every emulated node claims the same CPUs and ~90% of the memory so
    # that the daemon never marks itself invalid for over-claiming.
    cpus_line=$(slurmd -C | head -1 | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
    real_mem=$(slurmd -C | head -1 | tr ' ' '\n' | sed -n 's/^RealMemory=//p')
    mem=$((real_mem * 9 / 10))
    names=$(node_names "$nodes")
    cat >"$CONF.tmp" <<EOF
# Written by slurm/dev-cluster.sh; rewritten at every cold start.
ClusterName=$CLUSTER
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may start again after ~10 s instead of the default 120 s.
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCK
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=300
MessageTimeout=10
NodeName=n[1-$nodes] NodeAddr=127.0.0.1 Port=[$((PORT_BASE + 1))-$((PORT_BASE + nodes))] $cpus_line RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=n[1-$nodes] Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    echo "$nodes" >"$DIR/nodes"
    (umask 077; cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    )
    : "$names"
}

add_hosts() {
    local names=$1
    grep -qF "$HOSTS_MARK" /etc/hosts && return 0
    # Node names must resolve: submitit uses the first one as MASTER_ADDR for torch.distributed.
    echo "127.0.0.1 $names $HOSTS_MARK" >>/etc/hosts
}

remove_hosts() {
    grep -qF "$HOSTS_MARK" /etc/hosts || return 0
    # /etc/hosts may be a bind mount (containers): rewrite in place instead of renaming over it.
    local tmp
    tmp=$(mktemp)
    grep -vF "$HOSTS_MARK" /etc/hosts >"$tmp" || true
    cat "$tmp" >/etc/hosts
    rm -f "$tmp"
}

cluster_up() {  # every daemon alive and slurmctld answering with all nodes idle/alloc/mixed
    local n=$1 name
    for f in munge/munged.pid mysql.pid run/slurmdbd.pid run/slurmctld.pid; do pid_alive "$DIR/$f" || return 1; done
    for name in $(node_names "$n"); do pid_alive "$DIR/run/slurmd-$name.pid" || return 1; done
    SLURM_CONF=$CONF sinfo -h -o '%t' 2>/dev/null | grep -qvE 'down|unk|drain|fail|inval' || return 1
    ! SLURM_CONF=$CONF sinfo -h -o '%t' 2>/dev/null | grep -qE 'down|unk|drain|fail|inval'
}

cmd_start() {
    local nodes=$1 names name
    [[ $EUID -eq 0 ]] || die "must run as root (SlurmUser=root and /etc/hosts entries)"
    if [[ -s $DIR/nodes ]] && pid_alive "$DIR/run/slurmctld.pid"; then
        local running
        running=$(cat "$DIR/nodes")
        [[ $running == "$nodes" ]] || die "already running with $running nodes; run '$0 stop' first"
        if cluster_up "$nodes"; then log "already running ($nodes nodes)"; echo "SLURM_CONF=$CONF"; return 0; fi
    fi
    mkdir -p "$DIR"/{etc,log,run,state,munge,spool}
    # munged insists that everyone can traverse its socket dir; the key file itself stays 0400.
    chmod 755 "$DIR"; chmod 711 "$DIR/munge"
    ensure_packages
    export SLURM_CONF=$CONF
    names=$(node_names "$nodes")
    start_munge
    start_mariadb
    write_configs "$nodes"
    add_hosts "$names"
    if ! pid_alive "$DIR/run/slurmdbd.pid"; then
        slurmdbd || die "slurmdbd failed to start (see $DIR/log/slurmdbd.log)"
    fi
    wait_for 60 slurmdbd sacctmgr -n list cluster
    # Register the cluster before slurmctld starts so that its first jobs are already accounted.
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster failed"
    fi
    if ! pid_alive "$DIR/run/slurmctld.pid"; then
        slurmctld || die "slurmctld failed to start (see $DIR/log/slurmctld.log)"
    fi
    wait_for 30 slurmctld scontrol ping
    for name in $names; do
        mkdir -p "$DIR/spool/$name"
        pid_alive "$DIR/run/slurmd-$name.pid" || slurmd -N "$name" || die "slurmd $name failed (see $DIR/log/slurmd-$name.log)"
    done
    # Nodes left DOWN by an unclean earlier stop come back here.
    scontrol update nodename="n[1-$nodes]" state=resume >/dev/null 2>&1 || true
    wait_for 60 "nodes n[1-$nodes]" cluster_up "$nodes"
    log "up: $nodes nodes, partition $PARTITION, state in $DIR"
    echo "SLURM_CONF=$CONF"
}

cmd_stop() {
    [[ -d $DIR ]] || { log "not running"; return 0; }
    export SLURM_CONF=$CONF
    if pid_alive "$DIR/run/slurmctld.pid"; then
        # Only our own cluster's jobs: this SLURM_CONF points at our slurmctld.
        local jobs
        jobs=$(squeue -h -o '%A' 2>/dev/null | tr '\n' ' ')
        if [[ -n ${jobs// } ]]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 50); do [[ -z $(squeue -h -o '%A' 2>/dev/null) ]] && break; sleep 0.2; done
        fi
    fi
    # slurmd daemons in parallel; then controller before dbd (it flushes accounting), then the DB and munge.
    stop_pidfiles "$DIR"/run/slurmd-*.pid
    stop_pidfiles "$DIR/run/slurmctld.pid"
    stop_pidfiles "$DIR/run/slurmdbd.pid"
    stop_pidfiles "$DIR/mysql.pid" "$DIR/munge/munged.pid"
    remove_hosts
    rm -f "$DIR/nodes"
    log "stopped"
}

cmd_status() {
    local n
    [[ -s $DIR/nodes ]] || { log "not running"; return 1; }
    n=$(cat "$DIR/nodes")
    if cluster_up "$n"; then echo "SLURM_CONF=$CONF"; SLURM_CONF=$CONF sinfo >&2; return 0; fi
    log "not (fully) running; '$0 start' repairs it"
    return 1
}

main() {
    local cmd=${1:-} nodes=2
    [[ -n $cmd ]] || die "usage: $0 start|stop|status|env|install [--nodes N]"
    shift
    while [[ $# -gt 0 ]]; do
        case $1 in
            --nodes) [[ ${2:-} =~ ^[1-9][0-9]?$ ]] || die "--nodes needs a number 1-99, got '${2:-}'"; nodes=$2; shift 2 ;;
            --nodes=*) nodes=${1#--nodes=}; [[ $nodes =~ ^[1-9][0-9]?$ ]] || die "--nodes needs a number 1-99, got '$nodes'"; shift ;;
            *) die "unknown argument '$1' (usage: $0 start|stop|status|env|install [--nodes N])" ;;
        esac
    done
    case $cmd in
        start) cmd_start "$nodes" ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        env) echo "export SLURM_CONF=$CONF" ;;
        install) mkdir -p "$DIR/log"; ensure_packages ;;
        *) die "unknown command '$cmd' (usage: $0 start|stop|status|env|install [--nodes N])" ;;
    esac
}

main "$@"
