"""SavedModel export of a (sharded) Keras model, for serving on one device.

A DTensor program does not survive as a SavedModel: its graph keeps DTensor's
`Relayout`/`CopyToMesh` ops, which only a DTensor device can run, and its
variables come back without their layouts. So the export is of an unsharded
copy: the model is cloned outside any mesh, the clone takes the gathered
weights, and Keras' own `model.export` writes it. What comes out is a plain
SavedModel with the `serving_default` signature (input and output names as
Keras gives them) that `tf.saved_model.load` or TF Serving runs on any
device count, without tfpar.
"""

import os
import uuid

import keras
import tensorflow as tf

from tfpar.adapters import keras3 as adapter

__all__ = ["export_saved_model", "unsharded_copy"]


def export_saved_model(model, export_dir, *, input_signature=None):
    """Writes a plain single-device SavedModel of `model`, sharded or not.

    The model is cloned outside any mesh, the clone gets the model's whole
    weights (gathered from the shards), and Keras' `model.export(...,
    format="tf_saved_model")` writes it: a `serve` endpoint and a
    `serving_default` signature with the input and output names Keras gives
    them. The SavedModel is written to a temporary sibling directory and then
    renamed into place, so a server watching `export_dir`'s parent never sees
    a half-written one. The sharded model is left as it was.

    Args:
        model: a built Keras model (Sequential, Functional, or a subclass
            with `get_config`).
        export_dir: the SavedModel directory to write (replaced if it exists).
        input_signature: optional, as for `keras.Model.export`: a list of
            `tf.TensorSpec` (or `keras.InputSpec`) giving the serving inputs'
            shapes, dtypes and names. By default Keras derives it from the
            model's inputs, with a free batch dimension.

    Returns:
        `export_dir`.

    Raises:
        ValueError: the model is not built, or cannot be cloned.

    Example:
        >>> tfpar.export_saved_model(model, "serving/1")
        >>> # anywhere, without tfpar:
        >>> served = tf.saved_model.load("serving/1")
        >>> served.signatures["serving_default"](inputs=x)
    """
    export_dir = os.fspath(export_dir)
    plain = unsharded_copy(model)
    if input_signature is None:
        input_signature = _keras_input_signature(model)
    staging = _staging_sibling(export_dir)
    try:
        plain.export(staging, format="tf_saved_model", verbose=False, input_signature=input_signature)
        _move_into_place(staging, export_dir)
    finally:
        if tf.io.gfile.exists(staging):
            tf.io.gfile.rmtree(staging)
    return export_dir


def unsharded_copy(model):
    """A plain Keras copy of `model` (no mesh, no layouts) holding its whole weights.

    Built outside any `TensorParallel.scope()`, so its variables are
    ordinary single-device ones, whichever scope is open.

    Raises:
        ValueError: the model is not built, or Keras cannot clone it.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected a Keras model. Received: {type(model).__name__}.")
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built. Build it first (give it a keras.Input, "
            "call it on a batch, or call model.build(shape))."
        )
    with adapter.placing(None):
        try:
            plain = keras.models.clone_model(model)
        except Exception as e:  # noqa: BLE001 - Keras raises several kinds here
            raise ValueError(
                f"Cannot clone model {model.name!r} ({type(model).__name__}) to export it: {e} "
                "Subclassed models need get_config() and from_config() (see "
                "keras.models.clone_model)."
            ) from e
        if not plain.built:
            raise ValueError(
                f"The clone of model {model.name!r} is not built; give the model a "
                "keras.Input or a build config so Keras can rebuild it."
            )
    weights = model.get_weights()  # gathered whole from the shards
    if len(weights) != len(plain.weights):
        raise ValueError(
            f"The clone of model {model.name!r} has {len(plain.weights)} weights but the model "
            f"has {len(weights)}; it cannot be exported this way."
        )
    plain.set_weights(weights)
    return plain


def _keras_input_signature(model):
    """The serving signature Keras' `model.export` derives for `model` itself.

    Taken from the original, not the clone, so the inputs keep the original's
    names (a clone's unnamed inputs get fresh ones).
    """
    from keras.src.export import export_utils  # the function model.export calls

    try:
        return export_utils.get_input_signature(model)
    except (TypeError, ValueError):
        return None  # let Keras derive it from the clone, or say why it cannot


def _staging_sibling(export_dir):
    parent, name = os.path.split(os.path.normpath(export_dir))
    if parent:
        tf.io.gfile.makedirs(parent)
    return os.path.join(parent, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _move_into_place(staging, export_dir):
    if tf.io.gfile.exists(export_dir):
        # The old export moves aside first, so export_dir always holds a
        # complete SavedModel or nothing, never a mix of two.
        old = _staging_sibling(export_dir)
        tf.io.gfile.rename(export_dir, old)
        tf.io.gfile.rename(staging, export_dir)
        tf.io.gfile.rmtree(old)
    else:
        tf.io.gfile.rename(staging, export_dir)
