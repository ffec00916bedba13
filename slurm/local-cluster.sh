#!/usr/bin/env bash
# A real Slurm on this one machine, with two emulated nodes (n1, n2), to try the launchers without a cluster.
#
#   bash slurm/local-cluster.sh install   # Debian's slurmctld, slurmd, munge (needs root and apt)
#   bash slurm/local-cluster.sh start     # munged, slurmctld, slurmd -N n1, slurmd -N n2; waits until idle
#   bash slurm/local-cluster.sh status    # sinfo
#   bash slurm/local-cluster.sh stop
#
# Both "nodes" are localhost (NodeAddr=127.0.0.1, slurmd ports 17001-17002), so jobs see one filesystem, as on a
# cluster with a shared disk. Needs root (it writes /etc/slurm/slurm.conf and starts the daemons).
set -euo pipefail

CPUS_PER_NODE=${CPUS_PER_NODE:-4}
CONF=/etc/slurm/slurm.conf

need_root() {
  if [[ $(id -u) -ne 0 ]]; then echo "local-cluster.sh: run as root (it writes $CONF and starts daemons)" >&2; exit 1; fi
}

install() {
  need_root
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
     && command -v srun >/dev/null; then
    return 0
  fi
  command -v apt-get >/dev/null || { echo "local-cluster.sh: no apt-get here; install slurmctld, slurmd, slurm-client and munge" >&2; exit 1; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmd slurmctld slurm-client munge >/dev/null
}

write_conf() {
  mkdir -p /etc/slurm /var/spool/slurmctld /var/log/slurm
  cat > "$CONF" <<EOF
ClusterName=merak-local
SlurmctldHost=localhost
SlurmUser=root
SlurmctldPort=16817
SlurmdPort=17001
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it starts again (default 120 s)
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd-%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
# A requeued job becomes eligible once its begin time passes, which no event announces: the scheduler loops find it
# (defaults 60 s and 30 s), so they run every few seconds here
SchedulerParameters=sched_interval=2,bf_interval=1
KillWait=30
InactiveLimit=0
MinJobAge=600
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=17001-17002 CPUs=$CPUS_PER_NODE State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
  # The nodes' names resolve like real hosts (the launcher also falls back to scontrol's NodeAddr).
  for n in n1 n2; do grep -qE "^[0-9.]+[[:space:]].*\b$n\b" /etc/hosts || echo "127.0.0.1 $n" >> /etc/hosts; done
}

start_munge() {
  mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
  [[ -s /etc/munge/munge.key ]] || mungekey -c -f -k /etc/munge/munge.key
  chown -R munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge
  chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
  if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- munged
  fi
}

start() {
  need_root
  install
  write_conf
  start_munge
  pgrep -x slurmctld >/dev/null || slurmctld
  for n in n1 n2; do
    pgrep -f "slurmd -N $n" >/dev/null || slurmd -N "$n"
  done
  for _ in $(seq 1 60); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qx idle && [[ $(sinfo -h -N -o '%T' | grep -c idle) -eq 2 ]]; then
      sinfo
      return 0
    fi
    scontrol update nodename=n[1-2] state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  echo "local-cluster.sh: the nodes did not come up; see /var/log/slurm/" >&2
  sinfo -N >&2 || true
  exit 1
}

stop() {
  scontrol shutdown >/dev/null 2>&1 || true
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
}

status() {
  sinfo -N
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
