"""Checkpoints that outlive their mesh: save on one layout, restore on any other.

A checkpoint is an ordinary TensorFlow object-based checkpoint of
`tf.train.Checkpoint(model=model, optimizer=optimizer)`: every variable is
stored whole (DTensor's saver writes the global value, not the shards), keyed
by where it sits in the model's object graph (`model/.../_kernel`,
`optimizer/_variables/3`), never by device or layout. So the same files are
read by a sharded model on any mesh, by a plain Keras model, and by
`tf.train.Checkpoint.restore` itself; and a plain Keras `tf.train.Checkpoint`
restores into a sharded model.

Restoring matches the checkpoint's object graph against the model's (as
`tf.train.Checkpoint` does), checks every shape before touching anything, then
reads each value on the host and assigns it through its Keras variable, which
lays it out as that variable already is: the layout comes from the model
being restored into, not from the checkpoint.

Writes are atomic. `save_checkpoint(path, ...)` treats `path` as a directory
of numbered checkpoints (`ckpt-1`, `ckpt-2`, ...) with a `checkpoint` state
file, the layout `tf.train.CheckpointManager` uses. A new checkpoint is
written under a fresh number, and only once it is complete is the state file
replaced (write a temporary sibling, then rename) to point at it; older ones
are deleted after that. A process killed mid-save leaves the state file
pointing at the previous, complete checkpoint, which the next restore finds;
the next save clears the torn files.
"""

import os
import re
import uuid

import keras
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from tfpar.adapters import keras3 as adapter

__all__ = ["restore_checkpoint", "save_checkpoint"]

_STATE_FILE = "checkpoint"
_PREFIX = "ckpt"
_NUMBERED = re.compile(rf"^{_PREFIX}-(\d+)(?:[._].*)?$")
_OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


def save_checkpoint(path, model, optimizer=None, *, max_to_keep=1):
    """Saves the model's weights and optimizer state, readable on any mesh.

    Each variable is written whole, whatever its layout, so the checkpoint
    restores on another mesh, into a plain Keras model, or with
    `tf.train.Checkpoint(model=..., optimizer=...).restore`.

    Args:
        path: a directory; it holds numbered checkpoints and a `checkpoint`
            state file (as `tf.train.CheckpointManager` writes), created if
            needed.
        model: a built Keras model, sharded or not.
        optimizer: the optimizer whose state to save; by default
            `model.optimizer` (if the model is compiled).
        max_to_keep: how many checkpoints to keep in `path`, newest first
            (None keeps all). Older ones are deleted after the new one is
            complete.

    Returns:
        The prefix of the checkpoint written, e.g. `"run/ckpt-3"`; pass it or
        `path` to `restore_checkpoint`.

    Raises:
        ValueError: the model is not built.

    Example:
        >>> tfpar.save_checkpoint("run", model)      # model on a 2x2 mesh
        'run/ckpt-1'
        >>> tfpar.restore_checkpoint("run", other)   # other on 1x4, or plain
    """
    _check_built(model, "save")
    if max_to_keep is not None and max_to_keep < 1:
        raise ValueError(f"max_to_keep must be at least 1 or None. Received: max_to_keep={max_to_keep!r}.")
    path = os.fspath(path)
    tf.io.gfile.makedirs(path)
    number = _next_number(path)
    prefix = os.path.join(path, f"{_PREFIX}-{number}")
    _root(model, _optimizer_for(model, optimizer)).write(prefix)
    if _is_chief():
        kept = [p for p in _recorded_checkpoints(path) if p != prefix] + [prefix]
        if max_to_keep is not None:
            kept = kept[-max_to_keep:]
        _publish(path, prefix, kept)
        _remove_others(path, kept)
    return prefix


