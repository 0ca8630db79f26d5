"""Times keras.applications models with Keras's batch norm and with keras_bn's.

Each model is built from one seed (weights=None) as Keras makes it, and
converted by `keras_bn.from_keras`: the same weights and the same function,
with every `keras.layers.BatchNormalization` a `keras_bn.BatchNorm`. Both are
compiled alike (SGD, sparse categorical cross-entropy, Keras's default
`jit_compile`, which is off on a CPU-only machine). Per model and policy:

- train step: ms per `train_on_batch`, which runs the compiled train function
  that `fit()` uses (forward, backward, SGD update, moving statistics);
- predict: ms per `predict_on_batch`, the compiled predict function;
- first step: s of the first `train_on_batch` (tracing, graph optimization
  and the first run, what a user waits for before training starts);
- peak RSS: the peak resident memory of a short training run (the first
  step and a few more), `getrusage(RUSAGE_SELF).ru_maxrss` of the process;
- with `--floor`, train step and predict of the same model with every batch
  norm removed (an identity), timed with the other two: the ratio to Keras
  that a batch norm costing nothing would reach.

Train step and predict times come from one process holding both models:
warm-up calls excluded, then keras and keras_bn called in turn, in
alternating order, so that drift in the machine's speed hits both alike; each
figure is the median of the repeats. First step and peak RSS come from a
fresh process per model, policy and layer kind, so that nothing is cached or
already allocated. The peak is reset (Linux `/proc/self/clear_refs`) once
the model is built (and converted) and the heap's free memory handed back
(glibc's `malloc_trim`, in both kinds): it is the peak of the training run,
not of building or converting the model. This
parent process imports no TensorFlow: a child started by fork and exec
inherits its parent's resident size in `ru_maxrss`.

    python benchmarks/bench_models.py                      # all models, float32 and mixed_bfloat16
    python benchmarks/bench_models.py --models ResNet50 --policies float32
    python benchmarks/bench_models.py --quick              # a smoke run
    python benchmarks/bench_models.py --json out.json
    KERAS_BACKEND=jax python benchmarks/bench_models.py ...   # or torch: that backend's layers
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KINDS = ("keras", "keras_bn")
# name -> (keras.applications constructor, its extra arguments)
MODELS = {
    "ResNet50": ("ResNet50", {}),
    "MobileNetV2": ("MobileNetV2", {}),
    "EfficientNetB0": ("EfficientNetB0", {}),
    "DenseNet121": ("DenseNet121", {}),
    # The --quick model: MobileNetV2's smallest width.
    "MobileNetV2_0.35": ("MobileNetV2", {"alpha": 0.35}),
}
DEFAULT_MODELS = ("ResNet50", "MobileNetV2", "EfficientNetB0", "DenseNet121")
POLICIES = ("float32", "mixed_bfloat16")
RESULT = "RESULT "  # a child's last stdout line: RESULT {json}


# The children: everything that imports TensorFlow runs here.

def _build(args, kind):
    """The model of `kind`, compiled, and its number of batch norms."""
    import gc

    import keras

    import keras_bn

    keras.mixed_precision.set_global_policy(args.policy)
    keras.utils.set_random_seed(0)
    constructor, extra = MODELS[args.model]
    model = getattr(keras.applications, constructor)(
        weights=None, input_shape=(args.size, args.size, 3),
        classes=args.classes, **extra)
    count = sum(isinstance(layer, keras.layers.BatchNormalization)
                for layer in model.layers)
    if kind == "keras_bn":
        model = keras_bn.from_keras(model)
        gc.collect()  # the Keras original, no longer referenced
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=False))
    return model, count


def _without_batch_norm(args):
    """The same model with every batch norm an identity: the floor that a
    batch norm costing nothing would reach."""
    import keras

    class Identity(keras.layers.Layer):
        def call(self, inputs, training=None, mask=None):
            return inputs

    def clone(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            return Identity(name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    source, _ = _build(args, "keras")
    model = keras.models.clone_model(source, clone_function=clone)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=False))
    return model


def _data(args):
    import keras
    import numpy as np

    rng = np.random.RandomState(0)
    x = rng.normal(0.0, 1.0, (args.batch, args.size, args.size, 3))
    y = rng.randint(0, args.classes, args.batch)
    return (keras.ops.convert_to_tensor(x, "float32"),
            keras.ops.convert_to_tensor(y, "int32"))


def interleaved(calls, repeats):
    """Median seconds per call of each of `calls`, taken in turn."""
    times = {name: [] for name in calls}
    names = list(calls)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            calls[name]()  # returns once its work is done (NumPy values, CPU tensors)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def child_steady(args):
    """Train-step and predict times of both kinds, in this one process."""
    import keras
    import numpy as np

    # Each backend's record of the machine and versions.
    if keras.config.backend() == "tensorflow":
        from bench_layers import environment
    else:
        from bench_backends import environment

    models = {kind: _build(args, kind)[0] for kind in KINDS}
    x, y = _data(args)
    outputs = {kind: model.predict_on_batch(x) for kind, model in models.items()}
    if args.floor:
        models["no_batch_norm"] = _without_batch_norm(args)
    difference = float(np.max(np.abs(keras.ops.convert_to_numpy(outputs["keras"])
                                     - keras.ops.convert_to_numpy(outputs["keras_bn"]))))
    for model in models.values():
        for _ in range(args.warmup):
            model.train_on_batch(x, y)
            model.predict_on_batch(x)
    train = interleaved(
        {kind: (lambda m=m: m.train_on_batch(x, y)) for kind, m in models.items()},
        args.repeats)
    predict = interleaved(
        {kind: (lambda m=m: m.predict_on_batch(x)) for kind, m in models.items()},
        args.repeats)
    return {
        "environment": environment(),
        "jit_compile": {kind: bool(m.jit_compile) for kind, m in models.items()},
        "max_output_difference": difference,
        "train_step_ms": {k: v * 1e3 for k, v in train.items()},
        "predict_ms": {k: v * 1e3 for k, v in predict.items()},
    }


def _trim_heap():
    """Hands the heap's free memory back to the OS (glibc only).

    `from_keras` copies a model: the Keras original, dropped and collected,
    leaves its weights' memory free in the heap, which glibc keeps (about
    125 MiB for ResNet50). Trimmed, both kinds start their training run
    from what they hold, and the peak compares the runs, not the heaps.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss():
    """Sets the process's peak RSS back to its current RSS (Linux only)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_mib():
    """The current resident size, or None where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except OSError:
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib():
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # KiB on Linux, bytes on macOS.
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def child_first(args):
    """First-step time and peak RSS of a short training run, one kind."""
    model, count = _build(args, args.kind)
    x, y = _data(args)
    _trim_heap()
    reset, at_start = _reset_peak_rss(), _rss_mib()
    start = time.perf_counter()
    model.train_on_batch(x, y)
    first = time.perf_counter() - start
    for _ in range(args.steps - 1):
        model.train_on_batch(x, y)
    return {"batch_norms": count, "first_step_s": first,
            "peak_rss_mib": _peak_rss_mib(), "peak_rss_reset": reset,
            "rss_at_start_mib": at_start}


