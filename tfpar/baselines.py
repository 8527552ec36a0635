"""What tfpar is compared with: one device, MirroredStrategy, hand-written DTensor.

Every trainer here trains the same Keras MLP (`build_mlp`) on the same data
(`make_data`) from the same initial weights with the same Adam, so step
times, bytes per device and the loss reached can be set side by side:

* `KerasTrainer`: plain Keras on one device, or under a
  `tf.distribute.MirroredStrategy` (data parallelism: every device holds the
  whole model and its optimizer state, the batch is split, gradients are
  all-reduced). `step()` runs one call of the compiled train function that
  `model.fit` runs per batch; `fit()` is `model.fit` itself.
* `MirroredCustomLoop`: the same model under MirroredStrategy with a
  hand-written `strategy.run` loop (GradientTape + Keras Adam).
* `DTensorRaw`: the MLP written directly on DTensor, no Keras: DVariables
  laid out Megatron-style (column kernels `[unsharded, model]`, row kernels
  `[model, unsharded]`), one compiled step, Adam written out by hand. This is
  the floor tfpar's overhead is measured against.

All trainers share one protocol: `step() -> float` (the step's loss, read
on the host, which also waits for the step to finish), `get_weights()` (the
full kernels and biases as numpy arrays, in `build_mlp` order) and
`bytes_per_device() -> (param_bytes, optimizer_bytes)` (the most any one
device holds, read from the real per-device copies or shards).
"""

import collections

import numpy as np
import tensorflow as tf
from tensorflow.experimental import dtensor

__all__ = [
    "DTensorRaw",
    "KerasTrainer",
    "MirroredCustomLoop",
    "build_mlp",
    "make_data",
    "HostBatches",
    "make_dataset",
    "replica_batch",
    "mirrored_strategy",
    "mlp_loss",
    "mlp_styles",
]

# Keras 3 Adam's defaults; DTensorRaw writes the same update out by hand.
ADAM = {"learning_rate": 1e-3, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}


def build_mlp(hidden, layers, *, seed=0):
    """`layers` Dense(hidden) layers on `hidden` features, ReLU between them.

    The last layer is linear (a regression head of `hidden` outputs), so every
    kernel is `hidden x hidden` and `plan="auto"` pairs the layers Column,
    Row, Column, Row, ... (an odd last layer is Column with its output
    gathered). `seed` fixes the initial weights.
    """
    import keras

    if layers < 1:
        raise ValueError(f"build_mlp needs at least one layer. Received: layers={layers}.")
    keras.utils.set_random_seed(seed)
    body = [keras.Input((hidden,))]
    for i in range(layers):
        activation = "relu" if i < layers - 1 else None
        body.append(keras.layers.Dense(hidden, activation=activation, name=f"dense_{i}"))
    return keras.Sequential(body, name="mlp")


def mlp_styles(layers):
    """The auto plan's styles for `build_mlp(.., layers)`: 'column', 'row', 'column_gather'."""
    styles = []
    for i in range(layers):
        if i % 2:
            styles.append("row")
        else:
            styles.append("column_gather" if i == layers - 1 else "column")
    return styles


def make_data(hidden, batch, batches, *, seed=0):
    """`batches` batches of regression data: x ~ N(0, 1), y = tanh(x T / sqrt(hidden)).

    Returns (x, y), float32 arrays of `batches * batch` rows, batch after batch.
    """
    rng = np.random.RandomState(seed + 1)
    x = rng.randn(batches * batch, hidden).astype("float32")
    teacher = rng.randn(hidden, hidden).astype("float32") / np.sqrt(hidden)
    y = np.tanh(x @ teacher).astype("float32")
    return x, y


def make_dataset(x, y, batch):
    """The batches of (x, y) in order, as a `tf.data.Dataset` (for `fit`)."""
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True)


