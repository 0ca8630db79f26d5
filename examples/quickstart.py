"""Quick start: a small CNN with keras_bn.BatchNorm on scikit-learn's digits.

Trains a two-block convolutional network on the 8x8 handwritten digits that
ship with scikit-learn (no download), prints the test accuracy, saves the
model as a `.keras` file and exports it as a TensorFlow SavedModel, then
reloads both and checks that they predict what the trained model predicts.

    python examples/quickstart.py --epochs 5 --out quickstart_out
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import keras_bn  # noqa: E402


def load_data(seed):
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]  # (1797, 8, 8, 1)
    return train_test_split(x, digits.target, test_size=0.25, random_state=seed,
                            stratify=digits.target)


def build_model():
    # Convolutions drop their bias: BatchNorm's beta takes its place.
    return keras.Sequential([
        keras.Input((8, 8, 1)),
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="quickstart_out")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    keras.utils.set_random_seed(args.seed)

    x_train, x_test, y_train, y_test = load_data(args.seed)
    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, batch_size=64, epochs=args.epochs, verbose=2)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"test accuracy: {accuracy:.3f} on {len(x_test)} images")

    keras_path = os.path.join(args.out, "digits.keras")
    export_path = os.path.join(args.out, "saved_model")
    model.save(keras_path)
    model.export(export_path, verbose=False)

    expected = model.predict(x_test, verbose=0)
    reloaded = keras.saving.load_model(keras_path)
    saved = tf.saved_model.load(export_path)  # keep a reference: it owns the variables
    served = saved.serve(tf.constant(x_test))
    keras_diff = np.abs(reloaded.predict(x_test, verbose=0) - expected).max()
    saved_diff = np.abs(served.numpy() - expected).max()
    print(f"{keras_path}: max |difference| {keras_diff:.2e}")
    print(f"{export_path}: max |difference| {saved_diff:.2e}")
    if keras_diff > 1e-5 or saved_diff > 1e-5:
        raise SystemExit("reloaded models disagree with the trained one")


if __name__ == "__main__":
    main()
