"""Eight logical CPUs, configured once before TensorFlow initialises."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tfpar  # noqa: E402

DEVICES = tfpar.configure_virtual_devices(8)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

MESHES = ["1x1", "1x2", "2x2", "1x4", "4x1"]


def make_mesh(spec):
    """A DeviceMesh of the first devices it needs, e.g. make_mesh('2x2')."""
    sizes = [int(s) for s in spec.split("x")]
    return tfpar.DeviceMesh(tuple(sizes), ("batch", "model"), devices=DEVICES[: int(np.prod(sizes))])


def build_mlp(seed=0, in_features=8, hidden=16, out_features=4):
    """Input -> Dense(hidden, relu) -> Dense(8, relu) -> Dense(out): column, row, column+gather."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((in_features,)),
            keras.layers.Dense(hidden, activation="relu", name="up"),
            keras.layers.Dense(8, activation="relu", name="down"),
            keras.layers.Dense(out_features, name="head"),
        ],
        name="mlp",
    )


def regression_data(n=40, in_features=8, out_features=4, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, in_features).astype("float32")
    y = rng.randn(n, out_features).astype("float32")
    return x, y


@pytest.fixture
def mesh_factory():
    return make_mesh