class HostBatches:
    """The batches of (x, y) in order, repeated forever, as host numpy arrays.

    Every benchmarked configuration reads its batches from here and moves
    them to its devices inside the timed step, so all pay the same
    host-to-device cost. (The timed steps do not use tf.data: its iterators
    run autotuning threads that compete for the cores and can hold up an
    iterator's deletion for up to a minute.)
    """

    def __init__(self, x, y, batch):
        if len(x) < batch:
            raise ValueError(f"Need at least one batch of data. Received: {len(x)} rows; batch={batch}.")
        self.x, self.y, self.batch = x, y, batch
        self._next = 0

    def __iter__(self):
        return self

    def __next__(self):
        start = self._next * self.batch
        if start + self.batch > len(self.x):
            self._next, start = 0, 0
        self._next += 1
        return self.x[start : start + self.batch], self.y[start : start + self.batch]


def replica_batch(strategy, xb, yb):
    """A global batch split over `strategy`'s replicas, each part on its replica's device."""
    replicas = strategy.num_replicas_in_sync
    if len(xb) % replicas:
        raise ValueError(f"A batch of {len(xb)} rows does not split over {replicas} replicas.")
    xs, ys = np.split(xb, replicas), np.split(yb, replicas)

    def part(context):
        i = context.replica_id_in_sync_group
        return tf.constant(xs[i]), tf.constant(ys[i])

    return strategy.experimental_distribute_values_from_function(part)


def mlp_loss(weights, x, y):
    """Mean squared error of `build_mlp` weights on (x, y), in float64 on the host.

    The one definition of "final loss" every configuration is scored with.
    """
    h = np.asarray(x, np.float64)
    pairs = list(zip(weights[0::2], weights[1::2]))
    for i, (kernel, bias) in enumerate(pairs):
        h = h @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)
        if i < len(pairs) - 1:
            h = np.maximum(h, 0.0)
    return float(np.mean((h - np.asarray(y, np.float64)) ** 2))


_strategies_made = 0


def mirrored_strategy(devices):
    """A MirroredStrategy over `devices` (names such as 'CPU:0' or 'GPU:1').

    Its all-reduces are TensorFlow's default collective ops. Each strategy
    made here numbers its collective groups from its own base: two
    strategies of different sizes over overlapping devices would otherwise
    both claim group key 1 and abort ("joining a group with size 4, but that
    group has size 2").
    """
    global _strategies_made
    _strategies_made += 1
    names = ["/device:" + d.split("device:")[-1] for d in devices]
    cls = type(
        "MirroredStrategy",
        (tf.distribute.MirroredStrategy,),
        {"_collective_key_base": 100_000 * _strategies_made, "__module__": __name__},
    )
    return cls(names)


def _keras_adam():
    import keras

    return keras.optimizers.Adam(**ADAM)


def _compile(model):
    import keras

    model.compile(optimizer=_keras_adam(), loss=keras.losses.MeanSquaredError())


def _bytes(tensor):
    return int(np.prod(tensor.shape)) * tensor.dtype.size


def _per_device(variables, strategy):
    """The most bytes one device holds of `variables`, from their per-device copies."""
    totals = collections.Counter()
    for v in variables:
        value = getattr(v, "_value", v)
        if strategy is not None:
            copies = strategy.experimental_local_results(value)
        else:
            copies = [value]
        for copy in copies:
            totals[copy.device] += _bytes(copy)
    return max(totals.values()) if totals else 0


