#!/usr/bin/env bash
# Emulate a multi-host cluster on one machine with network namespaces (root): each "host"
# hfnodeN has its own address 10.200.0.N and hostname; traffic between them is real TCP.
#   launch/netns-cluster.sh up 2        # hosts hfnode1, hfnode2 (+ prints the env to use)
#   launch/netns-cluster.sh agent       # path of the launch agent that replaces ssh
#   launch/netns-cluster.sh exec hfnode1 CMD...   # run CMD on a host (mpirun goes here)
#   launch/netns-cluster.sh down 2
# Optional slower link: RATE=1gbit launch/netns-cluster.sh up 2 (tc tbf on each host).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cmd=${1:?up|down|exec|agent}

case $cmd in
up)
  n=${2:-2}
  ip netns add hfbr
  ip -n hfbr link add br0 type bridge
  ip -n hfbr link set br0 up
  ip -n hfbr link set lo up
  for i in $(seq "$n"); do
    ns=hfnode$i
    ip netns add "$ns"
    ip link add "veth$i" netns "$ns" type veth peer name "vn$i" netns hfbr
    ip -n "$ns" link set "veth$i" name eth0
    ip -n "$ns" addr add "10.200.0.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    ip -n hfbr link set "vn$i" master br0
    ip -n hfbr link set "vn$i" up
    if [[ -n ${RATE:-} ]]; then
      ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate "$RATE" burst 256kb latency 50ms
    fi
  done
  # What mpirun needs to reach the hosts: our agent instead of ssh, TCP on the bridge.
  cat <<ENV
export PRTE_MCA_plm_ssh_agent=$here/netns-cluster.sh\ agent-run
export PRTE_MCA_oob_tcp_if_include=10.200.0.0/24 OMPI_MCA_btl_tcp_if_include=10.200.0.0/24
export OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,sm,tcp OMPI_MCA_mpi_yield_when_idle=1
ENV
  ;;
down)
  n=${2:-2}
  for i in $(seq "$n"); do ip netns del "hfnode$i" 2>/dev/null || true; done
  ip netns del hfbr 2>/dev/null || true
  ;;
exec)
  host=${2:?host}; shift 2
  # Each host needs its own hostname, or Open MPI merges them into one node and hangs.
  exec ip netns exec "$host" unshare --uts /bin/sh -c 'hostname "$0"; exec "$@"' "$host" "$@"
  ;;
agent-run)
  # Called by PRRTE as: agent [ssh options] HOST COMMAND-STRING
  shift
  while [[ $# -gt 0 && $1 == -* ]]; do shift; done
  host=$1; shift
  exec ip netns exec "$host" unshare --uts /bin/sh -c 'hostname "$0"; exec /bin/sh -c "$1"' "$host" "$*"
  ;;
*)
  echo "unknown command $cmd" >&2; exit 2 ;;
esac
