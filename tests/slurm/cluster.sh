#!/usr/bin/env bash
# A throw-away single-host SLURM cluster for the tests (tests/slurm/test_slurm_cohort.py), from Debian's packages:
# munge, MariaDB, slurmdbd, slurmctld and one slurmd, every port on 127.0.0.1, every file under DIR.
#
#   tests/slurm/cluster.sh start DIR   start it; DIR/slurm.conf is the SLURM_CONF to use
#   tests/slurm/cluster.sh stop DIR    stop everything that start started (also after a failed start)
#
# Why each piece: Snakemake's SLURM executor polls job states with `sacct`, which needs the accounting daemon
# (slurmdbd) and its database; without them every job's state reads "unknown" and the plugin reports it a
# success. The slurm persistent connection (sacct, sacctmgr, slurmctld -> slurmdbd) authenticates through munge's
# default socket, so munged listens there (an already running munged is used as it is).
# Container settings: proctrack/linuxproc, task/none, no cgroups. One node declares 8 CPUs and 40 GB
# (config_overrides) so that profiles/slurm's shard jobs (4 CPUs, 16 GB) run two at a time on this 2-core host.
# Needs root (slurmd starts jobs as their user) and: apt-get install slurm-wlm slurmdbd munge mariadb-server
# Knobs: SLURM_TEST_PORT (default 16817; slurmd, slurmdbd and MariaDB take the next three).
set -euo pipefail

readonly MUNGE_SOCKET=/run/munge/munge.socket.2

die() {
  printf '[ERR] %s\n' "$*" >&2
  exit 1
}
log_run() { printf '[RUN ] %s\n' "$*"; }
log_done() { printf '[DONE] %s\n' "$*"; }

# wait_for SECONDS WHAT CMD...: retry CMD every 0.5 s until it succeeds, or die naming WHAT.
wait_for() {
  local seconds="$1" what="$2"
  shift 2
  local tries=$((seconds * 2))
  until "$@" >/dev/null 2>&1; do
    tries=$((tries - 1))
    ((tries > 0)) || die "${what} did not come up within ${seconds} s (logs in ${dir}/log)"
    sleep 0.5
  done
}

node_idle() { [[ "$(sinfo -h -o %T)" == idle ]]; }

stop() {
  export SLURM_CONF="${dir}/slurm.conf"
  if [[ -f "${dir}/run/slurmctld.pid" ]]; then
    scontrol shutdown >/dev/null 2>&1 || true
  fi
  local name pid
  for name in slurmd slurmctld slurmdbd mariadbd munged; do
    [[ -f "${dir}/run/${name}.pid" ]] || continue
    pid="$(cat "${dir}/run/${name}.pid")"
    if [[ -n "${pid}" ]] && kill -0 "${pid}" 2>/dev/null; then
      kill "${pid}" 2>/dev/null || true
      for _ in $(seq 1 40); do
        kill -0 "${pid}" 2>/dev/null || break
        sleep 0.25
      done
      kill -9 "${pid}" 2>/dev/null || true
    fi
    rm -f "${dir}/run/${name}.pid"
  done
}

start() {
  [[ "$(id -u)" == 0 ]] || die "the test cluster needs root (slurmd starts jobs as their user)"
  local tool
  for tool in munged mariadbd mariadb-install-db slurmdbd slurmctld slurmd sacctmgr; do
    command -v "${tool}" >/dev/null 2>&1 \
      || die "${tool} not found: apt-get install slurm-wlm slurmdbd munge mariadb-server"
  done
  local port="${SLURM_TEST_PORT:-16817}" host
  host="$(hostname -s)"
  mkdir -p "${dir}"/{run,log,spool/ctld,spool/d,db,munge}
  chmod 700 "${dir}/munge"
  trap 'stop; exit 1' ERR

  if munge -n >/dev/null 2>&1 </dev/null; then
    log_run "munge: using the munged already running at ${MUNGE_SOCKET}"
  else
    log_run "munge at ${MUNGE_SOCKET}"
    mkdir -p "$(dirname "${MUNGE_SOCKET}")"
    dd if=/dev/urandom of="${dir}/munge/munge.key" bs=1024 count=1 status=none
    chmod 600 "${dir}/munge/munge.key"
    munged --force --key-file="${dir}/munge/munge.key" --socket="${MUNGE_SOCKET}" \
      --pid-file="${dir}/run/munged.pid" --log-file="${dir}/log/munged.log" --seed-file="${dir}/munge/seed"
    wait_for 10 munged munge -n
  fi

  log_run "MariaDB on 127.0.0.1:$((port + 3))"
  mariadb-install-db --no-defaults --datadir="${dir}/db" --user=root --auth-root-authentication-method=normal \
    >"${dir}/log/mariadb-install.log" 2>&1
  mariadbd --no-defaults --datadir="${dir}/db" --socket="${dir}/run/mysql.sock" --pid-file="${dir}/run/mariadbd.pid" \
    --bind-address=127.0.0.1 --port="$((port + 3))" --user=root --log-error="${dir}/log/mariadb.log" \
    >/dev/null 2>&1 &
  wait_for 60 MariaDB mariadb --socket="${dir}/run/mysql.sock" -uroot -e 'select 1'
  mariadb --socket="${dir}/run/mysql.sock" -uroot -e "
    CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm-test';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"

  cat >"${dir}/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$((port + 2))
SlurmUser=root
LogFile=${dir}/log/slurmdbd.log
PidFile=${dir}/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((port + 3))
StorageUser=slurm
StoragePass=slurm-test
StorageLoc=slurm_acct_db
EOF
  chmod 600 "${dir}/slurmdbd.conf"
  cat >"${dir}/slurm.conf" <<EOF
ClusterName=synthseg-test
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmctldPort=${port}
SlurmdPort=$((port + 1))
AuthType=auth/munge
StateSaveLocation=${dir}/spool/ctld
SlurmdSpoolDir=${dir}/spool/d
SlurmctldPidFile=${dir}/run/slurmctld.pid
SlurmdPidFile=${dir}/run/slurmd.pid
SlurmctldLogFile=${dir}/log/slurmctld.log
SlurmdLogFile=${dir}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((port + 2))
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=3600
NodeName=${host} NodeAddr=127.0.0.1 CPUs=8 RealMemory=40000 State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF="${dir}/slurm.conf"
  log_run "slurmdbd on 127.0.0.1:$((port + 2))"
  slurmdbd
  wait_for 30 slurmdbd sacctmgr -n list cluster
  sacctmgr -i add cluster synthseg-test >/dev/null
  sacctmgr -i add account synthseg Cluster=synthseg-test Description=tests Organization=tests >/dev/null
  sacctmgr -i add user "$(id -un)" Account=synthseg DefaultAccount=synthseg >/dev/null
  log_run "slurmctld on 127.0.0.1:${port}, slurmd (${host}, 8 CPUs) on 127.0.0.1:$((port + 1))"
  slurmctld
  wait_for 30 slurmctld scontrol ping
  slurmd
  wait_for 60 "slurmd (node ${host} idle)" node_idle
  trap - ERR
  log_done "SLURM test cluster up: SLURM_CONF=${dir}/slurm.conf"
}

(($# == 2)) || die "usage: $0 start|stop DIR"
dir="$(mkdir -p "$2" && cd "$2" && pwd)"
case "$1" in
  start) start ;;
  stop) stop ;;
  *) die "usage: $0 start|stop DIR" ;;
esac
