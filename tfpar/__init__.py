"""tfpar: Megatron-style tensor parallelism for Keras 3 models on DTensor."""

from tfpar.checkpoint import restore_checkpoint, save_checkpoint
from tfpar.devices import configure_virtual_devices
from tfpar.export import export_saved_model
from tfpar.launch import initialize, num_processes, process_index
from tfpar.mesh import DeviceMesh
from tfpar.plan import Plan
from tfpar.styles import ColumnParallel, ParallelStyle, Replicated, RowParallel
from tfpar.tensor_parallel import TensorParallel
from tfpar.training import eval_step, train_step

__version__ = "0.1.0"

__all__ = [
    "ColumnParallel",
    "DeviceMesh",
    "ParallelStyle",
    "Plan",
    "Replicated",
    "RowParallel",
    "TensorParallel",
    "configure_virtual_devices",
    "eval_step",
    "export_saved_model",
    "initialize",
    "num_processes",
    "process_index",
    "restore_checkpoint",
    "save_checkpoint",
    "train_step",
]
