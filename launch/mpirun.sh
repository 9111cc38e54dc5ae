#!/usr/bin/env bash
# Launch a hyparflow job with mpirun on a plain cluster (no SLURM):
#   launch/mpirun.sh NP HOSTFILE_OR_- COMMAND...
#   launch/mpirun.sh 8 hosts.txt python3 -m hyparflow train configs/resnet110_cifar10.yaml
# hosts.txt lines look like "node01 slots=4". Settings for the ranks can be exported as
# HYPARFLOW_PARTITIONS / _MICROBATCHES / _SCHEDULE beforehand. This is what
# `hyparflow run -np NP --hostfile HOSTFILE COMMAND...` builds; --dry-run prints it.
set -euo pipefail
np=${1:?number of ranks}; hostfile=${2:?hostfile or -}; shift 2
args=(-np "$np" --bind-to none --map-by slot)
[[ $hostfile != - ]] && args+=(--hostfile "$hostfile")
[[ $(id -u) == 0 ]] && args+=(--allow-run-as-root)
# More ranks than cores: idle ranks must yield the core to their peers.
(( np > $(nproc) )) && args+=(--oversubscribe --mca mpi_yield_when_idle 1)
for var in $(compgen -e | grep -E '^(HYPARFLOW_|PYTHONPATH$)' || true); do args+=(-x "$var"); done
exec "${MPIRUN:-mpirun}" "${args[@]}" "$@"
