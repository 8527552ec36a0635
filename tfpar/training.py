"""Custom training loops on tensor-parallel models: compiled train and eval steps.

`train_step` and `eval_step` give users of `tf.GradientTape` loops the parts
that are hard to get right on a mesh: one compiled step over sharded
variables, batches laid out on the data axis, and gradient transformations
that stay exact when gradients are sharded.

* Global-norm clipping: ||g|| = sqrt(sum_i sum(g_i ** 2)) over every
  gradient. Each `sum` of a sharded gradient is a global reduction (DTensor
  all-reduces the per-shard partial sums over the model axis), so the norm,
  and hence the clipped update, equals the unsharded one. A per-shard norm
  would clip each shard by a different factor: silently wrong.
* Gradient accumulation over k calls: for a mean loss over a batch of b_j
  rows, b_j * g_j is the gradient of the batch's *sum* of losses, so
  (sum_j b_j * g_j) / (sum_j b_j) is the gradient of the mean loss over the
  k batches together: k steps of b rows equal one step of k*b rows.
  Accumulators take the layout of their variable (no extra communication).
* Mixed precision: layers compute in the global policy's dtype while
  variables, gradients, accumulators and the loss stay float32. With a
  `keras.optimizers.LossScaleOptimizer` the loss is scaled before the
  gradient, and clipping uses the scaled norm against the scaled threshold
  (the loss scale is a power of two, so this is exactly clipping the
  unscaled gradient); non-finite steps are skipped by the optimizer.
"""

import keras
import tensorflow as tf

from tfpar import _dtensor
from tfpar.adapters import keras3 as adapter

__all__ = ["EvalStep", "TrainStep", "eval_step", "train_step"]


def train_step(
    model,
    optimizer,
    loss_fn,
    *,
    metrics=None,
    clip_global_norm=None,
    accumulation_steps=1,
    jit_compile=False,
    allow_partial=True,
):
    """A compiled training step for a model laid out by a `TensorParallel`.

    Each call computes the loss and its gradients with `tf.GradientTape` in a
    `tf.function` on the model's mesh (traced once per input signature),
    optionally clips them by their global norm over all shards, and applies
    them with `optimizer`. Results equal the unsharded computation from the
    same weights.

    Args:
        model: a Keras model built inside `tp.scope()` or laid out with
            `tp.shard(model)`.
        optimizer: a Keras optimizer (a `LossScaleOptimizer` for
            `mixed_float16`). Built here, on the mesh, if it is not built.
        loss_fn: a Keras loss (instance or name, e.g. `"mse"`) or a callable
            `loss_fn(y_true, y_pred)`; a non-scalar result is averaged.
            Regularisation losses of the model (`model.losses`) are added.
        metrics: Keras metrics (instances, names or functions) updated on every call;
            their state accumulates across calls until `step.reset_metrics()`.
        clip_global_norm: if given, gradients are scaled by
            `min(1, clip_global_norm / ||g||)`, ||g|| their global norm over
            all variables and shards; logs then carry `"grad_norm"` (before
            clipping).
        accumulation_steps: k >= 1. Gradients of k consecutive calls are
            accumulated (weighted by batch rows) and applied on every k-th
            call, which equals one step on the k batches together. Calls in
            between only accumulate.
        jit_compile: compile the step with XLA.
        allow_partial: a batch the data axis does not divide is laid out
            replicated (exact, as in `fit`); False makes such a batch a
            `ValueError`.

    Returns:
        A `TrainStep`: `step(x, y, sample_weight=None) -> dict` of plain
        scalar tensors: `"loss"` (this batch's loss), each metric's result,
        and `"grad_norm"` when clipping. `x`, `y`, `sample_weight` may be
        arrays, tensors or DTensors from `tp.distribute_dataset`.

    Raises:
        ValueError: a model no `TensorParallel` laid out; `accumulation_steps`
            below 1; a non-positive `clip_global_norm`.

    Example:
        >>> step = tfpar.train_step(model, keras.optimizers.Adam(1e-3), "mse",
        ...                         clip_global_norm=1.0)
        >>> for x, y in tp.distribute_dataset(ds):
        ...     logs = step(x, y)
        >>> float(logs["loss"])
    """
    return TrainStep(
        model,
        optimizer,
        loss_fn,
        metrics=metrics,
        clip_global_norm=clip_global_norm,
        accumulation_steps=accumulation_steps,
        jit_compile=jit_compile,
        allow_partial=allow_partial,
    )


