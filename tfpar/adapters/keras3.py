"""Everything tfpar does to Keras 3 (TensorFlow backend) internals.

Keras 3 has no hook for where its TensorFlow variables live, so this module
installs a few small patches, each a no-op for models that no
`TensorParallel` laid out:

* `Variable._initialize`: inside `TensorParallel.scope()` (and while a
  laid-out model runs `fit`/`evaluate`/`predict`) a new variable is created
  as a `LaidOutVariable` in the layout its layer's style gives it;
* `TFOptimizer.add_variable_from_reference`: optimizer state (Adam's moments,
  ...) takes the layout of the variable it belongs to;
* `TensorFlowTrainer.make_{train,test,predict}_function`: the step pulls each
  batch eagerly from Keras' data iterator, lays it out on the mesh (sharded on
  the data axis) and runs one compiled step on the mesh; outputs and logs come
  back to the host. This is what makes `fit` work: a `tf.data` iterator
  cannot live on a DTensor mesh;
* `fit`/`evaluate`/`predict`/`*_on_batch`: run with the model's
  `TensorParallel` active so variables Keras makes late (metrics, optimizer
  state) land on the mesh too.

A tf-keras adapter would sit beside this file with the same four functions:
`install`, `layer_specs`, `adopt`, `owner_of`.
"""

import contextlib
import functools
import threading

import keras
import tensorflow as tf
from keras.src.backend.common import global_state
from keras.src.backend.common.symbolic_scope import in_symbolic_scope
from keras.src.backend.tensorflow import core as tf_core
from keras.src.backend.tensorflow import optimizer as tf_optimizer
from keras.src.backend.tensorflow import trainer as tf_trainer

from tfpar import _dtensor
from tfpar.styles import LayerSpec

__all__ = [
    "adopt",
    "adopt_metric",
    "adopt_optimizer",
    "install",
    "layer_specs",
    "model_variables",
    "owner_of",
    "placing",
]

_state = threading.local()
_installed = False


def _active():
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def placing(tp):
    """New Keras variables are laid out by `tp` while this is open."""
    install()
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(tp)
    try:
        yield
    finally:
        stack.pop()


# --- which layer a variable belongs to --------------------------------------


def _creating_layer():
    """The innermost Layer whose name scope is open (None if none)."""
    stack = global_state.get_global_attribute("name_scope_stack") or []
    for entry in reversed(stack):
        caller = entry.caller
        if isinstance(caller, keras.layers.Layer) and not isinstance(caller, keras.Model):
            return caller
        if isinstance(caller, keras.optimizers.Optimizer):
            return None
    return None


def _short_name(variable):
    return variable.path.rsplit("/", 1)[-1]


def layer_spec(layer, creating=None):
    """A `LayerSpec` of a Keras layer (Keras-free description for plans)."""
    kind = type(layer).__name__
    in_features = out_features = None
    if isinstance(layer, keras.layers.Dense):
        kind = "Dense"
        out_features = layer.units
        kernel = getattr(layer, "_kernel", None)
        if kernel is not None:
            in_features = int(kernel.shape[0])
        elif creating is not None and _short_name(creating) == "kernel":
            in_features = int(creating.shape[0])
    names = tuple(_short_name(v) for v in _own_variables(layer))
    return LayerSpec(layer.path or layer.name, kind, in_features, out_features, names)


def _own_variables(layer):
    return list(layer._trainable_variables) + list(layer._non_trainable_variables)


def _leaf_layers(model):
    """Layers that own variables, in model order (topological for Functional).

    Order matters to `plan="auto"`, which pairs consecutive Dense layers.
    """
    out, seen = [], set()

    def walk(layer):
        if id(layer) in seen or isinstance(layer, keras.metrics.Metric):
            return
        seen.add(id(layer))
        if not isinstance(layer, keras.Model) and _own_variables(layer):
            out.append(layer)
        children = layer.layers if isinstance(layer, keras.Model) else layer._layers
        for child in children:
            walk(child)

    walk(model)
    return out


def layer_specs(model):
    """(LayerSpec, layer) for every leaf layer of `model`, in model order."""
    return [(layer_spec(layer), layer) for layer in _leaf_layers(model)]


# --- the patches ---------------------------------------------------------------

_original = {}


def _initialize(self, value):
    tp = _active()
    if tp is None or isinstance(value, tf.Variable):
        return _original["initialize"](self, value)
    with tf.init_scope():
        if callable(value):
            value = value()
        value = tf.convert_to_tensor(value, dtype=self._dtype)
    reference = getattr(_state, "reference", None)
    layout = None
    if reference is not None and tuple(reference.shape) == tuple(value.shape):
        layout = _dtensor.layout_of(reference._value)
        if layout is not None and layout.mesh != tp.mesh.dtensor_mesh:
            layout = None  # state of a variable on another mesh: lay it out afresh
    if layout is None:
        layout = tp._creation_layout(self, _creating_layer(), value.shape)
    with tf.init_scope():
        variable = _dtensor.make_variable(
            value, layout, dtype=self._dtype, trainable=self.trainable, name=self.name
        )
    variable._tfpar_owner = tp
    return _original["initialize"](self, variable)