def restore_checkpoint(path, model, optimizer=None):
    """Restores weights (and optimizer state) into `model`, on its own layout.

    The checkpoint may come from any mesh or from a plain Keras model
    (`save_checkpoint`, `tf.train.Checkpoint(model=..., optimizer=...)`,
    `tf.train.CheckpointManager`). Values are read on the host and assigned
    through each variable, which keeps the layout the model has now.

    The optimizer is built first if it is not yet (on the model's mesh), so
    its state can be restored before training resumes. Every shape is
    checked before any variable changes.

    Args:
        path: a directory written by `save_checkpoint` or a
            `tf.train.CheckpointManager` (its latest checkpoint is used), or
            one checkpoint's prefix (e.g. `"run/ckpt-3"`).
        model: a built Keras model, sharded or not.
        optimizer: the optimizer to restore; its state must be in the
            checkpoint. By default `model.optimizer`, restored when the
            checkpoint holds optimizer state (a weights-only checkpoint
            restores the weights and leaves it alone).

    Returns:
        The prefix of the checkpoint restored.

    Raises:
        FileNotFoundError: no checkpoint at `path` (the message names it).
        ValueError: the model is not built; a variable's shape differs from
            the checkpoint's (the message names the variable and both
            shapes); the checkpoint holds no value for some weights, or for
            an optimizer passed explicitly.
    """
    _check_built(model, "restore")
    prefix = _resolve(os.fspath(path))
    explicit = optimizer is not None
    optimizer = _optimizer_for(model, optimizer)
    if optimizer is not None:
        _build_optimizer(model, optimizer)
    reader = tf.train.load_checkpoint(prefix)
    keys = _variable_keys(prefix, reader, _root(model, optimizer))
    shapes = reader.get_variable_to_shape_map()

    missing = [v for v in model.weights if id(v) not in keys]
    if missing:
        raise ValueError(
            f"Checkpoint {prefix!r} holds no value for {len(missing)} weight(s) of model "
            f"{model.name!r}: {_paths(missing)}. Was it written from a model of another "
            "structure? Build the same architecture (same layers, in the same order) "
            "before restoring."
        )
    weight_ids = {id(w) for w in model.weights}
    weights_first = sorted(keys.values(), key=lambda pair: id(pair[0]) not in weight_ids)
    mismatched = [
        f"{_name(v)!r} has shape {tuple(v.shape)} in the model but "
        f"{tuple(shapes[key])} in the checkpoint"
        for v, key in weights_first
        if tuple(v.shape) != tuple(shapes[key])
    ]
    if mismatched:
        raise ValueError(
            f"Checkpoint {prefix!r} does not fit model {model.name!r}: "
            + "; ".join(mismatched[:6])
            + (f"; and {len(mismatched) - 6} more" if len(mismatched) > 6 else "")
            + ". Nothing was restored. Build the model with the sizes it was saved with."
        )
    if optimizer is not None:
        unmatched = [v for v in optimizer.variables if id(v) not in keys]
        if explicit and len(unmatched) == len(optimizer.variables):
            raise ValueError(
                f"Checkpoint {prefix!r} holds no state for optimizer {optimizer.name!r} "
                f"({len(unmatched)} variable(s): {_paths(unmatched)}). Save it with "
                "save_checkpoint(path, model, optimizer), or restore without optimizer=."
            )
        if unmatched and len(unmatched) < len(optimizer.variables) and _trained(optimizer, keys, reader):
            raise ValueError(
                f"Checkpoint {prefix!r} holds state for only part of optimizer "
                f"{optimizer.name!r}; missing: {_paths(unmatched)}. Was it written for "
                "another optimizer or model?"
            )

    for variable, key in keys.values():
        variable.assign(reader.get_tensor(key))
    return prefix


# --- what is saved, and where each value sits in a checkpoint ---------------------------


def _optimizer_for(model, optimizer):
    return optimizer if optimizer is not None else getattr(model, "optimizer", None)


def _root(model, optimizer):
    if optimizer is None:
        return tf.train.Checkpoint(model=model)
    return tf.train.Checkpoint(model=model, optimizer=optimizer)


def _check_built(model, verb):
    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected a Keras model to {verb}. Received: {type(model).__name__}.")
    if not model.built or not model.weights:
        raise ValueError(
            f"Model {model.name!r} is not built, so it has no weights to {verb}. Build it "
            "first (give it a keras.Input, call it on a batch, or call model.build(shape))."
        )


def _build_optimizer(model, optimizer):
    """Builds the optimizer's state where training would: on the model's mesh."""
    owner = adapter.owner_of(model)
    if owner is None:
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
    elif optimizer is getattr(model, "optimizer", None):
        adapter.adopt(model, owner, build_optimizer=True)
    else:
        adapter.adopt_optimizer(optimizer, model.trainable_variables, owner)


