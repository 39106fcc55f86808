"""flashattn as a transformers attention implementation: a small Llama-style and GPT-2-style model from a
config with random weights (no downloads). Logits and one training step's gradients against the eager
implementation: fp32 on the CPU, bf16 on CUDA (docs/DESIGN.md §5: within twice the bf16 eager model's error
against the fp32 eager model, plus atol)."""

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import flashattn.integrations.transformers as fa_hf  # noqa: E402
from torch_reference import devices, grads, max_err  # noqa: E402

NAME = fa_hf.register()


def llama_config():
    return transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def gpt2_config():
    return transformers.GPT2Config(vocab_size=256, n_embd=256, n_layer=2, n_head=4, n_positions=256,
                                   attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)


MODELS = {
    "llama": (llama_config, transformers.LlamaForCausalLM),
    "gpt2": (gpt2_config, transformers.GPT2LMHeadModel),
}


def build(kind, implementation, state, device, dtype):
    config_fn, cls = MODELS[kind]
    model = cls._from_config(copy.deepcopy(config_fn()), attn_implementation=implementation)
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).train()


def loss_and_grads(model, ids, labels):
    logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    gradients = grads(loss, [p for _, p in model.named_parameters() if p.requires_grad], None)
    return logits, dict(zip(names, gradients))


def models(kind, device):
    """(ours, eager, exact): the same random weights with flashattn and eager attention in the test dtype,
    and eager in fp32 as the reference."""
    torch.manual_seed(0)
    config_fn, cls = MODELS[kind]
    state = cls._from_config(copy.deepcopy(config_fn()), attn_implementation="eager").state_dict()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    ours = build(kind, NAME, state, device, dtype)
    assert ours.config._attn_implementation == NAME
    return ours, build(kind, "eager", state, device, dtype), build(kind, "eager", state, device, torch.float32)


def batch(device):
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, 256, (2, 96), generator=g).to(device),
            torch.randint(0, 256, (2, 96), generator=g).to(device))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_logits_match_eager(kind, device):
    ours, eager, exact = models(kind, device)
    ids, _ = batch(device)
    with torch.no_grad():
        ref, base, got = exact(ids).logits, eager(ids).logits, ours(ids).logits
    assert max_err(got, ref) <= 2 * max_err(base, ref) + 1e-4 * ref.abs().max().item(), \
        (max_err(got, ref), max_err(base, ref))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_training_step_matches_eager(kind, device):
    ours, eager, exact = models(kind, device)
    ids, labels = batch(device)
    _, g_ours = loss_and_grads(ours, ids, labels)
    _, g_ref = loss_and_grads(exact, ids, labels)
    _, g_base = loss_and_grads(eager, ids, labels)
    for name, r in g_ref.items():  # every parameter's gradient
        scale = r.abs().max().item()
        err, base_err = max_err(g_ours[name], r), max_err(g_base[name], r)
        assert err <= 2 * base_err + 1e-4 * max(scale, 1e-6), f"{name}: {err:.3g} vs eager {base_err:.3g}"
    # and the step itself: plain SGD on both copies leaves models that still agree
    with torch.no_grad():
        for model, model_grads in ((ours, g_ours), (eager, g_base), (exact, g_ref)):
            for n, p in model.named_parameters():
                p -= 0.1 * model_grads[n].to(p.dtype)
        ref, base, got = exact(ids).logits, eager(ids).logits, ours(ids).logits
    assert max_err(got, ref) <= 2 * max_err(base, ref) + 1e-4 * ref.abs().max().item()


def decode_logits(model, ids, prompt):
    """Prefill ids[:, :prompt] with a KV cache, then feed the rest one token at a time: last logits of each step."""
    out = model(ids[:, :prompt], use_cache=True)
    logits, past = [out.logits[:, -1]], out.past_key_values
    for t in range(prompt, ids.shape[1]):
        out = model(ids[:, t:t + 1], past_key_values=past, use_cache=True)
        logits.append(out.logits[:, -1])
        past = out.past_key_values
    return torch.stack(logits, 1)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_decoding_with_kv_cache_matches_eager(kind, device):
    """One query over the cache per step (flash_attn's bottom-right causal alignment)."""
    ours, eager, exact = (m.eval() for m in models(kind, device))
    ids, _ = batch(device)
    with torch.no_grad():
        ref, base, got = (decode_logits(m, ids[:, :40], 24) for m in (exact, eager, ours))
    assert max_err(got, ref) <= 2 * max_err(base, ref) + 1e-4 * ref.abs().max().item(), \
        (max_err(got, ref), max_err(base, ref))
    if device == "cpu":  # fp32 throughout: greedy generation picks the same tokens
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(ids[:1, :12], **kwargs), eager.generate(ids[:1, :12], **kwargs))


def test_padding_mask_is_refused():
    ours = transformers.LlamaForCausalLM._from_config(llama_config(), attn_implementation=NAME)
    ids = torch.randint(0, 256, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(NotImplementedError, match="'attention_mask'"):
        ours(ids, attention_mask=mask)
    ours(ids, attention_mask=torch.ones(2, 8, dtype=torch.long))  # no padding: no mask reaches us
