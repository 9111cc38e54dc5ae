#!/usr/bin/env bash
# Start (or stop) a one-node SLURM cluster on this machine, for tests and for trying the
# sbatch templates: munged + slurmctld + slurmd as root, config under a temp dir.
#   eval "$(launch/slurm/cluster.sh start DIR)"   # prints: export SLURM_CONF=DIR/slurm.conf
#   launch/slurm/cluster.sh stop DIR
# Needs Debian's slurmctld slurmd slurm-client munge (apt-get install --no-install-recommends).
set -euo pipefail
cmd=${1:?start|stop}; dir=${2:?state directory}
host=$(hostname -s)
cpus=$(( $(nproc) > 4 ? $(nproc) : 4 ))  # room for 4 ranks on a 2-core machine

if [[ $cmd == stop ]]; then
  for name in slurmd slurmctld munged; do
    pidfile="$dir/$name.pid"
    [[ -f $pidfile ]] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  exit 0
fi

mkdir -p "$dir"/state "$dir"/spool "$dir"/munge
chmod 0711 "$dir"/munge
[[ -f /etc/munge/munge.key ]] || { mkdir -p /etc/munge; dd if=/dev/urandom of=/etc/munge/munge.key bs=128 count=1 status=none; chmod 0400 /etc/munge/munge.key; }
# Open MPI's PMIx and slurmd both talk to munged through this socket.
munged --force --socket="$dir"/munge/munge.socket.2 --pid-file="$dir"/munged.pid --log-file="$dir"/munged.log --key-file=/etc/munge/munge.key

cat > "$dir"/slurm.conf <<CONF
ClusterName=hyparflow
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket.2
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=pmix
SchedulerType=sched/builtin
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
CONF
export SLURM_CONF=$dir/slurm.conf
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
  sinfo -h -o %T 2>/dev/null | grep -qE '^idle' && { echo "export SLURM_CONF=$SLURM_CONF"; exit 0; }
  sleep 0.5
done
echo "SLURM did not come up; see $dir/*.log" >&2
exit 1
