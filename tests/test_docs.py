"""Every ```python block of README.md and docs/*.md runs as written.

The blocks of one file run in order in one fresh process (a later block
may use what an earlier one defined), in a temporary directory (they write
model files), on the CPU. A file whose code needs PyTorch or JAX is skipped
where that is not installed (tests/test_portable.py runs docs/backends.md
under JAX).

Every relative link of the project's markdown files reaches a file, and a
heading of it where the link names an anchor; CHANGELOG.md's newest version
is the package's.
"""

import collections
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
    for package, name in (("torch", "PyTorch"), ("jax", "JAX")):
        if any(re.search(rf"^import {package}", b, re.M) for b in blocks):
            if importlib.util.find_spec(package) is None:
                pytest.skip(f"needs {name}, which is not installed")
    script = "\n\n".join(blocks)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{path}:\n{result.stderr[-3000:]}"


LINKED_FILES = [os.path.join(ROOT, name) for name in (
    "README.md", "CONTRIBUTING.md", "CHANGELOG.md", os.path.join("benchmarks", "README.md"))
] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
FENCE = re.compile(r"^ *```.*?^ *```", re.S | re.M)
CODE_SPAN = re.compile(r"`+[^`\n]*`+")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", re.M)
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")


def _prose(text):
    """Markdown without fenced blocks and code spans: where links are links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def github_slug(heading):
    """The anchor GitHub gives a heading: its text lowercased, punctuation
    dropped (hyphens, spaces and underscores kept), spaces made hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path):
    """Every anchor a markdown file offers: its headings' slugs, GitHub's
    -1, -2, ... for repeated ones, and explicit <a name/id="..."> tags."""
    with open(path) as f:
        text = FENCE.sub("", f.read())
    found, seen = set(HTML_ANCHOR.findall(text)), collections.Counter()
    for _, heading in HEADING.findall(text):
        slug = github_slug(heading)
        found.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return found


def relative_links(path):
    with open(path) as f:
        text = _prose(f.read())
    targets = INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:|//", t, re.I)]


def test_github_slug_follows_githubs_rules():
    assert github_slug("Speed: the fused kernel and XLA") == "speed-the-fused-kernel-and-xla"
    assert github_slug("`training` vs `trainable`") == "training-vs-trainable"
    assert github_slug("0.2.0 - 2026-12-01") == "020---2026-12-01"
    assert github_slug("Multi-GPU and multi_worker (2 x)") == "multi-gpu-and-multi_worker-2-x"


@pytest.mark.parametrize("path", LINKED_FILES, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_reach_an_existing_file_and_heading(path):
    assert os.path.isfile(path), f"{os.path.relpath(path, ROOT)} is missing"
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) \
            if file_part else path
        if not os.path.exists(linked):
            broken.append(f"{target}: no file {os.path.relpath(linked, ROOT)}")
        elif anchor and linked.endswith(".md") and anchor not in anchors(linked):
            broken.append(f"{target}: no heading with the anchor #{anchor} in "
                          f"{os.path.relpath(linked, ROOT)}")
    assert broken == [], f"{os.path.relpath(path, ROOT)}:\n" + "\n".join(broken)


def test_changelog_tops_with_the_package_version():
    # The newest dated section is the version setup.cfg installs (it reads
    # keras_bn.__version__); an "Unreleased" section may stand above it.
    import keras_bn

    with open(os.path.join(ROOT, "CHANGELOG.md")) as f:
        released = re.findall(r"^## \[?(\d+\.\d+\.\d+)\]? - \d{4}-\d{2}-\d{2}\s*$", f.read(), re.M)
    assert released and released[0] == keras_bn.__version__, (released, keras_bn.__version__)
