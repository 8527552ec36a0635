"""Checkpoints across meshes and processes, resuming, interrupted saves, Keras saving.

The cross-process story runs once (module fixture `chain`), four processes in
a row, each a `tests/_checkpoint_worker.py`:

1. 2x2: train 3 steps, save A, dump; train 3 more (the uninterrupted 6-step
   run), dump; start another save into A and get SIGKILLed inside it;
2. 1x4: restore A, dump, train 3 more, dump, save B; then 2x2: restore A,
   train 3 more, dump, save into A again;
3. plain Keras, no mesh: restore B, dump; train 1 step, save C with a plain
   `tf.train.Checkpoint`, dump;
4. 2x2: restore C, dump.
"""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfpar
from tfpar import testing
from tests.conftest import build_mlp, make_mesh, regression_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_checkpoint_worker.py")
ATOL = 1e-6


def _worker(devices, steps, **kwargs):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen(
        [sys.executable, WORKER, str(devices), json.dumps(steps)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs
    )


def _run(devices, steps):
    proc = _worker(devices, steps)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "DONE" in out, out[-3000:]
    return out


def _load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    d = tmp_path_factory.mktemp("chain")
    a, b, c = str(d / "A"), str(d / "B"), str(d / "C" / "plain")
    p = lambda name: str(d / f"{name}.npz")  # noqa: E731

    first = _worker(4, [
        {"op": "model", "mesh": "2x2"},
        {"op": "train", "start": 0, "steps": 3},
        {"op": "save", "path": a},
        {"op": "dump", "path": p("after3")},
        {"op": "train", "start": 3, "steps": 3},
        {"op": "dump", "path": p("after6")},
        {"op": "save_and_hang", "path": a},
    ])
    lines, deadline = [], time.time() + 300
    while time.time() < deadline:
        line = first.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("HANG"):
            first.send_signal(signal.SIGKILL)
            break
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
    after_kill = {
        "files": sorted(os.listdir(a)),
        "latest": tf.train.latest_checkpoint(a),
        "hang": next(line.split()[1] for line in lines if line.startswith("HANG")),
    }

    _run(4, [
        {"op": "model", "mesh": "1x4", "seed": 7},
        {"op": "restore", "path": a},
        {"op": "dump", "path": p("restored_1x4")},
        {"op": "train", "start": 3, "steps": 3},
        {"op": "dump", "path": p("resumed_1x4")},
        {"op": "save", "path": b},
        {"op": "model", "mesh": "2x2", "seed": 7},
        {"op": "restore", "path": a},
        {"op": "train", "start": 3, "steps": 3},
        {"op": "dump", "path": p("resumed_2x2")},
        {"op": "save", "path": a},
    ])
    _run(1, [
        {"op": "model", "mesh": None, "seed": 7},
        {"op": "restore", "path": b},
        {"op": "dump", "path": p("restored_plain")},
        {"op": "train", "start": 6, "steps": 1},
        {"op": "keras_save", "path": c},
        {"op": "dump", "path": p("plain_saved")},
    ])
    out = _run(4, [
        {"op": "model", "mesh": "2x2", "seed": 7},
        {"op": "restore", "path": os.path.dirname(c)},
        {"op": "dump", "path": p("restored_2x2")},
    ])
    names = ["after3", "after6", "restored_1x4", "resumed_1x4", "resumed_2x2", "restored_plain",
             "plain_saved", "restored_2x2"]
    dumps = {n: _load(p(n)) for n in names}
    return {"dumps": dumps, "after_kill": after_kill, "A": a, "last_output": out}


def assert_same_state(got, want, atol=ATOL):
    """Weights, optimizer variables (Adam's moments, iteration) and outputs agree."""
    keys = sorted(k for k in want if k != "layouts")
    assert sorted(k for k in got if k != "layouts") == keys
    for k in keys:
        np.testing.assert_allclose(got[k], want[k], atol=atol, rtol=0, err_msg=k)


def test_2x2_to_1x4_in_a_new_process(chain):
    got, want = chain["dumps"]["restored_1x4"], chain["dumps"]["after3"]
    assert_same_state(got, want)
    assert int(got["o0"]) == 3  # Adam's iteration came along
    assert list(want["layouts"]) == ["2x2:unsharded,model", "2x2:model,unsharded", "2x2:unsharded,model"]
    assert list(got["layouts"]) == ["1x4:unsharded,model", "1x4:model,unsharded", "1x4:unsharded,model"]


def test_1x4_to_unsharded_in_a_new_process(chain):
    got, want = chain["dumps"]["restored_plain"], chain["dumps"]["resumed_1x4"]
    assert_same_state(got, want)
    assert list(got["layouts"]) == ["plain"] * 3


def test_plain_keras_checkpoint_to_2x2_in_a_new_process(chain):
    got, want = chain["dumps"]["restored_2x2"], chain["dumps"]["plain_saved"]
    assert_same_state(got, want)
    assert int(got["o0"]) == 7
    assert list(got["layouts"]) == ["2x2:unsharded,model", "2x2:model,unsharded", "2x2:unsharded,model"]


@pytest.mark.parametrize("mesh", ["2x2", "1x4"])
def test_resuming_equals_training_without_a_break(chain, mesh):
    # 6 steps on 2x2 in one process == 3 steps, save, process killed,
    # restore in a new process on `mesh`, 3 more steps.
    dumps = chain["dumps"]
    assert_same_state(dumps[f"resumed_{mesh}"], dumps["after6"])
    assert np.abs(dumps["after6"]["w0"] - dumps["after3"]["w0"]).max() > 1e-3  # the steps did move


def test_process_killed_during_a_save_leaves_the_previous_checkpoint(chain):
    after_kill, dumps = chain["after_kill"], chain["dumps"]
    # The interrupted save had written (torn) files for ckpt-2, never published.
    assert after_kill["hang"].endswith("ckpt-2")
    assert any(f.startswith("ckpt-2.data") for f in after_kill["files"])
    assert after_kill["latest"].endswith("ckpt-1")
    # The next process restored ckpt-1, the 3-step state, not the 6-step one
    # the torn files were being written from.
    assert_same_state(dumps["restored_1x4"], dumps["after3"])
    assert np.abs(dumps["restored_1x4"]["w0"] - dumps["after6"]["w0"]).max() > 1e-3
    # Its own save into the same directory took a fresh number and cleared the debris.
    files = sorted(os.listdir(chain["A"]))
    assert tf.train.latest_checkpoint(chain["A"]).endswith("ckpt-3")
    assert [f for f in files if not f.startswith("ckpt-3")] == ["checkpoint"], files


# --- in this process ---------------------------------------------------------------------


def compiled(mesh=None, seed=0, **kwargs):
    if mesh is None:
        model = build_mlp(seed=seed, **kwargs)
        model.compile(optimizer="adam", loss="mse")
        return model, None
    tp = tfpar.TensorParallel(make_mesh(mesh))
    with tp.scope():
        model = build_mlp(seed=seed, **kwargs)
        model.compile(optimizer="adam", loss="mse")
    return model, tp


def optimizer_state(model):
    return [np.asarray(v.numpy()) for v in model.optimizer.variables]


def test_save_restore_in_one_process_keeps_each_models_layout(tmp_path):
    x, y = regression_data(16)
    source, _ = compiled("2x2")
    source.fit(x, y, batch_size=8, verbose=0)
    first = tfpar.save_checkpoint(tmp_path / "run", source)
    weights_then = source.get_weights()
    source.fit(x, y, batch_size=8, verbose=0)
    second = tfpar.save_checkpoint(tmp_path / "run", source, max_to_keep=2)
    assert (first, second) == (str(tmp_path / "run" / "ckpt-1"), str(tmp_path / "run" / "ckpt-2"))
    target, tp = compiled("1x4", seed=3)
    assert tfpar.restore_checkpoint(tmp_path / "run", target) == second  # the directory: its latest
    testing.assert_sharded_close(target.weights, source.get_weights(), atol=0)
    testing.assert_sharded_close(target.optimizer.variables, optimizer_state(source), atol=0)
    testing.assert_layout(target.get_layer("up").kernel, ("unsharded", "model"))
    testing.assert_layout(target.optimizer.variables[2], ("unsharded", "model"))  # up/kernel momentum
    assert tp.layout_of(target.get_layer("up").kernel).mesh.dim_size("model") == 4
    plain = build_mlp(seed=4)  # not compiled: weights only
    tfpar.restore_checkpoint(first, plain)  # an explicit prefix: the older one
    for a, b in zip(plain.get_weights(), weights_then):
        np.testing.assert_array_equal(a, b)


def test_shape_mismatch_names_variable_and_both_shapes_and_changes_nothing(tmp_path):
    source, _ = compiled("2x2")
    source.fit(*regression_data(8), verbose=0)  # Adam's moments are in the checkpoint too
    tfpar.save_checkpoint(tmp_path / "run", source)
    wider, _ = compiled("2x2", hidden=32)
    before = wider.get_weights()
    message = r"'mlp/up/kernel' has shape \(8, 32\) in the model but \(8, 16\) in the checkpoint"
    with pytest.raises(ValueError, match=message):
        tfpar.restore_checkpoint(tmp_path / "run", wider)
    for a, b in zip(wider.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    assert int(wider.optimizer.iterations.numpy()) == 0


def test_missing_path_is_named(tmp_path):
    model = build_mlp()
    missing = str(tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match=f"No checkpoint at '{missing}'"):
        tfpar.restore_checkpoint(missing, model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"No checkpoint in directory '.*empty'"):
        tfpar.restore_checkpoint(tmp_path / "empty", model)


def test_optimizer_state_missing_from_a_weights_only_checkpoint(tmp_path):
    source = build_mlp()  # never compiled: the checkpoint holds weights only
    tfpar.save_checkpoint(tmp_path / "w", source)
    target, _ = compiled("1x2", seed=2)
    tfpar.restore_checkpoint(tmp_path / "w", target)  # model.optimizer is left as it is
    testing.assert_sharded_close(target.weights, source.get_weights(), atol=0)
    message = r"holds no state for optimizer 'adam.*' \(14 variable\(s\): '.*/iteration'"
    with pytest.raises(ValueError, match=message):
        tfpar.restore_checkpoint(tmp_path / "w", target, optimizer=keras.optimizers.Adam())


def test_tf_train_checkpoint_and_manager_on_sharded_models(tmp_path):
    x, y = regression_data(16)
    source, _ = compiled("2x2")
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=source, optimizer=source.optimizer), str(tmp_path / "mgr"), max_to_keep=2
    )
    for _ in range(3):
        source.fit(x, y, batch_size=8, verbose=0)
        manager.save()
    assert [os.path.basename(p) for p in manager.checkpoints] == ["ckpt-2", "ckpt-3"]
    assert not any(f.startswith("ckpt-1") for f in os.listdir(tmp_path / "mgr"))
    # Native restore into another mesh; the optimizer, not built yet, is
    # restored when fit builds it (TensorFlow's deferred restoration).
    target, _ = compiled("1x4", seed=3)
    tf.train.Checkpoint(model=target, optimizer=target.optimizer).restore(manager.latest_checkpoint)
    testing.assert_sharded_close(target.weights, source.get_weights(), atol=0)
    source.fit(x[:8], y[:8], batch_size=8, verbose=0)
    target.fit(x[:8], y[:8], batch_size=8, verbose=0)
    testing.assert_sharded_close(target.weights, source.get_weights(), atol=ATOL)
    testing.assert_sharded_close(target.optimizer.variables, optimizer_state(source), atol=ATOL)
    # tfpar reads a CheckpointManager's directory too.
    other, _ = compiled(None, seed=4)
    assert tfpar.restore_checkpoint(tmp_path / "mgr", other).endswith("ckpt-3")
    assert int(other.optimizer.iterations.numpy()) == 6