def eval_step(model, loss_fn, *, metrics=None, jit_compile=False, allow_partial=True):
    """A compiled evaluation step: loss and metrics, no update.

    Args:
        model: a Keras model laid out by a `TensorParallel`.
        loss_fn: as for `train_step`.
        metrics: Keras metrics (instances, names or functions); their state accumulates
            across calls until `evaluate.reset_metrics()`.
        jit_compile: compile the step with XLA.
        allow_partial: as for `train_step`.

    Returns:
        An `EvalStep`: `evaluate(x, y, sample_weight=None) -> dict` of plain
        scalar tensors, `"loss"` and each metric's result.

    Raises:
        ValueError: a model no `TensorParallel` laid out.
    """
    return EvalStep(model, loss_fn, metrics=metrics, jit_compile=jit_compile, allow_partial=allow_partial)


class _Step:
    """What train and eval steps share: the mesh, the loss, metrics, inputs."""

    def __init__(self, model, loss_fn, metrics, allow_partial, caller):
        tp = adapter.owner_of(model)
        if tp is None:
            raise ValueError(
                f"{caller} needs a model laid out by a tfpar.TensorParallel, but model "
                f"{model.name!r} was never laid out. Build it inside `tp.scope()` or call "
                "`tp.shard(model)` first."
            )
        self.model = model
        self._tp = tp
        self.loss_fn = keras.losses.get(loss_fn) if isinstance(loss_fn, str) else loss_fn
        if not callable(self.loss_fn):
            raise ValueError(f"loss_fn must be a Keras loss, its name or a callable. Received: {loss_fn!r}.")
        self.metrics = [self._metric(m) for m in (metrics or [])]
        self.allow_partial = bool(allow_partial)

    def _metric(self, metric):
        if isinstance(metric, str) or (callable(metric) and not isinstance(metric, keras.metrics.Metric)):
            # Made on the mesh: the name's metric, or a function averaged over batches as in compile.
            with adapter.placing(self._tp):
                if isinstance(metric, str):
                    metric = keras.metrics.get(metric)
                else:
                    metric = keras.metrics.MeanMetricWrapper(metric, name=getattr(metric, "__name__", None))
        if not isinstance(metric, keras.metrics.Metric):
            raise ValueError(
                "metrics must be keras.metrics.Metric instances, their names or functions "
                f"metric(y_true, y_pred). Received: {metric!r}."
            )
        adapter.adopt_metric(metric, self._tp)
        return metric

    def reset_metrics(self):
        """Resets the state of every metric (e.g. at the start of an epoch)."""
        for metric in self.metrics:
            metric.reset_state()

    def _layout_batch(self, x, y, sample_weight):
        return self._tp._distribute((x, y, sample_weight), allow_partial=self.allow_partial)

    def _loss(self, y, y_pred, sample_weight):
        if sample_weight is None:
            loss = self.loss_fn(y, y_pred)
        else:
            loss = self.loss_fn(y, y_pred, sample_weight=sample_weight)
        loss = tf.cast(loss, tf.float32)
        if loss.shape.rank:
            loss = tf.reduce_mean(loss)
        extra = self.model.losses
        if extra:
            loss = loss + tf.add_n([tf.cast(t, tf.float32) for t in extra])
        return loss

    def _update_metrics(self, logs, y, y_pred, sample_weight):
        for metric in self.metrics:
            metric.update_state(y, y_pred, sample_weight=sample_weight)
            logs[metric.name] = metric.result()
        return logs

    def _run(self, function, x, y, sample_weight):
        x, y, sample_weight = self._layout_batch(x, y, sample_weight)
        # Variables Keras makes late (e.g. lazily built metrics) land on the mesh.
        with adapter.placing(self._tp):
            logs = function(x, y, sample_weight)
        return {name: _dtensor.gather(value) for name, value in logs.items()}


