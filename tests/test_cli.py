"""The command line: info and the demo (the main job)."""

import os
import subprocess
import sys

import pytest

from tfpar import cli
from tfpar.demo import load_digits, run_demo


def test_info_prints_versions_and_mesh(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "tensorflow" in out and "keras" in out
    assert "<DeviceMesh batch=1 model=8 on 8 CPU>" in out


def test_digits_ship_offline():
    x, y, xt, yt = load_digits()
    assert x.shape == (1437, 64) and xt.shape == (360, 64)
    assert set(y) == set(range(10))
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_demo_trains_equal_to_unsharded():
    lines = []
    assert run_demo(mesh="2x2", epochs=2, hidden=32, print_fn=lines.append) == 0
    text = "\n".join(lines)
    assert "ColumnParallel" in text and "RowParallel" in text
    assert "OK: sharded training equals unsharded." in text
    assert "test accuracy" in text


def test_python_dash_m_tfpar_in_a_fresh_process():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-m", "tfpar", "info", "--devices", "4"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "<DeviceMesh batch=1 model=4 on 4 CPU>" in result.stdout


def test_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["frobnicate"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_importing_tfpar_and_its_command_does_not_load_tensorflow():
    code = (
        "import sys, tfpar, tfpar.cli\n"
        "list(tfpar.cli._optional_commands())\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow loaded'\n"
        "assert sorted(tfpar.__all__) == tfpar.__all__ and 'TensorParallel' in dir(tfpar)\n"
        "tfpar.TensorParallel\n"
        "assert 'tensorflow' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
