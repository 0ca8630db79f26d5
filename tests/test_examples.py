"""The examples run as a user would run them, in a quick mode."""

import os
import re
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


@pytest.mark.slow
def test_recalibrate_lifts_stale_statistics(tmp_path):
    result = run_example("recalibrate.py", "--epochs", "2", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    print(result.stdout)

    def accuracy(row):
        line = next(line for line in result.stdout.splitlines() if line.startswith(row))
        return float(line.split()[-1])

    # 44 steps at momentum 0.99 leave the moving statistics ~64 % at their
    # initial values (chance-level predictions, 0.10 measured); the
    # recalibrated model scores 0.94 (seed 0; 0.91-0.95 over seeds 0-2).
    before, after = accuracy("moving averages"), accuracy("recalibrated (")
    assert after > 0.8 and after > before + 0.3
    assert (tmp_path / "recalibrated.keras").is_file()


@pytest.mark.slow
def test_export_and_serve_serves_from_a_process_without_keras_bn(tmp_path):
    result = run_example("export_and_serve.py", "--epochs", "2", "--out", str(tmp_path))
    # The example exits non-zero if folding or serving moves a logit by more
    # than its tolerance.
    assert result.returncode == 0, result.stdout + result.stderr
    assert "serving process: keras_bn imported: no" in result.stdout
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()
            if line.startswith(("trained ", "SavedModel ", "TFLite "))}
    assert rows["SavedModel"][0] == rows["TFLite"][0] == rows["trained"][0]  # accuracy
    assert (tmp_path / "digits" / "1" / "saved_model.pb").is_file()  # TF Serving's layout
    assert (tmp_path / "digits.tflite").is_file()


@pytest.mark.slow
def test_digits_compares_runs_plots_exports_and_serves(tmp_path):
    result = run_example("digits.py", "--epochs", "1", "--out", str(tmp_path))
    # The example exits non-zero if a served model's logits differ from
    # model.predict's by more than its tolerance.
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()

    # The table: a header, then one row per run, columns two or more spaces
    # apart (a run's name has single spaces in it).
    header = lines.index(next(line for line in lines if line.startswith("run ")))
    table = "\n".join(lines[header:header + 3])
    print(table)
    assert re.split(r"\s{2,}", lines[header].strip()) == [
        "run", "final training loss", "test accuracy", "epochs to 90 %", "wall time"], table
    rows = {}
    for line in lines[header + 1:header + 3]:
        name, loss, accuracy, epochs_to_90, seconds = re.split(r"\s{2,}", line.strip())
        assert float(loss) > 0 and float(seconds.removesuffix(" s")) > 0, table
        rows[name] = float(accuracy), epochs_to_90
    # The headline, at the example's learning rate of 0.3: with batch norm the
    # test accuracy passes 90 % in the first epoch; without it (ReLUs pushed
    # dead: the example's docstring) it never does. Measured after one epoch, seed 0, oneDNN on and
    # off: 0.920-0.922 with, 0.447 without (seeds 1-3: 0.904-0.964 with,
    # 0.10-0.58 without).
    assert rows["batch norm"][1] == "1" and rows["batch norm"][0] >= 0.9, table
    assert rows["no batch norm"][1] == "never" and rows["no batch norm"][0] < 0.9, table

    with open(tmp_path / "digits_curves.png", "rb") as f:
        png = f.read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # The IHDR chunk comes first: width and height, 4 big-endian bytes each.
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (800, 304) and 10_000 < len(png) < 200_000

    for name in ("batch_norm", "folded"):
        assert (tmp_path / "models" / name / "1" / "saved_model.pb").is_file()
    assert "keras_bn imported: no" in result.stdout
    header = lines.index(next(line for line in lines if line.startswith("image true label")))
    served = [line.split() for line in lines[header + 1:header + 11]]
    assert len(served) == 10 and all(len(row) == 4 for row in served)
    assert all(row[2] == row[3] for row in served)  # batch_norm and folded predict alike
    assert "served predictions agree with model.predict" in result.stdout