# The parent: starts the children, gathers and prints.

def _run_child(args, mode, **extra):
    command = [sys.executable, os.path.abspath(__file__), "--child", mode,
               "--model", args.model, "--policy", args.policy,
               "--batch", str(args.batch), "--size", str(args.size),
               "--classes", str(args.classes), "--repeats", str(args.repeats),
               "--warmup", str(args.warmup), "--steps", str(args.steps)]
    if args.floor:
        command.append("--floor")
    for key, value in extra.items():
        command += [f"--{key}", str(value)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (ROOT, HERE, env.get("PYTHONPATH")) if p)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"bench_models: the child {' '.join(command[2:])} failed with "
            f"exit status {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


def _ratio(figures):
    return figures["keras_bn"] / figures["keras"]


def measure(args, model, policy):
    """Every figure for one model and policy, from three child processes."""
    args = argparse.Namespace(**{**vars(args), "model": model, "policy": policy})
    steady = _run_child(args, "steady")
    fresh = {kind: _run_child(args, "first", kind=kind) for kind in KINDS}
    row = {
        "model": model, "policy": policy,
        "batch_norms": fresh["keras"]["batch_norms"],
        "jit_compile": steady["jit_compile"],
        "max_output_difference": steady["max_output_difference"],
        "train_step_ms": steady["train_step_ms"],
        "predict_ms": steady["predict_ms"],
        "first_step_s": {k: fresh[k]["first_step_s"] for k in KINDS},
        "peak_rss_mib": {k: fresh[k]["peak_rss_mib"] for k in KINDS},
        "peak_rss_reset": all(fresh[k]["peak_rss_reset"] for k in KINDS),
        # The resident size when the peak was reset: the built model, the
        # libraries, and what the allocator kept of the conversion.
        "rss_at_start_mib": {k: fresh[k]["rss_at_start_mib"] for k in KINDS},
    }
    for name in ("train_step_ms", "predict_ms", "first_step_s", "peak_rss_mib"):
        row[name.rsplit("_", 1)[0] + "_ratio"] = _ratio(row[name])
    if args.floor:
        # The ratio a batch norm costing nothing would have.
        for name in ("train_step_ms", "predict_ms"):
            row[name.rsplit("_", 1)[0] + "_floor_ratio"] = (
                row[name]["no_batch_norm"] / row[name]["keras"])
    return row, steady["environment"]


