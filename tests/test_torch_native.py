"""torch's native kernel (keras_bn/backend/torch/native_kernel.py) and the
choice of it (backend/torch/dispatch.py), under Keras's torch backend; the
shared behaviour is tests/test_portable.py's. Skipped on other backends."""

import numpy as np
import pytest

import keras

from tests.reference import few_valued
from tests.reference import run_benchmark

pytestmark = pytest.mark.skipif(keras.config.backend() != "torch",
                                reason="PyTorch's kernels, under KERAS_BACKEND=torch")

if keras.config.backend() == "torch":
    import torch

    import keras_bn
    from keras_bn.backend.torch import dispatch


def _x(shape, seed=0, offset=0.5):
    return torch.tensor(np.random.RandomState(seed).normal(offset, 2.0, shape).astype("float32"))


@pytest.mark.parametrize("features, reason", [
    ({}, "torch's native batch norm, its own backward to every order"),
    ({"adjustment": True}, "torch's native batch norm, its own backward to every order"),
    ({"mask": True, "renorm": True},
     "mask, renorm: the keras.ops kernel computes it, torch's native kernel doesn't"),
])
def test_route_names_the_kernel_and_why(features, reason):
    assert dispatch.route(_x((4, 3)), 1, 1e-5, training=True, features=features).reason == reason


def test_several_axes_and_empty_batches_take_keras_ops():
    assert dispatch.route(_x((4, 3, 2)), (1, 2), 1e-5, training=True).kernel == dispatch.KERAS_OPS
    assert dispatch.route(_x((0, 3)), 1, 1e-5, training=True).kernel == dispatch.KERAS_OPS


def test_channels_last_output_is_contiguous_in_its_own_layout():
    # The NHWC input reaches the kernel as a channels_last view and its
    # output comes back as a plain NHWC tensor: no copy either way.
    y = keras_bn.BatchNorm()(_x((2, 4, 4, 3)), training=True)
    assert y.shape == (2, 4, 4, 3) and y.is_contiguous()


def test_empty_batch_is_refused_for_the_moving_statistics():
    bn = keras_bn.BatchNorm()
    bn(_x((2, 3)), training=False)
    y = bn(_x((0, 3)), training=True)
    assert tuple(y.shape) == (0, 3) and bn.refused_batches == 1
    np.testing.assert_array_equal(bn.moving_mean.numpy(), np.zeros(3))


def _hvp_and_differences(bn, shape, **call):
    """The Hessian-vector product of a loss with curvature through
    create_graph=True, and central differences of the float32 gradient
    along the same vector."""
    bn.build(shape)
    w, v = _x(shape, seed=1, offset=0.0), _x(shape, seed=2, offset=0.0)

    def grad(x, create_graph=False):
        x = x.detach().requires_grad_(True)
        loss = (bn(x, training=True, **call) ** 2 * w).sum()
        return x, torch.autograd.grad(loss, x, create_graph=create_graph)[0]

    x, g = grad(_x(shape), create_graph=True)
    hvp = torch.autograd.grad((g * v).sum(), x)[0].numpy()
    step = 1e-2
    diff = (grad(x + step * v)[1] - grad(x - step * v)[1]).numpy() / (2 * step)
    return hvp, diff


@pytest.mark.parametrize("shape, axis", [((6, 4), -1), ((3, 2, 2, 4), -1), ((3, 4, 2, 2), 1)])
def test_second_derivatives_match_differences_of_the_gradient(shape, axis):
    # torch's batch-norm double backward. Step 1e-2: rounding ~1e-5 and
    # truncation ~1e-4 of the product's scale; 1e-2 leaves room.
    hvp, diff = _hvp_and_differences(keras_bn.BatchNorm(axis=axis), shape)
    np.testing.assert_allclose(diff, hvp, atol=1e-2 * np.abs(hvp).max())


