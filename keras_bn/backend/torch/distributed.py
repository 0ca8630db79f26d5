"""Statistics across the default torch.distributed process group."""

import torch


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
