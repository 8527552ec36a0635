"""Plans: which style owns which layer.

A plan is `"auto"` or a dict `{regex: style}`. Resolution is pure data: it
takes `LayerSpec`s in model order and returns one `Assignment` per layer, so
it is tested without devices or Keras.
"""

import dataclasses
import re

from tfpar.styles import (
    SHARDABLE_KINDS,
    ColumnParallel,
    LayerSpec,
    ParallelStyle,
    Replicated,
    RowParallel,
)

__all__ = ["Plan", "Assignment"]


@dataclasses.dataclass(frozen=True)
class Assignment:
    """The style a plan gives one layer, and why."""

    style: ParallelStyle
    reason: str
    key: str | None = None


class Plan:
    """Maps layers to parallel styles.

    Args:
        plan: `"auto"` (Megatron pairing of consecutive Dense layers: Column
            then Row, one all-reduce forward and one backward per pair; layers
            whose sizes the model axis does not divide are replicated), or a
            dict mapping regular expressions, matched with `re.fullmatch`
            against `layer.path`, to styles. Unmatched layers are replicated.
        axis_name: the mesh axis that carries tensor parallelism.
        axis_size: its size.

    Raises:
        ValueError: a key is not a valid regular expression, or a value is
            not a style.
    """

    def __init__(self, plan, axis_name, axis_size):
        self.axis_name = axis_name
        self.axis_size = int(axis_size)
        if isinstance(plan, Plan):
            plan = plan.rules if plan.rules is not None else "auto"
        if plan == "auto":
            self.rules = None
        elif isinstance(plan, dict):
            rules = {}
            for key, style in plan.items():
                if not isinstance(style, ParallelStyle):
                    raise ValueError(
                        f"Plan key {key!r} maps to {style!r}, which is not a style; use "
                        "tfpar.ColumnParallel(), tfpar.RowParallel() or tfpar.Replicated()."
                    )
                try:
                    rules[key] = (re.compile(key), style)
                except re.error as e:
                    raise ValueError(f"Plan key {key!r} is not a valid regular expression: {e}.") from e
            self.rules = rules
        else:
            raise ValueError(
                f"plan must be 'auto' or a dict of regex -> style. Received: plan={plan!r}."
            )

    @property
    def is_auto(self):
        return self.rules is None

    def resolve(self, layers, *, complete=True):
        """Assigns a style to each layer.

        Args:
            layers: `LayerSpec`s in model order.
            complete: the list holds every layer of the model; then a key
                matching none of them is an error, and in `"auto"` an unpaired
                trailing Column layer gathers its output.

        Returns:
            dict path -> `Assignment`.

        Raises:
            ValueError: a layer matched by two keys; a key matching no layer
                (when `complete`); sizes the model axis does not divide.
            TypeError: a style given a layer it cannot shard.
        """
        layers = list(layers)
        if self.is_auto:
            return self._resolve_auto(layers, complete)
        return self._resolve_rules(layers, complete)

    def _resolve_rules(self, layers, complete):
        out = {}
        used = set()
        for layer in layers:
            keys = [k for k, (rx, _) in self.rules.items() if rx.fullmatch(layer.path)]
            if len(keys) > 1:
                raise ValueError(
                    f"Layer {layer.path!r} matches several plan keys: {keys}. Make the "
                    "keys exclusive so each layer has one style."
                )
            if not keys:
                out[layer.path] = Assignment(Replicated(), "not in plan")
                continue
            key = keys[0]
            used.add(key)
            style = self.rules[key][1]
            style.check(layer, self.axis_name, self.axis_size)
            out[layer.path] = Assignment(style, f"plan key {key!r}", key)
        if complete:
            unused = [k for k in self.rules if k not in used]
            if unused:
                paths = [layer.path for layer in layers]
                raise ValueError(
                    f"Plan keys match no layer: {unused}. Keys are matched with "
                    f"re.fullmatch against layer.path; the layer paths are: {paths}."
                )
        return out

    def _resolve_auto(self, layers, complete):
        n = self.axis_size
        out = {}
        open_column = None  # a Column layer still waiting for its Row partner
        for layer in layers:
            if layer.kind not in SHARDABLE_KINDS:
                out[layer.path] = Assignment(Replicated(), f"{layer.kind} is not sharded by auto")
                continue
            if open_column is not None and layer.in_features is not None and layer.in_features % n == 0:
                out[layer.path] = Assignment(RowParallel(), f"pairs with {open_column.path!r}")
                open_column = None
                continue
            if open_column is not None:
                out[open_column.path] = self._unpaired(open_column)
                open_column = None
            if layer.out_features is not None and layer.out_features % n == 0:
                out[layer.path] = Assignment(ColumnParallel(), "auto: column of a pair")
                open_column = layer
            else:
                out[layer.path] = Assignment(
                    Replicated(),
                    f"units={layer.out_features} not divisible by {self.axis_name}={n}",
                )
        if open_column is not None and complete:
            out[open_column.path] = self._unpaired(open_column)
        return out

    def _unpaired(self, layer):
        return Assignment(ColumnParallel(gather_output=True), "auto: no Row partner, output gathered")

    def __repr__(self):
        if self.is_auto:
            return f"Plan('auto', {self.axis_name}={self.axis_size})"
        body = ", ".join(f"{k!r}: {s!r}" for k, (_, s) in self.rules.items())
        return f"Plan({{{body}}}, {self.axis_name}={self.axis_size})"
