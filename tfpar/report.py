"""describe() and memory_report(): what lies where, read from the real shards."""

import io

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tfpar import _dtensor
from tfpar.adapters import keras3 as adapter

__all__ = ["describe", "memory_report"]


def _spec_text(variable):
    layout = _dtensor.layout_of(variable._value) if variable is not None else None
    if layout is None:
        return "-"
    return escape("[" + ", ".join(layout.sharding_specs) + "]")


def _device_bytes(variables):
    """Sum over variables of the bytes each device holds."""
    total = None
    for v in variables:
        shards = _dtensor.bytes_per_device(v._value)
        total = shards if total is None else [a + b for a, b in zip(total, shards)]
    return total or [0]


def _full_bytes(variable):
    return int(variable._value.shape.num_elements()) * variable._value.dtype.size


def _is_replicated(variable):
    layout = _dtensor.layout_of(variable._value)
    return layout is None or layout.is_fully_replicated()


def memory_report(tp, model):
    """Bytes of a laid-out model, per device, read with `dtensor.unpack`.

    Returns:
        dict with `total_bytes` (the unsharded size of weights and optimizer
        state), `per_device_bytes` (the most any device holds),
        `per_device_param_bytes`, `per_device_optimizer_bytes`,
        `replicated_bytes` (what every device holds in full), `sharded_bytes`,
        and `devices` (bytes by device).
    """
    adapter.adopt(model, tp)
    weights = list(model.weights)
    optimizer = getattr(model, "optimizer", None)
    state = list(optimizer.variables) if optimizer is not None and optimizer.built else []
    everything = weights + state
    per_device = _device_bytes(everything)
    return {
        "total_bytes": sum(_full_bytes(v) for v in everything),
        "param_bytes": sum(_full_bytes(v) for v in weights),
        "optimizer_bytes": sum(_full_bytes(v) for v in state),
        "per_device_bytes": max(per_device),
        "per_device_param_bytes": max(_device_bytes(weights)),
        "per_device_optimizer_bytes": max(_device_bytes(state)) if state else 0,
        "replicated_bytes": sum(_full_bytes(v) for v in everything if _is_replicated(v)),
        "sharded_bytes": sum(_full_bytes(v) for v in everything if not _is_replicated(v)),
        "devices": dict(zip(tp.mesh.devices, per_device)),
    }


def describe(tp, model):
    """A table of the model's layers: style, layouts, bytes per device."""
    assignments = adapter.adopt(model, tp)
    table = Table(title=f"tfpar {tp.mesh!r}, plan {tp.plan!r}")
    for column in ("layer", "style", "kernel", "bias", "bytes/device", "why"):
        table.add_column(column)
    for spec, layer in adapter.layer_specs(model):
        variables = {v.path.rsplit("/", 1)[-1]: v for v in adapter._own_variables(layer)}
        if not variables:
            continue
        a = assignments[spec.path]
        table.add_row(
            spec.path,
            repr(a.style),
            _spec_text(variables.get("kernel")),
            _spec_text(variables.get("bias")),
            f"{max(_device_bytes(variables.values())):,}",
            a.reason,
        )
    report = memory_report(tp, model)
    buffer = io.StringIO()
    console = Console(file=buffer, width=170, force_terminal=False)
    console.print(table)
    console.print(
        f"weights + optimizer state: {report['total_bytes']:,} bytes unsharded, "
        f"{report['per_device_bytes']:,} bytes on the fullest device"
    )
    return buffer.getvalue()
