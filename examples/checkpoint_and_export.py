"""Save on one mesh, resume on another, and export for serving without tfpar.

    python examples/checkpoint_and_export.py [OUTPUT_DIR]

Trains a model tensor-parallel on a 2xN mesh and saves a checkpoint
(optimizer state included), restores it onto a 1x2N mesh and into a plain
Keras model, resumes training there, round-trips `model.save("m.keras")`,
and exports a plain SavedModel that `tf.saved_model.load` serves on one
device. Every step is checked against the numbers it should reproduce.
"""

import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfpar  # noqa: E402

GPUS = len(tf.config.list_physical_devices("GPU"))
if not GPUS:
    tfpar.configure_virtual_devices(4)  # 4 logical CPUs stand in for 4 accelerators

import keras  # noqa: E402

DEVICES = GPUS or 4
TRAIN_MESH = (2, DEVICES // 2) if DEVICES % 2 == 0 else (1, DEVICES)
RESUME_MESH = (1, DEVICES)
OUT = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="tfpar-example-")


def build():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((32,), name="features"),
        keras.layers.Dense(128, activation="relu", name="up"),    # ColumnParallel
        keras.layers.Dense(16, name="down"),                      # RowParallel
    ], name="mlp")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    return model


def largest_difference(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


rng = np.random.RandomState(0)
x = rng.randn(256, 32).astype("float32")
y = np.tanh(x @ rng.randn(32, 16).astype("float32") / 6)

# --- train on one mesh, save ------------------------------------------------------------
tp = tfpar.TensorParallel(tfpar.DeviceMesh(TRAIN_MESH))
with tp.scope():
    model = build()
model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
path = tfpar.save_checkpoint(os.path.join(OUT, "run"), model)    # atomic: all or nothing
print(f"saved {path} from a {TRAIN_MESH[0]}x{TRAIN_MESH[1]} mesh")

# --- restore onto another mesh, and into plain Keras --------------------------------------
tp_resume = tfpar.TensorParallel(tfpar.DeviceMesh(RESUME_MESH))
with tp_resume.scope():
    resumed = build()
tfpar.restore_checkpoint(os.path.join(OUT, "run"), resumed)     # the directory's latest
plain = build()
tfpar.restore_checkpoint(path, plain)
print("restored on", tp_resume.layout_of(resumed.get_layer("up").kernel).sharding_specs,
      "and plain; weight difference:",
      largest_difference(resumed.get_weights(), model.get_weights()),
      largest_difference(plain.get_weights(), model.get_weights()))

# Resuming is exact: one more epoch after the restore equals one more epoch
# of the run that never stopped (Adam's moments and step came along).
for m in (model, resumed, plain):
    m.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
gap = max(largest_difference(resumed.get_weights(), model.get_weights()),
          largest_difference(plain.get_weights(), model.get_weights()))
print(f"after resuming one epoch: largest weight difference {gap:.2e}")
assert gap < 1e-5, gap

# --- Keras' own format ---------------------------------------------------------------------
keras_file = os.path.join(OUT, "model.keras")
model.save(keras_file)
with tp_resume.scope():
    reloaded = keras.saving.load_model(keras_file)                  # sharded on 1x2N
print("load_model inside the scope:", tp_resume.layout_of(reloaded.get_layer("up").kernel).sharding_specs)

# --- export for serving ----------------------------------------------------------------------
export_dir = tfpar.export_saved_model(model, os.path.join(OUT, "serving", "1"))
served = tf.saved_model.load(export_dir)                           # plain TF, one device
signature = served.signatures["serving_default"]
out = signature(features=tf.constant(x[:8]))["output_0"].numpy()
serve_gap = float(np.abs(out - model.predict(x[:8], verbose=0)).max())
print(f"exported {export_dir}; serving_default differs from the sharded model by {serve_gap:.2e}")
assert serve_gap < 1e-5, serve_gap
print(f"OK (files in {OUT})")
