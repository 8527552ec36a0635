"""The first law: sharded results equal unsharded Keras from the same weights."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar
from tfpar import testing
from tests.conftest import MESHES, build_mlp, make_mesh, regression_data

OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.05),
    "rmsprop": lambda: keras.optimizers.RMSprop(0.01),
    "adagrad": lambda: keras.optimizers.Adagrad(0.1),
}
STEPS, BATCH = 5, 8


@functools.cache
def reference(optimizer):
    """Plain Keras on one device: history, weights, optimizer state, eval, predict."""
    x, y = regression_data(STEPS * BATCH)
    model = build_mlp()
    model.compile(optimizer=OPTIMIZERS[optimizer](), loss="mse", metrics=["mae"])
    history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return {
        "history": history.history,
        "weights": model.get_weights(),
        "state": [v.numpy() for v in model.optimizer.variables],
        "evaluate": model.evaluate(x, y, batch_size=BATCH, verbose=0),
        "predict": model.predict(x, batch_size=BATCH, verbose=0),
    }


def sharded_model(mesh, optimizer="adam", plan="auto"):
    tp = tfpar.TensorParallel(mesh, plan)
    with tp.scope():
        model = build_mlp()
        model.compile(optimizer=OPTIMIZERS[optimizer](), loss="mse", metrics=["mae"])
    return tp, model


@pytest.mark.parametrize("mesh", MESHES)
def test_forward_and_gradients_equal_unsharded(mesh):
    x, y = regression_data(BATCH)
    plain = build_mlp()
    tp, model = sharded_model(make_mesh(mesh))
    testing.assert_sharded_close(model.weights, plain.get_weights(), atol=0)

    def loss_and_grads(m, xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(m(xb) - yb))
        return m(xb), loss, tape.gradient(loss, m.trainable_variables)

    want_out, want_loss, want_grads = loss_and_grads(plain, x, y)
    xb, yb = tp._distribute((x, y))
    got_out, got_loss, got_grads = tf.function(loss_and_grads)(model, xb, yb)
    testing.assert_sharded_close(got_out, want_out.numpy())
    testing.assert_sharded_close(got_loss, want_loss.numpy())
    testing.assert_sharded_close(got_grads, [g.numpy() for g in want_grads])


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("mesh", MESHES)
def test_fit_evaluate_predict_equal_unsharded(mesh, optimizer):
    want = reference(optimizer)
    x, y = regression_data(STEPS * BATCH)
    tp, model = sharded_model(make_mesh(mesh), optimizer)
    history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    np.testing.assert_allclose(history.history["loss"], want["history"]["loss"], atol=1e-5)
    np.testing.assert_allclose(history.history["mae"], want["history"]["mae"], atol=1e-5)
    testing.assert_sharded_close(model.weights, want["weights"], atol=1e-5)
    testing.assert_sharded_close(model.optimizer.variables, want["state"], atol=1e-5)
    np.testing.assert_allclose(model.evaluate(x, y, batch_size=BATCH, verbose=0), want["evaluate"], atol=1e-5)
    np.testing.assert_allclose(model.predict(x, batch_size=BATCH, verbose=0), want["predict"], atol=1e-5)


@pytest.mark.parametrize("optimizer", ["rmsprop", "adagrad"])
def test_other_stock_optimizers_on_2x2(optimizer):
    want = reference(optimizer)
    x, y = regression_data(STEPS * BATCH)
    _, model = sharded_model(make_mesh("2x2"), optimizer)
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    testing.assert_sharded_close(model.weights, want["weights"], atol=1e-5)
    testing.assert_sharded_close(model.optimizer.variables, want["state"], atol=1e-5)


@pytest.mark.parametrize("mesh", ["1x2", "2x2", "1x4"])
def test_optimizer_state_takes_its_variables_layout(mesh):
    tp, model = sharded_model(make_mesh(mesh), "adam")
    x, y = regression_data(BATCH)
    model.fit(x, y, batch_size=BATCH, verbose=0)
    kernel = model.get_layer("up").kernel
    testing.assert_layout(kernel, ("unsharded", "model"))
    testing.assert_layout(model.get_layer("down").kernel, ("model", "unsharded"))
    testing.assert_layout(model.get_layer("up").bias, ("model",))
    testing.assert_layout(model.get_layer("down").bias, ("unsharded",))
    stems = {"up": ("unsharded", "model"), "down": ("model", "unsharded")}
    for v in model.optimizer.variables:
        for layer, spec in stems.items():
            if f"_{layer}_kernel_" in v.path:
                testing.assert_layout(v, spec)


@pytest.mark.parametrize("mesh, n", [("1x2", 2), ("1x4", 4), ("2x2", 2)])
def test_per_device_bytes_of_kernels_and_state_are_one_nth(mesh, n):
    tp, model = sharded_model(make_mesh(mesh), "adam")
    x, y = regression_data(BATCH)
    model.fit(x, y, batch_size=BATCH, verbose=0)
    for name in ("up", "down"):
        kernel = model.get_layer(name).kernel
        full = int(np.prod(kernel.shape)) * 4
        shards = tfpar._dtensor.bytes_per_device(kernel._value)
        assert shards == [full // n] * make_mesh(mesh).size
        for v in model.optimizer.variables:
            if f"_{name}_kernel_" in v.path:
                assert tfpar._dtensor.bytes_per_device(v._value) == [full // n] * make_mesh(mesh).size
    report = tp.memory_report(model)
    assert report["per_device_bytes"] < report["total_bytes"]
    assert report["per_device_param_bytes"] == max(
        sum(s) for s in zip(*[tfpar._dtensor.bytes_per_device(w._value) for w in model.weights])
    )


def test_adam_under_plain_dtensor_bug_is_avoided():
    """Keras 3 Adam on DTensor without tfpar's fixes trains silently wrong.

    Inside a tf.function on a mesh, DTensor can run a variable's read before
    an earlier write of it (Adam's moments are written, then read), so the
    weight update sees stale moments. tfpar's variable forwards the written
    value to later reads. This pins the DTensor behaviour, so a TF upgrade
    that fixes it shows up here, and shows tfpar's variable is immune.
    """
    from tensorflow.experimental import dtensor

    mesh = make_mesh("1x2")
    rep, col = tfpar._dtensor.replicated(mesh, 2), tfpar._dtensor.layout(mesh, ("unsharded", "model"))
    a = np.arange(1, 9, dtype="float32").reshape(2, 4)

    def run(variable_class):
        w = variable_class(tfpar._dtensor.place(a, col))
        m = variable_class(tfpar._dtensor.place(np.zeros_like(a), rep))
        v = variable_class(tfpar._dtensor.place(np.zeros_like(a), rep))

        @tf.function
        def adam_like_step(g):
            m.assign_add((g - m) * 0.1)
            v.assign_add((tf.square(g) - v) * 0.001)
            w.assign_sub(m * 0.01 / (tf.sqrt(v) + 1e-7))

        adam_like_step(tfpar._dtensor.place(a, col))
        return testing.to_numpy(w)

    m, v = 0.1 * a, 0.001 * a * a
    expected = a - m * 0.01 / (np.sqrt(v) + 1e-7)
    np.testing.assert_allclose(run(tfpar._dtensor.LaidOutVariable), expected, atol=1e-6)
    plain = run(dtensor.DVariable)
    assert not np.allclose(plain, expected), "DTensor fixed its stale read; tfpar's workaround may go."
