"""Quickstart: a Keras MLP tensor-parallel on a 2x2 mesh, checked against one device.

    python examples/quickstart.py
"""

import numpy as np

import tfpar

tfpar.configure_virtual_devices(4)  # 4 logical CPUs; on a machine with 4 GPUs, skip this

import keras  # noqa: E402


def build():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((32,)),
        keras.layers.Dense(256, activation="relu", name="up"),     # ColumnParallel
        keras.layers.Dense(32, name="down"),                       # RowParallel
    ])


x = np.random.RandomState(0).randn(200, 32).astype("float32")
y = np.random.RandomState(1).randn(200, 32).astype("float32")

tp = tfpar.TensorParallel(tfpar.DeviceMesh((2, 2)), plan="auto")
with tp.scope():
    model = build()
    model.compile(optimizer="adam", loss="mse")
model.fit(x, y, batch_size=32, epochs=3, verbose=2)
print(tp.describe(model))

plain = build()
plain.compile(optimizer="adam", loss="mse")
plain.fit(x, y, batch_size=32, epochs=3, verbose=0)
diff = max(np.abs(a - b).max() for a, b in zip(plain.get_weights(), model.get_weights()))
print(f"largest weight difference from one device: {diff:.2e}")
