"""Batch norm or not: the same CNN on real digits, at a learning rate too high without it.

Trains a small CNN on the 8x8 handwritten digits that ship with scikit-learn
(no download) twice, from the same seed and with the same deliberately high
learning rate (SGD, 0.3, momentum 0.9): once with a `keras_bn.BatchNorm`
after each convolution and hidden dense layer, once without. It prints a
table of both runs (last epoch's training loss, test accuracy, the first
epoch at which test accuracy reaches 90 %, training wall time) and plots
their per-epoch training loss and test accuracy side by side.

What you should see: with batch norm the test accuracy passes 90 % in the
first epoch or two and ends near 0.99. Without it, the first large steps
leave the ReLUs dead, their inputs below zero for every image; the network's
output no longer depends on its input, and it stays at chance: test accuracy
0.10 and a training loss near ln 10 = 2.30, from the first or second epoch on.
Batch norm rescales each layer's pre-activations to zero mean and unit
variance whatever the weights did, so no unit can be pushed dead that way. At
a learning rate of 0.05 (`--learning-rate 0.05`) both runs train.

Then it exports the batch-norm model as a SavedModel in TF Serving's layout
(`OUT/models/batch_norm/1/`), and the same model with its batch norms folded
into the layers before them (`OUT/models/folded/1/`). A second Python process,
this file with `--serve`, in which importing keras_bn raises ImportError,
loads both, prints their predictions for a few test images next to the true
labels and saves its logits; this process checks that they are what
`model.predict` gives.

    python examples/digits.py                  # 15 epochs, about a minute on 2 CPU cores
    python examples/digits.py --epochs 1 --out /tmp/digits   # the quick mode the tests run
    python examples/digits.py --plot examples/digits_curves.png   # the README's plot
"""

import argparse
import importlib.abc
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

LEARNING_RATE = 0.3
BATCH_SIZE = 32
SHOWN = 10  # test images whose served predictions are printed
# Folding changes where float32 rounds: a few ulps of logits of O(10).
TOLERANCE = 1e-4


def load_data(seed):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]  # (1797, 8, 8, 1)
    return train_test_split(x, digits.target, test_size=0.25, random_state=seed,
                            stratify=digits.target)


def build_model(batch_norm):
    import keras

    import keras_bn

    def block(layer):
        if batch_norm:
            return [layer, keras_bn.BatchNorm(), keras.layers.ReLU()]
        return [layer, keras.layers.ReLU()]

    # With batch norm the layers drop their bias: BatchNorm's beta takes its
    # place. The input's name becomes the serving signature's: {"image": ...}.
    return keras.Sequential([
        keras.Input((8, 8, 1), name="image"),
        *block(keras.layers.Conv2D(32, 3, padding="same", use_bias=not batch_norm)),
        keras.layers.MaxPooling2D(),
        *block(keras.layers.Conv2D(64, 3, padding="same", use_bias=not batch_norm)),
        keras.layers.Flatten(),
        *block(keras.layers.Dense(64, use_bias=not batch_norm)),
        keras.layers.Dense(10),
    ], name="batch_norm" if batch_norm else "no_batch_norm")