@pytest.mark.parametrize("kwargs, shape, mask", [
    ({"virtual_batch_size": 3}, (6, 4), None),
    ({"axis": [1, 2]}, (3, 2, 2, 4), None),
    ({}, (3, 4, 2), np.array([[1, 1, 0, 1], [1, 0, 1, 1], [0, 1, 1, 1]], bool)),
], ids=["ghost", "several_axes", "mask"])
def test_second_derivatives_on_the_keras_ops_route(kwargs, shape, mask, monkeypatch):
    # What torch's native kernel can't compute runs as keras.ops, whose
    # derivatives of every order are torch's autograd of that math; the
    # same check as above, with the route confirmed by counting its calls.
    # (Renorm is left out: its r and d carry no gradient by definition, so
    # differences of its gradient are not its autograd's second derivative.)
    from keras_bn.backend import portable

    calls = []
    real = portable.train
    monkeypatch.setattr(portable, "train", lambda *a, **k: calls.append(1) or real(*a, **k))
    call = {} if mask is None else {"mask": torch.tensor(mask)}
    hvp, diff = _hvp_and_differences(keras_bn.BatchNorm(**kwargs), shape, **call)
    assert calls
    np.testing.assert_allclose(diff, hvp, atol=1e-2 * np.abs(hvp).max())


@pytest.mark.parametrize("shape", [(131, 32, 32, 4), (2**17 + 37, 4)])
def test_statistics_exact_beyond_what_the_kernel_sums_at_once(shape):
    # Channels-last and 2-D batches reach kernels that sum in float32: on
    # 0/1 data their variance was off by 1.2e-3 at 1.3e5 values per
    # channel. Measured in groups of at most SUM_LIMIT values (2^17 + 37
    # rows leave a remainder), within 1e-5 (measured 4e-6 to 7e-6), as
    # the test_offsets bound of 1e-4 asks with room.
    from keras_bn.backend.torch import native_kernel

    x = torch.tensor(few_valued(shape))
    assert native_kernel._rows(x.movedim(-1, 1)) is not None
    bn = keras_bn.BatchNorm(momentum=0.0)
    y = bn(x, training=True)
    x64 = x.double().numpy()
    axes = tuple(range(x64.ndim - 1))
    mean, var = x64.mean(axes), x64.var(axes)
    np.testing.assert_allclose(bn.moving_variance.numpy(), var, rtol=1e-5)
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(y.detach().numpy(), (x64 - mean) / np.sqrt(var + 1e-5),
                               rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("shape", [(40, 8, 8, 3), (4103, 3)])
def test_grouped_statistics_keep_the_kernels_derivatives(shape, monkeypatch):
    # Beyond SUM_LIMIT values per channel the statistics come from groups
    # and torch's training-mode backward is handed them: the gradient is
    # the one-call kernel's (same statistics to float32 rounding), and the
    # second derivatives still match differences of the gradient.
    from keras_bn.backend.torch import native_kernel

    x, w = _x(shape), _x(shape, seed=1, offset=0.0)
    gamma = torch.linspace(0.5, 2.0, shape[-1])

    def grads():
        bn = keras_bn.BatchNorm(momentum=0.0)
        bn.build(shape)
        bn.gamma.assign(gamma)
        xx = x.clone().requires_grad_(True)
        loss = (bn(xx, training=True) * w).sum()
        return [g.numpy() for g in torch.autograd.grad(loss, [xx, bn.gamma.value, bn.beta.value])]

    assert native_kernel._rows(x.movedim(-1, 1)) is not None
    grouped = grads()
    monkeypatch.setattr(native_kernel, "SUM_LIMIT", 10**9)  # one kernel call
    assert native_kernel._rows(x.movedim(-1, 1)) is None
    for got, want in zip(grouped, grads()):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    monkeypatch.undo()
    hvp, diff = _hvp_and_differences(keras_bn.BatchNorm(), shape)
    np.testing.assert_allclose(diff, hvp, atol=1e-2 * np.abs(hvp).max())


def test_half_precision_grouped_statistics_stay_float32():
    # 16384 values per channel of bfloat16: grouped. The kernel's
    # statistics of a half-precision input without a float32 weight come
    # back in bfloat16 (9e-4 off); with one, in float32.
    from keras_bn.backend.torch import native_kernel

    x = (_x((64, 16, 16, 8)) + 1.0).to(torch.bfloat16)
    assert native_kernel._rows(x.movedim(-1, 1)) is not None
    bn = keras_bn.BatchNorm(momentum=0.0, dtype="mixed_bfloat16")
    assert bn(x, training=True).dtype == torch.bfloat16
    np.testing.assert_allclose(bn.moving_variance.numpy(),
                               x.double().var((0, 1, 2), correction=0).numpy(), rtol=1e-5)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_half_precision_without_gamma_or_beta_keeps_float32_statistics(policy):
    # Without a float32 weight the kernel keeps a half-precision input's
    # statistics in its dtype: the bfloat16 variance was 4.6e-3 off.
    x = _x((64, 8)).to(torch.bfloat16 if policy == "mixed_bfloat16" else torch.float16)
    bn = keras_bn.BatchNorm(momentum=0.0, center=False, scale=False, dtype=policy)
    assert bn(x, training=True).dtype == x.dtype
    np.testing.assert_allclose(bn.moving_variance.numpy(),
                               x.double().var(0, correction=0).numpy(), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_mean.numpy(), x.double().mean(0).numpy(), rtol=1e-6,
                               atol=1e-6)


def test_half_precision_keeps_its_dtype_and_float32_statistics():
    x = _x((16, 4)).to(torch.bfloat16)
    bn = keras_bn.BatchNorm(momentum=0.0, dtype="mixed_bfloat16")
    y = bn(x, training=True)
    assert y.dtype == torch.bfloat16 and bn.moving_variance.value.dtype == torch.float32
    np.testing.assert_allclose(bn.moving_variance.numpy(), x.float().var(0, correction=0).numpy(),
                               rtol=1e-5)


_WORKER = r"""
import json, os, sys
os.environ["KERAS_BACKEND"] = "torch"
import numpy as np, torch, torch.distributed as dist
import keras_bn
rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=__import__("datetime").timedelta(seconds=60))
data = np.random.RandomState(0).normal(1e3, 2.0, (ROWS0 + ROWS1, 3)).astype("float32")
w = np.random.RandomState(1).normal(size=data.shape).astype("float32")
rows = slice(0, ROWS0) if rank == 0 else slice(ROWS0, ROWS0 + ROWS1)
bn = keras_bn.BatchNorm(momentum=0.0, synchronized=SYNC)
bn.build((None, 3))
x = torch.tensor(data[rows], requires_grad=True)
y = bn(x, training=True)
(y * torch.tensor(w[rows])).sum().backward()
print(json.dumps({"y": y.detach().numpy().tolist(), "dx": x.grad.numpy().tolist(),
                  "mean": bn.moving_mean.numpy().tolist(),
                  "variance": bn.moving_variance.numpy().tolist()}))
dist.destroy_process_group()
"""


def _two_gloo_processes(rows, synchronized):
    """Each process's output, input gradient and moving statistics after
    one training call on its rows of a shared batch."""
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (_WORKER.replace("ROWS0", str(rows[0])).replace("ROWS1", str(rows[1]))
            .replace("SYNC", str(synchronized)))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ))
             for r in range(2)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=120)
        finally:
            p.kill()
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


