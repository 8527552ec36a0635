"""Parallel styles: how one layer's variables lie on the model axis.

A style is pure data. Given a layer's description (a `LayerSpec`) and the
model axis, it returns a sharding spec per variable: a tuple with one entry
per tensor dimension, each a mesh axis name or `UNSHARDED`. No device, mesh
object or Keras import is needed, so styles and plans are tested as data.

The algebra, for a Dense layer Y = act(X A + b) with the model axis of size n:

* `ColumnParallel`: A = [A_1 ... A_n] split by columns, b = [b_1 ... b_n].
  Device i computes Y_i = act(X A_i + b_i). Forward: no communication (Y is
  sharded on its last dimension). Backward: one all-reduce of dX. With
  `gather_output=True` an all-gather makes Y replicated.
* `RowParallel`: A = [A_1; ...; A_n] split by rows, X = [X_1 ... X_n] sharded
  on its last dimension, b replicated. Y = act(sum_i X_i A_i + b). Forward:
  one all-reduce of the partial sums. Backward: no communication for dX.
* Column followed by Row (Megatron's MLP): one all-reduce forward, one
  backward for the pair.
* `Replicated`: every device holds all of A and b; no communication.
"""

import dataclasses

__all__ = [
    "UNSHARDED",
    "LayerSpec",
    "ParallelStyle",
    "ColumnParallel",
    "RowParallel",
    "Replicated",
]

UNSHARDED = "unsharded"  # the same string as tf.experimental.dtensor.UNSHARDED

SHARDABLE_KINDS = ("Dense",)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What a style needs to know of a layer, free of any Keras object.

    Attributes:
        path: the layer's `layer.path`, e.g. `"mlp/up"`.
        kind: the layer class name, e.g. `"Dense"`.
        in_features: size of the input's last dimension (None if unknown).
        out_features: size of the output's last dimension (Dense `units`).
        variables: names of the layer's own variables, e.g. `("kernel", "bias")`.
    """

    path: str
    kind: str
    in_features: int | None = None
    out_features: int | None = None
    variables: tuple = ()


class ParallelStyle:
    """Base class: a rule from a layer's variables to sharding specs."""

    sharded = True

    def check(self, layer, axis_name, axis_size):
        """Raises if this style cannot shard `layer` over `axis_size` devices.

        Raises:
            TypeError: the layer is of a kind the style cannot shard.
            ValueError: the sharded dimension is not divisible by the axis size.
        """
        if layer.kind not in SHARDABLE_KINDS:
            raise TypeError(
                f"{self!r} cannot shard layer {layer.path!r} of type {layer.kind}; "
                f"it shards {', '.join(SHARDABLE_KINDS)} layers. Map the layer to "
                "tfpar.Replicated() or leave it out of the plan."
            )
        dim, what = self._sharded_dim(layer)
        if dim is not None and dim % axis_size:
            raise ValueError(
                f"{layer.kind} {layer.path!r} has {what}={dim}, which the {axis_name!r} "
                f"axis of size {axis_size} does not divide; use a multiple of "
                f"{axis_size} or replicate the layer (tfpar.Replicated())."
            )

    def _sharded_dim(self, layer):
        return None, None

    def variable_spec(self, layer, variable_name, rank, axis_name):
        """The sharding spec of one of the layer's variables."""
        raise NotImplementedError

    def output_gathered(self):
        """Whether the layer's output is all-gathered to replicated."""
        return False

    def __eq__(self, other):
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self):
        return hash((type(self), tuple(sorted(vars(self).items()))))


class ColumnParallel(ParallelStyle):
    """Shards a Dense kernel on its output dimension, and its bias.

    Y = X [A_1 ... A_n] + [b_1 ... b_n]: input replicated on the model axis,
    output sharded on its last dimension. No collective forward; one
    all-reduce of dX backward. `gather_output=True` adds an all-gather of Y.

    Args:
        gather_output: all-gather the output so the next layer sees it whole.
    """

    def __init__(self, *, gather_output=False):
        self.gather_output = bool(gather_output)

    def _sharded_dim(self, layer):
        return layer.out_features, "units"

    def variable_spec(self, layer, variable_name, rank, axis_name):
        if variable_name == "kernel" and rank == 2:
            return (UNSHARDED, axis_name)
        if variable_name == "bias" and rank == 1:
            return (axis_name,)
        return (UNSHARDED,) * rank

    def output_gathered(self):
        return self.gather_output

    def __repr__(self):
        return f"ColumnParallel(gather_output={self.gather_output})"


class RowParallel(ParallelStyle):
    """Shards a Dense kernel on its input dimension; the bias is replicated.

    Y = sum_i X_i A_i + b: input sharded on its last dimension, output
    replicated after one all-reduce forward; no collective for dX backward.
    """

    def _sharded_dim(self, layer):
        return layer.in_features, "input features"

    def variable_spec(self, layer, variable_name, rank, axis_name):
        if variable_name == "kernel" and rank == 2:
            return (axis_name, UNSHARDED)
        return (UNSHARDED,) * rank

    def __repr__(self):
        return "RowParallel()"


class Replicated(ParallelStyle):
    """Every device holds the whole layer; no communication."""

    sharded = False

    def check(self, layer, axis_name, axis_size):
        return None

    def variable_spec(self, layer, variable_name, rank, axis_name):
        return (UNSHARDED,) * rank

    def __repr__(self):
        return "Replicated()"
