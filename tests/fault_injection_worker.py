"""A training run with `keras.callbacks.BackupAndRestore`, for
tests/test_fault_injection.py to kill and restart.

    python -m tests.fault_injection_worker WORKDIR RUN [--stop-at EPOCH BATCH]

The model has two batch norms, one on the fused kernel and one on TF ops;
backups go to WORKDIR/backup at the end of every epoch. The run writes, in
WORKDIR:

* `epochs.txt`: a line "RUN EPOCH" for every epoch it begins;
* `begin-RUN.npz`: the batch norms' weights when training begins, after
  BackupAndRestore has restored its backup (if there was one);
* `backup-EPOCH.npz`: the weights as BackupAndRestore saved them at the
  end of EPOCH;
* with `--stop-at`, after that batch: `stopped.npz` (the weights then),
  then a file `stopped`; and it waits there to be killed.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_bn import BatchNorm  # noqa: E402

EPOCHS = 4
BATCH_SIZE = 8
EXAMPLES = 48  # 6 batches an epoch
# Bounds the wait for the kill, should the test never send it.
WAIT_FOR_KILL_S = 300


def batch_norm_weights(model):
    return {f"{layer.name}.{w.name}": w.numpy()
            for layer in model.layers if isinstance(layer, BatchNorm)
            for w in layer.weights}


def _save(path, arrays):
    """Writes an .npz file whole or not at all (the test may read it any time)."""
    partial = f"{path}.partial.npz"
    np.savez(partial, **arrays)
    os.replace(partial, path)


class Recorder(keras.callbacks.Callback):
    """Records what the test checks; must come after BackupAndRestore in the
    callback list, so that it sees the state BackupAndRestore restored or saved."""

    def __init__(self, workdir, run, stop_at):
        super().__init__()
        self.workdir, self.run, self.stop_at = workdir, run, stop_at
        self.epoch = None

    def _path(self, name):
        return os.path.join(self.workdir, name)

    def on_train_begin(self, logs=None):
        _save(self._path(f"begin-{self.run}.npz"), batch_norm_weights(self.model))

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        with open(self._path("epochs.txt"), "a") as f:
            f.write(f"{self.run} {epoch}\n")

    def on_epoch_end(self, epoch, logs=None):
        _save(self._path(f"backup-{epoch}.npz"), batch_norm_weights(self.model))

    def on_train_batch_end(self, batch, logs=None):
        if self.stop_at != (self.epoch, batch):
            return
        _save(self._path("stopped.npz"), batch_norm_weights(self.model))
        with open(self._path("stopped.partial"), "w") as f:
            f.write(f"{self.epoch} {batch}\n")
        os.replace(self._path("stopped.partial"), self._path("stopped"))
        time.sleep(WAIT_FOR_KILL_S)
        os._exit(3)  # never killed: end without finishing the run


def build_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(4, 3, use_bias=False),
        BatchNorm(name="bn_kernel", fused=True),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(5, use_bias=False),
        BatchNorm(name="bn_tf_ops", fused=False),
        keras.layers.ReLU(),
        keras.layers.Dense(3),
    ])
    model.compile(keras.optimizers.SGD(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def data():
    rng = np.random.RandomState(0)
    x = rng.normal(0.5, 2.0, (EXAMPLES, 6, 6, 2)).astype(np.float32)
    return x, rng.randint(0, 3, EXAMPLES)


def main(argv):
    workdir, run = argv[0], argv[1]
    stop_at = (int(argv[3]), int(argv[4])) if argv[2:3] == ["--stop-at"] else None
    model = build_model()
    x, y = data()
    callbacks = [
        keras.callbacks.BackupAndRestore(os.path.join(workdir, "backup")),
        Recorder(workdir, run, stop_at),
    ]
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=EPOCHS, shuffle=False,
              callbacks=callbacks, verbose=0)


if __name__ == "__main__":
    main(sys.argv[1:])
