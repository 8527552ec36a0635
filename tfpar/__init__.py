"""tfpar: Megatron-style tensor parallelism for Keras 3 models on DTensor.

The public names load on first use, so `import tfpar` (and the `tfpar`
command) starts without importing TensorFlow; the command can then set up
logging and devices before TensorFlow initialises.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "ColumnParallel": "tfpar.styles",
    "DeviceMesh": "tfpar.mesh",
    "ParallelStyle": "tfpar.styles",
    "Plan": "tfpar.plan",
    "Replicated": "tfpar.styles",
    "RowParallel": "tfpar.styles",
    "TensorParallel": "tfpar.tensor_parallel",
    "configure_virtual_devices": "tfpar.devices",
    "eval_step": "tfpar.training",
    "export_saved_model": "tfpar.export",
    "initialize": "tfpar.launch",
    "num_processes": "tfpar.launch",
    "process_index": "tfpar.launch",
    "restore_checkpoint": "tfpar.checkpoint",
    "save_checkpoint": "tfpar.checkpoint",
    "train_step": "tfpar.training",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module 'tfpar' has no attribute {name!r}") from None


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
