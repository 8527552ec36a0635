"""DeviceMesh: named axes over a grid of devices."""

import math
import re

import tensorflow as tf
from tensorflow.experimental import dtensor

__all__ = ["DeviceMesh"]


def _default_devices():
    for kind in ("GPU", "TPU", "CPU"):
        devices = tf.config.list_logical_devices(kind)
        if devices:
            return kind, [d.name.split("device:")[-1] for d in devices]
    raise RuntimeError("TensorFlow sees no device at all.")


class DeviceMesh:
    """A grid of devices with one name per axis, e.g. `batch=2, model=2`.

    The `batch` axis carries data parallelism (each row of the grid sees part
    of the batch); the `model` axis carries tensor parallelism (each column
    holds a slice of every sharded kernel). A 1xN mesh is pure tensor
    parallelism, Nx1 pure data parallelism.

    Args:
        shape: devices along each axis, e.g. `(2, 2)`.
        axis_names: one name per axis, unique.
        devices: device names such as `"CPU:0"`; default all GPUs, else TPUs,
            else CPUs. Their number must equal the product of `shape`.

    Raises:
        ValueError: shape and device count differ, axis names repeat or do not
            match the shape.

    Example:
        >>> mesh = tfpar.DeviceMesh((2, 2))
        >>> mesh
        <DeviceMesh batch=2 model=2 on 4 CPU>
    """

    def __init__(self, shape, axis_names=("batch", "model"), devices=None):
        shape = tuple(int(s) for s in shape)
        axis_names = tuple(axis_names)
        if len(shape) != len(axis_names):
            raise ValueError(
                "DeviceMesh needs one axis name per dimension. Received: "
                f"shape={shape}; axis_names={axis_names}."
            )
        if len(set(axis_names)) != len(axis_names):
            raise ValueError(
                f"DeviceMesh axis names must be unique. Received: axis_names={axis_names}; "
                "give each axis its own name, e.g. ('batch', 'model')."
            )
        if any(s < 1 for s in shape):
            raise ValueError(f"DeviceMesh sizes must be positive. Received: shape={shape}.")
        if devices is None:
            kind, devices = _default_devices()
            if dtensor.num_clients() > 1:
                devices = None  # filled from the global device list below
        self._shape = shape
        self._axis_names = axis_names
        size = math.prod(shape)
        if devices is None:
            # Multi-client: every process's devices make one global mesh.
            self._mesh = dtensor.create_distributed_mesh(
                list(zip(axis_names, shape)), device_type=kind
            )
            self._devices = [str(d) for d in self._mesh.global_device_ids().flatten()]
            self._device_type = kind
            return
        devices = [d.split("device:")[-1] for d in devices]
        if size != len(devices):
            raise ValueError(
                "DeviceMesh shape does not match the number of devices. Received: "
                f"shape={shape} (product {size}); {len(devices)} devices {devices}. "
                f"Use a shape whose product is {len(devices)}, pass devices=, or call "
                f"tfpar.configure_virtual_devices({size}) first."
            )
        self._devices = devices
        self._device_type = devices[0].split(":")[0].upper()
        self._mesh = dtensor.create_mesh(
            list(zip(axis_names, shape)), devices=devices
        )

    @classmethod
    def parse(cls, spec, devices=None):
        """Builds a mesh from text: `"2x2"` or `"batch=2,model=2"`.

        A plain `"AxB"` names its axes `batch` and `model`; a single number
        `"4"` means `1x4` (all devices on the model axis).

        Raises:
            ValueError: the text is neither form.
        """
        text = str(spec).strip()
        if re.fullmatch(r"\d+(x\d+)*", text):
            sizes = tuple(int(p) for p in text.split("x"))
            if len(sizes) == 1:
                sizes = (1, sizes[0])
            if len(sizes) != 2:
                names = tuple(f"axis{i}" for i in range(len(sizes)))
            else:
                names = ("batch", "model")
            return cls(sizes, names, devices=devices)
        parts = [p.strip() for p in text.split(",") if p.strip()]
        names, sizes = [], []
        for part in parts:
            m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(\d+)", part)
            if not m:
                raise ValueError(
                    f"Cannot read mesh {spec!r}. Write it as '2x2' or 'batch=2,model=2'."
                )
            names.append(m.group(1))
            sizes.append(int(m.group(2)))
        if not parts:
            raise ValueError(f"Cannot read mesh {spec!r}. Write it as '2x2' or 'batch=2,model=2'.")
        return cls(tuple(sizes), tuple(names), devices=devices)

    @property
    def shape(self):
        return self._shape

    @property
    def axis_names(self):
        return self._axis_names

    @property
    def devices(self):
        return list(self._devices)

    @property
    def size(self):
        return math.prod(self._shape)

    @property
    def device_type(self):
        return self._device_type

    @property
    def dtensor_mesh(self):
        """The `tf.experimental.dtensor.Mesh` behind this mesh."""
        return self._mesh

    def axis_size(self, name):
        """Devices along the named axis.

        Raises:
            ValueError: no axis has that name.
        """
        self.check_axis(name)
        return self._shape[self._axis_names.index(name)]

    def check_axis(self, name, role="axis"):
        if name not in self._axis_names:
            raise ValueError(
                f"Unknown mesh axis {name!r} for {role}. The mesh has axes "
                f"{self._axis_names}; pass one of them."
            )

    def __repr__(self):
        axes = " ".join(f"{n}={s}" for n, s in zip(self._axis_names, self._shape))
        return f"<DeviceMesh {axes} on {self.size} {self._device_type}>"

    def __eq__(self, other):
        return isinstance(other, DeviceMesh) and self._mesh == other._mesh

    def __hash__(self):
        return hash(self._mesh)
