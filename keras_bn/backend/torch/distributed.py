"""Statistics across the default torch.distributed process group."""

import torch

from keras_bn import ops


def active():
    """Whether a process group of more than one process is initialized."""
    d = torch.distributed
    return d.is_available() and d.is_initialized() and d.get_world_size() > 1


def all_sum(t):
    """`t` summed over every process, differentiably: the backward pass
    sums the cotangents the same way, which is what a loss on the global
    batch needs (each process's x reaches every output through the
    statistics)."""
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t)


def averaged(stats):
    """Each process's own (C,) batch statistics, averaged over the
    processes that have a batch, by one all-reduce of a few rows that
    carries no gradient: with `synchronized=False` the moving statistics
    then follow the same values everywhere, as a TensorFlow replica's do
    (MirroredStrategy averages their updates). The count is the average
    count (what n / (n - 1) reads); no process with a batch gives count 0,
    which the bad-batch guard refuses; a non-finite statistic anywhere is
    non-finite everywhere, so every process refuses the step alike."""
    with torch.no_grad():
        has = stats.count > 0
        zero = torch.zeros_like(stats.mean)
        rows = torch.stack([has.to(zero.dtype), torch.where(has, stats.count, zero),
                            torch.where(has, stats.mean, zero),
                            torch.where(has, stats.variance.to(zero.dtype), zero)])
        torch.distributed.all_reduce(rows)
        processes = rows[0].clamp(min=1)
        return ops.BatchStats(*(rows[i] / processes for i in (1, 2, 3)))
