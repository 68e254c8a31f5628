#!/usr/bin/env bash
# A two-node SLURM cluster on this one machine, on loopback only: one slurmctld, two slurmd ("node1", "node2",
# one CPU each), munge. For tests and CI (tests/test_slurm.py); needs root.
#
#   bash scripts/slurm_cluster.sh start    # install slurm-wlm + munge if missing (apt-get), start; idempotent
#   bash scripts/slurm_cluster.sh status   # exit 0 when both nodes answer
#   bash scripts/slurm_cluster.sh stop     # stop the daemons this script started (and munged if it started it)
#
# State, logs and pid files live in $LZO_SLURM_STATE (default /tmp/lightning_zo_slurm). The configuration is
# written to /etc/slurm/slurm.conf (where sbatch, srun and submitit look) only when that file is absent or was
# written by this script: a machine with a real SLURM configuration is left alone and the script fails.
set -euo pipefail

STATE=${LZO_SLURM_STATE:-/tmp/lightning_zo_slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by lightning_zo scripts/slurm_cluster.sh"
CTLD_PORT=${LZO_SLURMCTLD_PORT:-17000}
NODES=(node1 node2)

say() { echo "[slurm_cluster] $*"; }
die() { echo "[slurm_cluster] error: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the process named in it runs
  [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
      && command -v sbatch >/dev/null; then
    return
  fi
  command -v apt-get >/dev/null || die "slurm-wlm/munge are not installed and there is no apt-get"
  say "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >"$STATE/apt.log" 2>&1 || die "apt-get update failed (see $STATE/apt.log)"
  apt-get install -y -qq slurm-wlm munge >>"$STATE/apt.log" 2>&1 || die "apt-get install failed (see $STATE/apt.log)"
}

write_conf() {
  if [[ -e "$CONF" ]] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; not touching a real SLURM configuration"
  fi
  mkdir -p /etc/slurm "$STATE/ctld" "$STATE/spool"
  local new="$STATE/slurm.conf.new"
  cat >"$new" <<EOF
$MARK
ClusterName=lzo
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again cred_expire+1 s after it was requeued (SLURM's default: 120 s)
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=node[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
  if [[ -e "$CONF" ]] && cmp -s "$new" "$CONF"; then
    rm -f "$new"
    return 1  # unchanged
  fi
  mv "$new" "$CONF"
  return 0
}

hosts_aliases() {
  # Lightning's SLURM environment uses the first node name as the rendezvous address: node1 must resolve.
  local n
  for n in "${NODES[@]}"; do
    if ! getent hosts "$n" >/dev/null; then
      echo "127.0.0.1 $n $MARK" >>/etc/hosts
      say "added '127.0.0.1 $n' to /etc/hosts"
    fi
  done
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return
  fi
  [[ -s /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing (reinstall munge)"
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  # munged as the munge user where runuser exists; as root otherwise (--force accepts that).
  if command -v runuser >/dev/null; then
    runuser -u munge -- /usr/sbin/munged || /usr/sbin/munged --force
  else
    /usr/sbin/munged --force
  fi
  touch "$STATE/munged.started"
  local i
  for i in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
    sleep 0.1
  done
  die "munged did not start (see /var/log/munge/munged.log)"
}

wait_nodes() {  # wait until both nodes are usable (idle, mixed or allocated)
  local i out
  for i in $(seq 60); do
    out=$(sinfo -h -N -o "%N %t" 2>/dev/null || true)
    if [[ $(grep -cE "^node[12] (idle|mix|alloc)" <<<"$out") == 2 ]]; then
      return 0
    fi
    # a node left DOWN by an earlier, stopped cluster: bring it back
    grep -qE "down|drain" <<<"$out" && scontrol update nodename=node[1-2] state=resume >/dev/null 2>&1 || true
    sleep 0.5
  done
  echo "$out" >&2
  return 1
}

start() {
  [[ $(id -u) == 0 ]] || die "needs root (several slurmd on one machine, /etc/slurm, /etc/hosts)"
  mkdir -p "$STATE"
  install_packages
  local changed=0
  write_conf && changed=1
  hosts_aliases
  start_munge
  if [[ $changed == 1 ]] && { alive "$STATE/slurmctld.pid" || alive "$STATE/slurmd.node1.pid"; }; then
    say "configuration changed: restarting the daemons"
    stop_daemons
  fi
  if ! alive "$STATE/slurmctld.pid"; then
    slurmctld || die "slurmctld did not start (see $STATE/slurmctld.log)"
  fi
  local n
  for n in "${NODES[@]}"; do
    if ! alive "$STATE/slurmd.$n.pid"; then
      mkdir -p "$STATE/spool/$n"
      slurmd -N "$n" || die "slurmd -N $n did not start (see $STATE/slurmd.$n.log)"
    fi
  done
  wait_nodes || die "the nodes did not come up (see $STATE/*.log)"
  say "up: $(sinfo -h -N -o '%N:%t' | tr '\n' ' ')(config $CONF, state $STATE)"
}

stop_pid() {  # stop_pid PIDFILE NAME
  local pid i
  alive "$1" || { rm -f "$1"; return 0; }
  pid=$(cat "$1")
  kill "$pid" 2>/dev/null || true
  for i in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$1"; return 0; }
    sleep 0.1
  done
  say "$2 ($pid) did not stop on SIGTERM; SIGKILL"
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$1"
}

stop_daemons() {
  local n
  for n in "${NODES[@]}"; do
    stop_pid "$STATE/slurmd.$n.pid" "slurmd $n"
  done
  stop_pid "$STATE/slurmctld.pid" slurmctld
}

stop() {
  stop_daemons
  if [[ -e "$STATE/munged.started" ]]; then
    stop_pid /run/munge/munged.pid munged
    rm -f "$STATE/munged.started"
  fi
  if grep -qF "$MARK" /etc/hosts 2>/dev/null; then
    # rewrite in place (/etc/hosts may be a bind mount that cannot be replaced)
    local kept
    kept=$(grep -vF "$MARK" /etc/hosts)
    printf '%s\n' "$kept" >/etc/hosts
  fi
  say "stopped"
}

status() {
  sinfo -h -N -o "%N %t" 2>/dev/null | grep -cE "^node[12] (idle|mix|alloc)" | grep -qx 2
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) status && say "up" || { say "not up"; exit 1; } ;;
  *) die "usage: $0 [start|stop|status]" ;;
esac
