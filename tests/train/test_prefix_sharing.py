"""Prefix sharing (issue 16): the prompt-shared layout, its mask, its errors, and its exactness.

Exactness is checked two ways on tiny random-init Llama and Qwen2 models (GQA; Qwen2 has q/k/v
biases), with the block-wise kernel (``prefix_sdpa``) and the dense masks (``sdpa``, ``eager``),
against both unshared layouts of ``collate`` (padded and packed):

* float64 model, a float64 linear functional of the loss-position hidden states: hidden states
  and every parameter gradient agree to float64 rounding (the shared prompt's last position is one
  tensor row gathered by every response, so its gradient is the sum over responses);
* float32 model through the trainer's ``Objective`` (fused dftkern losses): loss and every
  parameter gradient agree to float32 rounding, for every trainer loss, with and without
  gradient checkpointing, one group per row and all groups packed in one row.
"""

from __future__ import annotations

import pytest
import torch

from dftkern import DFTState
from dftkern.train.data import IGNORE_INDEX, Row, TrainExample, collate
from dftkern.train.model import backbone_hidden, lm_head_params
from dftkern.train.objectives import LOSS_NAMES, Objective, ObjectiveConfig
from dftkern.train.prefix_sharing import (
    PREFIX_SDPA,
    SharedPromptUnsupported,
    check_attention_support,
    check_shared_prompt_support,
    collate_shared,
    dense_shared_mask,
    prepare_shared_prompt_model,
    shared_attention_mask,
    shared_forward,
    use_prefix_sdpa,
)

VOCAB = 61


def tiny_model(family: str, *, attn: str = "sdpa", dtype=torch.float32, seed: int = 0, **overrides):
    """A 2-layer random-init causal LM: hidden 32, 4 query / 2 key-value heads, vocabulary 61.

    ``attn="prefix_sdpa"``: loaded with SDPA, then switched to the block-wise kernel."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False)
    kwargs.update(overrides)
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa" if attn == "prefix_sdpa" else attn)
    if attn == "prefix_sdpa":
        use_prefix_sdpa(model)
    return model.to(dtype).train()


def make_examples(shapes=((5, (3, 4, 1)), (3, (2, 1, 5)), (1, (4, 2, 3))), seed: int = 1) -> list[TrainExample]:
    """Groups of rows sharing a prompt: ``shapes`` = ((prompt_len, (response lengths...)), ...)."""
    gen = torch.Generator().manual_seed(seed)

    def tokens(n):
        return tuple(torch.randint(3, VOCAB, (n,), generator=gen).tolist())

    examples = []
    for index, (p, lengths) in enumerate(shapes):
        prompt = tokens(p)
        rows = [Row(prompt + tokens(n), p) for n in lengths]
        ref = (-torch.rand(len(rows), generator=gen) * 10 - 5).tolist()
        rewards = torch.rand(len(rows), generator=gen).tolist()
        examples.append(TrainExample(index, f"ex{index}", rows, ref_logps=ref, rewards=rewards))
    return examples


# ---------------------------------------------------------------------------------------------
# Layout and mask
# ---------------------------------------------------------------------------------------------


def test_layout_of_one_group_by_hand():
    prompt, r0, r1 = (11, 12, 13), (21, 22), (31, 32, 33)
    example = TrainExample(7, "g", [Row(prompt + r0, 3), Row(prompt + r1, 3)], ref_logps=[-1.0, -2.0],
                           rewards=[0.5, 0.25])
    batch = collate_shared([example], pad_token_id=0, with_ref_logps=True, with_rewards=True)
    assert batch.input_ids.tolist() == [[11, 12, 13, 21, 22, 31, 32, 33]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]
    assert batch.segment_ids.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]
    # row 0 predicts 21 from 13 (pos 2) and 22 from 21 (pos 3); row 1 predicts 31, 32, 33 from 13, 31, 32
    assert batch.gather_index.tolist() == [2, 3, 2, 5, 6]
    loss = batch.loss_batch
    assert loss.packed and loss.labels.tolist() == [21, 22, 31, 32, 33]
    assert loss.cu_seqlens.tolist() == [0, 2, 5] and loss.cu_seqlens.dtype == torch.int32
    assert loss.input_ids.tolist() == [[13, 21, 13, 31, 32]] and loss.position_ids.tolist() == [[2, 3, 2, 3, 4]]
    assert loss.example_ids.tolist() == [7] and loss.rows_per_example == 2
    assert loss.ref_logps.tolist() == [-1.0, -2.0] and loss.rewards.tolist() == [[0.5, 0.25]]
    assert batch.num_tokens == 11 and batch.backbone_tokens == 8 and batch.max_row_length == 6


@pytest.mark.parametrize("pack_groups", [False, True])
@pytest.mark.parametrize("rows", [None, [0], [2, 0]])
def test_loss_view_matches_collate(pack_groups, rows):
    """The loss view's labels are collate's labels with the ignored positions dropped, row by row;
    ids, reference log-probs and rewards are collate's."""
    examples = make_examples()
    plain = collate(examples, pad_token_id=0, packed=False, rows=rows, with_ref_logps=True, with_rewards=True)
    shared = collate_shared(examples, pad_token_id=0, rows=rows, with_ref_logps=True, with_rewards=True,
                            pack_groups=pack_groups)
    loss = shared.loss_batch
    bounds = loss.cu_seqlens.tolist()
    assert len(bounds) == plain.labels.shape[0] + 1
    for r, labels in enumerate(plain.labels):
        assert loss.labels[bounds[r]:bounds[r + 1]].tolist() == labels[labels != IGNORE_INDEX].tolist()
    assert torch.equal(loss.example_ids, plain.example_ids) and loss.rows_per_example == plain.rows_per_example
    assert torch.equal(loss.ref_logps, plain.ref_logps) and torch.equal(loss.rewards, plain.rewards)
    assert shared.num_tokens == plain.num_tokens
    # every loss position holds the token whose successor is the label: the unshared row's token there
    flat = shared.input_ids.reshape(-1)[shared.gather_index]
    for r in range(plain.labels.shape[0]):
        valid = (plain.labels[r] != IGNORE_INDEX).nonzero().flatten()
        assert flat[bounds[r]:bounds[r + 1]].tolist() == plain.input_ids[r, valid].tolist()


