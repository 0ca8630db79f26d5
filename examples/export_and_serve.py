"""Export and serve: train, fold the batch norms, export, serve without keras_bn.

Trains a small CNN with keras_bn.BatchNorm on scikit-learn's 8x8 digits (no
download), folds every batch norm into the convolution before it with
`keras_bn.fold_batch_norms`, exports the folded model as a SavedModel in the
directory layout TF Serving expects (`<out>/digits/1/`, 1 being the version)
and converts it to TFLite (`<out>/digits.tflite`).

Then it starts a second Python process, this same file with `--serve`, that
imports TensorFlow and NumPy but not keras_bn: a SavedModel holds the graph and
the weights, none of the Python code that built them. That process loads both
files, classifies the test images through the `serving_default` signature, and
prints a table of accuracies and of the largest difference from the trained
model's logits.

    python examples/export_and_serve.py --epochs 5 --out serving_out
"""

import argparse
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

# Folding changes where float32 rounds, and TFLite's kernels sum in another
# order: a few ulps of logits of O(10).
TOLERANCE = 1e-4


def load_data(seed):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]  # (1797, 8, 8, 1)
    return train_test_split(x, digits.target, test_size=0.25, random_state=seed,
                            stratify=digits.target)


def build_model():
    import keras

    import keras_bn

    # The input's name becomes the signature's input name: {"image": ...}.
    return keras.Sequential([
        keras.Input((8, 8, 1), name="image"),
        keras.layers.Conv2D(16, 3, padding="same", use_bias=False),
        keras_bn.BatchNorm(),
        keras.layers.ReLU(),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, padding="same", use_bias=False),
        keras_bn.BatchNorm(),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])


def train_fold_export(args):
    import keras
    import tensorflow as tf

    import keras_bn

    keras.utils.set_random_seed(args.seed)
    x_train, x_test, y_train, y_test = load_data(args.seed)
    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, batch_size=64, epochs=args.epochs, verbose=2)
    logits = model.predict(x_test, verbose=0)

    folded = keras_bn.fold_batch_norms(model)
    fold_diff = np.abs(folded.predict(x_test, verbose=0) - logits).max()
    print(f"folded: {len(model.layers)} layers -> {len(folded.layers)}, "
          f"max |difference| {fold_diff:.2e}")

    saved_model = os.path.join(args.out, "digits", "1")
    folded.export(saved_model, verbose=False)
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    with open(os.path.join(args.out, "digits.tflite"), "wb") as f:
        f.write(converter.convert())
    np.savez(os.path.join(args.out, "test_set.npz"), x=x_test, y=y_test, logits=logits)
    print(f"exported {saved_model} and {os.path.join(args.out, 'digits.tflite')}")
    if fold_diff > TOLERANCE:
        raise SystemExit("the folded model disagrees with the trained one")


def serve(out):
    """Runs in a fresh process that never imports keras_bn."""
    import tensorflow as tf

    test = np.load(os.path.join(out, "test_set.npz"))
    x, y, expected = test["x"], test["y"], test["logits"]

    loaded = tf.saved_model.load(os.path.join(out, "digits", "1"))
    (saved_logits,) = loaded.signatures["serving_default"](image=tf.constant(x)).values()

    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # TensorFlow's own, deprecated in favour of LiteRT
        import warnings

        warnings.filterwarnings("ignore", r"\s*Warning: tf\.lite\.Interpreter is deprecated")
        Interpreter = tf.lite.Interpreter
    runner = Interpreter(model_path=os.path.join(out, "digits.tflite")).get_signature_runner(
        "serving_default")
    (lite_logits,) = runner(image=x).values()

    print(f"serving process: keras_bn imported: {'yes' if 'keras_bn' in sys.modules else 'no'}")
    print(f"{'served by':<12} {'accuracy':>8} {'max |logit - trained logit|':>28}")
    worst = 0.0
    for name, logits in [("trained", expected), ("SavedModel", saved_logits.numpy()),
                         ("TFLite", lite_logits)]:
        accuracy = np.mean(np.argmax(logits, axis=1) == y)
        diff = np.abs(logits - expected).max()
        worst = max(worst, diff)
        print(f"{name:<12} {accuracy:>8.3f} {diff:>28.2e}")
    if worst > TOLERANCE:
        raise SystemExit("a served model disagrees with the trained one")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="serving_out")
    parser.add_argument("--serve", action="store_true",
                        help="only serve what an earlier run exported to --out")
    args = parser.parse_args()
    if args.serve:
        serve(args.out)
        return
    os.makedirs(args.out, exist_ok=True)
    train_fold_export(args)
    # A fresh interpreter, as a server would be: nothing of this one carries over.
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--serve",
                             "--out", args.out])
    if result.returncode:
        raise SystemExit(result.returncode)


if __name__ == "__main__":
    main()
