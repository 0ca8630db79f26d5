"""Every ```python block of README.md and docs/*.md runs as written.

The blocks of one file run in order in one fresh process (a later block
may use what an earlier one defined), in a temporary directory (they write
model files), on the CPU. A file whose code needs PyTorch is skipped where
torch is not installed.
"""

import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```", re.S | re.M)


def python_blocks(path):
    with open(path) as f:
        text = f.read()
    blocks = []
    for indent, body in BLOCK.findall(text):
        lines = [line[len(indent):] for line in body.splitlines()]
        blocks.append("\n".join(lines))
    return blocks


def test_every_python_block_is_found():
    # A fence the pattern misses would go unchecked: count them another way.
    for path in FILES:
        with open(path) as f:
            fences = f.read().count("```python")
        assert len(python_blocks(path)) == fences, path


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in FILES if python_blocks(p)],
                         ids=lambda p: os.path.relpath(p, ROOT))
def test_code_blocks_run_as_written(path, tmp_path):
    blocks = python_blocks(path)
    if any(re.search(r"^import torch", b, re.M) for b in blocks):
        if importlib.util.find_spec("torch") is None:
            pytest.skip("needs PyTorch, which is not installed")
    script = "\n\n".join(blocks)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{path}:\n{result.stderr[-3000:]}"