@pytest.mark.parametrize("pack_groups", [False, True])
def test_mask_is_the_union_of_the_unshared_causal_masks(pack_groups):
    """Brute force from the definition: shared position k is visible from q exactly when both belong
    to one unshared row and k comes no later than q in that row (padding: only padding, causally)."""
    examples = make_examples()
    batch = collate_shared(examples, pad_token_id=0, pack_groups=pack_groups)
    mask = dense_shared_mask(batch)
    b, s = batch.input_ids.shape
    # the unshared rows each shared position belongs to, as (group, row) pairs
    members = [[set() for _ in range(s)] for _ in range(b)]
    offset = 0
    for g, example in enumerate(examples):
        line = 0 if pack_groups else g
        start = offset if pack_groups else 0
        p = example.rows[0].prompt_len
        for t in range(p):
            members[line][start + t] = {(g, j) for j in range(len(example.rows))}
        cursor = start + p
        for j, row in enumerate(example.rows):
            for t in range(row.num_response_tokens):
                members[line][cursor + t] = {(g, j)}
            cursor += row.num_response_tokens
        offset = cursor
    positions = batch.position_ids
    for line in range(b):
        for q in range(s):
            for k in range(s):
                if not members[line][q]:  # padding
                    expected = not members[line][k] and k <= q
                else:
                    expected = bool(members[line][q] & members[line][k]) and positions[line, k] <= positions[line, q]
                assert bool(mask[line, q, k]) == expected, (line, q, k)


def test_mask_forms_per_attention_kernel():
    batch = collate_shared(make_examples(), pad_token_id=0)
    dense = dense_shared_mask(batch)
    sdpa = shared_attention_mask(batch, "sdpa")
    assert sdpa.dtype == torch.bool and torch.equal(sdpa[:, 0], dense)
    eager = shared_attention_mask(batch, "eager", dtype=torch.float64)
    assert eager.dtype == torch.float64
    assert torch.equal(eager[:, 0] == 0, dense) and bool((eager[:, 0][~dense] == torch.finfo(torch.float64).min).all())
    flex = shared_attention_mask(batch, "flex_attention")
    assert tuple(flex.shape[:1]) == (batch.input_ids.shape[0],)
    q = torch.arange(batch.input_ids.shape[1])
    for b in range(batch.input_ids.shape[0]):  # the block mask's own predicate gives the dense mask
        got = flex.mask_mod(torch.tensor(b), torch.tensor(0), q[:, None], q[None, :])
        assert torch.equal(got, dense[b])