def train(batch_norm, data, args):
    import keras

    x_train, x_test, y_train, y_test = data
    keras.utils.set_random_seed(args.seed)  # same initial weights, same batches
    model = build_model(batch_norm)
    model.compile(
        optimizer=keras.optimizers.SGD(args.learning_rate, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    print(f"\n{model.name}: {model.count_params()} parameters", flush=True)
    start = time.perf_counter()
    # The progress bar redraws in a terminal; in a log, one line per epoch.
    history = model.fit(x_train, y_train, batch_size=BATCH_SIZE, epochs=args.epochs,
                        validation_data=(x_test, y_test),
                        verbose=1 if sys.stdout.isatty() else 2)
    return model, history.history, time.perf_counter() - start


def print_table(runs):
    print(f"\n{'run':<14}  {'final training loss':>19}  {'test accuracy':>13}  "
          f"{'epochs to 90 %':>14}  {'wall time':>9}")
    for name, (_, history, seconds) in runs.items():
        reached = [epoch for epoch, accuracy in enumerate(history["val_accuracy"], 1)
                   if accuracy >= 0.9]
        print(f"{name:<14}  {history['loss'][-1]:>19.4f}  {history['val_accuracy'][-1]:>13.3f}  "
              f"{reached[0] if reached else 'never':>14}  {seconds:>7.1f} s")


def plot(runs, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, accuracy_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, (_, history, _) in runs.items():
        epochs = np.arange(1, len(history["loss"]) + 1)
        loss_ax.plot(epochs, history["loss"], marker=".", label=name)
        accuracy_ax.plot(epochs, history["val_accuracy"], marker=".", label=name)
    # Log scale: the batch-norm run's loss falls by four orders of magnitude.
    loss_ax.set(yscale="log", xlabel="epoch", ylabel="training loss", title="Training loss")
    accuracy_ax.axhline(0.9, color="gray", linestyle=":", linewidth=1)
    accuracy_ax.set(ylim=(0, 1.02), xlabel="epoch", ylabel="test accuracy", title="Test accuracy")
    for ax in (loss_ax, accuracy_ax):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"8x8 digits, SGD learning rate {args.learning_rate}, momentum 0.9, "
                 f"seed {args.seed}")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=80)
    plt.close(fig)
    print(f"\nwrote {args.plot}")


def export(model, out):
    import keras_bn

    paths = {"batch_norm": os.path.join(out, "models", "batch_norm", "1")}
    model.export(paths["batch_norm"], verbose=False)
    if hasattr(keras_bn, "fold_batch_norms"):
        paths["folded"] = os.path.join(out, "models", "folded", "1")
        keras_bn.fold_batch_norms(model).export(paths["folded"], verbose=False)
    for path in paths.values():
        print(f"exported {path}")
    return paths


class _BlockKerasBn(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "keras_bn":
            raise ImportError(f"the serving process may not import {name}")
        return None


def serve(out):
    """Runs in a fresh process in which keras_bn cannot be imported."""
    sys.meta_path.insert(0, _BlockKerasBn())
    import tensorflow as tf

    test = np.load(os.path.join(out, "test_set.npz"))
    models_dir = os.path.join(out, "models")
    logits = {}
    for name in sorted(os.listdir(models_dir)):
        loaded = tf.saved_model.load(os.path.join(models_dir, name, "1"))
        (output,) = loaded.signatures["serving_default"](image=tf.constant(test["x"])).values()
        logits[name] = output.numpy()
    np.savez(os.path.join(out, "served_logits.npz"), **logits)

    print(f"serving process, importing keras_bn blocked: keras_bn imported: "
          f"{'yes' if 'keras_bn' in sys.modules else 'no'}")
    print(f"{'image':>5} {'true label':>10}" + "".join(f" {name:>10}" for name in logits))
    for i in range(min(SHOWN, len(test["y"]))):
        print(f"{i:>5} {test['y'][i]:>10}"
              + "".join(f" {np.argmax(served[i]):>10}" for served in logits.values()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning-rate", type=float, default=LEARNING_RATE)
    parser.add_argument("--out", default="digits_out", help="where everything is written")
    parser.add_argument("--plot", help="the plot's path (default: OUT/digits_curves.png)")
    parser.add_argument("--serve", metavar="OUT",
                        help="only serve the SavedModels an earlier run exported to OUT")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    os.makedirs(args.out, exist_ok=True)
    args.plot = args.plot or os.path.join(args.out, "digits_curves.png")

    data = load_data(args.seed)
    x_test, y_test = data[1], data[3]
    runs = {"batch norm": train(True, data, args), "no batch norm": train(False, data, args)}
    print_table(runs)
    plot(runs, args)

    model = runs["batch norm"][0]
    paths = export(model, args.out)
    expected = model.predict(x_test, verbose=0)
    np.savez(os.path.join(args.out, "test_set.npz"), x=x_test, y=y_test)
    print(flush=True)  # the child writes to the same stdout
    # A fresh interpreter, as a server would be: nothing of this one carries over.
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--serve", args.out])
    if result.returncode:
        raise SystemExit(result.returncode)

    served = np.load(os.path.join(args.out, "served_logits.npz"))
    diffs = {name: np.abs(served[name] - expected).max() for name in paths}
    print(f"\nserved logits vs model.predict on {len(x_test)} test images, max |difference|: "
          + ", ".join(f"{name} {diff:.2e}" for name, diff in diffs.items()))
    if max(diffs.values()) > TOLERANCE:
        raise SystemExit("a served model disagrees with model.predict")
    print("served predictions agree with model.predict")


if __name__ == "__main__":
    main()