class TrainStep(_Step):
    """The callable `train_step` returns; see `train_step` for the arguments.

    Attributes:
        model, optimizer, metrics, accumulation_steps, clip_global_norm.
    """

    def __init__(
        self,
        model,
        optimizer,
        loss_fn,
        *,
        metrics=None,
        clip_global_norm=None,
        accumulation_steps=1,
        jit_compile=False,
        allow_partial=True,
    ):
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(
                "accumulation_steps must be an integer >= 1 (1: apply the gradients on every call). "
                f"Received: accumulation_steps={accumulation_steps!r}."
            )
        if clip_global_norm is not None and not clip_global_norm > 0:
            raise ValueError(
                "clip_global_norm must be a positive number, or None for no clipping. "
                f"Received: clip_global_norm={clip_global_norm!r}."
            )
        super().__init__(model, loss_fn, metrics, allow_partial, "train_step")
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise ValueError(f"optimizer must be a Keras optimizer. Received: {optimizer!r}.")
        self.optimizer = optimizer
        self.clip_global_norm = clip_global_norm
        self.accumulation_steps = accumulation_steps
        self._variables = list(model.trainable_variables)
        adapter.adopt_optimizer(optimizer, self._variables, self._tp)
        self._loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        self._calls = 0
        self._accumulators = []
        if accumulation_steps > 1:
            for v in self._variables:
                layout = _dtensor.layout_of(v._value)
                self._accumulators.append(
                    _dtensor.make_variable(
                        tf.zeros(v.shape, tf.float32), layout, trainable=False, name=f"{v.name}_accumulated"
                    )
                )
            self._rows = _dtensor.make_variable(
                tf.zeros((), tf.float32), _dtensor.replicated(self._tp.mesh, 0), trainable=False, name="rows"
            )

        def update(x, y, sample_weight):
            return self._step(x, y, sample_weight, apply=True)

        def accumulate(x, y, sample_weight):
            return self._step(x, y, sample_weight, apply=False)

        self._update = tf.function(update, jit_compile=jit_compile, reduce_retracing=True)
        self._accumulate = tf.function(accumulate, jit_compile=jit_compile, reduce_retracing=True)

    def __call__(self, x, y, sample_weight=None):
        """One step on a batch; returns `{"loss": ..., <metric>: ..., ["grad_norm": ...]}`."""
        self._calls += 1
        applies = self._calls % self.accumulation_steps == 0
        return self._run(self._update if applies else self._accumulate, x, y, sample_weight)

    def experimental_get_tracing_count(self):
        """How many times the step was traced (over its update and accumulate functions)."""
        return self._update.experimental_get_tracing_count() + self._accumulate.experimental_get_tracing_count()

    def _step(self, x, y, sample_weight, apply):
        with tf.GradientTape() as tape:
            y_pred = self.model(x, training=True)
            loss = self._loss(y, y_pred, sample_weight)
            target = self.optimizer.scale_loss(loss) if self._loss_scaled else loss
        grads = tape.gradient(target, self._variables)
        grads = [tf.zeros_like(v.value) if g is None else g for g, v in zip(grads, self._variables)]
        logs = {"loss": loss}
        if self._accumulators:
            rows = tf.cast(tf.shape(tf.nest.flatten(x)[0])[0], tf.float32)
            total_rows = self._rows.read_value() + rows
            totals = [a.read_value() + g * rows for a, g in zip(self._accumulators, grads)]
            grads = [t / total_rows for t in totals]
            if apply:
                for a, t in zip(self._accumulators, totals):
                    a.assign(tf.zeros_like(t))
                self._rows.assign(tf.zeros_like(total_rows))
            else:
                for a, t in zip(self._accumulators, totals):
                    a.assign(t)
                self._rows.assign(total_rows)
        if self.clip_global_norm is not None:
            norm = tf.linalg.global_norm(grads)
            scale = tf.cast(self.optimizer.dynamic_scale, tf.float32) if self._loss_scaled else 1.0
            if apply:
                grads, _ = tf.clip_by_global_norm(grads, self.clip_global_norm * scale, use_norm=norm)
            logs["grad_norm"] = norm / scale
        if apply:
            self.optimizer.apply(grads, self._variables)
        return self._update_metrics(logs, y, y_pred, sample_weight)


class EvalStep(_Step):
    """The callable `eval_step` returns; see `eval_step` for the arguments."""

    def __init__(self, model, loss_fn, *, metrics=None, jit_compile=False, allow_partial=True):
        super().__init__(model, loss_fn, metrics, allow_partial, "eval_step")
        self._function = tf.function(self._step, jit_compile=jit_compile, reduce_retracing=True)

    def __call__(self, x, y, sample_weight=None):
        """Loss and metrics on a batch; returns `{"loss": ..., <metric>: ...}`."""
        return self._run(self._function, x, y, sample_weight)

    def experimental_get_tracing_count(self):
        """How many times the step was traced."""
        return self._function.experimental_get_tracing_count()

    def _step(self, x, y, sample_weight):
        y_pred = self.model(x, training=False)
        logs = {"loss": self._loss(y, y_pred, sample_weight)}
        return self._update_metrics(logs, y, y_pred, sample_weight)
