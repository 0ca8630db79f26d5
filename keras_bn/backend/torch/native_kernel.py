"""Training- and inference-mode batch norm by torch's native kernel.

`torch.native_batch_norm` is one fused pass forward and one backward on a
CPU or GPU, with its own derivative to any order (PyTorch's batch-norm
double backward). It takes the channels on dimension 1: a channels-last
input is handed over as a permuted view (for 4-D and 5-D, the
channels_last memory format, which the CPU kernel reads as fast as NCHW),
so nothing is copied. Its CPU statistics sum in float32 in one pass, which
at a large offset loses the variance entirely (440 times the truth for a
256x64 batch at 1e6 + N(0, 0.1)): as with TensorFlow's fused kernel, a
channel whose mean lies far from zero is first shifted by a sample mean.
For channels-last memory (and 2-D inputs) those float32 sums also grow
with the batch (0/1 data: 1.1e-4 relative at 16384 values per channel,
5e-3 at 2^20), so such batches are measured in groups (`_grouped_moments`).
"""

import torch

from keras_bn import ops


# A dense [N, C] batch with many channels runs faster through the kernel
# as [N, C, 1] (measured on a 2-core AMD EPYC, torch 2.13, forward and
# backward: 256x4096 3.2 -> 1.2 ms, 512x2048 2.8 -> 1.3 ms), while below
# these sizes the 2-D form is faster (1024x1024 1.2 against 1.7 ms,
# 32x4096 0.18 against 0.21 ms, 4096x256 0.8 against 2.3 ms).
_WIDE_DENSE = (256, 2048)


def _channels_first(x, axis):
    """x as a view with its channels on dimension 1, and the inverse."""
    if x.dim() == 2 and x.shape[0] >= _WIDE_DENSE[0] and x.shape[1] >= _WIDE_DENSE[1]:
        return x.unsqueeze(-1), lambda y: y.squeeze(-1)
    if axis == 1:
        return x, lambda y: y
    view = torch.movedim(x, axis, 1)
    return view, lambda y: torch.movedim(y, 1, axis)


def _known_false(flag):
    """Whether a scalar bool tensor is known to be False: eagerly, its
    value; under torch.compile, never (`ops.static_value` declines to read
    a traced tensor, which would break the graph), so the pass it would
    skip is always taken there."""
    known = ops.static_value(flag)
    return known is not None and not bool(known)


def _sample_shift(view):
    """Per channel, the shift the kernel's input gets: the mean of the
    batch's first rows (at least `ops.SHIFT_SAMPLE` values per channel)
    where it is offset-dominated against their spread (`ops.offset_dominated`),
    else 0; None where no channel needs one (most batches: no pass)."""
    per_row = max(1, view[0].numel() // max(1, view.shape[1]))
    rows = -(-ops.SHIFT_SAMPLE // per_row)
    sample = view[:rows].detach().float()
    dims = [d for d in range(view.dim()) if d != 1]
    # Two plain reductions: torch.var_mean (Welford) took 1 ms for a 64x4096
    # sample on a 2-core CPU, these 0.05 ms.
    mean = sample.mean(dims, keepdim=True)
    variance = (sample - mean).square().mean(dims)
    mean = mean.reshape(-1)
    dominated = ops.offset_dominated(mean, variance)
    if _known_false(dominated.any()):
        return None
    return torch.where(dominated, mean, torch.zeros_like(mean))


# As TensorFlow's fused kernel (fused_kernel.SUM_LIMIT): no float32 running
# sum of the statistics longer than this many values per channel. torch's
# kernel for channels-first contiguous memory sums in double and is exact
# (7e-8 at 2^20 values per channel of 0/1 data); its channels-last and 2-D
# kernels sum in float32.
SUM_LIMIT = 2048


def _rows(seen):
    """The [A, C] rows of a kernel input whose channels are its innermost
    memory dimension and which torch's float32-summing kernels read (2-D,
    or channels-last memory); None for other inputs and small batches."""
    if seen.dim() > 2 and seen.is_contiguous():
        return None  # the double-summing kernel
    channels_last = torch.movedim(seen, 1, -1)
    if not channels_last.is_contiguous() or seen.numel() <= SUM_LIMIT * seen.shape[1]:
        return None
    return channels_last.reshape(-1, seen.shape[1])


def _variance_of(invstd, epsilon):
    """The variance 1 / invstd^2 - epsilon the kernel normalized with, in
    float64 (within a few float32 ulps of variance + epsilon), floored at 0."""
    return torch.clamp(invstd.double().pow(-2) - epsilon, min=0.0)


def _grouped_moments(rows, epsilon):
    """(mean, biased variance) per channel of [A, C] rows, float32, with no
    float32 sum longer than SUM_LIMIT values: the rows read as [A/k, k*C]
    (a free reshape) by one call of the kernel's statistics, the last
    A mod k rows by another, the parts merged exactly in float64 (Chan's
    formula, as `ops.merge_moments`)."""
    total, channels = rows.shape
    groups = -(-total // SUM_LIMIT)
    length = total // groups
    parts = [(rows[:groups * length].reshape(length, groups * channels), groups)]
    if total > groups * length:
        parts.append((rows[groups * length:], 1))
    means, variances = [], []
    for part, k in parts:
        if part.dtype in (torch.float32, torch.float64):
            # The kernel's statistics alone (no output written): mean and
            # biased variance, in the input's dtype.
            mean, variance = torch.batch_norm_update_stats(part, None, None, 0.0)
        else:
            # Half precision: only the kernel's mixed-dtype form (a float32
            # weight) keeps its statistics in float32.
            weight = torch.ones(part.shape[1], dtype=torch.float32, device=part.device)
            _, mean, invstd = torch.native_batch_norm(part, weight, None, None, None, True,
                                                      0.0, epsilon)
            variance = _variance_of(invstd, epsilon)
        means.append(mean.double().reshape(k, channels))
        variances.append(variance.double().reshape(k, channels))
    # Chan's formula, in torch itself: a few (k, C) ops, where keras.ops'
    # dispatch would cost more than the kernel call at small batches.
    # Every group has `length` rows; the remainder, if any, its own count.
    means, variances = torch.cat(means), torch.cat(variances)
    weights = torch.full((means.shape[0], 1), float(length), dtype=torch.float64,
                         device=rows.device)
    if len(parts) > 1:
        weights[-1] = float(total - groups * length)
    weights = weights / float(total)
    mean = (weights * means).sum(0)
    variance = (weights * (variances + (means - mean).square())).sum(0)
    return mean.float(), variance.float()


class _GroupedBatchNorm(torch.autograd.Function):
    """Training-mode batch norm with given statistics: the kernel's
    inference form forward, its training-mode backward (which treats the
    statistics as functions of the input) given the same statistics.
    `native_batch_norm_backward` has its own derivative, so this is
    differentiable to every order as the native kernel is."""

    @staticmethod
    def forward(ctx, seen, gamma, beta, mean, variance, invstd, epsilon):
        y = torch.native_batch_norm(seen, gamma, beta, mean, variance, False, 0.0, epsilon)[0]
        ctx.save_for_backward(seen, gamma, mean, invstd)
        ctx.epsilon, ctx.has_beta = epsilon, beta is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        seen, gamma, mean, invstd = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], gamma is not None and ctx.needs_input_grad[1],
                ctx.has_beta and ctx.needs_input_grad[2]]
        dx, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
            dy, seen, gamma, None, None, mean, invstd, True, ctx.epsilon, mask)
        return dx, dgamma, dbeta, None, None, None, None


