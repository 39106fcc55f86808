"""Argument checks shared by the numpy and torch paths: the ones that must happen before outputs can be
allocated (the C++ library checks everything else and names the argument itself)."""

from __future__ import annotations


def error(argument, expected, got):
    """ValueError with flashattn::Error's wording (the extension turns those into ValueError too)."""
    return ValueError(f"flashattn: invalid argument '{argument}': expected {expected}, got {got}")


def unsupported(argument, what):
    """NotImplementedError for an argument whose feature the kernels do not have yet."""
    return NotImplementedError(f"flashattn: argument '{argument}': {what} is not supported yet")


def check_rank(x, name, rank, layout):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise error(name, "a numpy array or a torch tensor", type(x).__name__)
    if len(x.shape) != rank:
        raise error(name, f"rank {rank} {layout}", f"rank {len(x.shape)} {list(x.shape)}")


def check_dropout(dropout_p, name="dropout_p"):
    if dropout_p != 0.0:
        raise unsupported(name, f"dropout ({name}={dropout_p!r}; only 0.0 runs)")


NO_WINDOW = (-1, -1)


def window_pair(window_size):
    """(left, right) ints from flash_attn's window_size; -1 = unbounded."""
    if window_size is NO_WINDOW:  # the functions' default (this object): nothing to check
        return -1, -1
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise error("window_size", "a pair (left, right) of ints, -1 = unbounded", repr(window_size))
    return int(window_size[0]), int(window_size[1])


def scale_or_none(softmax_scale):
    return None if softmax_scale is None else float(softmax_scale)
