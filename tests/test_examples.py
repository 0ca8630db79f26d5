"""The examples run as a user would run them, in a quick mode."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name, *args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", name), *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )


@pytest.mark.slow
def test_quickstart_trains_saves_exports_and_reloads(tmp_path):
    result = run_example("quickstart.py", "--epochs", "3", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test accuracy:" in result.stdout
    # Three epochs (a second of training) lift the digits far above chance
    # (0.1); after one, the moving statistics still lag the weights.
    accuracy = float(result.stdout.split("test accuracy:")[1].split()[0])
    assert accuracy > 0.8
    assert (tmp_path / "digits.keras").is_file()
    assert (tmp_path / "saved_model" / "saved_model.pb").is_file()
    assert "max |difference| 0.00e+00" in result.stdout
