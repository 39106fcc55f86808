"""flashattn as an attention implementation of Hugging Face transformers::

    import flashattn.integrations.transformers as fa_hf
    name = fa_hf.register()                            # adds "fattn" to transformers' registries
    model = AutoModelForCausalLM.from_config(config, attn_implementation=name)

The name has no "flash" in it on purpose: transformers treats any attn_implementation containing
"flash" as a request for its own flash-attention loaders (flash_attn or a hub kernel).

transformers hands the attention function (batch, heads, seqlen, head_dim) tensors and expects
(batch, seqlen, heads, head_dim) back: flashattn's own layout, so only views are taken. The causal
mask is flash_attn's bottom-right one, which is what a decoder with a KV cache needs (the new
queries are the last positions). What transformers' own flash-attention path supports, this does:
- padding masks: the mask function registered with it is transformers' flash-attention one, which
  passes None without padding and the 2D (batch, seqlen_k) padding mask otherwise; the batch is then
  unpadded into packed sequences, run through flash_attn_varlen_func, and padded back (zeros at padded
  query positions). With a KV cache the queries are the last seqlen_q positions of the mask;
- padding-free packed batches: cu_seq_lens_q/k + max_length_q/k in the kwargs (as transformers'
  DataCollatorWithFlattening passes them), or position_ids that restart at 0 within one row;
- sliding_window (key j visible iff i - j < sliding_window), softcap, and s_aux (attention sinks,
  gpt-oss), all differentiable through flashattn's backward.
"""

from __future__ import annotations

from .._interface import flash_attn_func, flash_attn_varlen_func

NAME = "fattn"


def _window(sliding_window, causal):
    if sliding_window is None:
        return (-1, -1)
    return (sliding_window - 1, 0 if causal else sliding_window - 1)


def _cu_seqlens(lengths):
    import torch

    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def _packed_from_position_ids(position_ids):
    """cu_seqlens of one packed row whose position ids restart at 0 for each sequence, or None."""
    import torch

    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    pos = position_ids[0]
    starts = torch.nonzero(pos == 0).flatten()
    if starts.numel() <= 1:
        return None
    ends = torch.cat([starts[1:], torch.tensor([pos.numel()], device=pos.device)])
    lengths = (ends - starts).to(torch.int32)
    return _cu_seqlens(lengths), int(lengths.max())


def _unpadded(q, k, v, attention_mask, **opts):
    """Attention over a padded batch: valid keys are attention_mask's ones; the queries are the last
    seqlen_q positions of each row. Unpad -> flash_attn_varlen_func -> pad back."""
    import torch

    batch, seqlen_q, heads, _ = q.shape
    seqlen_k = k.shape[1]
    mask_k = attention_mask[:, -seqlen_k:].bool()
    mask_q = mask_k[:, -seqlen_q:]
    lens_k, lens_q = mask_k.sum(1, dtype=torch.int32), mask_q.sum(1, dtype=torch.int32)
    idx_k = torch.nonzero(mask_k.flatten()).flatten()
    idx_q = torch.nonzero(mask_q.flatten()).flatten()
    out = flash_attn_varlen_func(q.reshape(batch * seqlen_q, heads, -1)[idx_q],
                                 k.reshape(batch * seqlen_k, k.shape[2], -1)[idx_k],
                                 v.reshape(batch * seqlen_k, v.shape[2], -1)[idx_k],
                                 _cu_seqlens(lens_q), _cu_seqlens(lens_k), int(lens_q.max()), int(lens_k.max()),
                                 **opts)
    full = out.new_zeros(batch * seqlen_q, heads, out.shape[-1])
    full = full.index_put((idx_q,), out)
    return full.view(batch, seqlen_q, heads, -1)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                      softcap=None, is_causal=None, s_aux=None, **kwargs):
    """transformers' attention-function interface -> (attn_output (batch, seqlen, heads, d_v), None)."""
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    opts = dict(dropout_p=dropout, softmax_scale=scaling, causal=causal, window_size=_window(sliding_window, causal),
                softcap=0.0 if softcap is None else softcap, sinks=s_aux)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    packed = None
    if cu_q is not None and cu_k is not None:
        packed = (cu_q, cu_k, kwargs.get("max_length_q"), kwargs.get("max_length_k"))
    elif attention_mask is None and q.shape[0] == 1:
        found = _packed_from_position_ids(kwargs.get("position_ids"))
        if found is not None and q.shape[1] == k.shape[1]:
            packed = (found[0], found[0], found[1], found[1])
    if packed is not None:  # padding-free: one row of packed sequences
        import torch

        cu_q, cu_k, max_q, max_k = packed
        cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
        max_q = int(max_q) if max_q is not None else int((cu_q[1:] - cu_q[:-1]).max())
        max_k = int(max_k) if max_k is not None else int((cu_k[1:] - cu_k[:-1]).max())
        out = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, max_q, max_k,
                                     **opts)
        return out.unflatten(0, q.shape[:2]), None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            from .._checks import error

            raise error("attention_mask", "None or a 2D (batch, seqlen_k) padding mask (transformers' "
                        "flash-attention mask function)", f"shape {list(attention_mask.shape)}")
        return _unpadded(q, k, v, attention_mask, **opts), None
    return flash_attn_func(q, k, v, **opts), None


def register(name: str = NAME) -> str:
    """Registers attention_forward (and transformers' flash-attention mask function) under `name`."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    except ImportError as e:
        raise ImportError("flashattn.integrations.transformers.register() needs transformers (pip install "
                          f"transformers); importing it failed: {e}") from None
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name