@pytest.mark.parametrize("pack_groups", [False, True])
def test_prompt_blocks_cover_exactly_the_dense_mask(pack_groups):
    """The block-wise kernel's (query, key) pairs — prompt blocks, and each response against its
    group's prompt then itself — are exactly the dense mask's pairs among real tokens, each once."""
    batch = collate_shared(make_examples(), pad_token_id=0, pack_groups=pack_groups)
    blocks = batch.blocks
    n = batch.input_ids.numel()
    count = torch.zeros(n, n, dtype=torch.int64)
    pm, lm = blocks.prompt_index.shape[1], blocks.response_index.shape[1]
    real_prompt_slots, real_response_slots = set(blocks.prompt_slots.tolist()), set(blocks.response_slots.tolist())
    for g, index in enumerate(blocks.prompt_index.tolist()):
        for qs, q in enumerate(index):
            if g * pm + qs in real_prompt_slots:
                for ks, k in enumerate(index):
                    if blocks.prompt_mask[g, 0, qs, ks]:
                        assert g * pm + ks in real_prompt_slots  # padding keys are masked off
                        count[q, k] += 1
    for r, index in enumerate(blocks.response_index.tolist()):
        g = int(blocks.response_group[r])
        keys = blocks.prompt_index[g].tolist() + index
        for qs, q in enumerate(index):
            if r * lm + qs in real_response_slots:
                for ks, k in enumerate(keys):
                    if blocks.response_mask[r, 0, qs, ks]:
                        real = real_prompt_slots if ks < pm else real_response_slots
                        assert (g * pm + ks if ks < pm else r * lm + ks - pm) in real
                        count[q, k] += 1
    real_prompt, real_response = set(blocks.prompt_dest.tolist()), set(blocks.response_dest.tolist())
    dense = dense_shared_mask(batch)
    expected = torch.zeros(n, n, dtype=torch.int64)
    s = batch.input_ids.shape[1]
    real = batch.segment_ids.reshape(-1) >= 0
    for b in range(batch.input_ids.shape[0]):
        expected[b * s:(b + 1) * s, b * s:(b + 1) * s] = dense[b].long()
    expected[~real] = 0  # padding queries are not computed by the block kernel
    count[~real] = 0
    assert torch.equal(count, expected)
    assert real_prompt.isdisjoint(real_response) and len(real_prompt) + len(real_response) == int(real.sum())


def test_prefix_sdpa_leaves_unshared_batches_to_sdpa():
    """After the switch, padded and packed unshared batches run transformers' SDPA bit for bit."""
    plain, switched = tiny_model("llama"), tiny_model("llama", attn="prefix_sdpa")
    assert switched.config._attn_implementation == PREFIX_SDPA and plain.config._attn_implementation == "sdpa"
    for packed in (False, True):
        batch = collate(make_examples(), pad_token_id=0, packed=packed)
        assert torch.equal(backbone_hidden(plain, batch), backbone_hidden(switched, batch))


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_rows_with_different_prompts_are_rejected():
    example = TrainExample(0, "bad", [Row((5, 6, 7, 8), 2), Row((5, 9, 7, 8), 2)])
    with pytest.raises(ValueError, match=r"example 'bad': row 1 does not start with the same prompt as row 0"):
        collate_shared([example], pad_token_id=0)
    example = TrainExample(0, "bad", [Row((5, 6, 7, 8), 2), Row((5, 6, 7, 8), 3)])
    with pytest.raises(ValueError, match=r"prompt_len 3 vs 2"):
        collate_shared([example], pad_token_id=0)
    with pytest.raises(ValueError, match=r"row 0 has prompt_len 0"):
        collate_shared([TrainExample(0, "empty", [Row((5, 6), 0), Row((5, 7), 0)])], pad_token_id=0)


def test_kernels_without_custom_masks_are_rejected():
    model = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"  # not importable here; only the check reads it
    with pytest.raises(SharedPromptUnsupported, match=r"flash_attention_2.*block-diagonal causal masks"):
        check_attention_support(model)
    with pytest.raises(SharedPromptUnsupported, match=r"flash_attention_2"):
        shared_forward(model, collate_shared(make_examples(), pad_token_id=0))
    with pytest.raises(SharedPromptUnsupported,
                       match=r"one of \('dftkern_prefix_sdpa', 'sdpa', 'eager', 'flex_attention'\)"):
        shared_attention_mask(collate_shared(make_examples(), pad_token_id=0), "paged|sdpa")


