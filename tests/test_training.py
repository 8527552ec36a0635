"""Custom training loops: train_step / eval_step equal a plain Keras tape loop."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar
from tfpar import testing
from tests.conftest import build_mlp, make_mesh, regression_data

MESHES = ["1x2", "2x2", "1x4"]
STEPS, BATCH, K = 5, 8, 3
CLIP = 0.1

VARIANTS = {
    "plain": dict(optimizer=lambda: keras.optimizers.Adam(0.01)),
    # SGD, not Adam: Adam's update barely depends on the gradient's scale, so
    # clipping would hardly show in the weights.
    "clipped": dict(optimizer=lambda: keras.optimizers.SGD(0.1, momentum=0.9), clip=CLIP),
    "accumulated": dict(optimizer=lambda: keras.optimizers.Adam(0.01), k=K),
    "metrics": dict(optimizer=lambda: keras.optimizers.Adam(0.01), metrics=True),
}


def make_metrics():
    return [keras.metrics.MeanAbsoluteError(), keras.metrics.MeanSquaredError(name="mse_metric")]


def data(n, seed=0):
    x, y = regression_data(n, seed=seed)
    weights = np.random.RandomState(seed + 1).uniform(0.5, 1.5, size=(n,)).astype("float32")
    return x, y, weights


def plain_loop(model, optimizer, batches, *, clip=None, metrics=(), loss_scaled=False):
    """The unsharded reference: a textbook tf.GradientTape loop on one device."""
    loss_fn = keras.losses.MeanSquaredError()
    optimizer.build(model.trainable_variables)  # the loss scale is read before the first apply

    @tf.function
    def step(x, y, w):
        with tf.GradientTape() as tape:
            pred = model(x, training=True)
            loss = loss_fn(y, pred, sample_weight=w)
            target = optimizer.scale_loss(loss) if loss_scaled else loss
        grads = tape.gradient(target, model.trainable_variables)
        logs = {"loss": loss}
        if clip is not None:
            scale = optimizer.dynamic_scale if loss_scaled else 1.0
            grads = [g / scale for g in grads]
            logs["grad_norm"] = tf.linalg.global_norm(grads)
            grads, _ = tf.clip_by_global_norm(grads, clip, use_norm=logs["grad_norm"])
            grads = [g * scale for g in grads]  # a power of two: exact
        optimizer.apply(grads, model.trainable_variables)
        for m in metrics:
            m.update_state(y, pred, sample_weight=w)
            logs[m.name] = m.result()
        return logs

    return [{k: float(v) for k, v in step(*b).items()} for b in batches]


def batches_of(arrays, size, count, weighted=False):
    x, y, w = arrays
    return [
        (x[i * size : (i + 1) * size], y[i * size : (i + 1) * size], w[i * size : (i + 1) * size] if weighted else None)
        for i in range(count)
    ]


@functools.cache
def reference(variant):
    """STEPS unsharded steps (on batches of K*BATCH rows when accumulating): logs, weights, state."""
    cfg = VARIANTS[variant]
    size = BATCH * cfg.get("k", 1)
    model, optimizer = build_mlp(), cfg["optimizer"]()
    logs = plain_loop(
        model,
        optimizer,
        batches_of(data(STEPS * size), size, STEPS, weighted=cfg.get("metrics", False)),
        clip=cfg.get("clip"),
        metrics=make_metrics() if cfg.get("metrics") else (),
    )
    return logs, model.get_weights(), [v.numpy() for v in optimizer.variables]


def laid_out_mlp(mesh):
    tp = tfpar.TensorParallel(make_mesh(mesh))
    with tp.scope():
        model = build_mlp()
    return tp, model


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mesh", MESHES)
def test_steps_equal_unsharded(mesh, variant):
    cfg = VARIANTS[variant]
    k = cfg.get("k", 1)
    want_logs, want_weights, want_state = reference(variant)
    _, model = laid_out_mlp(mesh)
    step = tfpar.train_step(
        model,
        cfg["optimizer"](),  # made outside the scope: train_step moves it onto the mesh
        keras.losses.MeanSquaredError(),
        metrics=make_metrics() if cfg.get("metrics") else None,
        clip_global_norm=cfg.get("clip"),
        accumulation_steps=k,
    )
    batches = batches_of(data(STEPS * k * BATCH), BATCH, STEPS * k, weighted=cfg.get("metrics", False))
    got = [step(*b) for b in batches]
    assert all(isinstance(v, tf.Tensor) and v.shape == () for logs in got for v in logs.values())
    got = [{name: float(v) for name, v in logs.items()} for logs in got]
    if k > 1:
        # Equal micro-batches: the mean of their mean losses is the mean loss
        # of the k*BATCH rows the reference steps on.
        losses = np.array([g["loss"] for g in got]).reshape(STEPS, k).mean(axis=1)
        np.testing.assert_allclose(losses, [w["loss"] for w in want_logs], atol=1e-5)
    else:
        assert sorted(got[0]) == sorted(want_logs[0])
        for g, w in zip(got, want_logs):
            np.testing.assert_allclose([g[n] for n in sorted(w)], [w[n] for n in sorted(w)], atol=1e-5)
    if "clip" in cfg:
        norms = [g["grad_norm"] for g in got]
        assert min(norms) > 2 * CLIP, f"clipping must happen on every step; norms were {norms}"
    assert int(testing.to_numpy(step.optimizer.iterations)) == STEPS
    testing.assert_sharded_close(model.weights, want_weights, atol=1e-5)
    testing.assert_sharded_close(step.optimizer.variables, want_state, atol=1e-5)


def test_jit_compiled_step_equals_unsharded():
    want_logs, want_weights, _ = reference("plain")
    _, model = laid_out_mlp("2x2")
    step = tfpar.train_step(model, VARIANTS["plain"]["optimizer"](), "mse", jit_compile=True)
    losses = [float(step(x, y)["loss"]) for x, y, _ in batches_of(data(STEPS * BATCH), BATCH, STEPS)]
    np.testing.assert_allclose(losses, [w["loss"] for w in want_logs], atol=1e-5)
    testing.assert_sharded_close(model.weights, want_weights, atol=1e-5)


def test_distributed_dataset_loop_with_partial_batches_and_accumulation():
    """43 rows in batches of 8: the last batch (3 rows) is replicated, windows of 2 are uneven."""
    x, y, _ = data(43)
    windows = [(0, 16), (16, 32), (32, 43)]  # accumulation_steps=2 over batches 8,8 | 8,8 | 8,3
    plain = build_mlp()
    want = plain_loop(plain, keras.optimizers.SGD(0.1, momentum=0.9), [(x[a:b], y[a:b], None) for a, b in windows])

    tp, model = laid_out_mlp("2x2")
    step = tfpar.train_step(model, keras.optimizers.SGD(0.1, momentum=0.9), "mse", accumulation_steps=2)
    batches = list(tp.distribute_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)))
    testing.assert_layout(batches[0][0], ("batch", "unsharded"))
    testing.assert_layout(batches[-1][0], ("unsharded", "unsharded"))
    losses = [float(step(xb, yb)["loss"]) for xb, yb in batches]
    # Each window's loss is the row-weighted mean of its batches' mean losses.
    rows = [8, 8, 8, 8, 8, 3]
    for (first, second), w in zip([(0, 1), (2, 3), (4, 5)], want):
        mean = (losses[first] * rows[first] + losses[second] * rows[second]) / (rows[first] + rows[second])
        np.testing.assert_allclose(mean, w["loss"], atol=1e-5)
    testing.assert_sharded_close(model.weights, plain.get_weights(), atol=1e-5)


def test_eval_step_equals_unsharded_and_accumulates_metrics():
    x, y, w = data(21)
    plain = build_mlp()
    plain_metric = keras.metrics.MeanAbsoluteError()
    want_losses = []
    for a, b in [(0, 8), (8, 16), (16, 21)]:
        pred = plain(x[a:b])
        want_losses.append(float(keras.losses.MeanSquaredError()(y[a:b], pred, sample_weight=w[a:b])))
        plain_metric.update_state(y[a:b], pred, sample_weight=w[a:b])

    _, model = laid_out_mlp("2x2")
    evaluate = tfpar.eval_step(model, keras.losses.MeanSquaredError(), metrics=["mae"])
    logs = [evaluate(x[a:b], y[a:b], w[a:b]) for a, b in [(0, 8), (8, 16), (16, 21)]]
    np.testing.assert_allclose([float(g["loss"]) for g in logs], want_losses, atol=1e-5)
    np.testing.assert_allclose(float(logs[-1]["mean_absolute_error"]), float(plain_metric.result()), atol=1e-5)
    assert evaluate.experimental_get_tracing_count() == 2  # sharded batches; the replicated 5-row one
    evaluate.reset_metrics()
    assert float(evaluate(x[:8], y[:8], w[:8])["mean_absolute_error"]) == pytest.approx(
        float(keras.metrics.MeanAbsoluteError()(y[:8], plain(x[:8]), sample_weight=w[:8])), abs=1e-5
    )


@pytest.mark.parametrize("accumulation_steps, traces", [(1, 1), (2, 2)])
def test_step_is_traced_once_over_ten_calls(accumulation_steps, traces):
    calls = []

    def loss_fn(y_true, y_pred):
        calls.append(1)  # Python runs only while tracing
        return tf.reduce_mean(tf.square(y_true - y_pred))

    tp, model = laid_out_mlp("2x2")
    step = tfpar.train_step(
        model, keras.optimizers.Adam(0.01), loss_fn, metrics=["mae"], accumulation_steps=accumulation_steps
    )
    x, y, _ = data(10 * BATCH)
    for i in range(10):  # numpy batches, laid out by the step
        step(x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH])
    # accumulate-only and update calls are two functions, each traced once.
    assert len(calls) == traces
    assert step.experimental_get_tracing_count() == traces


def test_regularization_losses_are_added():
    def build():
        keras.utils.set_random_seed(0)
        return keras.Sequential([
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", kernel_regularizer=keras.regularizers.L2(0.1), name="up"),
            keras.layers.Dense(4, name="down"),
        ])

    x, y, _ = data(STEPS * BATCH)
    batches = [(x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH]) for i in range(STEPS)]
    plain, optimizer = build(), keras.optimizers.SGD(0.1)

    @tf.function
    def plain_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(plain(xb, training=True) - yb)) + tf.add_n(plain.losses)
        optimizer.apply(tape.gradient(loss, plain.trainable_variables), plain.trainable_variables)
        return loss

    want = [float(plain_step(xb, yb)) for xb, yb in batches]
    tp = tfpar.TensorParallel(make_mesh("1x2"))
    with tp.scope():
        model = build()
    testing.assert_layout(model.get_layer("up").kernel, ("unsharded", "model"))  # a sharded L2 sum
    step = tfpar.train_step(model, keras.optimizers.SGD(0.1), "mse")
    np.testing.assert_allclose([float(step(xb, yb)["loss"]) for xb, yb in batches], want, atol=1e-5)
    testing.assert_sharded_close(model.weights, plain.get_weights(), atol=1e-5)


@pytest.fixture
def policy():
    """Sets the global mixed-precision policy for one test; always restores it."""
    previous = keras.mixed_precision.global_policy()
    try:
        yield keras.mixed_precision.set_global_policy
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _assert_float32_state(model, step, compute_dtype):
    assert all(layer.compute_dtype == compute_dtype for layer in model.layers)
    assert all(v.dtype == "float32" and testing.to_numpy(v).dtype == np.float32 for v in model.weights)
    assert all(v.dtype in ("float32", "int64") for v in step.optimizer.variables)
    for layer in ("up", "down"):
        assert tfpar._dtensor.layout_of(model.get_layer(layer).kernel._value) is not None


@pytest.mark.parametrize("mesh", MESHES)
def test_mixed_bfloat16_close_to_unsharded_bfloat16(mesh, policy):
    policy("mixed_bfloat16")
    x, y, _ = data(STEPS * BATCH)
    batches = [(x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH], None) for i in range(STEPS)]
    plain = build_mlp()
    want = plain_loop(plain, keras.optimizers.SGD(0.1), batches)
    _, model = laid_out_mlp(mesh)
    step = tfpar.train_step(model, keras.optimizers.SGD(0.1), keras.losses.MeanSquaredError())
    losses = [float(step(xb, yb)["loss"]) for xb, yb, _ in batches]
    _assert_float32_state(model, step, "bfloat16")
    # Why these tolerances: both runs round every matmul to bfloat16 (unit
    # roundoff u = 2**-8 ~ 3.9e-3), but over different partial sums (the row
    # layer all-reduces per-shard bf16 partial products; the data split
    # reorders the batch reductions), so activations may differ by about one
    # bf16 ulp. The loss then differs by ~u relatively: rtol 1e-2 (~2.5u;
    # measured ~2.9e-3). SGD moves a weight by lr * sum_t g_t, so weights
    # differ by at most lr * STEPS * u * max|g| ~ 0.1 * 5 * 3.9e-3 ~ 2e-3 for
    # gradients of order one (measured <= 4e-4). A sharding error (a missing
    # all-reduce, a shard-local norm) is of order lr * |g| ~ 0.1: far outside.
    np.testing.assert_allclose(losses, [w["loss"] for w in want], rtol=1e-2)
    testing.assert_sharded_close(model.weights, plain.get_weights(), atol=2e-3)


def test_mixed_float16_with_loss_scaling_and_clipping(policy):
    policy("mixed_float16")
    x, y, _ = data(STEPS * BATCH)
    batches = [(x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH], None) for i in range(STEPS)]

    def optimizer():
        return keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1, momentum=0.9))

    plain, plain_optimizer = build_mlp(), optimizer()
    want = plain_loop(plain, plain_optimizer, batches, clip=CLIP, loss_scaled=True)
    _, model = laid_out_mlp("2x2")
    step = tfpar.train_step(model, optimizer(), keras.losses.MeanSquaredError(), clip_global_norm=CLIP)
    logs = [step(xb, yb) for xb, yb, _ in batches]
    _assert_float32_state(model, step, "float16")
    assert float(testing.to_numpy(step.optimizer.dynamic_scale)) == float(plain_optimizer.dynamic_scale.numpy())
    assert int(testing.to_numpy(step.optimizer.iterations)) == STEPS  # no step skipped as non-finite
    assert min(float(g["grad_norm"]) for g in logs) > 2 * CLIP
    # As for bfloat16, with float16's unit roundoff u = 2**-11 ~ 4.9e-4:
    # loss rtol 2e-3 (~4u); weights lr * STEPS * 4u * max|g| ~ 1e-3.
    np.testing.assert_allclose([float(g["loss"]) for g in logs], [w["loss"] for w in want], rtol=2e-3)
    np.testing.assert_allclose([float(g["grad_norm"]) for g in logs], [w["grad_norm"] for w in want], rtol=2e-3)
    testing.assert_sharded_close(model.weights, plain.get_weights(), atol=1e-3)


# --- errors -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_accumulation_steps_below_one_is_an_error(bad):
    _, model = laid_out_mlp("1x2")
    message = r"accumulation_steps must be an integer >= 1 .* Received: accumulation_steps="
    with pytest.raises(ValueError, match=message):
        tfpar.train_step(model, keras.optimizers.SGD(), "mse", accumulation_steps=bad)


def test_non_positive_clip_norm_is_an_error():
    _, model = laid_out_mlp("1x2")
    with pytest.raises(ValueError, match=r"clip_global_norm must be a positive number.*clip_global_norm=0"):
        tfpar.train_step(model, keras.optimizers.SGD(), "mse", clip_global_norm=0)


def test_indivisible_batch_without_partial_handling_is_an_error():
    tp, model = laid_out_mlp("2x2")
    x, y, _ = data(9)
    step = tfpar.train_step(model, keras.optimizers.SGD(), "mse", allow_partial=False)
    message = r"A batch of 9 rows does not divide over the 'batch' axis of size 2"
    with pytest.raises(ValueError, match=message):
        step(x, y)
    evaluate = tfpar.eval_step(model, "mse", allow_partial=False)
    with pytest.raises(ValueError, match=message):
        evaluate(x, y)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(9)
    with pytest.raises(ValueError, match=message):
        next(iter(tp.distribute_dataset(dataset, allow_partial=False)))
    # A replicated DTensor of 9 rows is refused too, not silently accepted.
    with pytest.raises(ValueError, match=message):
        step(*tp._distribute((x, y), allow_partial=True))
    assert float(step(x[:8], y[:8])["loss"]) > 0  # divisible batches still train


def test_model_never_laid_out_is_an_error():
    model = build_mlp()
    message = r"train_step needs a model laid out by a tfpar.TensorParallel, but model 'mlp' was never laid out"
    with pytest.raises(ValueError, match=message):
        tfpar.train_step(model, keras.optimizers.SGD(), "mse")
    with pytest.raises(ValueError, match=r"eval_step needs a model laid out .* Build it inside `tp.scope\(\)`"):
        tfpar.eval_step(model, "mse")
