"""fit / evaluate / predict features of Keras, on a sharded model, equal to plain Keras."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar
from tfpar import testing
from tests.conftest import build_mlp, make_mesh, regression_data


def compiled_pair(mesh="2x2", **compile_kwargs):
    compile_kwargs.setdefault("optimizer", "adam")
    compile_kwargs.setdefault("loss", "mse")
    plain = build_mlp()
    plain.compile(**compile_kwargs)
    tp = tfpar.TensorParallel(make_mesh(mesh))
    with tp.scope():
        sharded = build_mlp()
        kwargs = dict(compile_kwargs)
        if not isinstance(kwargs["optimizer"], str):
            kwargs["optimizer"] = kwargs["optimizer"].__class__.from_config(kwargs["optimizer"].get_config())
        sharded.compile(**kwargs)
    return plain, tp, sharded


def test_partial_final_batch_and_predict_rows_in_order():
    # 37 rows in batches of 8: the last batch (5 rows) does not divide the data axis (2).
    x, y = regression_data(37)
    plain, _, sharded = compiled_pair()
    h1 = plain.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    h2 = sharded.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    np.testing.assert_allclose(h2.history["loss"], h1.history["loss"], atol=1e-5)
    testing.assert_sharded_close(sharded.weights, plain.get_weights())
    want = plain.predict(x, batch_size=6, verbose=0)
    got = sharded.predict(x, batch_size=6, verbose=0)
    assert got.shape == (37, 4)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_tf_data_datasets_validation_and_callbacks(tmp_path):
    x, y = regression_data(40)
    xv, yv = regression_data(12, seed=1)
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    val = tf.data.Dataset.from_tensor_slices((xv, yv)).batch(5)
    seen = []

    class RecordWeights(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append([w.copy() for w in self.model.get_weights()])

    histories = []
    for model in compiled_pair(metrics=["mae"])[::2]:
        seen.clear()
        histories.append(
            model.fit(
                train,
                validation_data=val,
                epochs=3,
                verbose=0,
                callbacks=[
                    RecordWeights(),
                    keras.callbacks.EarlyStopping(monitor="val_loss", patience=5),
                    keras.callbacks.ModelCheckpoint(
                        str(tmp_path / f"ckpt{len(histories)}.weights.h5"), save_weights_only=True
                    ),
                ],
            )
        )
        histories[-1].recorded = [list(w) for w in seen]
    plain_h, sharded_h = histories
    for key in ("loss", "mae", "val_loss", "val_mae"):
        np.testing.assert_allclose(sharded_h.history[key], plain_h.history[key], atol=1e-5)
    assert len(sharded_h.recorded) == 3
    for a, b in zip(plain_h.recorded, sharded_h.recorded):
        for wa, wb in zip(a, b):
            np.testing.assert_allclose(wb, wa, atol=1e-5)
    assert (tmp_path / "ckpt1.weights.h5").exists()


def test_validation_split_and_steps_per_execution():
    x, y = regression_data(50)
    plain, _, sharded = compiled_pair(steps_per_execution=3)
    h1 = plain.fit(x, y, batch_size=8, epochs=2, validation_split=0.2, shuffle=False, verbose=0)
    h2 = sharded.fit(x, y, batch_size=8, epochs=2, validation_split=0.2, shuffle=False, verbose=0)
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(h2.history[key], h1.history[key], atol=1e-5)
    testing.assert_sharded_close(sharded.weights, plain.get_weights())


def test_early_stopping_stops_the_sharded_run_like_plain():
    x, y = regression_data(16)
    runs = []
    for model in compiled_pair(optimizer=keras.optimizers.SGD(10.0))[::2]:  # diverges: loss rises
        h = model.fit(x, y, batch_size=8, epochs=10, verbose=0, shuffle=False,
                      callbacks=[keras.callbacks.EarlyStopping(monitor="loss", patience=1)])
        runs.append(len(h.history["loss"]))
    assert runs[0] == runs[1] < 10


def test_progress_bar_prints(capsys):
    x, y = regression_data(16)
    _, _, sharded = compiled_pair()
    sharded.fit(x, y, batch_size=8, epochs=1, verbose=1)
    assert "loss" in capsys.readouterr().out


def test_get_set_save_load_weights(tmp_path):
    x, y = regression_data(16)
    plain, tp, sharded = compiled_pair("1x4")
    sharded.fit(x, y, batch_size=8, verbose=0)
    trained = sharded.get_weights()
    path = str(tmp_path / "m.weights.h5")
    sharded.save_weights(path)
    plain.load_weights(path)  # sharded -> plain
    for a, b in zip(plain.get_weights(), trained):
        np.testing.assert_array_equal(a, b)
    fresh = [np.full_like(w, 0.5) for w in trained]
    sharded.set_weights(fresh)
    testing.assert_sharded_close(sharded.weights, fresh, atol=0)
    testing.assert_layout(sharded.get_layer("up").kernel, ("unsharded", "model"))
    sharded.load_weights(path)  # file -> sharded, layouts kept
    testing.assert_sharded_close(sharded.weights, trained, atol=0)
    testing.assert_layout(sharded.get_layer("up").kernel, ("unsharded", "model"))


def test_train_and_test_on_batch():
    x, y = regression_data(8)
    plain, _, sharded = compiled_pair()
    np.testing.assert_allclose(sharded.train_on_batch(x, y), plain.train_on_batch(x, y), atol=1e-5)
    np.testing.assert_allclose(sharded.test_on_batch(x, y), plain.test_on_batch(x, y), atol=1e-5)
    np.testing.assert_allclose(sharded.predict_on_batch(x), plain.predict_on_batch(x), atol=1e-5)


def test_shard_an_already_built_model_with_pretrained_weights():
    x, y = regression_data(24)
    plain = build_mlp()
    plain.compile(optimizer="adam", loss="mse")
    plain.fit(x, y, batch_size=8, verbose=0)  # "pretrained", optimizer state built
    model = build_mlp(seed=5)
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, batch_size=8, verbose=0)
    model.set_weights(plain.get_weights())
    for a, b in zip(model.optimizer.variables, plain.optimizer.variables):
        a.assign(b.numpy())
    tp = tfpar.TensorParallel(make_mesh("2x2"))
    assert tp.shard(model) is model
    testing.assert_layout(model.get_layer("up").kernel, ("unsharded", "model"))
    testing.assert_sharded_close(model.weights, plain.get_weights(), atol=0)
    plain.fit(x, y, batch_size=8, verbose=0, shuffle=False)
    model.fit(x, y, batch_size=8, verbose=0, shuffle=False)
    testing.assert_sharded_close(model.weights, plain.get_weights())
    testing.assert_sharded_close(model.optimizer.variables, [v.numpy() for v in plain.optimizer.variables])


def test_functional_model_with_nested_submodel_and_dict_plan():
    def build():
        keras.utils.set_random_seed(3)
        block_in = keras.Input((16,))
        h = keras.layers.Dense(32, activation="gelu", name="up")(block_in)
        block = keras.Model(block_in, keras.layers.Dense(16, name="down")(h), name="block")
        inputs = keras.Input((8,))
        h = keras.layers.Dense(16, name="embed")(inputs)
        h = keras.layers.LayerNormalization(name="norm")(block(h) + h)
        return keras.Model(inputs, keras.layers.Dense(3, name="head")(h))

    # A sub-model's layers built before the sub-model keep their own path
    # ("up"), as Keras' layer.path says.
    plan = {r"up": tfpar.ColumnParallel(), r"down": tfpar.RowParallel()}
    x, y = regression_data(16, out_features=3)
    plain = build()
    plain.compile(optimizer="adamw", loss="mse")
    tp = tfpar.TensorParallel(make_mesh("2x2"), plan)
    with tp.scope():
        sharded = build()
        sharded.compile(optimizer="adamw", loss="mse")
    plain.fit(x, y, batch_size=8, verbose=0, shuffle=False, epochs=2)
    sharded.fit(x, y, batch_size=8, verbose=0, shuffle=False, epochs=2)
    testing.assert_sharded_close(sharded.weights, plain.get_weights())
    up = sharded.get_layer("block").get_layer("up")
    testing.assert_layout(up.kernel, ("unsharded", "model"))
    testing.assert_layout(sharded.get_layer("embed").kernel, ("unsharded", "unsharded"))
    table = tp.describe(sharded)
    assert "up" in table and "ColumnParallel" in table and "[unsharded, model]" in table


def test_dropout_seed_state_and_metrics_live_on_the_mesh():
    tp = tfpar.TensorParallel(make_mesh("1x2"))
    with tp.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dropout(0.5),
                                  keras.layers.Dense(4)])
        model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    x, y = regression_data(16)
    model.fit(x, y, batch_size=8, verbose=0)
    from tfpar.adapters.keras3 import model_variables

    for v in model_variables(model):
        assert tp.layout_of(v) is not None, v.path


# --- errors a user meets -------------------------------------------------------------------


def test_units_not_divisible_in_a_dict_plan_fails_at_creation():
    tp = tfpar.TensorParallel(make_mesh("1x4"), {r"mlp/down": tfpar.ColumnParallel()})
    with pytest.raises(ValueError, match=r"Dense 'mlp/down' has units=6, which the 'model' axis of size 4 does not divide; use a multiple of 4 or replicate"):
        with tp.scope():
            keras.Sequential([keras.Input((8,)), keras.layers.Dense(6, name="down")], name="mlp")


def test_plan_key_matching_nothing_is_reported_with_candidates():
    tp = tfpar.TensorParallel(make_mesh("1x2"), {r"mlp/up": tfpar.ColumnParallel(), r"mlp/ffn": tfpar.RowParallel()})
    with tp.scope():
        model = build_mlp()
    with pytest.raises(ValueError, match=r"Plan keys match no layer: \['mlp/ffn'\].*'mlp/up', 'mlp/down', 'mlp/head'"):
        tp.describe(model)


def test_style_on_a_layer_it_cannot_shard():
    tp = tfpar.TensorParallel(make_mesh("1x2"), {r"m/norm": tfpar.ColumnParallel()})
    with pytest.raises(TypeError, match=r"cannot shard layer 'm/norm' of type LayerNormalization"):
        with tp.scope():
            keras.Sequential([keras.Input((8,)), keras.layers.LayerNormalization(name="norm")], name="m")


def test_layout_of_a_plain_variable():
    tp = tfpar.TensorParallel(make_mesh("1x2"))
    with pytest.raises(ValueError, match="is not on a mesh; create it inside tp.scope"):
        tp.layout_of(build_mlp().get_layer("up").kernel)


def test_plain_models_are_untouched():
    plain = build_mlp()
    plain.compile(optimizer="adam", loss="mse")
    x, y = regression_data(8)
    plain.fit(x, y, verbose=0)
    assert not tfpar._dtensor.is_dtensor(plain.get_layer("up").kernel._value)


def test_per_batch_logs_seen_by_callbacks_equal_plain():
    x, y = regression_data(32)
    runs = []

    class BatchLogs(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            runs[-1].append((logs["loss"], logs["mae"]))

    for model in compiled_pair(metrics=["mae"])[::2]:
        runs.append([])
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[BatchLogs()])
    assert len(runs[0]) == len(runs[1]) == 8
    np.testing.assert_allclose(runs[1], runs[0], atol=1e-5)


def test_memory_report_counts_optimizer_state_once_built():
    x, y = regression_data(8)
    _, tp, sharded = compiled_pair("1x4")
    before = tp.memory_report(sharded)
    assert before["optimizer_bytes"] == 0 and before["per_device_optimizer_bytes"] == 0
    sharded.fit(x, y, batch_size=8, verbose=0)
    after = tp.memory_report(sharded)
    assert after["param_bytes"] == before["param_bytes"]
    # Adam: two moments per weight, plus its int64 iteration and float32 learning rate.
    assert after["optimizer_bytes"] == 2 * after["param_bytes"] + 8 + 4
    assert after["total_bytes"] == after["param_bytes"] + after["optimizer_bytes"]
    assert after["per_device_optimizer_bytes"] < after["optimizer_bytes"] / 2


def test_auto_plan_starts_afresh_in_each_scope():
    tp = tfpar.TensorParallel(make_mesh("1x2"))
    with tp.scope():
        build_mlp()
    with tp.scope():
        keras.utils.set_random_seed(0)
        second = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="a"),
                                   keras.layers.Dense(8, name="b")])
    testing.assert_layout(second.get_layer("a").kernel, ("unsharded", "model"))
    testing.assert_layout(second.get_layer("b").kernel, ("model", "unsharded"))


def test_compile_outside_scope_sample_and_class_weights_and_x_only_dataset():
    x, y = regression_data(30)
    weights = np.random.RandomState(3).rand(30).astype("float32")
    plain = build_mlp()
    tp = tfpar.TensorParallel(make_mesh("2x2"))
    with tp.scope():
        sharded = build_mlp()
    histories = []
    for model in (plain, sharded):  # the sharded model is compiled outside the scope
        model.compile(optimizer="adam", loss="mse", metrics=["mae"])
        histories.append(model.fit(x, y, sample_weight=weights, batch_size=8, epochs=2,
                                   shuffle=False, verbose=0).history)
    for key in ("loss", "mae"):
        np.testing.assert_allclose(histories[1][key], histories[0][key], atol=1e-5)
    testing.assert_sharded_close(sharded.weights, plain.get_weights())
    np.testing.assert_allclose(sharded.evaluate(x, y, sample_weight=weights, verbose=0),
                               plain.evaluate(x, y, sample_weight=weights, verbose=0), atol=1e-5)
    only_x = tf.data.Dataset.from_tensor_slices(x).batch(7)
    got = sharded.predict(only_x, verbose=0)
    assert got.shape == (30, 4)
    np.testing.assert_allclose(got, plain.predict(only_x, verbose=0), atol=1e-5)

    labels = np.random.RandomState(4).randint(0, 4, 30)
    class_weight = {0: 1.0, 1: 2.0, 2: 0.5, 3: 1.5}
    runs = []
    for model in compiled_pair(
        optimizer="rmsprop",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )[::2]:
        runs.append(model.fit(x, labels, class_weight=class_weight, batch_size=8, epochs=2,
                              shuffle=False, verbose=0))
        runs[-1].weights = model.get_weights()
    np.testing.assert_allclose(runs[1].history["loss"], runs[0].history["loss"], atol=1e-5)
    for a, b in zip(runs[0].weights, runs[1].weights):
        np.testing.assert_allclose(b, a, atol=1e-5)


def test_optimizer_built_in_a_scope_for_a_plain_model_is_replicated_on_the_mesh():
    plain = build_mlp()
    tp = tfpar.TensorParallel(make_mesh("1x2"))
    with tp.scope():
        optimizer = keras.optimizers.Adam()
        optimizer.build(plain.trainable_variables)
    for v in optimizer.variables:
        testing.assert_layout(v, ("unsharded",) * len(v.shape))
