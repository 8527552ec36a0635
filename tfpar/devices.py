"""Logical devices: split one physical device into several."""

import math
import re

import tensorflow as tf

__all__ = ["configure_virtual_devices", "list_devices", "mesh_size", "prepare_devices"]


def _short_name(device_name):
    """'/job:localhost/replica:0/task:0/device:CPU:3' -> 'CPU:3'."""
    return device_name.split("device:")[-1]


def list_devices(device_type):
    """Names ('CPU:0', ...) of the logical devices of one type."""
    return [_short_name(d.name) for d in tf.config.list_logical_devices(device_type)]


def configure_virtual_devices(n, device_type="CPU"):
    """Splits the first physical device of a type into `n` logical devices.

    Logical devices let one CPU (or one GPU) stand for a mesh of several: the
    way tfpar's tests run every mesh up to 8 devices on one machine. It must
    run before TensorFlow initialises its devices (before the first op).

    Args:
        n: number of logical devices, at least 1.
        device_type: "CPU" or "GPU".

    Returns:
        The logical device names, e.g. `["CPU:0", "CPU:1"]`.

    Raises:
        ValueError: `n` < 1, or no physical device of that type.
        RuntimeError: TensorFlow already initialised its devices with another
            number of logical devices.

    Example:
        >>> tfpar.configure_virtual_devices(4)
        ['CPU:0', 'CPU:1', 'CPU:2', 'CPU:3']
    """
    device_type = device_type.upper()
    if not isinstance(n, int) or n < 1:
        raise ValueError(
            f"configure_virtual_devices needs a positive device count. Received: n={n!r}."
        )
    physical = tf.config.list_physical_devices(device_type)
    if not physical:
        raise ValueError(
            f"No physical {device_type} device to split. Received: device_type={device_type!r}; "
            f"physical devices: {[d.name for d in tf.config.list_physical_devices()]}."
        )
    current = tf.config.get_logical_device_configuration(physical[0])
    if current is not None and len(current) == n:
        return list_devices(device_type)
    if device_type == "GPU":
        memory = 1024
        configs = [tf.config.LogicalDeviceConfiguration(memory_limit=memory)] * n
    else:
        configs = [tf.config.LogicalDeviceConfiguration()] * n
    try:
        tf.config.set_logical_device_configuration(physical[0], configs)
    except RuntimeError as e:
        have = len(tf.config.list_logical_devices(device_type))
        raise RuntimeError(
            f"configure_virtual_devices({n}, {device_type!r}) came after TensorFlow "
            f"initialised its devices ({have} logical {device_type} device(s) exist). "
            "Call it first thing in the process, before any TensorFlow op or mesh, "
            f"or use the {have} device(s) that exist."
        ) from e
    return list_devices(device_type)


def mesh_size(spec):
    """Devices a mesh text needs: '2x2' -> 4, 'batch=2,model=2' -> 4, '4' -> 4."""
    numbers = [int(n) for n in re.findall(r"\d+", str(spec))]
    if not numbers:
        raise ValueError(f"Cannot read mesh {spec!r}. Write it as '2x2' or 'batch=2,model=2'.")
    return math.prod(numbers)


def prepare_devices(n):
    """At least `n` devices: GPUs if there are enough, else logical ones.

    Leaves an existing split of at least `n` logical devices as it is (a
    test session's, say), so other code in the process keeps its devices.
    Returns the device names to use, `n` of them.
    """
    gpus = tf.config.list_physical_devices("GPU")
    kind = "GPU" if gpus else "CPU"
    if kind == "GPU" and len(gpus) >= n:
        return list_devices(kind)[:n]
    physical = tf.config.list_physical_devices(kind)[0]
    configured = tf.config.get_logical_device_configuration(physical)
    if configured is None or len(configured) < n:
        try:
            configure_virtual_devices(n, kind)
        except RuntimeError:
            if len(list_devices(kind)) < n:
                raise
    names = list_devices(kind)
    if len(names) < n:
        raise RuntimeError(
            f"tfpar needs {n} {kind} devices and TensorFlow has {len(names)}; run it in a "
            "fresh process, or use a smaller mesh."
        )
    return names[:n]
