"""Logical devices: split one physical device into several."""

import tensorflow as tf

__all__ = ["configure_virtual_devices", "list_devices"]


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
