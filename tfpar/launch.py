"""Several processes, one mesh: `tfpar.initialize()` and `tfpar launch`.

DTensor's multi-client runtime runs one Python process per host (a *client*),
each owning its local devices; together they form one global mesh, and the
collectives a layout implies cross process boundaries over gRPC. Every
process runs the same program (SPMD): it builds the same model, the same
mesh, and calls `fit` with the same arguments.

A process learns its place in the job from four environment variables, the
ones DTensor itself reads:

========================  ==================================================
``DTENSOR_CLIENT_ID``     this process's index, ``0 .. N-1``
``DTENSOR_NUM_CLIENTS``   ``N``, the number of processes
``DTENSOR_JOBS``          ``host:port`` of every process, comma-separated,
                          in index order (the same list on every host)
``DTENSOR_JOB_NAME``      the TensorFlow job name (default ``worker``)
========================  ==================================================

and, optionally, ``TFPAR_DEVICES_PER_PROCESS`` (split the process's CPU, or
first GPU, into that many logical devices) and ``TFPAR_DEVICE_TYPE``.

`tfpar launch -n N -- CMD ...` sets all of them for N processes on this
machine, on loopback ports, and supervises the job.
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

__all__ = ["add_parser", "initialize", "is_multi_process", "num_processes", "process_index"]

ENV_CLIENT_ID = "DTENSOR_CLIENT_ID"
ENV_NUM_CLIENTS = "DTENSOR_NUM_CLIENTS"
ENV_JOBS = "DTENSOR_JOBS"
ENV_JOB_NAME = "DTENSOR_JOB_NAME"
ENV_DEVICES = "TFPAR_DEVICES_PER_PROCESS"
ENV_DEVICE_TYPE = "TFPAR_DEVICE_TYPE"

_initialized = None  # the (id, n, jobs, job name, devices, type) the runtime came up with


# --- one process: join the job -----------------------------------------------------


def _int_setting(value, variable, minimum):
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{variable} must be an integer. Received: {variable}={value!r}.") from None
    if number < minimum:
        raise ValueError(f"{variable} must be at least {minimum}. Received: {variable}={number}.")
    return number


def _read_settings(process_id, num_processes, addresses, job_name, devices_per_process, device_type):
    """The job description from the arguments, else the environment, checked."""
    env = os.environ
    if addresses is None and env.get(ENV_JOBS, "").strip():
        addresses = env[ENV_JOBS]
    if isinstance(addresses, str):
        addresses = [a.strip() for a in addresses.split(",")]
    if num_processes is None and env.get(ENV_NUM_CLIENTS, "").strip():
        num_processes = env[ENV_NUM_CLIENTS]
    if process_id is None and env.get(ENV_CLIENT_ID, "").strip():
        process_id = env[ENV_CLIENT_ID]
    if devices_per_process is None and env.get(ENV_DEVICES, "").strip():
        devices_per_process = env[ENV_DEVICES]
    if device_type is None and env.get(ENV_DEVICE_TYPE, "").strip():
        device_type = env[ENV_DEVICE_TYPE]
    job_name = job_name or env.get(ENV_JOB_NAME, "").strip() or "worker"

    if devices_per_process is not None:
        devices_per_process = _int_setting(devices_per_process, ENV_DEVICES, 1)
    if device_type is not None:
        device_type = str(device_type).upper()
        if device_type not in ("CPU", "GPU"):
            raise ValueError(f"{ENV_DEVICE_TYPE} must be CPU or GPU. Received: {device_type!r}.")

    if addresses is None and num_processes is None and process_id is None:
        return None, devices_per_process, device_type  # one process, nothing to join
    if num_processes is not None:
        num_processes = _int_setting(num_processes, ENV_NUM_CLIENTS, 1)
    if not addresses and num_processes == 1 and str(process_id or 0).strip() == "0":
        return None, devices_per_process, device_type  # a job of one: a single process
    if not addresses:
        raise ValueError(
            f"{ENV_JOBS} is not set, so this process cannot find the others "
            f"({ENV_NUM_CLIENTS}={num_processes}, {ENV_CLIENT_ID}={process_id}). Set {ENV_JOBS} "
            "to every process's host:port, comma-separated, in process order (the same list "
            "everywhere), e.g. DTENSOR_JOBS=10.0.0.1:9470,10.0.0.2:9470, or start the job "
            "with `tfpar launch -n N -- CMD`."
        )
    for address in addresses:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+:\d{1,5}|\[[0-9A-Fa-f:.]+\]:\d{1,5}", address):
            raise ValueError(
                f"{ENV_JOBS} entries must be host:port. Received: {address!r} in "
                f"{ENV_JOBS}={','.join(addresses)!r}."
            )
    if len(set(addresses)) != len(addresses):
        raise ValueError(
            f"{ENV_JOBS} lists an address twice; every process needs its own host:port. "
            f"Received: {ENV_JOBS}={','.join(addresses)!r}."
        )
    if num_processes is None:
        num_processes = len(addresses)
    if num_processes != len(addresses):
        raise ValueError(
            f"{ENV_NUM_CLIENTS}={num_processes} but {ENV_JOBS} lists {len(addresses)} "
            f"address(es) ({','.join(addresses)}); list one host:port per process."
        )
    if process_id is None:
        raise ValueError(
            f"{ENV_CLIENT_ID} is not set: this process does not know its index in the job of "
            f"{num_processes} processes ({ENV_JOBS}={','.join(addresses)}). Set "
            f"{ENV_CLIENT_ID} to 0..{num_processes - 1}, a different one on each host."
        )
    process_id = _int_setting(process_id, ENV_CLIENT_ID, 0)
    if process_id >= num_processes:
        raise ValueError(
            f"{ENV_CLIENT_ID}={process_id} is out of range for {ENV_NUM_CLIENTS}={num_processes}; "
            f"use 0..{num_processes - 1}."
        )
    return (process_id, num_processes, tuple(addresses), job_name), devices_per_process, device_type


def initialize(
    *,
    process_id=None,
    num_processes=None,
    addresses=None,
    job_name=None,
    devices_per_process=None,
    device_type=None,
):
    """Joins this process to a multi-process job (DTensor's multi-client runtime).

    Call it first thing, before any TensorFlow op, mesh or model: DTensor can
    only bring its distributed runtime up in a TensorFlow that has not
    started. Each argument left as None is read from the environment
    (module docstring); `tfpar launch` sets the environment for you. After
    it, `tfpar.DeviceMesh` spans every process's devices (process 0's first,
    then process 1's, ...), so a `(P, K)` mesh over P processes of K devices
    puts the `batch` axis across processes and the `model` axis within one,
    which keeps the tensor-parallel all-reduces inside a host.

    With no job described (no argument, no variable) it only configures
    `devices_per_process` logical devices, if asked: single-process use needs
    no call at all. A second call with the same job is a no-op.

    Args:
        process_id: this process's index, `DTENSOR_CLIENT_ID`.
        num_processes: processes in the job, `DTENSOR_NUM_CLIENTS` (checked
            against `addresses`).
        addresses: `host:port` of every process in index order, a list or a
            comma-separated string, `DTENSOR_JOBS`.
        job_name: TensorFlow job name, `DTENSOR_JOB_NAME` (default "worker").
        devices_per_process: split this process's CPU (or first GPU) into this
            many logical devices first, `TFPAR_DEVICES_PER_PROCESS`.
        device_type: "CPU" or "GPU", `TFPAR_DEVICE_TYPE` (default: GPU if
            there is one, else CPU).

    Returns:
        A dict: `process_id`, `num_processes`, `addresses`, `local_devices`,
        `device_type`.

    Raises:
        ValueError: a missing or inconsistent setting; the message names the
            environment variable.
        RuntimeError: TensorFlow already started, or `initialize` was already
            called with another job.

    Example:
        >>> # DTENSOR_CLIENT_ID=0 DTENSOR_NUM_CLIENTS=2 \\
        >>> # DTENSOR_JOBS=host0:9470,host1:9470 python train.py
        >>> tfpar.initialize()
        >>> mesh = tfpar.DeviceMesh((2, 4))      # 2 hosts x 4 GPUs
    """
    global _initialized
    job, devices_per_process, device_type = _read_settings(
        process_id, num_processes, addresses, job_name, devices_per_process, device_type
    )
    import tensorflow as tf
    from tensorflow.experimental import dtensor
    from tensorflow.python.eager import context

    from tfpar.devices import configure_virtual_devices, list_devices

    if device_type is None:
        device_type = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    key = (job, devices_per_process, device_type)
    if _initialized is not None:
        if _initialized != key:
            raise RuntimeError(
                "tfpar.initialize() was already called with another job "
                f"({_describe(_initialized[0])}); a process joins one job, once."
            )
        return _info(job, device_type)
    if job is None:
        if devices_per_process is not None:
            configure_virtual_devices(devices_per_process, device_type)
        _initialized = key
        return {
            "process_id": 0,
            "num_processes": 1,
            "addresses": [],
            "local_devices": list_devices(device_type),
            "device_type": device_type,
        }
    if context.context()._initialized:  # noqa: SLF001 - DTensor checks the same flag
        raise RuntimeError(
            "tfpar.initialize() came after TensorFlow started (a tensor, op, device query or "
            "mesh was made first). Call it first thing in the program, right after the imports."
        )
    process_id, num_processes, addresses, job_name = job
    # DTensor reads its job description from these variables, so arguments
    # become the environment of this process.
    os.environ[ENV_CLIENT_ID] = str(process_id)
    os.environ[ENV_NUM_CLIENTS] = str(num_processes)
    os.environ[ENV_JOBS] = ",".join(addresses)
    os.environ[ENV_JOB_NAME] = job_name
    logical_cpus = None
    if devices_per_process is not None:
        if device_type == "CPU":
            logical_cpus = devices_per_process
        else:
            configure_virtual_devices(devices_per_process, device_type)
    dtensor.initialize_accelerator_system(device_type, num_logical_cpu_devices=logical_cpus)
    _initialized = key
    return _info(job, device_type)


def _describe(job):
    if job is None:
        return "a single process"
    return f"{ENV_CLIENT_ID}={job[0]}, {ENV_NUM_CLIENTS}={job[1]}, {ENV_JOBS}={','.join(job[2])}"


def _info(job, device_type):
    from tensorflow.experimental import dtensor

    return {
        "process_id": job[0] if job else 0,
        "num_processes": job[1] if job else 1,
        "addresses": list(job[2]) if job else [],
        "local_devices": [d.to_string() for d in dtensor.local_devices(device_type)],
        "device_type": device_type,
    }


def is_multi_process():
    """True once this process runs in a job of several processes."""
    return num_processes() > 1


def num_processes():
    """Processes in the job (1 without `initialize` or outside a job)."""
    if _initialized is None or _initialized[0] is None:
        return 1
    return _initialized[0][1]


def process_index():
    """This process's index in the job (0 without `initialize`)."""
    if _initialized is None or _initialized[0] is None:
        return 0
    return _initialized[0][0]


# --- many processes: `tfpar launch` ----------------------------------------------------


def add_parser(subparsers):
    """Registers `tfpar launch` on an argparse sub-parser collection."""
    p = subparsers.add_parser(
        "launch",
        help="start N processes of one multi-process job on this machine",
        description=(
            "Starts N copies of CMD as one DTensor multi-client job on this machine "
            "(loopback addresses), each with DTENSOR_CLIENT_ID, DTENSOR_NUM_CLIENTS, "
            "DTENSOR_JOBS, DTENSOR_JOB_NAME and TFPAR_DEVICES_PER_PROCESS set; CMD calls "
            "tfpar.initialize(). Output is prefixed '[rank k]'. If a process fails, the "
            "others are stopped and launch exits with its code."
        ),
    )
    p.add_argument("-n", "--nproc", type=int, required=True, help="number of processes")
    p.add_argument("--devices-per-process", type=int, default=None,
                   help="logical devices each process splits its CPU (or GPU) into")
    p.add_argument("--device-type", choices=("CPU", "GPU"), default=None,
                   help="device type for --devices-per-process (default: GPU if present, else CPU)")
    p.add_argument("--port", type=int, default=None,
                   help="first port; process k listens on PORT+k (default: free ports)")
    p.add_argument("--host", default="127.0.0.1",
                   help="loopback address the processes listen on (default 127.0.0.1)")
    p.add_argument("--grace", type=float, default=5.0,
                   help="seconds stopped processes get to exit before they are killed")
    p.add_argument("--timeout", type=float, default=None,
                   help="stop the whole job after this many seconds")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command each process runs, after --")
    p.set_defaults(run=run_launch)
    return p


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _free_ports(host, n):
    """n distinct ports free on `host` now (all held open together, then released)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _check_ports(host, ports):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port in ports:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError as e:
                raise ValueError(
                    f"Port {port} on {host} is in use ({e.strerror}); pick another --port "
                    "or leave it out to use free ports."
                ) from None


def job_environment(rank, nproc, addresses, devices_per_process=None, device_type=None):
    """The environment variables process `rank` of a job needs (strings)."""
    env = {
        ENV_CLIENT_ID: str(rank),
        ENV_NUM_CLIENTS: str(nproc),
        ENV_JOBS: ",".join(addresses),
        ENV_JOB_NAME: "worker",
        "PYTHONUNBUFFERED": "1",
    }
    if devices_per_process is not None:
        env[ENV_DEVICES] = str(devices_per_process)
    if device_type is not None:
        env[ENV_DEVICE_TYPE] = device_type
    return env


class _Job:
    """N child processes, their prefixed output, and stopping them together."""

    def __init__(self, cmd, nproc, addresses, devices_per_process, device_type, grace):
        self.grace = grace
        self.lock = threading.Lock()
        self.procs = []
        self.threads = []
        for rank in range(nproc):
            env = dict(os.environ)
            env.update(job_environment(rank, nproc, addresses, devices_per_process, device_type))
            try:
                proc = subprocess.Popen(
                    cmd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: stopping it stops its children
                )
            except OSError:
                self.stop(self.running())
                raise
            self.procs.append(proc)
            thread = threading.Thread(target=self._pump, args=(rank, proc.stdout), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _pump(self, rank, stream):
        prefix = f"[rank {rank}] ".encode()
        for line in iter(stream.readline, b""):
            if not line.endswith(b"\n"):
                line += b"\n"
            with self.lock:
                out = getattr(sys.stdout, "buffer", None)
                if out is not None:
                    sys.stdout.flush()
                    out.write(prefix + line)
                    out.flush()
                else:
                    sys.stdout.write((prefix + line).decode(errors="replace"))
                    sys.stdout.flush()
        stream.close()

    def say(self, message):
        with self.lock:
            sys.stdout.flush()
            print(f"tfpar launch: {message}", file=sys.stderr, flush=True)

    def running(self):
        return [k for k, p in enumerate(self.procs) if p.poll() is None]

    def stop(self, ranks):
        """SIGTERM to each process group; SIGKILL to those alive after `grace`."""
        for k in ranks:
            _signal_group(self.procs[k], signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and any(self.procs[k].poll() is None for k in ranks):
            time.sleep(0.05)
        for k in ranks:
            if self.procs[k].poll() is None:
                _signal_group(self.procs[k], signal.SIGKILL)
        for k in ranks:
            try:
                self.procs[k].wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def finish_output(self):
        for thread in self.threads:
            thread.join(timeout=2)


def _signal_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def _exit_text(code):
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _exit_code(code):
    return 128 - code if code < 0 else code


def launch(cmd, nproc, *, devices_per_process=None, device_type=None, port=None,
           host="127.0.0.1", grace=5.0, timeout=None, allow_remote_host=False):
    """Runs `cmd` as `nproc` processes of one job on this machine; returns the exit code.

    Process k gets `DTENSOR_CLIENT_ID=k` and the same `DTENSOR_JOBS` list of
    `host:port` (free loopback ports unless `port` is given). Output is
    prefixed `[rank k]`. When one process fails (non-zero exit or a signal),
    every other one is sent SIGTERM, then SIGKILL after `grace` seconds, and
    the failing process's code is returned (128+signal for a signal), so a
    dead peer never leaves the job hanging in a collective.

    Raises:
        ValueError: bad arguments, a busy port, a non-loopback host.
    """
    if not cmd:
        raise ValueError(
            "tfpar launch needs a command after --, e.g. `tfpar launch -n 2 -- python train.py`."
        )
    if nproc < 1:
        raise ValueError(f"tfpar launch needs at least one process. Received: -n {nproc}.")
    if devices_per_process is not None and devices_per_process < 1:
        raise ValueError(
            f"--devices-per-process must be at least 1. Received: {devices_per_process}."
        )
    if host not in _LOOPBACK and not allow_remote_host:
        raise ValueError(
            f"tfpar launch starts every process on this machine, so it listens on loopback "
            f"only. Received: --host {host!r}; use 127.0.0.1. For several hosts, set "
            f"{ENV_CLIENT_ID}, {ENV_NUM_CLIENTS} and {ENV_JOBS} on each host instead."
        )
    if port is None:
        ports = _free_ports(host, nproc)
    else:
        if not 0 < port <= 65535 - nproc + 1:
            raise ValueError(f"--port must leave room for {nproc} ports below 65536. Received: {port}.")
        ports = list(range(port, port + nproc))
        _check_ports(host, ports)
    shown = f"[{host}]" if ":" in host else host
    addresses = [f"{shown}:{p}" for p in ports]

    try:
        job = _Job(cmd, nproc, addresses, devices_per_process, device_type, grace)
    except OSError as e:
        print(f"tfpar launch: cannot start {cmd[0]!r}: {e.strerror}.", file=sys.stderr)
        return 127
    job.say(f"started {nproc} process(es) on {','.join(addresses)}: {' '.join(cmd)}")

    interrupted = []

    def on_signal(signum, frame):
        interrupted.append(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    start = time.monotonic()
    try:
        while True:
            failed = [(k, p.returncode) for k, p in enumerate(job.procs)
                      if p.poll() is not None and p.returncode != 0]
            alive = job.running()
            if failed:
                rank, code = failed[0]
                if alive:
                    job.say(
                        f"process {rank} (pid {job.procs[rank].pid}) {_exit_text(code)}; stopping "
                        f"the other {len(alive)} process(es) ({', '.join(map(str, alive))}) of the job."
                    )
                    job.stop(alive)
                job.finish_output()
                job.say(f"job failed: process {rank} {_exit_text(code)}.")
                return _exit_code(code) or 1
            if not alive:
                job.finish_output()
                return 0
            if interrupted:
                name = signal.Signals(interrupted[0]).name
                job.say(f"received {name}; stopping all {len(alive)} process(es).")
                job.stop(alive)
                job.finish_output()
                return 128 + interrupted[0]
            if timeout is not None and time.monotonic() - start > timeout:
                job.say(f"job ran past --timeout {timeout:g}s; stopping all {len(alive)} process(es).")
                job.stop(alive)
                job.finish_output()
                return 124
            time.sleep(0.05)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for k in job.running():
            _signal_group(job.procs[k], signal.SIGKILL)


def run_launch(args):
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    try:
        return launch(
            cmd,
            args.nproc,
            devices_per_process=args.devices_per_process,
            device_type=args.device_type,
            port=args.port,
            host=args.host,
            grace=args.grace,
            timeout=args.timeout,
        )
    except ValueError as e:
        print(f"tfpar launch: {e}", file=sys.stderr)
        return 2
