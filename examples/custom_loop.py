"""A custom training loop on a tensor-parallel model, checked against one device.

    python examples/custom_loop.py

`tfpar.train_step` compiles one step (tf.GradientTape, global-norm clipping
over all shards, the optimizer update) on the model's mesh;
`tp.distribute_dataset` lays each batch out sharded on the data axis (the
final partial batch replicated, as `fit` does); `tfpar.eval_step` computes
loss and metrics. The same loop written with plain TensorFlow on one device
gives the same losses and weights.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfpar  # noqa: E402

GPUS = len(tf.config.list_physical_devices("GPU"))
if not GPUS:
    tfpar.configure_virtual_devices(4)  # 4 logical CPUs stand in for 4 accelerators

import keras  # noqa: E402

DEVICES = GPUS or 4
MESH = (2, DEVICES // 2) if DEVICES >= 4 and DEVICES % 2 == 0 else (1, DEVICES)
EPOCHS, BATCH, CLIP = 3, 32, 0.5


def build():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((32,)),
        keras.layers.Dense(256, activation="relu", name="up"),     # ColumnParallel
        keras.layers.Dense(32, name="down"),                       # RowParallel
    ])


rng = np.random.RandomState(0)
x = rng.randn(205, 32).astype("float32")                           # 6 batches of 32, then 13
y = np.tanh(x @ rng.randn(32, 32).astype("float32") / 6)
x_val, y_val = x[:64], y[:64]
train = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)

# --- tensor-parallel ----------------------------------------------------------------
tp = tfpar.TensorParallel(tfpar.DeviceMesh(MESH), plan="auto")
with tp.scope():
    model = build()
step = tfpar.train_step(model, keras.optimizers.Adam(1e-3), "mse", metrics=["mae"],
                        clip_global_norm=CLIP)         # accumulation_steps=k: k batches per update
evaluate = tfpar.eval_step(model, "mse")
losses = []
for epoch in range(EPOCHS):
    step.reset_metrics()
    for xb, yb in tp.distribute_dataset(train):
        logs = step(xb, yb)
        losses.append(float(logs["loss"]))
    val = evaluate(x_val, y_val)
    print(f"epoch {epoch + 1}: loss {logs['loss']:.4f}  mae {logs['mean_absolute_error']:.4f}  "
          f"grad_norm {logs['grad_norm']:.3f}  val_loss {val['loss']:.4f}")

# --- the same loop on one device ---------------------------------------------------
plain, optimizer, loss_fn = build(), keras.optimizers.Adam(1e-3), keras.losses.MeanSquaredError()


@tf.function
def plain_step(xb, yb):
    with tf.GradientTape() as tape:
        loss = loss_fn(yb, plain(xb, training=True))
    grads = tape.gradient(loss, plain.trainable_variables)
    grads, _ = tf.clip_by_global_norm(grads, CLIP)
    optimizer.apply(grads, plain.trainable_variables)
    return loss


plain_losses = [float(plain_step(xb, yb)) for _ in range(EPOCHS) for xb, yb in train]
loss_diff = np.abs(np.array(losses) - plain_losses).max()
weight_diff = max(np.abs(a - b).max() for a, b in zip(plain.get_weights(), model.get_weights()))
print(f"mesh {MESH}: {len(losses)} steps; losses {losses[0]:.4f} -> {losses[-1]:.4f}")
print(f"max difference from one device: loss {loss_diff:.2e}, weights {weight_diff:.2e}")
