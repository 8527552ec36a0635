"""TensorParallel: lay a Keras model out over a device mesh."""

import contextlib

import tensorflow as tf

from tfpar import _dtensor
from tfpar import data as data_lib
from tfpar.adapters import keras3 as adapter
from tfpar.mesh import DeviceMesh
from tfpar.plan import Plan
from tfpar.styles import Replicated

__all__ = ["TensorParallel"]


class TensorParallel:
    """Shards a Keras model's Dense layers over the model axis of a mesh.

    Kernels and biases are laid out by the plan's styles (Megatron column /
    row sharding), every other variable (optimizer state follows its
    variable; metrics, counters and seeds are replicated) lives on the mesh
    too, and batches are split over the data axis. DTensor inserts the
    collectives the layouts imply; results equal the unsharded model's.

    Args:
        mesh: a `DeviceMesh` (or text for `DeviceMesh.parse`, e.g. `"2x2"`).
        plan: `"auto"` or a dict `{regex on layer.path: style}`.
        data_axis: the mesh axis that splits batches (None: no data split).
        model_axis: the mesh axis that shards layers.

    Raises:
        ValueError: an axis the mesh does not have; a bad plan.

    Example:
        >>> tp = tfpar.TensorParallel(tfpar.DeviceMesh((2, 2)))
        >>> with tp.scope():
        ...     model = keras.Sequential([keras.Input((32,)),
        ...                               keras.layers.Dense(64, activation="relu"),
        ...                               keras.layers.Dense(8)])
        ...     model.compile(optimizer="adam", loss="mse")
        >>> model.fit(x, y, batch_size=16)
    """

    def __init__(self, mesh, plan="auto", *, data_axis="batch", model_axis="model"):
        if isinstance(mesh, str):
            mesh = DeviceMesh.parse(mesh)
        if not isinstance(mesh, DeviceMesh):
            raise ValueError(f"TensorParallel needs a tfpar.DeviceMesh. Received: mesh={mesh!r}.")
        mesh.check_axis(model_axis, "model_axis")
        if data_axis is not None:
            mesh.check_axis(data_axis, "data_axis")
            if data_axis == model_axis:
                raise ValueError(
                    f"data_axis and model_axis are both {model_axis!r}; give them different mesh axes."
                )
        self.mesh = mesh
        self.data_axis = data_axis
        self.model_axis = model_axis
        self._plan = Plan(plan, model_axis, mesh.axis_size(model_axis))
        self._seen_layers = {}
        adapter.install()

    @property
    def plan(self):
        return self._plan

    def __repr__(self):
        return f"<TensorParallel {self.mesh!r} plan={self._plan!r} data_axis={self.data_axis!r}>"

    # --- user API ----------------------------------------------------------------

    @contextlib.contextmanager
    def scope(self):
        """Variables Keras creates inside are created already laid out.

        Build (and usually compile) the model inside; `fit`, `evaluate` and
        `predict` may then be called anywhere.
        """
        # "auto" pairs the Dense layers created in this scope, in order.
        self._seen_layers = {}
        with adapter.placing(self):
            yield self

    def shard(self, model):
        """Lays out an already-built model in place (e.g. pretrained weights).

        Weights keep their values; optimizer state, if built, follows its
        variables. Returns the model.
        """
        adapter.adopt(model, self)
        return model

    def layout_of(self, variable):
        """The `tf.experimental.dtensor.Layout` of a (Keras) variable."""
        value = getattr(variable, "_value", variable)
        layout = _dtensor.layout_of(value)
        if layout is None:
            raise ValueError(
                f"Variable {getattr(variable, 'path', variable.name)!r} is not on a mesh; "
                "create it inside tp.scope() or call tp.shard(model)."
            )
        return layout

    def distribute_dataset(self, dataset, *, allow_partial=True, prefetch=2):
        """Yields the dataset's batches as DTensors sharded on the data axis.

        Args:
            dataset: a batched `tf.data.Dataset` (or any iterable of batches).
            allow_partial: a final batch the data axis does not divide is laid
                out replicated (exact); False makes it an error.
            prefetch: batches the host prepares ahead.

        In a multi-process job (`tfpar.initialize`) each process's dataset
        yields only its part of every global batch: the rows its devices
        hold on the data axis (on a `(P, K)` mesh, a 1/P share; e.g.
        `ds.shard(tfpar.num_processes(), tfpar.process_index())` before
        `batch`). Every process must yield batches of the same size, so
        batch with `drop_remainder=True`. `fit`/`evaluate`/`predict`
        instead take the whole data, the same in every process.
        """
        if isinstance(dataset, tf.data.Dataset) and prefetch:
            dataset = dataset.prefetch(prefetch)
        for batch in dataset:
            yield data_lib.distribute_batch(
                batch, self.mesh, self.data_axis, allow_partial=allow_partial, per_process=True
            )

    def describe(self, model):
        """A table: layer path, style, kernel/bias layouts, bytes per device."""
        from tfpar.report import describe

        return describe(self, model)

    def memory_report(self, model):
        """Bytes of the model (and optimizer state, once built), read from the shards."""
        from tfpar.report import memory_report

        return memory_report(self, model)

    # --- used by the adapter -----------------------------------------------------------

    def _distribute(self, batch, allow_partial=True):
        return data_lib.distribute_batch(batch, self.mesh, self.data_axis, allow_partial=allow_partial)

    def _style_layout(self, spec, style, variable_name, rank):
        return _dtensor.layout(self.mesh, style.variable_spec(spec, variable_name, rank, self.model_axis))

    def _creation_layout(self, variable, layer, shape):
        rank = len(shape)
        if layer is None:
            return _dtensor.replicated(self.mesh, rank)
        spec = adapter.layer_spec(layer, creating=variable)
        self._seen_layers[spec.path] = spec
        assignments = self._plan.resolve(self._seen_layers.values(), complete=False)
        style = assignments.get(spec.path)
        style = style.style if style is not None else Replicated()
        name = variable.path.rsplit("/", 1)[-1]
        return self._style_layout(spec, style, name, rank)

    def _gather_features(self, outputs):
        return tf.nest.map_structure(lambda y: _dtensor.unshard_last_dim(y, self.mesh), outputs)
