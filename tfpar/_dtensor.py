"""Every DTensor data movement tfpar makes: place, gather, reshard.

This is the only module that calls `relayout`, `pack`, `unpack` and
`copy_to_mesh` (Megatron's `mappings.py` idea): layers, styles and the Keras
adapter say *where* a tensor should live, and this module moves it.
"""

import numpy as np
import tensorflow as tf
from tensorflow.experimental import dtensor

__all__ = [
    "LaidOutVariable",
    "bytes_per_device",
    "gather",
    "is_dtensor",
    "layout",
    "layout_of",
    "place",
    "replicated",
]


def layout(mesh, spec):
    """A `dtensor.Layout` on `mesh` (a DeviceMesh or dtensor Mesh) from a spec tuple."""
    mesh = getattr(mesh, "dtensor_mesh", mesh)
    return dtensor.Layout(list(spec), mesh)


def replicated(mesh, rank):
    mesh = getattr(mesh, "dtensor_mesh", mesh)
    return dtensor.Layout.replicated(mesh, rank=rank)


def is_dtensor(value):
    if isinstance(value, tf.Variable):
        return isinstance(value, dtensor.DVariable) or _has_layout(value)
    if not tf.is_tensor(value) or not tf.executing_eagerly():
        return False
    try:
        return dtensor.is_dtensor(value)
    except Exception:  # noqa: BLE001 - symbolic / non-eager tensors
        return False


def _has_layout(variable):
    return getattr(variable, "layout", None) is not None


def layout_of(value):
    """The layout of a DTensor or DTensor variable (None for plain tensors)."""
    if isinstance(value, tf.Variable):
        return getattr(value, "layout", None)
    if is_dtensor(value):
        return dtensor.fetch_layout(value)
    return None


def place(value, target):
    """Lays `value` out with layout `target`.

    A plain tensor or array is copied onto the mesh (replicated) and then
    resharded; a DTensor is resharded if its layout differs. Inside a traced
    function the relayout is explicit, which DTensor needs for correct
    ordering (see `LaidOutVariable`).
    """
    if not tf.executing_eagerly():
        return dtensor.relayout(value, target)
    if isinstance(value, tf.Variable):
        value = value.read_value()
    if not is_dtensor(value):
        value = tf.convert_to_tensor(value)
        rank = value.shape.rank
        value = dtensor.copy_to_mesh(value, dtensor.Layout.replicated(target.mesh, rank=rank))
    current = dtensor.fetch_layout(value)
    if current == target:
        return value
    if current.mesh != target.mesh:
        # Moving across meshes goes through the host: gather, then place.
        return place(gather(value), target)
    return dtensor.relayout(value, target)


def gather(value):
    """A plain (single-device) tensor holding the whole value of `value`."""
    if isinstance(value, tf.Variable):
        value = value.read_value()
    if not is_dtensor(value):
        return tf.convert_to_tensor(value)
    current = dtensor.fetch_layout(value)
    full = dtensor.Layout.replicated(current.mesh, rank=current.rank)
    if current != full:
        value = dtensor.relayout(value, full)
    return dtensor.unpack(value)[0]


def bytes_per_device(value):
    """Bytes each local device holds of `value`, read from its real shards."""
    if isinstance(value, tf.Variable):
        value = value.read_value()
    if not is_dtensor(value):
        t = tf.convert_to_tensor(value)
        return [int(np.prod(t.shape)) * t.dtype.size]
    return [int(np.prod(c.shape)) * c.dtype.size for c in dtensor.unpack(value)]


class LaidOutVariable(dtensor.DVariable):
    """A DVariable that keeps every write in its own layout.

    DTensor mis-orders a write whose value has another layout than the
    variable: inside a `tf.function`, a read that follows
    `v.assign_add(value_sharded)` on a replicated `v` can see the value from
    before the write. Keras 3's Adam does exactly this (replicated moments,
    sharded gradients) and trains silently wrong. Relayouting the value to
    the variable's layout before every write removes the mismatch at its
    root, so any optimizer or metric that writes variables stays exact.
    """

    def _in_layout(self, value):
        return place(value, self.layout)

    def assign(self, value, use_locking=None, name=None, read_value=True):
        return super().assign(self._in_layout(value), use_locking, name, read_value)

    def assign_add(self, delta, use_locking=None, name=None, read_value=True):
        return super().assign_add(self._in_layout(delta), use_locking, name, read_value)

    def assign_sub(self, delta, use_locking=None, name=None, read_value=True):
        return super().assign_sub(self._in_layout(delta), use_locking, name, read_value)

    def numpy(self):
        return gather(self.read_value()).numpy()

    def __array__(self, dtype=None):
        return np.asarray(self.numpy(), dtype=dtype)


def make_variable(value, target, *, dtype=None, trainable=True, name=None):
    """A `LaidOutVariable` with layout `target` holding `value`."""
    if dtype is not None and not is_dtensor(value):
        value = tf.cast(tf.convert_to_tensor(value), dtype)
    return LaidOutVariable(place(value, target), trainable=trainable, name=name)


def unshard_last_dim(value, mesh):
    """All-gathers the last dimension of `value`, leaving the others as they are."""
    rank = value.shape.rank
    spec = [dtensor.MATCH] * (rank - 1) + [dtensor.UNSHARDED]
    return dtensor.relayout(value, layout(mesh, spec))
