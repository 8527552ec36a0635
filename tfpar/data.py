"""Batches onto the mesh: sharded on the data axis, partial batches too."""

import tensorflow as tf

from tfpar import _dtensor
from tfpar.styles import UNSHARDED

__all__ = ["batch_layout", "distribute_batch", "process_batch_layout"]


def batch_layout(mesh, data_axis, shape):
    """The layout of one batch tensor of `shape`.

    The leading (batch) dimension is sharded on `data_axis` when the axis
    divides it. A batch it does not divide (the final partial batch of a
    data set, say) is laid out replicated instead: every data-parallel row
    of the mesh then computes that whole batch, which gives exactly the
    unsharded result, at the cost of repeated work for that one batch.
    """
    rank = len(shape)
    if rank == 0 or data_axis is None:
        return _dtensor.replicated(mesh, rank)
    size = mesh.axis_size(data_axis)
    batch = shape[0]
    if batch is None or batch % size:
        return _dtensor.replicated(mesh, rank)
    return _dtensor.layout(mesh, (data_axis,) + (UNSHARDED,) * (rank - 1))


def _check_divisible(shape, mesh, data_axis):
    size = mesh.axis_size(data_axis)
    if shape and shape[0] is not None and shape[0] % size:
        raise ValueError(
            f"A batch of {shape[0]} rows does not divide over the {data_axis!r} axis "
            f"of size {size}. Use a batch size that is a multiple of {size}, drop the "
            "remainder (dataset.batch(..., drop_remainder=True)), or keep "
            "partial-batch handling on (allow_partial=True)."
        )


def process_batch_layout(mesh, data_axis, local_shape):
    """(layout, global shape) of a batch of which this process holds `local_shape`.

    The batch is sharded on `data_axis`; this process's rows are the shards
    its devices hold, so the global batch is the local one times the number
    of data-axis shards over the number held here.
    """
    rank = len(local_shape)
    if rank == 0 or data_axis is None:
        return _dtensor.replicated(mesh, rank), tuple(local_shape)
    target = _dtensor.layout(mesh, (data_axis,) + (UNSHARDED,) * (rank - 1))
    held, total = _dtensor.local_shard_counts(target, 0)
    rows = local_shape[0]
    if rows is None or rows % held:
        raise ValueError(
            f"This process's batch of {rows} rows does not divide over the {held} "
            f"{data_axis!r} shard(s) its devices hold. In a multi-process job every process "
            f"feeds the same number of rows, a multiple of {held}: batch with "
            "drop_remainder=True."
        )
    return target, (rows // held * total,) + tuple(local_shape[1:])


def distribute_batch(batch, mesh, data_axis, *, allow_partial=True, per_process=False):
    """Lays out every tensor of a (nested) batch on the mesh.

    Args:
        batch: a tensor, array, or nest of them (None leaves kept).
        mesh: a `DeviceMesh`.
        data_axis: the mesh axis that splits the batch, or None.
        allow_partial: lay out a batch the data axis does not divide
            replicated (exact); if False, such a batch is an error.
        per_process: in a multi-process job, `batch` is this process's part
            of the global batch (the rows its devices hold on `data_axis`;
            see `_dtensor.pack_local`), not the whole batch every process
            holds alike. Every process then feeds batches of one size, and a
            partial batch cannot be laid out replicated. No effect in a
            single process, where the part is the whole.

    Returns:
        The same nest, each tensor a DTensor on the mesh.
    """
    this_process_part = per_process and mesh.num_processes > 1

    def place(x):
        if x is None:
            return None
        laid_out = _dtensor.is_dtensor(x)
        if not laid_out:
            x = tf.convert_to_tensor(x)
        shape = tuple(x.shape)
        if not this_process_part and not allow_partial and data_axis is not None:
            # DTensors too: one laid out replicated may hold a partial batch.
            _check_divisible(shape, mesh, data_axis)
        if laid_out:
            return x
        if this_process_part:
            target, _ = process_batch_layout(mesh, data_axis, shape)
            return _dtensor.pack_local(x, target)
        return _dtensor.place(x, batch_layout(mesh, data_axis, shape))

    return tf.nest.map_structure(place, batch)
