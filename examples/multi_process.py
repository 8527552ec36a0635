"""Tensor parallelism across processes: one 2x2 mesh over two processes.

Run on one machine (two processes, two logical CPUs each):

    tfpar launch -n 2 --devices-per-process 2 -- python examples/multi_process.py

or on two hosts, each with its own index and the same address list:

    DTENSOR_CLIENT_ID=0 DTENSOR_NUM_CLIENTS=2 DTENSOR_JOBS=host0:9470,host1:9470 \\
        python examples/multi_process.py        # on host0; DTENSOR_CLIENT_ID=1 on host1

The mesh is `batch=2, model=2`: the batch axis runs across the processes (each
process computes half of every batch) and the model axis within a process
(each Dense kernel split over its two devices, so the tensor-parallel
all-reduces stay inside a host; only gradients cross hosts). Every process
runs this same program. Two ways to feed data:

* `model.fit(x, y)`: every process passes the whole data set, identically;
* `tp.distribute_dataset(ds)`: each process reads only its share of every
  batch (`ds.shard(num_processes, process_index)`), here for a hand-written
  `tf.function` training step.

Both give the weights a single process on a 2x2 mesh gets
(`python examples/multi_process.py` on its own runs that one process).
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import tfpar  # noqa: E402
import tfpar.testing  # noqa: E402

BATCH = 8
LEARNING_RATE = 0.05


def build_model(seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", name="up"),
            keras.layers.Dense(8, activation="relu", name="down"),
            keras.layers.Dense(4, name="head"),
        ],
        name="mlp",
    )


def make_data(steps, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(steps * BATCH, 8).astype("float32")
    y = rng.randn(steps * BATCH, 4).astype("float32")
    return x, y


def train_fit(tp, x, y):
    """`fit` as in one process: every process passes the same x and y."""
    import keras

    with tp.scope():
        model = build_model()
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return model, history.history["loss"]


def process_rows(x, num_processes, index):
    """This process's rows of every batch: a contiguous 1/P block of each."""
    part = BATCH // num_processes
    rows = np.arange(len(x)).reshape(-1, num_processes, part)[:, index].reshape(-1)
    return x[rows]


def train_custom(tp, x, y, num_processes=1, index=0, on_step=None):
    """A hand-written step; each process feeds only its part of each batch."""
    import tensorflow as tf

    with tp.scope():
        model = build_model()
    xs, ys = process_rows(x, num_processes, index), process_rows(y, num_processes, index)
    dataset = tf.data.Dataset.from_tensor_slices((xs, ys)).batch(
        BATCH // num_processes, drop_remainder=True
    )

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(xb) - yb))
        grads = tape.gradient(loss, model.trainable_variables)
        for variable, grad in zip(model.trainable_variables, grads):
            variable.assign_sub(LEARNING_RATE * grad)
        return loss

    losses = []
    for k, (xb, yb) in enumerate(tp.distribute_dataset(dataset)):
        losses.append(float(tfpar.testing.to_numpy(step(xb, yb))))
        if on_step is not None:
            on_step(k, losses[-1])
    return model, losses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=None, help="process 0 writes the weights here (.npz)")
    parser.add_argument("--loop", choices=("fit", "custom", "both"), default="both")
    args = parser.parse_args(argv)

    if "DTENSOR_JOBS" in os.environ or "TFPAR_DEVICES_PER_PROCESS" in os.environ:
        job = tfpar.initialize()  # reads DTENSOR_* and TFPAR_DEVICES_PER_PROCESS, as `tfpar launch` sets them
    else:  # run on its own: one process, four logical CPUs stand in for the 2x2 mesh
        job = tfpar.initialize(devices_per_process=4, device_type="CPU")
    rank, nproc = job["process_id"], job["num_processes"]
    print(f"process {rank} of {nproc} (pid {os.getpid()}), local devices {job['local_devices']}",
          flush=True)
    mesh = tfpar.DeviceMesh((2, 2))
    tp = tfpar.TensorParallel(mesh)
    print(f"mesh {mesh!r}", flush=True)
    x, y = make_data(args.steps)
    results = {}
    if args.loop in ("fit", "both"):
        model, losses = train_fit(tp, x, y)
        print(f"fit: loss {losses[-1]:.6f}", flush=True)
        results.update({f"fit_{i}": tfpar.testing.to_numpy(w) for i, w in enumerate(model.weights)})
    if args.loop in ("custom", "both"):

        def on_step(k, loss):
            print(f"custom step {k}: loss {loss:.6f}", flush=True)

        model, losses = train_custom(tp, x, y, nproc, rank, on_step)
        results.update({f"custom_{i}": tfpar.testing.to_numpy(w) for i, w in enumerate(model.weights)})
    if args.out and rank == 0:
        np.savez(args.out, **results)
        print(f"weights written to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