def _add_variable_from_reference(self, reference_variable, name=None, initializer="zeros"):
    previous = getattr(_state, "reference", None)
    _state.reference = reference_variable if isinstance(reference_variable, keras.Variable) else None
    try:
        return _original["add_variable_from_reference"](
            self, reference_variable, name=name, initializer=initializer
        )
    finally:
        _state.reference = previous


def _with_owner(method_name):
    original = getattr(tf_trainer.TensorFlowTrainer, method_name)
    _original[method_name] = original

    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        tp = owner_of(self)
        if tp is None:
            return original(self, *args, **kwargs)
        with placing(tp):
            adopt(self, tp, build_optimizer=method_name in ("fit", "train_on_batch"))
            return original(self, *args, **kwargs)

    return wrapper


def _make_function(kind):
    original = getattr(tf_trainer.TensorFlowTrainer, f"make_{kind}_function")
    _original[f"make_{kind}_function"] = original
    attribute = f"{kind}_function"

    @functools.wraps(original)
    def wrapper(self, force=False):
        tp = owner_of(self)
        if tp is None:
            return original(self, force=force)
        current = getattr(self, attribute, None)
        if current is not None and not force and getattr(current, "_tfpar", False):
            return current
        function = _build_function(self, tp, kind)
        setattr(self, attribute, function)
        return function

    return wrapper


def install():
    """Installs the patches once; they do nothing for models tfpar did not lay out."""
    global _installed
    if _installed:
        return
    _original["initialize"] = tf_core.Variable._initialize
    tf_core.Variable._initialize = _initialize
    _original["add_variable_from_reference"] = tf_optimizer.TFOptimizer.add_variable_from_reference
    tf_optimizer.TFOptimizer.add_variable_from_reference = _add_variable_from_reference
    for kind in ("train", "test", "predict"):
        setattr(tf_trainer.TensorFlowTrainer, f"make_{kind}_function", _make_function(kind))
    for name in ("fit", "evaluate", "predict", "train_on_batch", "test_on_batch", "predict_on_batch"):
        setattr(tf_trainer.TensorFlowTrainer, name, _with_owner(name))
    _installed = True


# --- models laid out by a TensorParallel ---------------------------------------------


def owner_of(model):
    """The `TensorParallel` that laid out `model`'s variables, or None."""
    for variable in model.weights:
        tp = getattr(variable._value, "_tfpar_owner", None)
        if tp is not None:
            return tp
    return None


def model_variables(model):
    """Every variable tfpar places for a model: weights, metrics, optimizer, seeds."""
    optimizer = getattr(model, "optimizer", None)
    return _unique(
        list(model.variables)
        + list(getattr(model, "metrics_variables", []))
        + (list(optimizer.variables) if optimizer is not None else [])
    )


def _unique(variables):
    """Initialised variables, each once, in order."""
    seen, out = set(), []
    for v in variables:
        if id(v) not in seen and getattr(v, "_value", None) is not None:
            seen.add(id(v))
            out.append(v)
    return out


def _optimizer_references(optimizer):
    """Optimizer state variable -> the model variable it belongs to."""
    refs = {}
    trainables = list(getattr(optimizer, "_trainable_variables", []))
    for v in optimizer.variables:
        name = v.path.rsplit("/", 1)[-1]
        best = None
        for t in trainables:
            stem = t.path.replace("/", "_")
            if name.startswith(stem + "_") and tuple(t.shape) == tuple(v.shape):
                if best is None or len(stem) > len(best.path):
                    best = t
        if best is not None:
            refs[id(v)] = best
    return refs


def adopt(model, tp, *, build_optimizer=False):
    """Lays out every variable of `model` as `tp` says; moves what is elsewhere.

    Resolves `tp`'s plan over all of the model's layers (raising for keys that
    match nothing), then re-places each variable whose layout differs: weights
    by their layer's style, optimizer state like its variable, the rest
    replicated. With `build_optimizer`, a compiled model's optimizer is
    built now, eagerly and on the mesh (before the train step is traced).
    Returns the plan's assignments by layer path.
    """
    install()
    specs = layer_specs(model)
    assignments = tp._plan.resolve([s for s, _ in specs], complete=True)
    expected = {}
    for spec, layer in specs:
        style = assignments[spec.path].style
        _set_output_gather(layer, tp, style.output_gathered())
        for v in _own_variables(layer):
            expected[id(v)] = tp._style_layout(spec, style, _short_name(v), len(v.shape))
    moved = False
    for v in _unique(list(model.variables) + list(getattr(model, "metrics_variables", []))):
        target = expected.get(id(v)) or _dtensor.replicated(tp.mesh, len(v.shape))
        moved |= _move(v, target, tp)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        build = build_optimizer and model.built and bool(model.trainable_variables)
        moved |= adopt_optimizer(optimizer, model.trainable_variables, tp, build=build)
    if moved:
        for attribute in ("train_function", "test_function", "predict_function"):
            setattr(model, attribute, None)
    return assignments


