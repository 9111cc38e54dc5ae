"""Run on 4 ranks: the cases of tests/cases.py named in UNDER_MPI, under real MPI. Rank 0 trains the
reference copy and writes the comparison as JSON (argv[1]); each rank also reports which
trainable variables its optimizer holds state for."""

from __future__ import annotations

import json
import sys

import cases
from mpi4py import MPI

from hyparflow.checkpoint import optimizer_state

world = MPI.COMM_WORLD
results: dict[str, dict] = {}
for key in cases.UNDER_MPI:
    spec = cases.CASES[key]
    model = cases.compiled(spec[0], spec[4])
    history = cases.fit(model, key)
    mine = sorted({k[0] for k in optimizer_state(model.optimizer, model) if isinstance(k[0], int)})
    owned = world.gather(mine, root=0)  # optimizer state lives only where its variables do
    if world.Get_rank() == 0:
        results[key] = cases.compare(key, model, history) | {
            "owned": owned,
            "n_trainable": len(model.trainable_variables),
        }

if world.Get_rank() == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)
