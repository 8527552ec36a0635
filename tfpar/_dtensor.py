"""Every DTensor data movement tfpar makes: place, gather, reshard.

This is the only module that calls `relayout`, `pack`, `unpack` and
`copy_to_mesh` (Megatron's `mappings.py` idea): layers, styles and the Keras
adapter say *where* a tensor should live, and this module moves it.
"""

import weakref

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
    "local_shard_counts",
    "pack_local",
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


def local_shard_counts(target, dim):
    """(shards of dimension `dim` that this process's devices hold, shards in all).

    For a batch laid out on a `(P, K)` mesh over P processes, sharded on the
    first axis: (1, P), each process holds one row block. A dimension that is
    not sharded: (1, 1).
    """
    axis = target.sharding_specs[dim]
    if axis == dtensor.UNSHARDED:
        return 1, 1
    mesh = target.mesh
    a = mesh.dim_names.index(axis)
    held = {mesh.device_location(d)[a] for d in mesh.local_device_ids()}
    return len(held), mesh.dim_size(axis)


def pack_local(value, target):
    """A DTensor with layout `target` built from this process's part of it.

    Multi-process feeding: each process holds only the block of the global
    tensor its own devices need (for a batch sharded on a mesh axis that runs
    across processes, its rows). Along every sharded dimension the local
    block is the concatenation, in order, of the shards this process's
    devices hold; the global shape is the local one times (shards in all /
    shards held here). Nothing crosses processes: `dtensor.pack` assembles
    the DTensor from local components. In a single process this equals
    `place(value, target)`.

    Raises:
        ValueError: the local block does not divide into the shards this
            process holds.
    """
    value = tf.convert_to_tensor(value)
    mesh = target.mesh
    shape = value.shape.as_list()
    local_ids = list(mesh.local_device_ids())
    components = []
    for device in local_ids:
        location = mesh.device_location(device)
        index = []
        for dim, axis in enumerate(target.sharding_specs):
            if axis == dtensor.UNSHARDED:
                index.append(slice(None))
                continue
            a = mesh.dim_names.index(axis)
            held = sorted({mesh.device_location(d)[a] for d in local_ids})
            if shape[dim] % len(held):
                raise ValueError(
                    f"This process's block of {shape[dim]} along dimension {dim} does not "
                    f"divide into the {len(held)} shard(s) of mesh axis {axis!r} its devices "
                    f"hold. Give each process a multiple of {len(held)} (e.g. batch with "
                    "drop_remainder=True)."
                )
            step = shape[dim] // len(held)
            start = held.index(location[a]) * step
            index.append(slice(start, start + step))
        components.append(value[tuple(index)])
    return dtensor.pack(components, target)


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
    """A DVariable whose reads inside a function see that function's writes.

    DTensor (TF 2.21) can order a `ReadVariableOp` before an earlier
    `AssignVariableOp` of the same variable inside a `tf.function` (observed:
    the read returns the old value, as if the automatic control dependency
    between them were dropped when the function runs on the mesh). Keras 3's Adam writes its moments and then reads them to update
    the weight, so on a mesh it trains silently wrong (the weight update sees
    moments of zero, or stale ones). Eager execution is unaffected.

    This variable removes the dependence on that edge: inside a traced
    function each write computes the new value as a tensor, writes it, and
    later reads in the same function return that tensor (a data dependency,
    which lowering keeps). Every written value is first put in the
    variable's own layout. Eagerly it behaves as any DVariable.
    """

    def _pending_values(self):
        pending = self.__dict__.get("_tfpar_pending")
        if pending is None:
            pending = self.__dict__["_tfpar_pending"] = weakref.WeakKeyDictionary()
        return pending

    def _write(self, kind, value, use_locking, name, read_value):
        value = place(value, self.layout)
        if tf.executing_eagerly():
            method = getattr(super(), kind)
            return method(value, use_locking, name, read_value)
        graph = tf.compat.v1.get_default_graph()
        pending = self._pending_values()
        previous = pending.get(graph)
        current = self._pending_value()
        if kind == "assign":
            new = value
        else:
            if current is None:
                current = super()._read_variable_op()
            new = current + value if kind == "assign_add" else current - value
        deps = [previous[1]] if previous is not None else []
        with tf.control_dependencies(deps):
            op = super().assign(new, use_locking=use_locking, name=name, read_value=False)
        pending[graph] = (new, op)
        if read_value:
            with tf.control_dependencies([op]):
                return tf.identity(new)
        return op

    def assign(self, value, use_locking=None, name=None, read_value=True):
        return self._write("assign", value, use_locking, name, read_value)

    def assign_add(self, delta, use_locking=None, name=None, read_value=True):
        return self._write("assign_add", delta, use_locking, name, read_value)

    def assign_sub(self, delta, use_locking=None, name=None, read_value=True):
        return self._write("assign_sub", delta, use_locking, name, read_value)

    def _read_variable_op(self, no_copy=False):
        if not tf.executing_eagerly():
            current = self._pending_value()
            if current is not None:
                return tf.identity(current)
        return super()._read_variable_op(no_copy=no_copy)

    def _pending_value(self):
        """The value last written in this function, or an enclosing one.

        A `tf.cond`/`tf.while_loop` body is a graph of its own inside the
        function: it sees a write made before it through its outer graph
        (the tensor is captured into the body).
        """
        pending = self._pending_values()
        graph = tf.compat.v1.get_default_graph()
        while graph is not None:
            previous = pending.get(graph)
            if previous is not None:
                return previous[0]
            graph = getattr(graph, "outer_graph", None)
        return None

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
