"""An ordinary user script: hf.fit with no grid arguments, as `hyparflow run` launches it
(the grid comes from HYPARFLOW_* variables). Prints the final accuracy on rank 0."""

import logging

import keras
from mpi4py import MPI

import hyparflow as hf
from hyparflow import data, models

logging.basicConfig(level=logging.INFO, format="%(message)s")
x, y, xt, yt, k = data.load("digits")
keras.utils.set_random_seed(0)
model = models.build("cnn", x.shape[1:], k)
model.compile(
    optimizer=keras.optimizers.Adam(0.003),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
)
hf.fit(model, x, y, batch_size=64, epochs=6, verbose=0)
acc = hf.evaluate(model, xt, yt, batch_size=256, return_dict=True)["accuracy"]
if MPI.COMM_WORLD.Get_rank() == 0:
    print(f"world {MPI.COMM_WORLD.Get_size()} final accuracy {acc:.3f}")