@pytest.mark.parametrize("rows", [(5, 3), (4, 0)], ids=["uneven", "one_empty"])
def test_synchronized_over_two_gloo_processes_is_the_global_batch(rows):
    # Two processes on 127.0.0.1 (gloo), uneven batches, one possibly
    # empty: each normalizes with the global batch's statistics, ends with
    # the same moving ones, and its input gradient is its rows' share of
    # the global batch's, against the float64 formula.
    outs = _two_gloo_processes(rows, synchronized=True)
    data = np.random.RandomState(0).normal(1e3, 2.0, (sum(rows), 3)).astype("float32")
    w = np.random.RandomState(1).normal(size=data.shape).astype("float32")
    x64, n = data.astype(np.float64), sum(rows)
    mean, var = x64.mean(0), x64.var(0)
    inv = 1 / np.sqrt(var + 1e-5)
    xhat = (x64 - mean) * inv
    dx = inv / n * (n * w - w.sum(0) - xhat * (w * xhat).sum(0))
    got_y = np.concatenate([np.reshape(o["y"], (-1, 3)) for o in outs])
    got_dx = np.concatenate([np.reshape(o["dx"], (-1, 3)) for o in outs])
    np.testing.assert_allclose(got_y, xhat, atol=1e-4)
    np.testing.assert_allclose(got_dx, dx, atol=1e-4 * np.abs(dx).max())
    for o in outs:
        np.testing.assert_allclose(o["mean"], mean, rtol=1e-6)
        np.testing.assert_allclose(o["variance"], var, rtol=1e-4)
    assert outs[0]["mean"] == outs[1]["mean"] and outs[0]["variance"] == outs[1]["variance"]


