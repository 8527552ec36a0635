"""`tfpar demo`: train a classifier tensor-parallel and prove it equals one device."""

import time

import numpy as np

__all__ = ["run_demo", "versions", "load_digits"]


def versions():
    import keras
    import tensorflow as tf

    import tfpar

    return {"tfpar": tfpar.__version__, "tensorflow": tf.__version__, "keras": keras.__version__}


def load_digits(seed=0):
    """The UCI handwritten digits (8x8 images, 10 classes), shipped in scikit-learn.

    Returns (x_train, y_train, x_test, y_test), features scaled to [0, 1].
    """
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("int32")
    order = np.random.RandomState(seed).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return x[:split], y[:split], x[split:], y[split:]


def build_classifier(hidden, classes=10, features=64):
    import keras

    return keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(hidden, activation="relu", name="up"),
            keras.layers.Dense(hidden // 2, activation="relu", name="down"),
            keras.layers.Dense(classes, name="logits"),
        ],
        name="classifier",
    )


def _train(model, data, epochs, batch_size):
    x, y, xt, yt = data
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0,
              validation_data=(xt, yt))
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(xt, yt, batch_size=batch_size, verbose=0)
    return accuracy, seconds


def run_demo(mesh="2x2", epochs=8, batch_size=64, hidden=128, seed=0, print_fn=print):
    """Trains the digits classifier on `mesh` and unsharded; prints the comparison.

    Returns 0 when the sharded run equals the unsharded one within 1e-5
    (weights) and reaches the same accuracy, 1 otherwise.
    """
    from tfpar.devices import mesh_size, prepare_devices

    devices = prepare_devices(mesh_size(mesh))

    import keras

    import tfpar

    mesh = tfpar.DeviceMesh.parse(mesh, devices=devices)
    kind = mesh.device_type
    data = load_digits(seed)
    print_fn(f"tfpar demo: digits classifier (scikit-learn's UCI digits, {len(data[0])} train / "
             f"{len(data[2])} test images) on {mesh!r}")

    keras.utils.set_random_seed(seed)
    reference = build_classifier(hidden)
    initial = reference.get_weights()
    reference.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])

    tp = tfpar.TensorParallel(mesh)
    with tp.scope():
        model = build_classifier(hidden)
        model.set_weights(initial)
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])

    sharded_accuracy, sharded_s = _train(model, data, epochs, batch_size)
    plain_accuracy, plain_s = _train(reference, data, epochs, batch_size)
    print_fn(tp.describe(model))
    difference = max(float(np.abs(a - b).max()) for a, b in zip(reference.get_weights(), model.get_weights()))
    logits = np.abs(reference.predict(data[2], verbose=0) - model.predict(data[2], verbose=0)).max()
    print_fn(f"epochs: {epochs}, batch size: {batch_size} (final partial batches included)")
    print_fn(f"test accuracy  tensor-parallel: {sharded_accuracy:.4f}   unsharded: {plain_accuracy:.4f}")
    print_fn(f"largest difference from unsharded: weights {difference:.2e}, logits {logits:.2e}")
    print_fn(f"training time  tensor-parallel: {sharded_s:.1f}s   unsharded: {plain_s:.1f}s "
             f"({kind} devices share this machine's cores; see README on speed)")
    ok = difference <= 1e-5 and abs(sharded_accuracy - plain_accuracy) < 1e-6
    print_fn("OK: sharded training equals unsharded." if ok else "MISMATCH: sharded differs from unsharded.")
    return 0 if ok else 1