def test_flex_attention_on_cpu_needs_no_grad():
    model = tiny_model("llama", attn="flex_attention")
    batch = collate_shared(make_examples(), pad_token_id=0)
    with pytest.raises(SharedPromptUnsupported, match=r"FlexAttention has no backward on CPU"):
        shared_forward(model, batch)


def test_sliding_window_only_when_rows_fit():
    """A prepared mask replaces the sliding window: rows longer than the window must be refused, rows
    that fit are exact (the window then masks nothing)."""
    examples = make_examples()  # longest row: 5 + 4 = 9 tokens
    batch = collate_shared(examples, pad_token_id=0)
    narrow = tiny_model("mistral", sliding_window=8)
    with pytest.raises(SharedPromptUnsupported, match=r"sliding-window attention \(window 8\).*9 tokens"):
        shared_forward(narrow, batch)
    qwen = tiny_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert qwen.config.layer_types == ["full_attention", "sliding_attention"]
    with pytest.raises(SharedPromptUnsupported, match=r"window 8"):
        shared_forward(qwen, batch)
    wide = tiny_model("mistral", sliding_window=9)
    check_attention_support(wide, batch)
    hidden, _ = shared_forward(wide, batch)
    reference = _unshared_loss_hidden(wide, collate(examples, pad_token_id=0, packed=False))
    torch.testing.assert_close(hidden, reference, rtol=1e-5, atol=1e-5)


def test_probe_accepts_llama_qwen2_and_rejects_a_model_that_ignores_the_mask():
    for family in ("llama", "qwen2"):
        for attn in ("sdpa", "eager"):
            assert check_shared_prompt_support(tiny_model(family, attn=attn)) < 1e-5
    # MPT's ALiBi bias is built from the sequence layout, not from position ids: shared != unshared
    mpt = tiny_model("mpt", attn="eager", n_layers=2, d_model=32, n_heads=4, max_seq_len=64)
    with pytest.raises(SharedPromptUnsupported, match=r"MptForCausalLM .*does not honour the prompt-shared mask"):
        check_shared_prompt_support(mpt)
    assert mpt.training  # the probe restores the training mode


def test_block_kernel_refusals_and_fallback():
    # StableLM does not pass keyword arguments down to its attention function: the kernel notices
    stablelm = tiny_model("stablelm")
    use_prefix_sdpa(stablelm)
    with pytest.raises(SharedPromptUnsupported, match=r"StableLmAttention did not pass the prompt-block keyword"):
        check_shared_prompt_support(stablelm)
    # ... and preparing it falls back to SDPA with the dense mask, with a warning
    stablelm = tiny_model("stablelm")
    with pytest.warns(UserWarning, match=r"block-wise attention unavailable"):
        assert prepare_shared_prompt_model(stablelm) == "sdpa"
    assert stablelm.config._attn_implementation == "sdpa"
    with pytest.raises(SharedPromptUnsupported, match=r"replaces the 'sdpa' attention kernel; this model uses 'eager'"):
        use_prefix_sdpa(tiny_model("llama", attn="eager"))
    llama = tiny_model("llama")
    assert prepare_shared_prompt_model(llama) == PREFIX_SDPA
    assert prepare_shared_prompt_model(tiny_model("llama"), block_attention=False) == "sdpa"


# ---------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------


def _unshared_loss_hidden(model, batch) -> torch.Tensor:
    """Hidden states of an unshared (padded or packed) batch at its label-carrying positions, row-major."""
    hidden = backbone_hidden(model, batch)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    return hidden[(batch.labels.reshape(-1) != IGNORE_INDEX).nonzero().flatten()]


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over parameters of max |a - b| / max |b| (both dicts must name the same parameters)."""
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in a)


def _float64_rms_norm(self, hidden_states):
    """RMSNorm in the input's dtype (HF's Llama/Qwen2 RMSNorm computes in float32 whatever the input)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def float64_model(family: str, attn: str):
    """A float64 model with no float32 islands: RMSNorm patched to run in float64, SDPA attention (its
    CPU math kernel is float64 for float64 inputs; HF's eager softmax is float32). RoPE's cos/sin are
    still computed in float32 from the integer positions, identically for every layout."""
    import types

    model = tiny_model(family, attn=attn, dtype=torch.float64)
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(_float64_rms_norm, module)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "prefix_sdpa"])
def test_float64_hidden_states_and_gradients(family, attn):
    """Exactness beyond float32 rounding: a float64 functional of the loss-position hidden states has
    the same value and the same parameter gradients in every layout, to float64 rounding."""
    model = float64_model(family, attn)
    examples = make_examples()
    probe = torch.randn(sum(r.num_response_tokens for e in examples for r in e.rows), 32, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(3))
    results = {}
    for name in ("padded", "packed", "shared", "shared_packed"):
        if name.startswith("shared"):
            hidden, _ = shared_forward(model, collate_shared(examples, pad_token_id=0,
                                                             pack_groups=name == "shared_packed"))
        else:
            hidden = _unshared_loss_hidden(model, collate(examples, pad_token_id=0, packed=name == "packed"))
        model.zero_grad(set_to_none=True)
        (hidden * probe).sum().backward()
        results[name] = (hidden.detach(), _grads(model))
    ref_hidden, ref_grads = results["padded"]
    for name in ("packed", "shared", "shared_packed"):
        hidden, grads = results[name]
        assert float((hidden - ref_hidden).abs().max()) <= 1e-12 * float(ref_hidden.abs().max()), name
        assert max_rel_diff(grads, ref_grads) <= 1e-11, name


