"""flashattn as an attention implementation of Hugging Face transformers::

    import flashattn.integrations.transformers as fa_hf
    name = fa_hf.register()                            # adds "fattn" to transformers' registries
    model = AutoModelForCausalLM.from_config(config, attn_implementation=name)

The name has no "flash" in it on purpose: transformers treats any attn_implementation containing
"flash" as a request for its own flash-attention loaders (flash_attn or a hub kernel).

transformers hands the attention function (batch, heads, seqlen, head_dim) tensors and expects
(batch, seqlen, heads, head_dim) back: flashattn's own layout, so only views are taken. The causal
mask is flash_attn's bottom-right one, which is what a decoder with a KV cache needs (the new
queries are the last positions). Padding masks are not supported yet: the mask function registered
with it is transformers' flash-attention one, which passes None when there is no padding and the
2D padding mask otherwise; this function then raises NotImplementedError rather than ignore it.
"""

from __future__ import annotations

from .._checks import unsupported
from .._interface import flash_attn_func

NAME = "fattn"


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                      softcap=None, is_causal=None, s_aux=None, **kwargs):
    """transformers' attention-function interface -> (attn_output (batch, seqlen, heads, d_v), None)."""
    if attention_mask is not None:
        raise unsupported("attention_mask", "a padding mask (pass unpadded batches, or use flash_attn_varlen_func)")
    if s_aux is not None:
        raise unsupported("s_aux", "attention sinks")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = (-1, -1)
    if sliding_window is not None:  # transformers' sliding window: key j visible iff i - j < sliding_window
        window = (sliding_window - 1, 0 if causal else sliding_window - 1)
    out = flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dropout_p=dropout,
                          softmax_scale=scaling, causal=bool(causal), window_size=window,
                          softcap=0.0 if softcap is None else softcap)
    return out, None


def register(name: str = NAME) -> str:
    """Registers attention_forward (and transformers' flash-attention mask function) under `name`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name
