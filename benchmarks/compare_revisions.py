"""Runs bench_layers.py for two git revisions of keras_bn, case by case in turn.

A change to a hot path is judged against the code before it: this checks
out `--before` (default: HEAD) into a temporary worktree and, for each case
of the layer benchmark, runs that revision's keras_bn and then the working
tree's, each in its own process, so that drift in the machine's speed hits
both alike. Keras's layer runs in both processes as the shared yardstick:
the table compares keras_bn's ms and its ratio to Keras, before and after.

    python benchmarks/compare_revisions.py --before 6a17f52 --json cmp.json
    python benchmarks/compare_revisions.py --modes train_step --jit off

With --in-process both revisions' layers run in one process, interleaved
call by call with Keras's (each revision's package copied as
`keras_bn_before` / `keras_bn_after`, its imports renamed): on a machine whose speed drifts
between processes by more than the change being measured (the 2-core
cloud machines here: +-10 % from one process to the next), this is the
comparison to trust.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from bench_layers import QUICK_SHAPES  # noqa: E402
from bench_layers import SHAPES  # noqa: E402


def _run(package_root, case, args, out):
    """bench_layers.py with `package_root`'s keras_bn first on the path."""
    command = [sys.executable, os.path.join(HERE, "bench_layers.py"), "--cases", case,
               "--json", out, "--jit", args.jit, "--modes", args.modes,
               "--repeats", str(args.repeats)]
    if args.dtypes:
        command += ["--dtypes", args.dtypes]
    env = dict(os.environ, PYTHONPATH=package_root, TF_CPP_MIN_LOG_LEVEL="2")
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="HEAD", help="git revision to compare against")
    parser.add_argument("--json", help="write both runs and the comparison here")
    parser.add_argument("--jit", default="off,on")
    parser.add_argument("--modes", default="inference,train_forward,train_step")
    parser.add_argument("--dtypes", default=None)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--cases", default=",".join(SHAPES))
    parser.add_argument("--in-process", action="store_true",
                        help="time both revisions in this process (see above)")
    args = parser.parse_args(argv)
    if args.in_process:
        return _in_process(args)

    with tempfile.TemporaryDirectory() as tmp:
        before_root = os.path.join(tmp, "before")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", before_root,
                        args.before], check=True, capture_output=True)
        try:
            runs = {"before": [], "after": []}
            for case in args.cases.split(","):
                for label, root in (("before", before_root), ("after", ROOT)):
                    data = _run(root, case, args, os.path.join(tmp, f"{label}.json"))
                    runs[label].append(data)
                    environment = data["environment"]
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", before_root],
                           check=False, capture_output=True)

    rows = []
    header = (f"{'case':<26} {'dtype':<8} {'jit':<4} {'mode':<14} {'before ms':>9} "
              f"{'after ms':>9} {'after/before':>12} {'ratio to Keras before':>22} "
              f"{'after':>6}")
    print(header)
    print("-" * len(header))
    for before, after in zip(runs["before"], runs["after"]):
        for b, a in zip(before["results"], after["results"]):
            row = {
                "case": a["case"], "dtype": a["dtype"], "jit_compile": a["jit_compile"],
                "mode": a["mode"], "before_ms": b["ms"]["keras_bn"],
                "after_ms": a["ms"]["keras_bn"],
                "after_over_before": a["ms"]["keras_bn"] / b["ms"]["keras_bn"],
                "ratio_to_keras_before": b["ratio_to_keras"],
                "ratio_to_keras_after": a["ratio_to_keras"],
            }
            rows.append(row)
            print(f"{row['case']:<26} {row['dtype']:<8} "
                  f"{'on' if row['jit_compile'] else 'off':<4} {row['mode']:<14} "
                  f"{row['before_ms']:>9.2f} {row['after_ms']:>9.2f} "
                  f"{row['after_over_before']:>12.3f} {row['ratio_to_keras_before']:>22.2f} "
                  f"{row['ratio_to_keras_after']:>6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment, "before": args.before,
                       "repeats": args.repeats, "rows": rows}, f, indent=1)
    return rows


def _copy_package(revision, directory, name):
    """keras_bn at `revision` (None: the working tree), unpacked in
    `directory` as the package `name`, its imports renamed."""
    package = os.path.join(directory, name)
    if revision is None:
        shutil.copytree(os.path.join(ROOT, "keras_bn"), package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(["git", "-C", ROOT, "archive", revision, "keras_bn"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", directory], input=archive, check=True)
        os.rename(os.path.join(directory, "keras_bn"), package)
    # Every module, subpackages included: a backend module left importing
    # `keras_bn` would run the installed package's kernels in both copies.
    paths = [os.path.join(folder, file_name) for folder, _, files in os.walk(package)
             for file_name in files if file_name.endswith(".py")]
    for path in paths:
        with open(path) as f:
            text = f.read()
        # Its own modules, and its own name in Keras's registry.
        text = re.sub(r"\bfrom keras_bn([. ])", rf"from {name}\1", text)
        text = text.replace('package="keras_bn"', f'package="{name}"')
        with open(path, "w") as f:
            f.write(text)


def _in_process(args):
    import bench_layers

    with tempfile.TemporaryDirectory() as tmp:
        # Both as copies: the same code imported as the installed package
        # and as a copy timed 7-13 % apart here, the copy faster.
        _copy_package(args.before, tmp, "keras_bn_before")
        _copy_package(None, tmp, "keras_bn_after")
        sys.path.insert(0, tmp)
        import keras_bn_after
        import keras_bn_before

        rows = []
        header = (f"{'case':<26} {'dtype':<8} {'jit':<4} {'mode':<14} {'before ms':>9} "
                  f"{'after ms':>9} {'after/before':>12} {'keras ms':>9}")
        print(header)
        print("-" * len(header))
        dtypes = (args.dtypes or "float32,bfloat16").split(",")
        for jit in [j == "on" for j in args.jit.split(",")]:
            for dtype_name in dtypes:
                for case in args.cases.split(","):
                    shape, axis = {**SHAPES, **QUICK_SHAPES}[case]
                    for mode in args.modes.split(","):
                        t = bench_layers.time_case(
                            shape, axis, dtype_name, mode, jit, args.repeats, 3,
                            extra_layers={"before": keras_bn_before.BatchNorm,
                                          "after": keras_bn_after.BatchNorm}, rotate=True)
                        row = {"case": case, "dtype": dtype_name, "jit_compile": jit,
                               "mode": mode, "before_ms": t["before"] * 1e3,
                               "after_ms": t["after"] * 1e3, "keras_ms": t["keras"] * 1e3,
                               "after_over_before": t["after"] / t["before"]}
                        rows.append(row)
                        print(f"{case:<26} {dtype_name:<8} {'on' if jit else 'off':<4} "
                              f"{mode:<14} {row['before_ms']:>9.2f} {row['after_ms']:>9.2f} "
                              f"{row['after_over_before']:>12.3f} {row['keras_ms']:>9.2f}",
                              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": bench_layers.environment(), "before": args.before,
                       "in_process": True, "repeats": args.repeats, "rows": rows},
                      f, indent=1)
    return rows


if __name__ == "__main__":
    main()
