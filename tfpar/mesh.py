"""DeviceMesh: named axes over a grid of devices."""

import math
import os
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


def _job_size():
    """Processes DTENSOR_JOBS lists (0 when unset: a single-process run)."""
    jobs = [j for j in os.environ.get("DTENSOR_JOBS", "").split(",") if j.strip()]
    return len(jobs)


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
            else CPUs. Their number must equal the product of `shape`. In a
            multi-process job (`tfpar.initialize`) they name each process's
            local devices (default all), and the product of `shape` must equal
            their number times the number of processes.

    Raises:
        ValueError: shape and device count differ (in a job: all processes'
            devices together), axis names repeat or do not match the shape.
        RuntimeError: `DTENSOR_JOBS` is set but `tfpar.initialize()` was not
            called.

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
        self._shape = shape
        self._axis_names = axis_names
        self._num_processes = 1
        size = math.prod(shape)
        if _job_size():
            self._init_distributed(devices)
            return
        if devices is None:
            kind, devices = _default_devices()
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

    def _init_distributed(self, devices):
        """One mesh over every process's devices (DTensor multi-client).

        Global device k is local device `k % per_process` of process
        `k // per_process`, and devices fill the mesh in row-major order: on a
        `(P, K)` mesh over P processes of K devices each row is one process.
        """
        from tensorflow.dtensor.python import accelerator_util

        shape, size, processes = self._shape, math.prod(self._shape), _job_size()
        if not accelerator_util.is_initialized():
            raise RuntimeError(
                f"DTENSOR_JOBS describes a job of {processes} process(es), but this process has "
                "not joined it: call tfpar.initialize() first thing in the program, before "
                "any mesh or TensorFlow op."
            )
        if devices is None:
            kind = "GPU" if dtensor.num_local_devices("GPU") else "CPU"
            local = [f"{kind}:{i}" for i in range(dtensor.num_local_devices(kind))]
        else:
            local = [d.split("device:")[-1] for d in devices]
            kind = local[0].split(":")[0].upper() if local else "CPU"
        total = len(local) * processes
        if size != total:
            need = size // processes if size % processes == 0 else "more"
            raise ValueError(
                "DeviceMesh shape does not match the number of devices of all processes. "
                f"Received: shape={shape} (product {size}); {processes} processes x "
                f"{len(local)} {kind} devices each = {total} devices. Use a shape whose "
                f"product is {total}, or give each process {need} devices "
                "(tfpar launch --devices-per-process, TFPAR_DEVICES_PER_PROCESS)."
            )
        self._mesh = dtensor.create_distributed_mesh(
            list(zip(self._axis_names, shape)), local_devices=local, device_type=kind
        )
        job = dtensor.job_name()
        self._devices = [
            f"/job:{job}/replica:0/task:{int(k) // len(local)}/device:{local[int(k) % len(local)]}"
            for k in self._mesh.global_device_ids().flatten()
        ]
        self._local_devices = local
        self._device_type = kind
        self._num_processes = processes

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
    def local_devices(self):
        """The devices of this mesh that belong to this process."""
        return list(getattr(self, "_local_devices", self._devices))

    @property
    def num_processes(self):
        """Processes whose devices make up the mesh (1 unless `tfpar.initialize` joined a job)."""
        return self._num_processes

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
        where = f" over {self._num_processes} processes" if self._num_processes > 1 else ""
        return f"<DeviceMesh {axes} on {self.size} {self._device_type}{where}>"

    def __eq__(self, other):
        return isinstance(other, DeviceMesh) and self._mesh == other._mesh

    def __hash__(self):
        return hash(self._mesh)
