"""Synchronized BatchNorm across workers with MultiWorkerMirroredStrategy.

Run it as it is and it starts two worker processes on this machine
(127.0.0.1, free ports), each training the same small CNN on its share of
scikit-learn's digits with `keras_bn.BatchNorm(synchronized=True)`, so every
batch-norm layer normalizes with the statistics of the global batch. When
they finish it prints each worker's moving statistics side by side: they
are identical, as they must be for checkpoints and exports to agree.

To join a real cluster instead, set TF_CONFIG on each machine as usual
(https://www.tensorflow.org/guide/distributed_training) and run the same
command there; the script then acts as that worker.

    python examples/distributed.py --steps 5 --out distributed_out
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

GLOBAL_BATCH = 64


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def load_data(n=None):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    return (x, y) if n is None else (x[:n], y[:n])


def build_model(seed=0):
    import keras

    import keras_bn

    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(8, 3, padding="same", use_bias=False),
        keras_bn.BatchNorm(synchronized=True, name="bn1"),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(16, use_bias=False),
        keras_bn.BatchNorm(synchronized=True, name="bn2"),
        keras.layers.ReLU(),
        keras.layers.Dense(10),
    ])


def moving_statistics(model):
    import keras_bn

    return {
        f"{layer.name}/{v.name}": v.numpy().tolist()
        for layer in model.layers if isinstance(layer, keras_bn.BatchNorm)
        for v in (layer.moving_mean, layer.moving_variance)
    }


def train(steps, strategy=None, worker=0, num_workers=1):
    """Trains for `steps` global batches of GLOBAL_BATCH digits.

    Each worker feeds its own slice of every global batch to its replica;
    gradients are averaged over the global batch. With `strategy=None` the
    whole batch runs in this process: the single-device reference.

    A custom loop rather than `model.fit`: Keras 3's fit fails under
    MultiWorkerMirroredStrategy before the first step (keras-team/keras
    issue 20585), whatever the layers.
    """
    import keras
    import tensorflow as tf

    strategy = strategy or tf.distribute.get_strategy()
    x, y = load_data(GLOBAL_BATCH * steps)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None)
    with strategy.scope():
        model = build_model()
        optimizer = keras.optimizers.SGD(0.05)
        optimizer.build(model.trainable_variables)

    @tf.function
    def step(x, y):
        def replica_step(x, y):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = tf.nn.compute_average_loss(
                    loss_fn(y, logits), global_batch_size=GLOBAL_BATCH)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))

        strategy.run(replica_step, args=(x, y))

    share = GLOBAL_BATCH // num_workers
    for s in range(steps):
        start = s * GLOBAL_BATCH + worker * share
        step(x[start:start + share], y[start:start + share])
    return model


def run_worker(args):
    import tensorflow as tf

    # The strategy must exist before any other TF op runs in this process.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    model = train(args.steps, strategy, task, strategy.num_replicas_in_sync)
    stats = moving_statistics(model)
    if args.out:
        with open(os.path.join(args.out, f"worker{task}.json"), "w") as f:
            json.dump(stats, f)
    print(f"worker {task} done")


def launch(args):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    os.makedirs(args.out, exist_ok=True)
    procs = []
    try:
        for index in range(2):
            env = dict(os.environ, TF_CONFIG=json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}))
            log = open(os.path.join(args.out, f"worker{index}.log"), "w")
            procs.append((subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--steps",
                 str(args.steps), "--out", args.out],
                env=env, stdout=log, stderr=subprocess.STDOUT), log))
        deadline = time.monotonic() + args.timeout
        for proc, _ in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        # A worker left waiting for its peer would hang forever: end both.
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    codes = [proc.returncode for proc, _ in procs]
    if any(codes):
        raise SystemExit(f"workers exited with {codes}; logs in {args.out}")
    results = []
    for index in range(2):
        with open(os.path.join(args.out, f"worker{index}.json")) as f:
            results.append(json.load(f))
    print(f"{'statistic':<26} {'worker 0':>12} {'worker 1':>12}   (first channels)")
    for key in results[0]:
        for c in range(min(3, len(results[0][key]))):
            print(f"{key + f'[{c}]':<26} {results[0][key][c]:>12.6f} "
                  f"{results[1][key][c]:>12.6f}")
    identical = all(results[0][k] == results[1][k] for k in results[0])
    print("identical on both workers:", identical)
    if not identical:
        raise SystemExit("moving statistics differ between workers")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="global batches to train")
    parser.add_argument("--out", default="distributed_out")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds before the workers are stopped")
    args = parser.parse_args()
    if "TF_CONFIG" in os.environ:
        run_worker(args)
    else:
        launch(args)


if __name__ == "__main__":
    main()