def loss_and_grads(model, objective: Objective, batch, *, num_examples: int):
    """Trainer-style step: backbone -> fused loss (float32) -> backward; returns (loss, grads)."""
    model.zero_grad(set_to_none=True)
    hidden, loss_batch = shared_forward(model, batch)
    weight, bias = lm_head_params(model)
    loss, _ = objective(hidden, weight, bias, loss_batch, state=DFTState(num_examples))
    loss.backward()
    return loss.detach(), _grads(model)


def compare_layouts(model, loss_name: str, examples, *, layouts=("packed", "shared", "shared_packed")):
    """(|loss - padded loss| / max(1, |padded loss|), max grad rel diff) per layout, vs the padded layout."""
    objective = Objective(ObjectiveConfig(loss=loss_name))
    kwargs = dict(pad_token_id=0, rows=objective.rows, with_ref_logps=objective.spec.needs_ref_logps,
                  with_rewards=objective.spec.needs_rewards)
    ref_loss, ref_grads = loss_and_grads(model, objective, collate(examples, packed=False, **kwargs),
                                         num_examples=len(examples))
    out = {}
    for name in layouts:
        batch = collate(examples, packed=True, **kwargs) if name == "packed" else \
            collate_shared(examples, pack_groups=name == "shared_packed", **kwargs)
        loss, grads = loss_and_grads(model, objective, batch, num_examples=len(examples))
        out[name] = (float((loss - ref_loss).abs()) / max(1.0, float(ref_loss.abs())), max_rel_diff(grads, ref_grads))
    return out


# float32 rounding: the backbone's float32 sums run in a different order (masked SDPA vs causal,
# per-response vs shared prompt rows), the loss is float32; observed <= ~1e-6 relative here.
LOSS_RTOL, GRAD_RTOL = 1e-5, 2e-5


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "prefix_sdpa"])
@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_trainer_losses_match_unshared(family, attn, loss_name):
    diffs = compare_layouts(tiny_model(family, attn=attn), loss_name, make_examples())
    for layout, (loss_diff, grad_diff) in diffs.items():
        assert loss_diff <= LOSS_RTOL and grad_diff <= GRAD_RTOL, (layout, loss_diff, grad_diff)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("loss_name", ["dft", "dpo", "rloo"])
def test_eager_attention_matches_unshared(family, loss_name):
    diffs = compare_layouts(tiny_model(family, attn="eager"), loss_name, make_examples())
    for layout, (loss_diff, grad_diff) in diffs.items():
        assert loss_diff <= LOSS_RTOL and grad_diff <= GRAD_RTOL, (layout, loss_diff, grad_diff)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "prefix_sdpa"])
@pytest.mark.parametrize("loss_name", ["dft", "dpo", "rloo"])
def test_gradient_checkpointing_matches_unshared(family, attn, loss_name):
    model = tiny_model(family, attn=attn)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_activation_checkpointing
    diffs = compare_layouts(model, loss_name, make_examples())
    for layout, (loss_diff, grad_diff) in diffs.items():
        assert loss_diff <= LOSS_RTOL and grad_diff <= GRAD_RTOL, (layout, loss_diff, grad_diff)


def test_uniform_lengths_and_one_group():
    """No padding anywhere (every prompt and every response of one length), and a single group."""
    examples = make_examples(shapes=((4, (3, 3, 3)), (4, (3, 3, 3))))
    for attn in ("sdpa", "prefix_sdpa"):
        for batch_examples in (examples, examples[:1]):
            diffs = compare_layouts(tiny_model("qwen2", attn=attn), "rloo", batch_examples)
            for layout, (loss_diff, grad_diff) in diffs.items():
                assert loss_diff <= LOSS_RTOL and grad_diff <= GRAD_RTOL, (attn, layout, loss_diff, grad_diff)