def test_keras_save_and_load_model(tmp_path):
    x, y = regression_data(16)
    source, _ = compiled("2x2")
    source.fit(x, y, batch_size=8, verbose=0)
    path = str(tmp_path / "m.keras")
    source.save(path)
    want = source.predict(x, verbose=0)
    tp = tfpar.TensorParallel(make_mesh("1x4"))
    with tp.scope():
        loaded = keras.saving.load_model(path)
    testing.assert_layout(loaded.get_layer("up").kernel, ("unsharded", "model"))
    testing.assert_layout(loaded.get_layer("down").kernel, ("model", "unsharded"))
    testing.assert_sharded_close(loaded.weights, source.get_weights(), atol=0)
    testing.assert_sharded_close(loaded.optimizer.variables, optimizer_state(source), atol=0)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), want, atol=ATOL)
    plain = keras.saving.load_model(path)
    assert not tfpar._dtensor.is_dtensor(plain.get_layer("up").kernel._value)
    np.testing.assert_allclose(plain.predict(x, verbose=0), want, atol=ATOL)
    # Both keep training alike.
    loaded.fit(x, y, batch_size=8, verbose=0, shuffle=False)
    plain.fit(x, y, batch_size=8, verbose=0, shuffle=False)
    testing.assert_sharded_close(loaded.weights, plain.get_weights(), atol=1e-5)