HEADER = ("| model | policy | BNs | train ms Keras | train ms keras_bn | ratio "
          "| predict ms Keras | predict ms keras_bn | ratio "
          "| first step s Keras | first step s keras_bn "
          "| peak RSS MiB Keras | peak RSS MiB keras_bn |")


def table_row(row):
    t, p, f, m = (row[k] for k in ("train_step_ms", "predict_ms",
                                   "first_step_s", "peak_rss_mib"))
    return (f"| {row['model']} | {row['policy']} | {row['batch_norms']} "
            f"| {t['keras']:.1f} | {t['keras_bn']:.1f} | {row['train_step_ratio']:.2f} "
            f"| {p['keras']:.1f} | {p['keras_bn']:.1f} | {row['predict_ratio']:.2f} "
            f"| {f['keras']:.1f} | {f['keras_bn']:.1f} "
            f"| {m['keras']:.0f} | {m['keras_bn']:.0f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="MobileNetV2 alpha 0.35 at 32x32, batch 4, one "
                             "repeat, float32: a smoke run")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated, among {', '.join(MODELS)}")
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help="comma-separated Keras dtype policies")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="image side")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5,
                        help="training steps of the peak-RSS run")
    parser.add_argument("--floor", action="store_true",
                        help="also time each model with its batch norms removed "
                             "(train step and predict): what no batch norm at all costs")
    parser.add_argument("--child", choices=("steady", "first"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        result = (child_steady if args.child == "steady" else child_first)(args)
        print(RESULT + json.dumps(result), flush=True)
        return result

    if args.quick:
        args.models, args.policies = "MobileNetV2_0.35", "float32"
        args.batch, args.size, args.repeats, args.warmup, args.steps = 4, 32, 1, 1, 2
    models, policies = args.models.split(","), args.policies.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"argument --models: expected names among "
                     f"{', '.join(MODELS)}; received {', '.join(unknown)}")

    settings = {
        "batch": args.batch, "image": [args.size, args.size, 3],
        "classes": args.classes, "repeats": args.repeats,
        "warmup": args.warmup, "peak_rss_steps": args.steps,
        "train_step": "Keras train_on_batch (the compiled train function "
                      "fit() uses), SGD(0.01), sparse categorical "
                      "cross-entropy",
        "predict": "Keras predict_on_batch (the compiled predict function)",
        "load_average_at_start": list(os.getloadavg()),
    }
    results, environment = [], None

    def write():
        # Rewritten after every row: a run stopped early keeps its rows.
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"environment": environment, "settings": settings,
                           "results": results}, f, indent=1)

    print(HEADER + (" train floor | predict floor |" if args.floor else ""))
    print("|" + " --- |" * 3 + " ---: |" * (12 if args.floor else 10))
    for model in models:
        for policy in policies:
            row, environment = measure(args, model, policy)
            results.append(row)
            print(table_row(row) + (f" {row['train_step_floor_ratio']:.2f} | "
                                    f"{row['predict_floor_ratio']:.2f} |" if args.floor else ""),
                  flush=True)
            write()
    print(json.dumps(environment))
    return results


if __name__ == "__main__":
    main()
