"""One process of a checkpoint test: runs the steps given as JSON, in order.

    python tests/_checkpoint_worker.py DEVICES '[{"op": "model", "mesh": "2x2"}, ...]'

DEVICES logical CPUs are configured first (1: none, a plain process). Steps:

* model {mesh: "2x2" | null, seed}: the test MLP, compiled with Adam, built
  inside a TensorParallel scope on that mesh (null: plain Keras);
* train {start, steps}: `fit` on batches start .. start+steps-1 (8 rows each);
* save {path}: `tfpar.save_checkpoint`; keras_save {path}: a plain
  `tf.train.Checkpoint(model=..., optimizer=...).save`;
* restore {path}: `tfpar.restore_checkpoint`;
* dump {path}: weights, optimizer variables, predictions, layouts -> .npz;
* save_and_hang {path}: a save that stops after writing its files and before
  publishing them, having torn its data file, and prints HANG: the parent
  kills the process there (SIGKILL), deterministically mid-save.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tfpar  # noqa: E402

DEVICES = int(sys.argv[1])
if DEVICES > 1:
    tfpar.configure_virtual_devices(DEVICES)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfpar import checkpoint  # noqa: E402
from tfpar.devices import list_devices  # noqa: E402

BATCH = 8


def data(n=64):
    rng = np.random.RandomState(0)
    return rng.randn(n, 8).astype("float32"), rng.randn(n, 4).astype("float32")


def build_model(mesh, seed):
    def build():
        keras.utils.set_random_seed(seed)
        model = keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(16, activation="relu", name="up"),
                keras.layers.Dense(8, activation="relu", name="down"),
                keras.layers.Dense(4, name="head"),
            ],
            name="mlp",
        )
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        return model

    if mesh is None:
        return build(), None
    sizes = tuple(int(s) for s in mesh.split("x"))
    tp = tfpar.TensorParallel(tfpar.DeviceMesh(sizes, devices=list_devices("CPU")[: int(np.prod(sizes))]))
    with tp.scope():
        return build(), tp


def dump(model, tp, path):
    x, _ = data()
    arrays = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    arrays.update({f"o{i}": np.asarray(v.numpy()) for i, v in enumerate(model.optimizer.variables)})
    arrays["out"] = model.predict(x, batch_size=16, verbose=0)
    layouts = []
    for layer in model.layers:
        if tp is None:
            layouts.append("plain")
        else:
            layout = tp.layout_of(layer.kernel)
            mesh = "x".join(str(layout.mesh.dim_size(a)) for a in layout.mesh.dim_names)
            layouts.append(f"{mesh}:{','.join(layout.sharding_specs)}")
    arrays["layouts"] = np.array(layouts)
    np.savez(path, **arrays)


def hang_in_publish(path, latest, kept):
    # The new checkpoint's files are written but not yet published: tear its
    # data file (as a write cut short would) and wait to be killed.
    for name in os.listdir(path):
        if name.startswith(os.path.basename(latest) + ".data"):
            full = os.path.join(path, name)
            with open(full, "r+b") as f:
                f.truncate(os.path.getsize(full) // 2)
    print("HANG", latest, flush=True)
    time.sleep(600)


def main():
    model = tp = None
    x, y = data()
    for step in json.loads(sys.argv[2]):
        op = step["op"]
        if op == "model":
            model, tp = build_model(step["mesh"], step.get("seed", 0))
        elif op == "train":
            a, b = step["start"] * BATCH, (step["start"] + step["steps"]) * BATCH
            model.fit(x[a:b], y[a:b], batch_size=BATCH, shuffle=False, verbose=0)
        elif op == "save":
            print("SAVED", checkpoint.save_checkpoint(step["path"], model), flush=True)
        elif op == "keras_save":
            plain_checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
            print("SAVED", plain_checkpoint.save(step["path"]), flush=True)
        elif op == "restore":
            print("RESTORED", checkpoint.restore_checkpoint(step["path"], model), flush=True)
        elif op == "dump":
            dump(model, tp, step["path"])
        elif op == "save_and_hang":
            checkpoint._publish = hang_in_publish
            checkpoint.save_checkpoint(step["path"], model)
        else:
            raise ValueError(f"unknown step {op!r}")
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
