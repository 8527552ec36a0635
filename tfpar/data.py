"""Batches onto the mesh: sharded on the data axis, partial batches too."""

import tensorflow as tf

from tfpar import _dtensor
from tfpar.styles import UNSHARDED

__all__ = ["batch_layout", "distribute_batch"]


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


def distribute_batch(batch, mesh, data_axis, *, allow_partial=True):
    """Lays out every tensor of a (nested) batch on the mesh.

    Args:
        batch: a tensor, array, or nest of them (None leaves kept).
        mesh: a `DeviceMesh`.
        data_axis: the mesh axis that splits the batch, or None.
        allow_partial: lay out a batch the data axis does not divide
            replicated (exact); if False, such a batch is an error.

    Returns:
        The same nest, each tensor a DTensor on the mesh.
    """

    def place(x):
        if x is None:
            return None
        if _dtensor.is_dtensor(x):
            return x
        x = tf.convert_to_tensor(x)
        shape = tuple(x.shape)
        if not allow_partial and data_axis is not None:
            _check_divisible(shape, mesh, data_axis)
        return _dtensor.place(x, batch_layout(mesh, data_axis, shape))

    return tf.nest.map_structure(place, batch)