def train(x, *, gamma, beta, epsilon, axis):
    """(y, BatchStats) by the native kernel; `axis` a non-negative int.

    The kernel reports the batch mean and 1 / sqrt(variance + epsilon); the
    variance is recovered from the latter in float64, to within a few
    float32 ulps of variance + epsilon (so relative to the variance itself
    where it is not far below epsilon), and floored at 0.
    """
    view, back = _channels_first(x, axis)
    if gamma is None and x.dtype in (torch.float16, torch.bfloat16):
        # Without a float32 weight the kernel keeps a half-precision
        # input's statistics in that dtype (4.6e-3 off in bfloat16): ones,
        # which change nothing else.
        gamma = torch.ones(view.shape[1], dtype=torch.float32, device=x.device)
    shift = _sample_shift(view)
    seen = view
    if shift is not None:
        # Subtracting values near the data is exact (Sterbenz), and batch
        # norm doesn't see a per-channel shift; the gradient passes as is.
        seen = view - shift.to(view.dtype).reshape([1, -1] + [1] * (view.dim() - 2))
    rows = _rows(seen.detach())
    if rows is None:
        y, mean, invstd = torch.native_batch_norm(
            seen, gamma, beta, None, None, True, 0.0, epsilon)
        mean = mean.detach()
        variance = _variance_of(invstd.detach(), epsilon)
    else:
        mean, variance = _grouped_moments(rows, epsilon)
        invstd = torch.rsqrt(variance.double() + epsilon).float()
        y = _GroupedBatchNorm.apply(seen, gamma, beta, mean, variance, invstd, epsilon)
    if shift is not None:
        mean = mean + shift
    stat_dtype = ops.statistics_dtype(x.dtype)
    count = torch.full_like(mean, view.numel() // max(1, view.shape[1]), dtype=mean.dtype)
    stats = ops.BatchStats(*(t.to(getattr(torch, stat_dtype)) for t in (count, mean, variance)))
    return back(y), stats


def infer(x, *, mean, variance, gamma, beta, epsilon, axis):
    """Inference with given (C,) statistics, exact at any offset.

    The native kernel computes x * a + (beta - mean * a), which rounds x * a
    at the offset's magnitude (4e-4 off at 1e4 + N(0, 1)). Where some
    channel's mean is offset-dominated (`ops.offset_dominated`, read from
    the (C,) statistics) it is given x - mean and a zero mean instead: two
    passes. Elsewhere the rounding is within ten float32 ulps of the
    output, and the kernel's one pass serves. Under torch.compile, where
    reading the statistics would break the graph, always centred first.
    """
    view, back = _channels_first(x, axis)
    if _known_false(ops.offset_dominated(mean, variance).any()):
        return back(torch.native_batch_norm(view, gamma, beta, mean, variance,
                                            False, 0.0, epsilon)[0])
    # In the statistics dtype: a half-precision mean would be rounded first.
    centred = view.to(mean.dtype) - mean.reshape([1, -1] + [1] * (view.dim() - 2))
    y = torch.native_batch_norm(centred, gamma, beta, torch.zeros_like(mean), variance,
                                False, 0.0, epsilon)[0]
    return back(y.to(x.dtype))