def _variable_keys(prefix, reader, root):
    """{id(variable): (variable, checkpoint key)} for every variable the checkpoint holds.

    Matches the checkpoint's object graph against `root`'s by child names, as
    `tf.train.Checkpoint.restore` does, so a checkpoint written from a
    sharded model, a plain one or a `tf.train.Checkpoint` of either lines up
    with the same variables.
    """
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor(_OBJECT_GRAPH_KEY))
    keys = {}
    for node_id, obj in tf.train.CheckpointView(prefix).match(root).items():
        if not isinstance(obj, (keras.Variable, tf.Variable)):
            continue
        for attribute in graph.nodes[node_id].attributes:
            if attribute.name == "VARIABLE_VALUE":
                keys[id(obj)] = (obj, attribute.checkpoint_key)
    return keys


def _trained(optimizer, keys, reader):
    """Whether the checkpoint's optimizer had taken steps (so it must hold all its state).

    An optimizer saved before it was built holds only its step counter
    (zero) and learning rate; its moments did not exist yet.
    """
    iterations = getattr(optimizer, "iterations", None)
    if iterations is None or id(iterations) not in keys:
        return True
    return int(reader.get_tensor(keys[id(iterations)][1])) != 0


def _name(variable):
    return getattr(variable, "path", None) or variable.name


def _paths(variables, limit=8):
    names = [_name(v) for v in variables]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


# --- the directory: numbered checkpoints, a state file, atomic publication -------------


def _resolve(path):
    """The prefix of the checkpoint `path` names (a directory's latest, or a prefix)."""
    if tf.io.gfile.isdir(path):
        for prefix in reversed(_recorded_checkpoints(path)):
            if tf.io.gfile.exists(prefix + ".index"):
                return prefix
        raise FileNotFoundError(
            f"No checkpoint in directory {path!r}: it has no '{_STATE_FILE}' state file "
            "naming a complete checkpoint. Save one with tfpar.save_checkpoint(path, model) "
            "or a tf.train.CheckpointManager."
        )
    if tf.io.gfile.exists(path + ".index"):
        return path
    raise FileNotFoundError(
        f"No checkpoint at {path!r}: it is neither a directory of checkpoints nor a "
        f"checkpoint prefix (no {path + '.index'!r})."
    )


def _recorded_checkpoints(path):
    """Prefixes the state file lists, oldest first (empty if there is none)."""
    state = tf.train.get_checkpoint_state(path)
    if state is None:
        return []
    prefixes = [_absolute(path, p) for p in state.all_model_checkpoint_paths]
    latest = _absolute(path, state.model_checkpoint_path) if state.model_checkpoint_path else None
    if latest and latest not in prefixes:
        prefixes.append(latest)
    return prefixes


def _absolute(path, prefix):
    return prefix if os.path.isabs(prefix) or "://" in prefix else os.path.join(path, prefix)


def _next_number(path):
    """One more than any number in use, torn leftovers included, so nothing is overwritten."""
    numbers = [0]
    for name in tf.io.gfile.listdir(path):
        match = _NUMBERED.match(name.rstrip("/"))
        if match:
            numbers.append(int(match.group(1)))
    return max(numbers) + 1


def _publish(path, latest, kept):
    """Points the state file at `latest`: the moment the new checkpoint counts.

    The state file is written whole to a temporary sibling and renamed over
    the old one, so a reader sees either the old list or the new one.
    """
    lines = [f'model_checkpoint_path: "{os.path.basename(latest)}"']
    lines += [f'all_model_checkpoint_paths: "{os.path.basename(p)}"' for p in kept]
    temporary = os.path.join(path, f".{_STATE_FILE}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with tf.io.gfile.GFile(temporary, "w") as f:
        f.write("\n".join(lines) + "\n")
    tf.io.gfile.rename(temporary, os.path.join(path, _STATE_FILE), overwrite=True)


def _remove_others(path, kept):
    """Deletes numbered checkpoints not kept: old ones, and files of interrupted saves."""
    keep = {os.path.basename(p) for p in kept}
    for name in tf.io.gfile.listdir(path):
        name = name.rstrip("/")
        match = _NUMBERED.match(name)
        stale_state = name.startswith(f".{_STATE_FILE}.tmp-")
        if not stale_state and (not match or f"{_PREFIX}-{match.group(1)}" in keep):
            continue
        full = os.path.join(path, name)
        if tf.io.gfile.isdir(full):
            tf.io.gfile.rmtree(full)
        else:
            tf.io.gfile.remove(full)


def _is_chief():
    """Whether this process writes the state file (client 0 of a multi-client job)."""
    try:
        from tensorflow.experimental import dtensor

        return dtensor.client_id() == 0
    except Exception:  # noqa: BLE001 - no DTensor runtime: a single process
        return True
