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


def window_pair(window_size, causal=False):
    """(left, right) ints from flash_attn's window_size: any pair (tuple, list, 2-element tensor or array);
    -1 = unbounded. With causal=True the right window is 0, as flash_attn sets it."""
    if window_size is NO_WINDOW:  # the functions' default (this object): nothing to check
        return (-1, 0) if causal else (-1, -1)
    try:
        if hasattr(window_size, "tolist"):  # a tensor or an array
            window_size = window_size.tolist()
        left, right = window_size
        left, right = int(left), int(right)
    except (TypeError, ValueError):
        raise error("window_size", "a pair (left, right) of ints, -1 = unbounded", repr(window_size)) from None
    return (left, 0) if causal else (left, right)


class AttentionOptions:
    """The attention options of one call, as every route takes them (one object instead of a growing
    argument tuple). window_left/right already hold causal's right bound."""

    __slots__ = ("softmax_scale", "causal", "window_left", "window_right", "softcap", "alibi_slopes", "sinks",
                 "deterministic", "num_splits")

    def __init__(self, softmax_scale=None, causal=False, window_left=-1, window_right=-1, softcap=0.0,
                 alibi_slopes=None, sinks=None, deterministic=False, num_splits=0):
        self.softmax_scale = None if softmax_scale is None else float(softmax_scale)
        self.causal = bool(causal)
        self.window_left = window_left
        self.window_right = window_right
        self.softcap = float(softcap)
        self.alibi_slopes = alibi_slopes
        self.sinks = sinks
        self.deterministic = bool(deterministic)
        self.num_splits = int(num_splits)

    @staticmethod
    def of(softmax_scale, causal, window_size, softcap, alibi_slopes, sinks=None, deterministic=False, num_splits=0):
        """From flash_attn's arguments. (On every decode step: the default window skips window_pair.)"""
        o = AttentionOptions.__new__(AttentionOptions)
        o.softmax_scale = None if softmax_scale is None else float(softmax_scale)
        o.causal = bool(causal)
        if window_size is NO_WINDOW:
            o.window_left, o.window_right = -1, (0 if o.causal else -1)
        else:
            o.window_left, o.window_right = window_pair(window_size, o.causal)
        o.softcap = float(softcap)
        o.alibi_slopes = alibi_slopes
        o.sinks = sinks
        o.deterministic = bool(deterministic)
        o.num_splits = int(num_splits)
        return o


def one_of(v2_value, v3_value, v2_name, v3_name):
    """flash_attn v2's and v3's names for one argument (block_table / page_table): either, not both."""
    if v2_value is not None and v3_value is not None:
        raise error(v3_name, f"{v2_name} or {v3_name} (the same argument under flash_attn v2's and v3's names), "
                    "not both", "both")
    return v3_value if v3_value is not None else v2_value


def scale_or_none(softmax_scale):
    return None if softmax_scale is None else float(softmax_scale)