def adopt_optimizer(optimizer, trainable_variables, tp, *, build=True):
    """Builds `optimizer` on `tp`'s mesh (if `build`); moves state that is elsewhere.

    For optimizers of compiled models (`adopt`) and used outside `compile`
    (custom loops). State that belongs to a variable takes that variable's
    layout; the rest (iterations, learning rate, loss scale) is replicated.
    Built here, eagerly, because DTensor variables cannot be created inside
    the traced step. Returns whether any variable moved.
    """
    install()
    if build and not optimizer.built:
        with placing(tp), keras.src.backend.name_scope(optimizer.name, caller=optimizer):
            optimizer.build(trainable_variables)
    refs = _optimizer_references(optimizer)
    moved = False
    for v in _unique(optimizer.variables):
        ref = refs.get(id(v))
        target = _dtensor.layout_of(ref._value) if ref is not None else None
        moved |= _move(v, target or _dtensor.replicated(tp.mesh, len(v.shape)), tp)
    for opt in (optimizer, getattr(optimizer, "inner_optimizer", None)):
        # Keys are the ids of the current tf variables, which `tp.shard` may
        # have replaced since the optimizer was built.
        if opt is not None and getattr(opt, "built", False):
            opt._trainable_variables_indices = {
                opt._var_key(v): i for i, v in enumerate(opt._trainable_variables)
            }
    return moved


def adopt_metric(metric, tp):
    """Moves a Keras metric's state onto `tp`'s mesh, replicated."""
    install()
    for v in metric.variables:
        _move(v, _dtensor.replicated(tp.mesh, len(v.shape)), tp)


def _move(variable, target, tp):
    current = variable._value
    layout = _dtensor.layout_of(current)
    if layout is not None and layout == target and getattr(current, "_tfpar_owner", None) is tp:
        return False
    new = _dtensor.make_variable(
        current.read_value() if _dtensor.is_dtensor(current) else current.value(),
        target,
        dtype=current.dtype,
        trainable=variable.trainable,
        name=variable.name,
    )
    new._tfpar_owner = tp
    variable._value = new
    return True


def _set_output_gather(layer, tp, gather):
    wrapped = layer.__dict__.get("_tfpar_call_original")
    if gather and wrapped is None:
        original = layer.call

        @functools.wraps(original)
        def call(*args, **kwargs):
            outputs = original(*args, **kwargs)
            if in_symbolic_scope() or not _on_mesh(outputs):
                return outputs
            return tp._gather_features(outputs)

        object.__setattr__(layer, "_tfpar_call_original", original)
        object.__setattr__(layer, "call", call)
    elif not gather and wrapped is not None:
        object.__setattr__(layer, "call", wrapped)
        del layer.__dict__["_tfpar_call_original"]


def _on_mesh(outputs):
    """False for eager plain tensors (e.g. Keras shape inference); True otherwise."""
    if not tf.executing_eagerly():
        return True
    return all(_dtensor.is_dtensor(t) for t in tf.nest.flatten(outputs))


# --- fit / evaluate / predict on the mesh --------------------------------------------


def _next_batches(model, iterator):
    """The batches one call of a Keras step function consumes."""
    if isinstance(iterator, (list, tuple)):
        return list(iterator)
    batches = []
    for _ in range(model.steps_per_execution):
        try:
            batches.append(next(iterator))
        except (StopIteration, tf.errors.OutOfRangeError):
            break
    if not batches:
        raise StopIteration
    return batches


def _build_function(model, tp, kind):
    step_fn = {"train": model.train_step, "test": model.test_step, "predict": model.predict_step}[kind]
    if not model.run_eagerly:
        step_fn = tf.function(step_fn, reduce_retracing=True, jit_compile=bool(model.jit_compile))

    def run(batch):
        return step_fn(tp._distribute(batch))

    if kind == "predict":

        def function(data):
            outputs = [tf.nest.map_structure(_dtensor.gather, run(b)) for b in _next_batches(model, data)]
            if len(outputs) == 1:
                return outputs[0]
            return tf.nest.map_structure(lambda *xs: tf.concat(xs, axis=0), *outputs)

    else:

        def function(iterator):
            logs = None
            for batch in _next_batches(model, iterator):
                logs = run(batch)
            logs = tf.nest.map_structure(_dtensor.gather, logs)
            return logs

    function._tfpar = True
    return function
