"""The benchmark script runs (a smoke test: timings are never asserted)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.reference import run_benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_layer_benchmark_quick_mode_writes_a_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    stdout = run_benchmark("bench_layers.py", "--quick", "--json", str(out))
    assert "ratio" in stdout and "bn/copy" in stdout
    data = json.loads(out.read_text())
    assert data["environment"]["tensorflow"]
    # 3 quick shapes x 2 dtypes x 2 jit settings x 3 modes.
    assert len(data["results"]) == 36
    for row in data["results"]:
        assert row["ms"]["keras_bn"] > 0 and row["ms"]["keras"] > 0
        assert row["ratio_to_keras"] == pytest.approx(row["ms"]["keras_bn"] / row["ms"]["keras"])


def test_kernel_accuracy_quick_mode_measures_every_kernel_on_every_kind_of_data(tmp_path):
    out = tmp_path / "accuracy.json"
    stdout = run_benchmark("kernel_accuracy.py", "--quick", "--json", str(out))
    assert "one call" in stdout
    data = json.loads(out.read_text())
    assert data["environment"]["tensorflow"] and data["sum_limit"] > 0
    # 3 kinds of data x 2 sizes, each with all three variances measured.
    assert {(r["data"], r["per_channel"]) for r in data["rows"]} == {
        (d, n) for d in ("normal", "offset_1e6", "binary") for n in (2**12, 2**14)}
    for row in data["rows"]:
        # The layer's figures are within the bound its tests hold it to.
        assert 0 <= row["fused"] < 1e-4 and 0 <= row["tf_ops"] < 1e-4 and row["one_call"] >= 0


@pytest.mark.slow
def test_fold_benchmark_quick_mode_writes_a_table_and_json(tmp_path):
    out = tmp_path / "fold.json"
    stdout = run_benchmark("fold_benchmark.py", "--quick", "--batches", "2", "--json", str(out))
    assert "| batch | unfolded ms | folded ms | speed-up |" in stdout
    data = json.loads(out.read_text())
    assert data["environment"]["tensorflow"] and data["environment"]["cpu"]
    assert data["max_output_difference"] < 1e-3
    (row,) = data["results"]
    assert row["batch"] == 2 and row["unfolded_ms"] > 0 and row["folded_ms"] > 0
    assert row["speedup"] == pytest.approx(row["unfolded_ms"] / row["folded_ms"])


@pytest.mark.slow
def test_model_benchmark_quick_mode_writes_a_table_and_json(tmp_path):
    out = tmp_path / "models.json"
    stdout = run_benchmark("bench_models.py", "--quick", "--json", str(out), timeout=600)
    assert "| model | policy | BNs | train ms Keras |" in stdout
    data = json.loads(out.read_text())
    environment = data["environment"]
    for key in ("cpu", "cpu_count", "python", "tensorflow", "keras"):
        assert environment[key]
    assert data["settings"]["batch"] == 4 and data["settings"]["repeats"] == 1
    (row,) = data["results"]
    assert (row["model"], row["policy"], row["batch_norms"]) == (
        "MobileNetV2_0.35", "float32", 52)
    # The converted model computes what Keras's does.
    assert row["max_output_difference"] < 1e-4
    for name in ("train_step_ms", "predict_ms", "first_step_s", "peak_rss_mib"):
        assert row[name]["keras"] > 0 and row[name]["keras_bn"] > 0
        ratio = name.rsplit("_", 1)[0] + "_ratio"
        assert row[ratio] == pytest.approx(row[name]["keras_bn"] / row[name]["keras"])


GPU_CHECK = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def test_gpu_check_runs_only_test_files_that_exist():
    # The script runs only where a GPU is lent, so a renamed test file would
    # go unnoticed until then (it once listed a tests/test_fused.py).
    with open(GPU_CHECK) as f:
        listed = set(re.findall(r"\btests/[\w/]+\.py\b", f.read()))
    assert "tests/test_gpu.py" in listed  # the pattern still finds them
    assert sorted(p for p in listed if not os.path.isfile(os.path.join(ROOT, p))) == []


def test_gpu_check_stops_before_any_step_when_a_test_file_is_missing(tmp_path):
    # A copy of the script in a tree without tests/: it must name the missing
    # files and exit before creating OUT or running anything.
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(GPU_CHECK, tmp_path / "benchmarks" / "gpu_check.sh")
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(tmp_path / "benchmarks" / "gpu_check.sh"), str(out)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"gpu_check.sh: test files not found in {tmp_path}: tests/test_gpu.py tests/test_ops.py ")
    assert not out.exists()


@pytest.mark.parametrize("setting, onednn", [("0", False), ("1", True)])
def test_environment_records_onednn_cpu_flags_versions_and_commit(setting, onednn):
    # Figures depend on the CPU kind: each set says which one it came from.
    import subprocess
    import sys

    code = ("import json, sys; sys.path.insert(0, 'benchmarks'); import bench_layers; "
            "print(json.dumps(bench_layers.environment()))")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
        env=dict(os.environ, TF_ENABLE_ONEDNN_OPTS=setting, TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0, done.stderr
    env = json.loads(done.stdout.splitlines()[-1])
    assert env["onednn"] is onednn and env["TF_ENABLE_ONEDNN_OPTS"] == setting
    assert isinstance(env["cpu_flags"], list) and env["cpu"]
    assert env["git"] and env["tensorflow"] and env["keras"] and env["keras_bn"]


_IN_A_CHECKOUT = shutil.which("git") is not None and os.path.isdir(os.path.join(ROOT, ".git"))


@pytest.mark.skipif(not _IN_A_CHECKOUT, reason="compares git revisions: needs git and a checkout")
def test_in_process_revision_comparison_times_both_copies(tmp_path):
    # HEAD against the working tree: both revisions' layers are imported as
    # copies and timed in one loop, each row naming both times.
    out = tmp_path / "cmp.json"
    stdout = run_benchmark("compare_revisions.py", "--before", "HEAD", "--in-process",
                        "--cases", "dense 64x16", "--modes", "train_step", "--jit", "off",
                        "--dtypes", "float32", "--repeats", "3", "--json", str(out))
    assert "after/before" in stdout
    data = json.loads(out.read_text())
    assert data["in_process"] is True and data["before"] == "HEAD"
    (row,) = data["rows"]
    assert row["case"] == "dense 64x16" and row["mode"] == "train_step"
    assert row["before_ms"] > 0 and row["after_ms"] > 0
    assert row["after_over_before"] == pytest.approx(row["after_ms"] / row["before_ms"])
