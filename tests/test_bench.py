"""`tfpar bench` and its baselines, at a size that runs in seconds.

Every configuration starts from the same weights and sees the same batches
in the same order under the same Adam, so their final losses must agree up
to float32 rounding: the configurations differ only in the order partial
sums are added (sharded matmuls, all-reduces), which moves a float32 result
by about 1e-7 relative per operation. Measured at this size the final losses
agree to about 1e-8 relative; a real fault (a missed all-reduce, Adam
reading a stale moment, a shard laid out on the wrong device) moves them by
1e-3 or more, so rtol=1e-5 separates the two by orders of magnitude on
either side.
"""

import json

import numpy as np
import pytest

from tfpar import baselines, bench
from tfpar.devices import mesh_size
from tfpar.cli import main

from .conftest import DEVICES

HIDDEN, LAYERS, BATCH, STEPS, WARMUP = 64, 2, 32, 3, 1
LOSS_RTOL = 1e-5

API_FIELDS = {
    "name", "mesh", "devices", "step_time_s", "samples_per_s",
    "per_device_param_bytes", "per_device_optimizer_bytes", "final_loss",
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    json_path, plot_path = out / "bench.json", out / "bench.png"
    rc = main([
        "bench", "--mesh", "1x2", "--mesh", "2x2", "--hidden", str(HIDDEN), "--layers", str(LAYERS),
        "--batch", str(BATCH), "--steps", str(STEPS), "--warmup", str(WARMUP),
        "--json", str(json_path), "--plot", str(plot_path), "--no-progress",
    ])
    assert rc == 0
    with open(json_path) as f:
        return json.load(f), plot_path


def test_json_has_every_configuration_and_field(results):
    data, _ = results
    configs = data["configs"]
    names = [(c["name"], c["mesh"]) for c in configs]
    for expected in [("single", "1x1"), ("mirrored", "2x1"), ("mirrored", "4x1"),
                     ("dtensor_raw", "1x2"), ("dtensor_raw", "2x2"), ("tfpar", "1x2"), ("tfpar", "2x2")]:
        assert names.count(expected) == 1, (expected, names)
    for c in configs:
        assert API_FIELDS <= set(c), c
        assert c["devices"] == int(np.prod([int(s) for s in c["mesh"].split("x")]))
        assert c["step_time_s"] > 0 and np.isfinite(c["step_time_s"])
        assert c["samples_per_s"] == pytest.approx(BATCH / c["step_time_s"])
        assert len(c["step_times_s"]) == STEPS
        assert c["per_device_param_bytes"] > 0 and c["per_device_optimizer_bytes"] > 0
    tp = next(c for c in configs if c["name"] == "tfpar" and c["mesh"] == "1x2")
    assert tp["ratio_to_dtensor_raw"] > 0 and tp["speedup_over_mirrored"] > 0
    assert data["settings"]["hidden"] == HIDDEN and data["settings"]["steps"] == STEPS


def test_final_losses_agree_and_training_happened(results):
    data, _ = results
    losses = {f"{c['name']} {c['mesh']}": c["final_loss"] for c in data["configs"]}
    reference = losses["single 1x1"]
    for label, loss in losses.items():
        assert loss == pytest.approx(reference, rel=LOSS_RTOL), (label, losses)
    assert reference < data["settings"]["initial_loss"]


def test_bytes_per_device_follow_the_layouts(results):
    data, _ = results
    rows = {(c["name"], c["mesh"]): c for c in data["configs"]}
    kernel, bias = HIDDEN * HIDDEN * 4, HIDDEN * 4
    full = LAYERS * (kernel + bias)
    # One device and every mirrored replica hold everything.
    for key in [("single", "1x1"), ("mirrored", "2x1"), ("mirrored", "4x1")]:
        assert rows[key]["per_device_param_bytes"] == full
    # On model=2: both kernels and the column bias halved, the row bias whole.
    half = kernel // 2 + bias // 2 + kernel // 2 + bias
    for name in ("tfpar", "dtensor_raw"):
        for mesh in ("1x2", "2x2"):
            assert rows[(name, mesh)]["per_device_param_bytes"] == half
    # Adam: two moments per weight (+ tfpar/Keras' step count and learning rate).
    assert 2 * half <= rows[("tfpar", "1x2")]["per_device_optimizer_bytes"] <= 2 * half + 16
    met = [t for t in data["targets"] if "bytes" in t["target"]]
    assert met and all(t["met"] for t in met)


def test_plot_is_a_png(results):
    _, plot_path = results
    content = plot_path.read_bytes()
    assert content[:8] == b"\x89PNG\r\n\x1a\n"
    assert content[12:16] == b"IHDR" and len(content) > 10_000


def test_mirrored_fit_equals_the_custom_loop():
    """`model.fit` under MirroredStrategy and the hand-written loop train alike."""
    x, y = baselines.make_data(32, 16, 3)
    weights = baselines.build_mlp(32, 2).get_weights()
    strategy = baselines.mirrored_strategy(DEVICES[:2])
    fitted = baselines.KerasTrainer(weights, x, y, batch=16, layers=2, strategy=strategy)
    fitted.fit(epochs=1)
    loop = baselines.MirroredCustomLoop(weights, x, y, batch=16, layers=2, strategy=strategy)
    for _ in range(3):
        loop.step()
    for a, b in zip(fitted.get_weights(), loop.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(weights[0], loop.get_weights()[0])


def test_bench_rejects_bad_settings():
    with pytest.raises(ValueError, match="steps >= 1"):
        bench.run_bench(["1x2"], hidden=8, layers=2, batch=4, steps=0)
    assert mesh_size("batch=2,model=2") == 4 and mesh_size("1x4") == 4 and mesh_size("4") == 4
