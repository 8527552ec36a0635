"""Several processes, one mesh: `tfpar.initialize`, `tfpar launch`, per-process data.

The multi-process runs are real: `python -m tfpar launch` starts two Python
processes on loopback, each with two logical CPUs, which form one 2x2 DTensor
mesh (batch axis across the processes, model axis within each). Every
subprocess is bounded by a timeout.
"""

import importlib.util
import os
import pathlib
import queue
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import tfpar
from tfpar import launch as launch_lib
from tfpar import testing
from tests.conftest import make_mesh

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "multi_process.py"
STEPS = 5
DTENSOR_VARIABLES = ("DTENSOR_CLIENT_ID", "DTENSOR_NUM_CLIENTS", "DTENSOR_JOBS", "DTENSOR_JOB_NAME")


def _example():
    spec = importlib.util.spec_from_file_location("multi_process_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env():
    env = dict(os.environ)
    for name in DTENSOR_VARIABLES + ("TFPAR_DEVICES_PER_PROCESS",):
        env.pop(name, None)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _launch(args, timeout):
    """Runs `python -m tfpar launch ARGS`; returns (exit code, output)."""
    result = subprocess.run(
        [sys.executable, "-m", "tfpar", "launch", *args],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    return result.returncode, result.stdout


# --- the job: same weights as one process -----------------------------------------------


def test_two_processes_train_like_one(tmp_path):
    """fit (whole data in each process) and a custom step (each process its rows)."""
    out = tmp_path / "weights.npz"
    code, output = _launch(
        ["-n", "2", "--devices-per-process", "2", "--device-type", "CPU", "--", sys.executable, str(EXAMPLE),
         "--steps", str(STEPS), "--out", str(out)],
        timeout=240,
    )
    assert code == 0, output
    for rank in (0, 1):
        assert f"[rank {rank}] mesh <DeviceMesh batch=2 model=2 on 4 CPU over 2 processes>" in output
        assert f"[rank {rank}] custom step {STEPS - 1}:" in output
    got = np.load(out)

    example = _example()
    x, y = example.make_data(STEPS)
    tp = tfpar.TensorParallel(make_mesh("2x2"))
    fit_model, _ = example.train_fit(tp, x, y)
    custom_model, _ = example.train_custom(tp, x, y)
    for prefix, model in (("fit", fit_model), ("custom", custom_model)):
        want = [testing.to_numpy(w) for w in model.weights]
        assert sorted(k for k in got.files if k.startswith(prefix + "_")) == sorted(
            f"{prefix}_{i}" for i in range(len(want))
        )
        for i, w in enumerate(want):
            np.testing.assert_allclose(got[f"{prefix}_{i}"], w, atol=1e-5, err_msg=f"{prefix} weight {i}")
    # Training moved the weights: the comparison is not between two initial states.
    untrained = example.build_model()
    assert max(np.abs(a - b).max() for a, b in zip(untrained.get_weights(), want)) > 1e-3


def test_killed_process_ends_the_job(tmp_path):
    """SIGKILL one process mid-training: launch stops the other and fails, fast."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tfpar", "launch", "-n", "2", "--devices-per-process", "2", "--device-type", "CPU", "--",
         sys.executable, str(EXAMPLE), "--steps", "100000", "--loop", "custom"],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout], daemon=True).start()
    output, victim, killed_at = [], None, None
    deadline = time.monotonic() + 180
    try:
        while killed_at is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                assert proc.poll() is None, "".join(output)
                continue
            output.append(line)
            m = re.match(r"\[rank 1\] process 1 of 2 \(pid (\d+)\)", line)
            if m:
                victim = int(m.group(1))
            if victim and line.startswith("[rank 1] custom step 3:"):
                os.kill(victim, signal.SIGKILL)
                killed_at = time.monotonic()
        assert killed_at is not None, "training never reached step 3:\n" + "".join(output)
        code = proc.wait(timeout=60)
        elapsed = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    while not lines.empty():
        output.append(lines.get())
    text = "".join(output)
    assert code == 128 + signal.SIGKILL, text
    assert elapsed < 60, text
    assert "tfpar launch: process 1 (pid" in text and "was killed by SIGKILL; stopping the other 1" in text, text
    assert "tfpar launch: job failed: process 1 was killed by SIGKILL." in text, text


# --- clear errors ---------------------------------------------------------------------------


MESH_ERRORS = textwrap.dedent(
    """
    import tfpar
    try:
        tfpar.DeviceMesh((2, 2))
    except RuntimeError as e:
        print("BEFORE INITIALIZE:", e)
    tfpar.initialize()
    try:
        tfpar.DeviceMesh((4, 2))
    except ValueError as e:
        print("TOO BIG:", e)
    print("MESH:", tfpar.DeviceMesh((1, 4)), tfpar.DeviceMesh((1, 4)).devices)
    """
)


def test_mesh_errors_across_processes():
    code, output = _launch(
        ["-n", "2", "--devices-per-process", "2", "--device-type", "CPU", "--", sys.executable, "-c", MESH_ERRORS], timeout=180
    )
    assert code == 0, output
    for rank in (0, 1):
        assert (
            f"[rank {rank}] BEFORE INITIALIZE: DTENSOR_JOBS describes a job of 2 process(es), but "
            "this process has not joined it: call tfpar.initialize()"
        ) in output, output
        assert (
            f"[rank {rank}] TOO BIG: DeviceMesh shape does not match the number of devices of all "
            "processes. Received: shape=(4, 2) (product 8); 2 processes x 2 CPU devices each = 4 devices."
        ) in output, output
        assert f"[rank {rank}] MESH: <DeviceMesh batch=1 model=4 on 4 CPU over 2 processes>" in output
    assert "/job:worker/replica:0/task:1/device:CPU:1" in output


@pytest.mark.parametrize(
    "env, message",
    [
        ({"DTENSOR_CLIENT_ID": "0", "DTENSOR_NUM_CLIENTS": "2"}, r"DTENSOR_JOBS is not set"),
        ({"DTENSOR_JOBS": "localhost:1,localhost:2"}, r"DTENSOR_CLIENT_ID is not set"),
        (
            {"DTENSOR_CLIENT_ID": "0", "DTENSOR_NUM_CLIENTS": "3", "DTENSOR_JOBS": "localhost:1,localhost:2"},
            r"DTENSOR_NUM_CLIENTS=3 but DTENSOR_JOBS lists 2 address",
        ),
        (
            {"DTENSOR_CLIENT_ID": "2", "DTENSOR_JOBS": "localhost:1,localhost:2"},
            r"DTENSOR_CLIENT_ID=2 is out of range for DTENSOR_NUM_CLIENTS=2",
        ),
        ({"DTENSOR_CLIENT_ID": "one", "DTENSOR_JOBS": "localhost:1,localhost:2"},
         r"DTENSOR_CLIENT_ID must be an integer"),
        ({"DTENSOR_CLIENT_ID": "0", "DTENSOR_JOBS": "localhost,localhost:2"}, r"DTENSOR_JOBS entries must be host:port"),
        ({"DTENSOR_CLIENT_ID": "0", "DTENSOR_JOBS": "localhost:1,localhost:1"}, r"DTENSOR_JOBS lists an address twice"),
        ({"DTENSOR_CLIENT_ID": "0", "DTENSOR_JOBS": "localhost:1,localhost:2", "TFPAR_DEVICES_PER_PROCESS": "0"},
         r"TFPAR_DEVICES_PER_PROCESS must be at least 1"),
    ],
)
def test_initialize_names_the_bad_variable(monkeypatch, env, message):
    for name in DTENSOR_VARIABLES + ("TFPAR_DEVICES_PER_PROCESS",):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        tfpar.initialize()
    assert tfpar.num_processes() == 1


def test_initialize_after_tensorflow_started(monkeypatch):
    monkeypatch.setenv("DTENSOR_CLIENT_ID", "0")
    monkeypatch.setenv("DTENSOR_JOBS", "localhost:1,localhost:2")
    with pytest.raises(RuntimeError, match=r"tfpar.initialize\(\) came after TensorFlow started"):
        tfpar.initialize()


# --- the launcher itself (no TensorFlow in the children) ---------------------------------


def test_launch_sets_the_environment_and_prefixes_output():
    script = (
        "import os; print(os.environ['DTENSOR_CLIENT_ID'], os.environ['DTENSOR_NUM_CLIENTS'], "
        "os.environ['DTENSOR_JOBS'], os.environ['DTENSOR_JOB_NAME'], os.environ['TFPAR_DEVICES_PER_PROCESS'])"
    )
    code, output = _launch(["-n", "3", "--devices-per-process", "2", "--", sys.executable, "-c", script], timeout=60)
    assert code == 0, output
    found = dict(re.findall(r"^\[rank (\d)\] (.*)$", output, re.M))
    assert sorted(found) == ["0", "1", "2"], output
    jobs = {line.split()[2] for line in found.values()}
    assert len(jobs) == 1, output
    addresses = jobs.pop().split(",")
    assert len(addresses) == 3 and len(set(addresses)) == 3
    assert all(a.startswith("127.0.0.1:") for a in addresses)
    for rank, line in found.items():
        assert line.split()[:2] == [rank, "3"] and line.split()[3:] == ["worker", "2"]


def test_launch_stops_the_job_when_a_process_fails():
    script = "import os, sys, time; rank = int(os.environ['DTENSOR_CLIENT_ID']); time.sleep(300 if rank == 0 else 0.2); sys.exit(3)"
    start = time.monotonic()
    code, output = _launch(["-n", "2", "--grace", "2", "--", sys.executable, "-c", script], timeout=60)
    assert code == 3, output
    assert time.monotonic() - start < 30
    assert "tfpar launch: process 1 (pid" in output and "exited with code 3; stopping the other 1 process(es) (0)" in output


def test_launch_refuses_bad_arguments(capsys):
    from tfpar.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        assert main(["launch", "-n", "1", "--port", str(port), "--", "true"]) == 2
    assert f"Port {port} on 127.0.0.1 is in use" in capsys.readouterr().err
    assert main(["launch", "-n", "2", "--host", "0.0.0.0", "--", "true"]) == 2
    assert "loopback only" in capsys.readouterr().err
    assert main(["launch", "-n", "2"]) == 2
    assert "needs a command after --" in capsys.readouterr().err
    assert main(["launch", "-n", "0", "--", "true"]) == 2
    assert "at least one process. Received: -n 0" in capsys.readouterr().err
    assert main(["launch", "-n", "2", "--", "/nonexistent/command"]) == 127
    assert "cannot start '/nonexistent/command'" in capsys.readouterr().err
    assert launch_lib.launch([sys.executable, "-c", "pass"], 2) == 0