def test_mask_picture_and_benchmark_smoke(capsys):
    from dftkern.train.prefix_sharing import _main, benchmark, mask_picture

    _main(["mask", "--prompt", "2", "--responses", "1", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["p", "p", "0", "1", "1"]
    batch = collate_shared([TrainExample(0, "x", [Row((1, 2, 3), 2), Row((1, 2, 4, 5), 2)])], pad_token_id=0)
    assert lines == mask_picture(batch).splitlines()
    grid = [[c == "#" for c in line.split()[2:]] for line in lines[1:]]
    assert torch.equal(torch.tensor(grid), dense_shared_mask(batch)[0])
    results = benchmark(ks=(2,), shapes=((6, 3),), groups=2, hidden_size=16, num_layers=1, vocab_size=32, repeats=1)
    assert [r["layout"] for r in results] == ["unshared", "shared"]
    unshared, shared = results
    assert unshared["row_tokens"] == shared["row_tokens"] == 2 * 3 * 9
    assert unshared["backbone_tokens"] == 54 and shared["backbone_tokens"] == 2 * (6 + 3 * 3)
    assert shared["step_s"] > 0 and shared["cpu_s"] > 0


def test_wrong_mask_would_be_caught():
    """The comparison can fail: the same step with plain causal attention over the shared sequence
    (responses see each other) is far outside the tolerance."""
    model = tiny_model("llama")
    examples = make_examples()
    objective = Objective(ObjectiveConfig(loss="dft"))
    kwargs = dict(pad_token_id=0, with_ref_logps=True)
    ref_loss, ref_grads = loss_and_grads(model, objective, collate(examples, packed=False, **kwargs),
                                         num_examples=len(examples))
    batch = collate_shared(examples, **kwargs)
    batch.segment_ids = batch.segment_ids.clamp(max=0).where(batch.segment_ids >= 0, batch.segment_ids)
    loss, grads = loss_and_grads(model, objective, batch, num_examples=len(examples))
    assert float((loss - ref_loss).abs()) / float(ref_loss.abs()) > 10 * LOSS_RTOL
    assert max_rel_diff(grads, ref_grads) > 100 * GRAD_RTOL


# ---------------------------------------------------------------------------------------------
# Benchmark: model presets, options, JSON
# ---------------------------------------------------------------------------------------------


def test_bench_preset_is_llama3_8b_layer_shapes_without_allocating():
    from transformers import LlamaConfig

    from dftkern.train.prefix_sharing import _bench_parameters, _rope_theta, bench_config

    config = bench_config(preset="llama3-8b-layers", max_length=1280)
    assert isinstance(config, LlamaConfig)
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.intermediate_size,
            config.vocab_size, config.num_hidden_layers) == (4096, 32, 8, 14336, 128256, 2)
    assert _rope_theta(config) == 500000.0 and config.tie_word_embeddings is False
    assert config.max_position_embeddings == 8192 and config.head_dim == 128
    # parameters counted on the meta device (nothing allocated): per layer q, o [4096, 4096], k, v [1024, 4096],
    # gate, up, down 4096 x 14336, two norms; untied embedding and head; final norm
    h, kv, m, v = 4096, 8 * 128, 14336, 128256
    per_layer = 2 * h * h + 2 * kv * h + 3 * h * m + 2 * h
    assert _bench_parameters(config) == 2 * per_layer + 2 * v * h + h
    deeper = bench_config(preset="llama3-8b-layers", num_layers=4, max_length=9000)
    assert deeper.num_hidden_layers == 4 and deeper.hidden_size == 4096 and deeper.max_position_embeddings == 9000
    # a small override of the preset builds and runs on the CPU: its GQA ratio and RoPE base are kept
    small = bench_config(preset="llama3-8b-layers", hidden_size=64, intermediate_size=96, vocab_size=50, num_layers=1)
    assert (small.num_attention_heads, small.num_key_value_heads, small.head_dim) == (32, 8, 2)
    assert _rope_theta(small) == 500000.0


def test_bench_default_model_is_the_one_the_cpu_numbers_were_measured_on():
    """Without a preset the benchmark's config is exactly the LlamaConfig it always hard-coded."""
    from transformers import LlamaConfig

    from dftkern.train.prefix_sharing import bench_config

    old = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=4 * 128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1280,
                      tie_word_embeddings=True)
    assert bench_config(max_length=1280).to_dict() == old.to_dict()
    old_small = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=9,
                            tie_word_embeddings=True)
    assert bench_config(hidden_size=16, num_layers=1, vocab_size=32, max_length=9).to_dict() == old_small.to_dict()


