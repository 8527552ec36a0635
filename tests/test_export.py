"""export_saved_model: a plain SavedModel served without tfpar, equal to the sharded model."""

import json
import os
import subprocess
import sys
import sysconfig

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar
from tfpar import testing
from tests.conftest import build_mlp, make_mesh, regression_data

# Runs with `python -S` and only site-packages on the path: the editable
# install's hook (a .pth file) and the repository are out of reach.
SERVE = r"""
import importlib.util, json, sys
import numpy as np
import tensorflow as tf

assert importlib.util.find_spec("tfpar") is None, "tfpar is importable"
x = np.load("x.npy")
report = {"devices": len(tf.config.list_logical_devices())}
outputs = {}
for name in sys.argv[1:]:
    served = tf.saved_model.load(name)
    signature = served.signatures["serving_default"]
    inputs = sorted(signature.structured_input_signature[1])
    (out_name, out), = signature(**{inputs[0]: tf.constant(x)}).items()
    outputs[name] = out.numpy()
    outputs[name + "_serve"] = served.serve(x).numpy()
    report[name] = {"inputs": inputs, "outputs": sorted(signature.structured_outputs)}
report["tfpar_loaded"] = "tfpar" in sys.modules
np.savez("served.npz", **outputs)
print(json.dumps(report))
"""


def build_functional(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8,), name="features")
    h = keras.layers.Dense(16, activation="relu", name="up")(inputs)
    h = keras.layers.Dense(8, activation="relu", name="down")(h)
    return keras.Model(inputs, keras.layers.Dense(4, name="scores")(h), name="net")


def signature_names(export_dir):
    signature = tf.saved_model.load(export_dir).signatures["serving_default"]
    return sorted(signature.structured_input_signature[1]), sorted(signature.structured_outputs)


def test_export_is_served_without_tfpar_and_equals_the_sharded_model(tmp_path):
    x, y = regression_data(24)
    x_new = regression_data(10, seed=3)[0]
    tp = tfpar.TensorParallel(make_mesh("2x2"))
    with tp.scope():
        functional = build_functional()
        functional.compile(optimizer="adam", loss="mse")
    functional.fit(x, y, batch_size=8, verbose=0)
    tp4 = tfpar.TensorParallel(make_mesh("1x4"))
    with tp4.scope():
        sequential = build_mlp()
        sequential.compile(optimizer="adam", loss="mse")
        sequential.fit(x, y, batch_size=8, verbose=0)
        # Inside a scope too, the export is plain.
        tfpar.export_saved_model(sequential, tmp_path / "seq")
    kernel_before = testing.to_numpy(functional.get_layer("up").kernel)
    want_net = functional.predict(x_new, verbose=0)
    want_seq = sequential.predict(x_new, verbose=0)
    tfpar.export_saved_model(functional, tmp_path / "net")
    tfpar.export_saved_model(functional, tmp_path / "net")  # replaces it whole
    spec = [tf.TensorSpec((None, 8), tf.float32, name="rows")]
    assert tfpar.export_saved_model(functional, str(tmp_path / "renamed"), input_signature=spec) == str(
        tmp_path / "renamed"
    )
    assert sorted(os.listdir(tmp_path)) == ["net", "renamed", "seq"]  # no staging left behind

    # The sharded model is as it was, and keeps training on its mesh.
    testing.assert_layout(functional.get_layer("up").kernel, ("unsharded", "model"))
    np.testing.assert_array_equal(testing.to_numpy(functional.get_layer("up").kernel), kernel_before)
    functional.fit(x, y, batch_size=8, verbose=0)
    testing.assert_layout(functional.get_layer("up").kernel, ("unsharded", "model"))

    # No DTensor op in the graphs: they run on a plain device.
    for name in ("net", "renamed", "seq"):
        graph = (tmp_path / name / "saved_model.pb").read_bytes()
        assert b"Relayout" not in graph and b"CopyToMesh" not in graph

    # Names as Keras' own export gives them, for the same model unsharded.
    build_functional().export(str(tmp_path / "keras_net"), verbose=False)
    keras_names = signature_names(str(tmp_path / "keras_net"))
    assert keras_names == (["features"], ["output_0"])
    assert signature_names(str(tmp_path / "net")) == keras_names
    assert signature_names(str(tmp_path / "seq")) == ([sequential.inputs[0].name], ["output_0"])

    # Serve in a fresh process that cannot import tfpar, on one device.
    np.save(tmp_path / "x.npy", x_new)
    (tmp_path / "serve.py").write_text(SERVE)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": sysconfig.get_paths()["purelib"],
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "HOME": str(tmp_path),
    }
    run = subprocess.run(
        [sys.executable, "-S", "serve.py", "net", "renamed", "seq"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["tfpar_loaded"] is False and report["devices"] == 1
    assert report["net"] == {"inputs": ["features"], "outputs": ["output_0"]}
    assert report["renamed"] == {"inputs": ["rows"], "outputs": ["output_0"]}
    assert report["seq"]["inputs"] == [sequential.inputs[0].name]
    served = np.load(tmp_path / "served.npz")
    for name, want in [("net", want_net), ("renamed", want_net), ("seq", want_seq)]:
        np.testing.assert_allclose(served[name], want, atol=1e-6, rtol=0, err_msg=name)
        np.testing.assert_allclose(served[name + "_serve"], want, atol=1e-6, rtol=0, err_msg=name)


def test_export_predictions_equal_the_sharded_model_before_serving(tmp_path):
    x = regression_data(16)[0]
    tp = tfpar.TensorParallel(make_mesh("1x2"))
    with tp.scope():
        model = build_mlp(seed=2)
    tfpar.export_saved_model(model, tmp_path / "m")
    served = tf.saved_model.load(str(tmp_path / "m"))
    np.testing.assert_allclose(served.serve(x).numpy(), model.predict(x, verbose=0), atol=1e-6, rtol=0)


def test_export_of_an_unbuilt_model_says_so(tmp_path):
    model = keras.Sequential([keras.layers.Dense(4)], name="lazy")
    with pytest.raises(ValueError, match="Model 'lazy' is not built"):
        tfpar.export_saved_model(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()