class KerasTrainer:
    """The Keras MLP trained by Keras' own compiled train function.

    With `strategy=None` it runs on the default device; with a
    MirroredStrategy the model and Adam are created in its scope, each global
    batch is split over the replicas and gradients are all-reduced, exactly
    as `model.fit` does.

    Args:
        weights: initial weights (from `build_mlp(...).get_weights()`).
        x, y: the data; batches are taken in order, repeated.
        batch: global batch size.
        layers: Dense layers of the MLP.
        strategy: None or a `tf.distribute.Strategy`.
    """

    def __init__(self, weights, x, y, *, batch, layers, strategy=None):
        self.strategy = strategy
        self._x, self._y, self._batch = x, y, batch
        with self._scope():
            self.model = build_mlp(x.shape[1], layers)
            self.model.set_weights(weights)
            _compile(self.model)
            # Built now, in the strategy's scope, as `fit` does before its
            # first step (not lazily inside the traced step).
            self.model.optimizer.build(self.model.trainable_variables)
        self._batches = HostBatches(x, y, batch)
        self.model.make_train_function()

    def _scope(self):
        return self.strategy.scope() if self.strategy is not None else tf.distribute.get_strategy().scope()

    def step(self):
        """One call of the compiled step `model.fit` runs per batch; returns the loss.

        The batch goes to the device (or is split over the replicas, as a
        distributed dataset would) and Keras' `train_function` runs
        `strategy.run(train_step)` on it.
        """
        xb, yb = next(self._batches)
        if self.strategy is not None:
            data = replica_batch(self.strategy, xb, yb)
        else:
            data = (tf.constant(xb), tf.constant(yb))
        logs = self.model.train_function([data])
        return float(logs["loss"])

    def fit(self, epochs=1, steps_per_epoch=None):
        """`model.fit` on the data; returns the History."""
        steps = steps_per_epoch or len(self._x) // self._batch
        return self.model.fit(
            make_dataset(self._x, self._y, self._batch),
            epochs=epochs,
            steps_per_epoch=steps,
            shuffle=False,
            verbose=0,
        )

    def get_weights(self):
        return self.model.get_weights()

    def bytes_per_device(self):
        params = _per_device(self.model.weights, self.strategy)
        state = _per_device(self.model.optimizer.variables, self.strategy)
        return params, state


class MirroredCustomLoop:
    """The Keras MLP under MirroredStrategy, trained by a hand-written loop.

    Each replica computes the mean squared error of its part of the batch,
    divided by the number of replicas (so the all-reduced gradient is the
    global batch's mean), and Keras Adam all-reduces and applies the
    gradients on every replica. One compiled function pulls the distributed
    batch and runs the step.
    """

    def __init__(self, weights, x, y, *, batch, layers, strategy):
        self.strategy = strategy
        with strategy.scope():
            self.model = build_mlp(x.shape[1], layers)
            self.model.set_weights(weights)
            self.optimizer = _keras_adam()
            self.optimizer.build(self.model.trainable_variables)
        self._batches = HostBatches(x, y, batch)
        model, optimizer = self.model, self.optimizer
        replicas = strategy.num_replicas_in_sync

        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(model(xb, training=True) - yb))
                scaled = loss / replicas
            variables = model.trainable_variables
            grads = tape.gradient(scaled, variables)
            optimizer.apply_gradients(zip(grads, variables))
            return scaled

        @tf.function
        def train(data):
            losses = strategy.run(replica_step, args=data)
            return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

        self._train = train

    def step(self):
        return float(self._train(replica_batch(self.strategy, *next(self._batches))))

    def get_weights(self):
        return self.model.get_weights()

    def bytes_per_device(self):
        params = _per_device(self.model.weights, self.strategy)
        state = _per_device(self.optimizer.variables, self.strategy)
        return params, state


