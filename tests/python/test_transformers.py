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


def gpt_oss_config():
    """gpt-oss-like: attention sinks (s_aux), sliding-window layers alternating with full ones, GQA."""
    return transformers.GptOssConfig(vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=8,
                                     num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                                     layer_types=["sliding_attention", "full_attention"])


GENERATORS = {
    "llama": (llama_config, transformers.LlamaForCausalLM),
    "gpt_oss": (gpt_oss_config, transformers.GptOssForCausalLM),
}


def pair(kind):
    """(ours, eager) in fp32 on the CPU with the same random weights; sinks nonzero (their init is 0)."""
    torch.manual_seed(0)
    config_fn, cls = GENERATORS[kind]
    eager = cls._from_config(config_fn(), attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in eager.named_parameters():
            if name.endswith("sinks"):
                p.normal_(0, 2)
    ours = cls._from_config(config_fn(), attn_implementation=NAME).eval()
    ours.load_state_dict(eager.state_dict())
    return ours, eager


def left_padded(batch_lengths, total):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 256, (len(batch_lengths), total), generator=g)
    mask = torch.zeros(len(batch_lengths), total, dtype=torch.long)
    for b, n in enumerate(batch_lengths):
        mask[b, total - n:] = 1
        ids[b, :total - n] = 0
    return ids, mask


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_padded_batch_logits_match_eager(kind):
    """A left-padded batch (unpad -> varlen -> pad back): logits at every real position match eager."""
    ours, eager = pair(kind)
    ids, mask = left_padded([12, 7, 3], 12)
    with torch.no_grad():
        got, ref = ours(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits
    real = mask.bool()
    assert max_err(got[real], ref[real]) <= 1e-4 * ref[real].abs().max().item()


@pytest.mark.parametrize("kind", sorted(GENERATORS))
@pytest.mark.parametrize("padded", [False, True])
def test_greedy_generate_matches_eager(kind, padded):
    """generate() with its KV cache, on a batch with or without left padding: eager's tokens exactly (fp32)."""
    ours, eager = pair(kind)
    ids, mask = left_padded([10, 6, 4] if padded else [10, 10, 10], 10)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kwargs), eager.generate(ids, **kwargs))


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_padding_free_packed_batch_matches_separate_runs(kind):
    """Sequences packed into one row, position_ids restarting at 0 (DataCollatorWithFlattening's layout):
    each sequence's logits equal its own unpacked run through eager."""
    ours, eager = pair(kind)
    g = torch.Generator().manual_seed(3)
    lengths = [9, 4, 12]
    seqs = [torch.randint(1, 256, (1, n), generator=g) for n in lengths]
    packed = torch.cat(seqs, 1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        got = ours(packed, position_ids=position_ids).logits[0]
        start = 0
        for seq, n in zip(seqs, lengths):
            ref = eager(seq).logits[0]
            assert max_err(got[start:start + n], ref) <= 1e-4 * ref.abs().max().item()
            start += n


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_gradients_through_padding_and_sinks(kind):
    """A training step on a padded batch: every parameter's gradient (the sinks' included) matches eager."""
    ours, eager = pair(kind)
    ours.train(), eager.train()
    ids, mask = left_padded([12, 5], 12)
    # Only logits at real positions may count: label t is scored on the logits at t - 1, so the first real
    # token of a padded row is no label (a padded row's output is implementation-defined: eager averages
    # over every key there, flash_attn gives zeros).
    prev_real = torch.nn.functional.pad(mask[:, :-1], (1, 0))
    labels = ids.masked_fill((mask == 0) | (prev_real == 0), -100)
    grads_of = {}
    for name, model in (("ours", ours), ("eager", eager)):
        loss = model(ids, attention_mask=mask, labels=labels).loss
        params = [p for p in model.parameters() if p.requires_grad]
        grads_of[name] = dict(zip([n for n, p in model.named_parameters() if p.requires_grad],
                                  torch.autograd.grad(loss, params, allow_unused=True)))
    for name, ref in grads_of["eager"].items():
        got = grads_of["ours"][name]
        if ref is None:
            continue
        assert max_err(got, ref) <= 1e-4 * max(ref.abs().max().item(), 1e-6), name