@pytest.mark.parametrize("rows", [(5, 3), (4, 0)], ids=["uneven", "one_empty"])
def test_unsynchronized_over_two_gloo_processes_averages_the_moving_statistics(rows):
    # synchronized=False: each process normalizes with its own rows'
    # statistics, and the moving statistics are the average over the
    # processes that had rows, identical in both (as TensorFlow's
    # replicas' are); an empty process normalizes nothing and adds nothing.
    outs = _two_gloo_processes(rows, synchronized=False)
    data = np.random.RandomState(0).normal(1e3, 2.0, (sum(rows), 3)).astype(np.float64)
    shares = [data[:rows[0]], data[rows[0]:]]
    for out, share in zip(outs, shares):
        got = np.reshape(out["y"], (-1, 3))
        if len(share):
            xhat = (share - share.mean(0)) / np.sqrt(share.var(0) + 1e-5)
            np.testing.assert_allclose(got, xhat, atol=1e-4)
        else:
            assert got.size == 0
    having = [s for s in shares if len(s)]
    for o in outs:
        np.testing.assert_allclose(o["mean"], np.mean([s.mean(0) for s in having], 0), rtol=1e-6)
        np.testing.assert_allclose(o["variance"], np.mean([s.var(0) for s in having], 0),
                                   rtol=1e-4)
    assert outs[0]["mean"] == outs[1]["mean"] and outs[0]["variance"] == outs[1]["variance"]


@pytest.mark.parametrize("kwargs", [{}, {"virtual_batch_size": 4}, {"renorm": True}],
                         ids=["native", "ghost", "renorm"])
@pytest.mark.parametrize("training", [True, False])
def test_torch_compile_traces_one_graph(kwargs, training):
    # Under compile(jit_compile=True) Keras's torch trainer runs
    # torch.compile: a value read from a tensor (the shift check, a count
    # made by NumPy) would split the layer into several graphs run eagerly
    # in between. Dynamo's own report counts the breaks.
    bn = keras_bn.BatchNorm(**kwargs)
    bn.build((8, 3))
    x = _x((8, 3), offset=1e3)
    report = torch._dynamo.explain(lambda x: bn(x, training=training))(x)
    assert report.graph_break_count == 0, [str(b.reason)[:200] for b in report.break_reasons]
    torch._dynamo.reset()


def test_torch_compile_traces_the_grouped_statistics_in_one_graph():
    # A batch beyond SUM_LIMIT values per channel (statistics in groups,
    # the backward an autograd.Function) is one graph too.
    bn = keras_bn.BatchNorm()
    bn.build((4103, 3))
    report = torch._dynamo.explain(lambda x: bn(x, training=True))(_x((4103, 3)))
    assert report.graph_break_count == 0, [str(b.reason)[:200] for b in report.break_reasons]
    torch._dynamo.reset()


def test_sum_limit_benchmark_runs_and_records_its_conditions(tmp_path):
    import json

    out = tmp_path / "out.json"
    run_benchmark("torch_sum_limit.py", "--quick", "--json", str(out))
    record = json.loads(out.read_text())
    assert {"backend", "cpu", "torch", "keras", "git"} <= set(record["environment"])
    rows = {tuple(r["shape"]): r for r in record["rows"]}
    assert set(rows) == {(8, 16, 16, 8), (4100, 8), (64, 8)}
    for row in rows.values():
        assert all(ms > 0 for ms in row["ms"].values())
        assert row["variance_error"]["grouped"] < 1e-4


def test_grouped_statistics_refuse_a_nan_batch():
    # A NaN beyond SUM_LIMIT values per channel (grouped statistics) leaves
    # the moving statistics as they were, as on the one-call route.
    from keras_bn.backend.torch import native_kernel

    x = _x((40, 8, 8, 3))
    x[17, 3, 4, 1] = float("nan")
    assert native_kernel._rows(x.movedim(-1, 1)) is not None
    bn = keras_bn.BatchNorm()
    bn.build(x.shape)
    bn.moving_mean.assign([1.0, 2.0, 3.0])
    before = [bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()]
    assert tuple(bn(x, training=True).shape) == (40, 8, 8, 3)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), before[0])
    np.testing.assert_array_equal(bn.moving_variance.numpy(), before[1])
    assert bn.refused_batches == 1