@pytest.mark.parametrize("attn", ["prefix_sdpa", "sdpa"])
def test_bench_step_equals_the_direct_cpu_step(attn):
    """The benchmark's step (the trainer's PolicyWithLoss, fp32) computes bit for bit what the CPU benchmark's
    direct shared_forward + Objective step computed: same loss, same gradients, both layouts."""
    from transformers import LlamaForCausalLM

    from dftkern.train.model import PolicyWithLoss
    from dftkern.train.prefix_sharing import bench_config

    config = bench_config(hidden_size=32, num_layers=2, vocab_size=VOCAB, max_length=16)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    if attn == "prefix_sdpa":
        use_prefix_sdpa(model)
    objective = Objective(ObjectiveConfig(loss="dft2"))
    examples = make_examples()
    for batch in (collate(examples, pad_token_id=0, packed=False), collate_shared(examples, pad_token_id=0)):
        hidden, loss_batch = shared_forward(model, batch)
        weight, bias = lm_head_params(model)
        direct, _ = objective(hidden, weight, bias, loss_batch, state=DFTState(len(examples)))
        direct.backward()
        direct_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        wrapped, _ = PolicyWithLoss(model, objective)(batch, state=DFTState(len(examples)))
        wrapped.backward()
        assert torch.equal(wrapped, direct)
        for name, param in model.named_parameters():
            assert torch.equal(param.grad, direct_grads[name]), name
        model.zero_grad(set_to_none=True)


