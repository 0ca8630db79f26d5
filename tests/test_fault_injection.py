"""Fault injection: a training run with `keras.callbacks.BackupAndRestore`
is killed with SIGKILL in the middle of an epoch, then started again. It
resumes at the epoch of the last backup, with the moving statistics (and
the rest of the batch norms' weights) exactly as they were when that backup
was written: what the last backup holds is not lost, and nothing of the
killed epoch leaks in.

The run itself is tests/fault_injection_worker.py, in a subprocess.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests import fault_injection_worker as worker

ROOT = Path(__file__).resolve().parent.parent
KILL_EPOCH, KILL_BATCH = 2, 2  # mid-epoch: 3 of its 6 batches done
# Generous bounds for a 2-core machine (a run takes about 10 s there).
START_TIMEOUT_S = 240
RUN_TIMEOUT_S = 240

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)"),
]


def _start(workdir, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    log = open(workdir / f"log-{args[0]}.txt", "w")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.fault_injection_worker", str(workdir), *args],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()  # the child holds its own descriptor


def _stop(process):
    """Kills `process` if it still runs; always reaps it."""
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


def _log(workdir, run):
    return (workdir / f"log-{run}.txt").read_text()[-3000:]


def _wait_for(path, process, workdir):
    deadline = time.monotonic() + START_TIMEOUT_S
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the worker ended ({process.returncode}) before {path.name}:\n"
                        + _log(workdir, "first"))
        if time.monotonic() > deadline:
            pytest.fail(f"no {path.name} after {START_TIMEOUT_S} s:\n" + _log(workdir, "first"))
        time.sleep(0.05)


def _epochs(workdir, run):
    lines = (workdir / "epochs.txt").read_text().split("\n")
    return [int(line.split()[1]) for line in lines if line.startswith(f"{run} ")]


def _assert_same(a, b):
    """Bit-identical weights; `a` and `b` are .npz files or dicts."""
    a, b = dict(a), dict(b)
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_killed_run_resumes_from_the_last_backup_with_its_moving_statistics(tmp_path):
    first = _start(tmp_path, "first", "--stop-at", str(KILL_EPOCH), str(KILL_BATCH))
    try:
        _wait_for(tmp_path / "stopped", first, tmp_path)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        _stop(first)
    assert first.returncode == -signal.SIGKILL
    assert _epochs(tmp_path, "first") == list(range(KILL_EPOCH + 1))

    # The last backup is from the end of the epoch before; the killed
    # epoch's batches have moved the statistics since.
    metadata = json.loads((tmp_path / "backup" / "training_metadata.json").read_text())
    assert metadata["epoch"] == KILL_EPOCH
    backup = np.load(tmp_path / f"backup-{KILL_EPOCH - 1}.npz")
    stopped = np.load(tmp_path / "stopped.npz")
    for key in backup.files:
        if ".moving_" in key:
            assert not np.array_equal(stopped[key], backup[key]), key
    # The backup on disk holds what the model held when it was written.
    saved = worker.build_model()
    saved.optimizer.build(saved.trainable_variables)
    saved.load_weights(tmp_path / "backup" / "latest.weights.h5")
    _assert_same(worker.batch_norm_weights(saved), backup)

    second = _start(tmp_path, "second")
    try:
        second.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the resumed run took over {RUN_TIMEOUT_S} s:\n" + _log(tmp_path, "second"))
    finally:
        _stop(second)
    assert second.returncode == 0, _log(tmp_path, "second")
    assert _epochs(tmp_path, "second") == list(range(KILL_EPOCH, worker.EPOCHS))
    # Restored bit for bit: gamma, beta and both moving statistics of each
    # batch norm, kernel path and TF-ops path.
    _assert_same(np.load(tmp_path / "begin-second.npz"), backup)
    # A finished run deletes its backup (Keras's delete_checkpoint=True).
    assert not (tmp_path / "backup").exists()
