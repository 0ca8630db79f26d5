"""What every backend's layer benchmark shares: the cases, and the machine
they ran on for the figures' record (the CPU and the flags that decide
TensorFlow's CPU kernels, the checkout's commit). No TensorFlow or JAX
here, so that each backend's benchmark can import it."""

import os
import platform
import subprocess

SHAPES = {
    "dense 4096x256": ((4096, 256), -1),
    "dense 256x4096": ((256, 4096), -1),
    "conv NHWC 64x32x32x64": ((64, 32, 32, 64), -1),
    "conv NHWC 32x56x56x128": ((32, 56, 56, 128), -1),
    "conv NCHW 64x64x32x32": ((64, 64, 32, 32), 1),
    "conv NCHW 32x128x56x56": ((32, 128, 56, 56), 1),
}
QUICK_SHAPES = {
    "dense 64x16": ((64, 16), -1),
    "conv NHWC 4x8x8x8": ((4, 8, 8, 8), -1),
    "conv NCHW 4x8x8x8": ((4, 8, 8, 8), 1),
}

# The CPU flags that decide TensorFlow's CPU kernels: oneDNN is on by
# default only with AVX-512 VNNI/BF16 or AMX, and its kernels use them.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni",
             "amx_tile", "amx_bf16", "amx_int8")


def cpuinfo():
    """(model name, its flags among CPU_FLAGS) from /proc/cpuinfo."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                if model != "unknown" and flags:
                    break
    except OSError:
        pass
    return model, [flag for flag in CPU_FLAGS if flag in flags]


def git_commit():
    """The checkout's commit (with -dirty for uncommitted changes)."""
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True,
            text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        ).stdout.strip() or "unknown"
    except OSError:
        return "unknown"
