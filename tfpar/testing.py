"""Assertions for sharded values, for tfpar's tests and its users' tests.

In the manner of DTensor's own test utilities: check a DTensor's layout,
global shape and dtype, that the replicas of each shard agree, and that its
reassembled value is close to an expected (unsharded) value.
"""

import numpy as np
from tensorflow.experimental import dtensor

from tfpar import _dtensor

__all__ = ["assert_sharded_close", "assert_layout", "assert_replicas_agree", "to_numpy"]


def to_numpy(value):
    """The whole value of a tensor, DTensor, (Keras) variable or array."""
    value = getattr(value, "_value", value)
    if isinstance(value, np.ndarray):
        return value
    return _dtensor.gather(value).numpy()


def assert_layout(value, spec):
    """Asserts `value` is a DTensor laid out with sharding `spec` (a tuple)."""
    value = getattr(value, "_value", value)
    layout = _dtensor.layout_of(value)
    if layout is None:
        raise AssertionError(f"{value!r} is not a DTensor; expected sharding {tuple(spec)}.")
    if tuple(layout.sharding_specs) != tuple(spec):
        raise AssertionError(f"Layout {tuple(layout.sharding_specs)} != expected {tuple(spec)}.")


def assert_replicas_agree(value):
    """Asserts every device holding the same shard holds the same numbers."""
    value = getattr(value, "_value", value)
    if hasattr(value, "read_value"):
        value = value.read_value()
    if not _dtensor.is_dtensor(value):
        return
    layout = dtensor.fetch_layout(value)
    shards = [c.numpy() for c in dtensor.unpack(value)]
    seen = {}
    for device, shard in enumerate(shards):
        key = _shard_key(layout, device)
        if key in seen:
            np.testing.assert_array_equal(seen[key], shard, err_msg=f"replica {device} differs")
        else:
            seen[key] = shard


def _shard_key(layout, device):
    coords = layout.mesh.local_device_locations()[device]
    return tuple(coords[name] for name in layout.sharding_specs if name in coords)


def assert_sharded_close(actual, expected, *, atol=1e-5, rtol=0.0, spec=None, err_msg=""):
    """Asserts a sharded value reassembles to `expected` within `atol`.

    Args:
        actual: DTensor, laid-out variable, or list of them.
        expected: arrays (or list of arrays) from the unsharded computation.
        atol: absolute tolerance (float32: 1e-5 is tfpar's contract).
        spec: optionally, the sharding every `actual` must have.
    """
    if isinstance(actual, (list, tuple)):
        if len(actual) != len(expected):
            raise AssertionError(f"{len(actual)} values != {len(expected)} expected. {err_msg}")
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_sharded_close(a, e, atol=atol, rtol=rtol, spec=spec, err_msg=f"{err_msg} [item {i}]")
        return
    if spec is not None:
        assert_layout(actual, spec)
    assert_replicas_agree(actual)
    got = to_numpy(actual)
    want = to_numpy(expected)
    if got.shape != want.shape:
        raise AssertionError(f"Shape {got.shape} != expected {want.shape}. {err_msg}")
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=err_msg)
