"""Precise batch-norm statistics: recalibrate a model after a short training.

A batch-norm layer keeps moving averages of the batch statistics and uses
them at inference time. With Keras's usual momentum of 0.99 each step moves
them only 1 % of the way, so after a short training they still mostly hold
their initial values (mean 0, variance 1) and lag the weights: the model
does much worse at inference than in training. `keras_bn.recalibrate` runs
the trained model over the training data once and sets every batch-norm
layer's statistics to the exact population ones (PreciseBN, Wu & Johnson,
2021), leaving the weights alone.

This trains a small CNN on scikit-learn's 8x8 digits (no download) for a
few dozen steps, then prints its test accuracy before and after
recalibration and saves the recalibrated model.

    python examples/recalibrate.py --epochs 2 --out recalibrate_out
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


MOMENTUM = 0.99  # keras.layers.BatchNormalization's default


def load_data(seed):
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]  # (1797, 8, 8, 1)
    return train_test_split(x, digits.target, test_size=0.25, random_state=seed,
                            stratify=digits.target)


def build_model():
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(16, 3, padding="same", use_bias=False),
        keras_bn.BatchNorm(momentum=MOMENTUM),
        keras.layers.ReLU(),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, padding="same", use_bias=False),
        keras_bn.BatchNorm(momentum=MOMENTUM),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="recalibrate_out")
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
    history = model.fit(x_train, y_train, batch_size=args.batch_size,
                        epochs=args.epochs, verbose=0)
    steps = args.epochs * int(np.ceil(len(x_train) / args.batch_size))
    _, before = model.evaluate(x_test, y_test, verbose=0)

    # The training images, in order, without labels: only x is used.
    data = tf.data.Dataset.from_tensor_slices(x_train).batch(args.batch_size)
    report = keras_bn.recalibrate(model, data, verbose=0)
    _, after = model.evaluate(x_test, y_test, verbose=0)

    train_accuracy = history.history["accuracy"][-1]
    print(f"trained {steps} steps; last-epoch training accuracy "
          f"{train_accuracy:.3f}")
    print(report)
    print()
    rows = [
        ("batch-norm statistics", "test accuracy"),
        (f"moving averages (momentum {MOMENTUM}, {steps} steps)",
         f"{before:.3f}"),
        (f"recalibrated ({report.examples} training images)", f"{after:.3f}"),
    ]
    for name, value in rows:
        print(f"{name:<44} {value}")

    path = os.path.join(args.out, "recalibrated.keras")
    model.save(path)
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