class DTensorRaw:
    """The MLP written directly on DTensor: the floor tfpar is measured against.

    Layer i is Megatron column-parallel for even i (kernel `[unsharded,
    model]`, bias `[model]`: Y_i = relu(X A_i + b_i) with A split by columns,
    no communication forward) and row-parallel for odd i (kernel `[model,
    unsharded]`, bias replicated: the partial products X_j A_j are summed by
    one all-reduce); an unpaired last column layer all-gathers its output.
    Batches are sharded on the data axis. One `tf.function` computes the
    loss, its gradients (DTensor's SPMD expansion adds the backward
    collectives) and Keras 3's Adam update, written out by hand: every
    variable is read once and written once, so no read has to follow a write.

    Args:
        mesh: a `tfpar.DeviceMesh` with axes `data_axis` and `model_axis`.
        weights: initial kernels and biases, as `build_mlp(...).get_weights()`.
        x, y: the data; batches are taken in order, repeated.
        batch: global batch size (a multiple of the data axis' size).
    """

    def __init__(self, mesh, weights, x, y, *, batch, data_axis="batch", model_axis="model"):
        self.mesh = mesh
        dmesh = mesh.dtensor_mesh
        unsharded = dtensor.UNSHARDED
        self._batches = HostBatches(x, y, batch)
        self._batch_layout = dtensor.Layout([data_axis, unsharded], dmesh)
        self._rows = [loc[data_axis] for loc in dmesh.local_device_locations()]
        self._data_size = dmesh.dim_size(data_axis)
        if batch % self._data_size:
            raise ValueError(
                f"DTensorRaw needs a batch the {data_axis!r} axis divides. Received: batch={batch}; "
                f"{data_axis}={self._data_size}."
            )
        styles = mlp_styles(len(weights) // 2)
        layouts = []
        for style in styles:
            if style == "row":
                layouts += [[model_axis, unsharded], [unsharded]]
            else:
                layouts += [[unsharded, model_axis], [model_axis]]
        self.layouts = [dtensor.Layout(spec, dmesh) for spec in layouts]

        def variable(value, layout):
            value = tf.convert_to_tensor(value)
            value = dtensor.copy_to_mesh(value, dtensor.Layout.replicated(dmesh, rank=value.shape.rank))
            return dtensor.DVariable(dtensor.relayout(value, layout))

        self.params = [variable(w, lay) for w, lay in zip(weights, self.layouts)]
        self.m = [variable(np.zeros_like(w), lay) for w, lay in zip(weights, self.layouts)]
        self.v = [variable(np.zeros_like(w), lay) for w, lay in zip(weights, self.layouts)]
        self.iterations = variable(np.int64(0), dtensor.Layout.replicated(dmesh, rank=0))
        gather = dtensor.Layout([data_axis, unsharded], dmesh) if styles[-1] == "column_gather" else None
        lr, b1, b2, eps = (ADAM[k] for k in ("learning_rate", "beta_1", "beta_2", "epsilon"))

        @tf.function
        def train(xb, yb):
            with tf.GradientTape() as tape:
                tape.watch(self.params)
                h = xb
                for i in range(len(styles)):
                    h = tf.matmul(h, self.params[2 * i]) + self.params[2 * i + 1]
                    if i < len(styles) - 1:
                        h = tf.nn.relu(h)
                if gather is not None:
                    h = dtensor.relayout(h, gather)
                loss = tf.reduce_mean(tf.square(h - yb))
            grads = tape.gradient(loss, self.params)
            t = tf.cast(self.iterations + 1, tf.float32)
            alpha = lr * tf.sqrt(1.0 - tf.pow(b2, t)) / (1.0 - tf.pow(b1, t))
            for p, m, v, g, lay in zip(self.params, self.m, self.v, grads, self.layouts):
                m_new = m + (g - m) * (1.0 - b1)
                v_new = v + (tf.square(g) - v) * (1.0 - b2)
                m.assign(dtensor.relayout(m_new, lay))
                v.assign(dtensor.relayout(v_new, lay))
                p.assign(dtensor.relayout(p - alpha * m_new / (tf.sqrt(v_new) + eps), lay))
            self.iterations.assign_add(tf.constant(1, tf.int64))
            return loss

        self._train = train

    def _pack(self, array):
        """The batch as a DTensor: each device gets its rows, straight from the host."""
        chunks = np.split(array, self._data_size)
        return dtensor.pack([chunks[row] for row in self._rows], self._batch_layout)

    def step(self):
        xb, yb = next(self._batches)
        loss = self._train(self._pack(xb), self._pack(yb))
        return float(dtensor.unpack(loss)[0])

    def get_weights(self):
        full = dtensor.Layout.replicated
        return [
            dtensor.unpack(dtensor.relayout(p.read_value(), full(self.mesh.dtensor_mesh, rank=len(p.shape))))[0].numpy()
            for p in self.params
        ]

    def bytes_per_device(self):
        from tfpar._dtensor import bytes_per_device

        def most(variables):
            totals = None
            for v in variables:
                shards = bytes_per_device(v)
                totals = shards if totals is None else [a + b for a, b in zip(totals, shards)]
            return max(totals)

        return most(self.params), most(self.m + self.v + [self.iterations])