def _bench_error(capsys, argv) -> str:
    from dftkern.train.prefix_sharing import _main

    with pytest.raises(SystemExit) as exit_info:
        _main(["bench", *argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


def test_bench_option_errors(capsys, monkeypatch, tmp_path):
    tiny = ["--ks", "2", "--shapes", "6/3", "--hidden", "16", "--layers", "1", "--vocab", "32", "--repeats", "1"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        err = _bench_error(capsys, [*tiny, "--device", device])
        assert len(err) == 1 and err[0].startswith("python -m dftkern.train.prefix_sharing bench: error: --device "
                                                   f"{device}: CUDA is not available"), err
    err = _bench_error(capsys, [*tiny, "--device", "tpu"])
    assert len(err) == 1 and "--device 'tpu'" in err[0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    err = _bench_error(capsys, [*tiny, "--device", "cuda:3"])
    assert len(err) == 1 and "--device cuda:3: only 1 CUDA device(s) visible" in err[0]
    cases = {
        ("--heads", "3"): "--heads 3 does not divide --hidden 16",
        ("--heads", "2", "--kv-heads", "4"): "--kv-heads 4 does not divide --heads 2",
        ("--hidden", "12", "--heads", "4"): "head dimension 3, which must be even",
        ("--vocab", "3"): "--vocab must be at least 4",
        ("--layers", "0"): "--layers must be a positive integer",
        ("--shapes", "6x3"): "--shapes '6x3': expected PROMPT/RESPONSE",
        ("--shapes", "0/3"): "--shapes prompt length must be an integer >= 1",
        ("--ks", "0"): "--ks must be an integer >= 1",
        ("--warmup", "-1"): "--warmup must be an integer >= 0",
        ("--loss", "grpo"): "--loss grpo: policy losses need",
        ("--loss", "nope"): "--loss: loss must be one of",
        ("--json", str(tmp_path)): f"--json {tmp_path}: is a directory",
        ("--preset", "llama3-8b-layers", "--heads", "5"): "--heads 5 does not divide --hidden 16",  # --hidden wins
    }
    for extra, expected in cases.items():
        err = _bench_error(capsys, [*tiny, *extra])
        assert len(err) == 1 and expected in err[0], (extra, err)
    for extra in (["--dtype", "fp16"], ["--preset", "llama3-70b"]):  # argparse choices: usage + the error line
        err = _bench_error(capsys, [*tiny, *extra])
        assert extra[0] in err[-1] and extra[1] in err[-1], err


def test_bench_json_schema_on_a_tiny_cpu_run(tmp_path, capsys):
    import json

    from dftkern.train.prefix_sharing import _format_device_benchmark, _main

    path = tmp_path / "sub" / "prefix.json"  # missing folders are created
    _main(["bench", "--ks", "2", "--shapes", "6/3", "--hidden", "16", "--layers", "1", "--vocab", "32",
           "--repeats", "2", "--json", str(path)])
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("| P/L | K | row tokens |") and "| 6/3 | 2 | 54 | 30 |" in out
    report = json.loads(path.read_text())
    assert set(report) == {"meta", "complete", "results", "cases"} and report["complete"] is True
    meta = report["meta"]
    assert meta["device"] == "cpu" and meta["dtype"] == "fp32" and meta["groups"] == 2 and meta["repeats"] == 2
    assert meta["warmup"] == 1 and meta["attn"] == "prefix_sdpa" and meta["loss"] == "dft2"
    assert meta["command"][3:5] == ["bench", "--ks"]
    assert meta["model"]["hidden_size"] == 16 and meta["model"]["num_key_value_heads"] == 4
    assert meta["model"]["parameters"] == 32 * 16 + (4 * 16 * 16 + 3 * 16 * 64 + 2 * 16) + 16  # tied head
    results = report["results"]
    assert [(r["P"], r["L"], r["K"], r["layout"]) for r in results] == [(6, 3, 2, "unshared"), (6, 3, 2, "shared")]
    unshared, shared = results
    for r in results:
        assert r["trained_tokens"] == 2 * (1 + 2) * 3  # groups x (1 + K) x L response tokens with a label
        assert r["clock"] == "process_cpu" and r["device"] == "cpu" and r["peak_base_mib"] is None
        assert r["tokens_per_s"] == pytest.approx(r["trained_tokens"] / r["cpu_s"])
        assert r["peak_mib"] == r["peak_rss_mib"]
    assert unshared["backbone_tokens"] == unshared["row_tokens"] == 54 and shared["backbone_tokens"] == 30
    (case,) = report["cases"]
    assert case["ratio"] == pytest.approx(shared["tokens_per_s"] / unshared["tokens_per_s"])
    assert case["ratio"] == pytest.approx(unshared["cpu_s"] / shared["cpu_s"])
    assert (case["unshared_backbone_tokens"], case["shared_backbone_tokens"], case["trained_tokens"]) == (54, 30, 18)
    # the CUDA table (printed for --device cuda) reads the same cases
    header, _, row = _format_device_benchmark(results).splitlines()
    assert "unshared tok/s" in header and "ratio (shared/unshared)" in header
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["6/3", "2", "18", "54 / 30"]
    assert cells[6:9] == [f"{unshared['tokens_per_s']:.0f}", f"{shared['tokens_per_s']:.0f}", f"{case['ratio']:.2f}x"]


def test_bench_bf16_autocast_and_preset_override_run_on_cpu():
    """The bf16 path is the trainer's autocast (float32 weights stay float32); a shrunk preset runs."""
    from dftkern.train.prefix_sharing import benchmark

    results = benchmark(ks=(2,), shapes=((4, 2),), groups=1, repeats=1, warmup=0, dtype="bf16",
                        preset="llama3-8b-layers", hidden_size=64, intermediate_size=96, vocab_size=50, num_layers=1)
    assert [r["layout"] for r in results] == ["unshared", "shared"]
    assert all(r["dtype"] == "bf16" and r["trained_tokens"] == 3 * 2 for r in results)


def test_gpu_run_script_prefix_step_parses(capsys, monkeypatch):
    """benchmarks/gpu_run.sh's prefix-sharing command: every option is accepted and checked; without CUDA only
    --device is refused (before any model is built)."""
    import re
    import shlex
    from pathlib import Path

    script = (Path(__file__).parents[2] / "benchmarks" / "gpu_run.sh").read_text()
    command = re.search(r'-m dftkern\.train\.prefix_sharing (bench .*?) >"\$OUT', script, re.S).group(1)
    argv = shlex.split(command.replace("\\\n", " ").replace('"$OUT/', '"/nonexistent-out/'))
    assert argv[:3] == ["bench", "--device", "cuda"] and "--preset" in argv and "--json" in argv
    assert argv[argv.index("--ks") + 1:argv.index("--shapes")] == ["2", "4", "8"]
    assert argv[argv.index("--shapes") + 1:argv.index("--shapes") + 3] == ["512/512", "1024/256"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _bench_error(capsys, argv[1:])
    assert len(err) == 1 and "error: --device cuda: CUDA is not available" in err[0]
