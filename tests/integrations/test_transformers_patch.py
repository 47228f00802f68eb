"""patch_causal_lm: Hugging Face's own loss, computed by dftkern, for every supported family.

The reference is the unpatched model (its ``ForCausalLMLoss`` on full fp32 logits); token
log-probs are also checked against a float64 log-softmax of those logits.
"""

from __future__ import annotations

import pytest
import torch
from integ_helpers import VOCAB, assert_same_loss_and_grads, batch, make_model, max_grad_diff, pair

pytest.importorskip("transformers")

from dftkern.integrations.transformers import (  # noqa: E402
    TokenLogprobsOutput,
    is_patched,
    patch_causal_lm,
    unpatch_causal_lm,
)
from dftkern.integrations.transformers import _engine_has_entropy  # noqa: E402

FAMILIES = ["llama", "llama_tied", "llama_bias", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "cohere",
            "granite", "phi", "gpt2", "gemma", "phi3", "olmo", "olmo2", "gpt_neox", "opt", "starcoder2", "stablelm",
            "falcon", "glm", "smollm3", "exaone4", "mixtral", "qwen2_moe", "qwen3_moe"]


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_grads_match_hf(family):
    model, ref = pair(family)
    assert patch_causal_lm(model) is model and is_patched(model)
    ids, mask, labels = batch()
    for num_items in (None, torch.tensor(11), 7):  # mean over tokens; sum / num_items (tensor or int)
        model.zero_grad()
        ref.zero_grad()
        expected = ref(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=num_items)
        got = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=num_items)
        assert got.logits is None and expected.logits is not None
        assert got.loss.dtype == torch.float32
        torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-5)
        expected.loss.backward()
        got.loss.backward()
        assert max_grad_diff(model, ref) < 1e-5


def test_family_transforms_are_needed():
    """The softcap / scale handling matters: the checked families differ from a plain head."""
    for family in ("gemma2", "cohere", "granite"):
        model = make_model(family)
        ids, mask, labels = batch()
        with torch.no_grad():
            hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            plain = torch.nn.functional.cross_entropy(model.lm_head(hidden)[:, :-1].reshape(-1, VOCAB),
                                                      labels[:, 1:].reshape(-1))
            own = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert abs(plain.item() - own.item()) > 1e-3, family


def test_positional_arguments_and_return_dict():
    model, ref = pair("llama")
    patch_causal_lm(model)
    ids, mask, labels = batch()
    got = model(ids, mask, labels=labels, return_dict=False)
    assert isinstance(got, tuple)
    torch.testing.assert_close(got[0], ref(ids, mask, labels=labels).loss, rtol=1e-5, atol=1e-5)


def test_shift_labels_are_used_as_given():
    model, ref = pair("qwen2")
    patch_causal_lm(model)
    ids, mask, labels = batch()
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, shift_labels=shifted).loss,
                               ref(input_ids=ids, attention_mask=mask, labels=labels).loss, rtol=1e-5, atol=1e-5)


def test_without_labels_logits_and_generation_unchanged():
    model, ref = pair("llama")
    patch_causal_lm(model)
    model.eval()
    ref.eval()
    ids, mask, _ = batch()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           ref(input_ids=ids, attention_mask=mask).logits)
    prompt = ids[:1, :4]
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0))


def test_gradient_checkpointing():
    model, ref = pair("llama")
    for m in (model, ref):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    patch_causal_lm(model)
    assert_same_loss_and_grads(model, ref)


def _reference_logprobs(model, ids, mask, labels):
    """float64 log-softmax of the unpatched model's logits at the shifted labels (0 where ignored)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    target = labels[:, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(target == -100, 0.0), logits


@pytest.mark.parametrize("family", ["llama", "gemma2", "cohere"])
def test_logprobs_output(family):
    model, ref = pair(family)
    patch_causal_lm(model, output="logprobs")
    ids, mask, labels = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert isinstance(out, TokenLogprobsOutput) and out.loss is None and out.logits is None
    assert out.token_logps.shape == (3, 9) and out.token_logps.dtype == torch.float32
    assert torch.equal(out.label_mask, labels[:, 1:] != -100)
    expected, _ = _reference_logprobs(ref, ids, mask, labels)
    torch.testing.assert_close(out.token_logps.double(), expected, rtol=1e-5, atol=1e-5)
    # any upstream gradient
    weights = torch.randn(3, 9, generator=torch.Generator().manual_seed(3))
    (out.token_logps * weights).sum().backward()
    (expected.float() * weights).sum().backward()
    assert max_grad_diff(model, ref) < 1e-4


def test_per_call_output_override():
    model, ref = pair("llama")
    patch_causal_lm(model)  # default: loss
    ids, mask, labels = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, dftkern_output="logprobs")
    expected, _ = _reference_logprobs(ref, ids, mask, labels)
    torch.testing.assert_close(out.token_logps.double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dftkern_output"):
        model(input_ids=ids, labels=labels, dftkern_output="logits")


def test_entropy_output():
    if not _engine_has_entropy():
        model = make_model("llama")
        patch_causal_lm(model, output="logprobs", return_entropy=True)
        ids, mask, labels = batch()
        with pytest.raises(NotImplementedError, match="return_entropy"):
            model(input_ids=ids, attention_mask=mask, labels=labels)
        pytest.skip("this dftkern build's fused_linear_logprobs has no return_entropy (engine change not merged)")
    model, ref = pair("gemma2")
    patch_causal_lm(model, output="logprobs", return_entropy=True)
    ids, mask, labels = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    _, logits = _reference_logprobs(ref, ids, mask, labels)
    logp_all = torch.log_softmax(logits, -1)
    entropy = -(logp_all.exp() * logp_all).sum(-1).masked_fill(labels[:, 1:] == -100, 0.0)
    torch.testing.assert_close(out.entropy.double(), entropy, rtol=1e-5, atol=1e-5)


def test_peft_lora():
    peft = pytest.importorskip("peft")
    model, ref = pair("llama")
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    torch.manual_seed(5)
    model = peft.get_peft_model(model, peft.LoraConfig(**config))
    torch.manual_seed(5)
    ref = peft.get_peft_model(ref, peft.LoraConfig(**config))
    with torch.no_grad():  # non-zero B so that the adapter changes the loss
        for m in (model, ref):
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    assert patch_causal_lm(model) is model and is_patched(model)
    assert_same_loss_and_grads(model, ref)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_A" in n)


def test_peft_adapter_on_the_head_is_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_model("llama"), peft.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    with pytest.raises(TypeError, match="PEFT adapter"):
        patch_causal_lm(model)


def test_model_without_linear_head_is_refused():
    model = make_model("llama")
    model.lm_head = torch.nn.Sequential(torch.nn.Linear(32, VOCAB))
    with pytest.raises(TypeError, match="not a torch.nn.Linear"):
        patch_causal_lm(model)
    with pytest.raises(TypeError, match="no output embedding"):
        patch_causal_lm(make_model("llama").model)  # the backbone alone has no head


def test_unchecked_family_is_verified_at_patch_time():
    """A family outside the checked list is compared with its own loss when patched (verify=None, the
    default): a plain head passes, a model that scales its hidden states before the head is refused;
    verify=False refuses any unchecked family, and verify must be None or a bool."""
    with pytest.raises(NotImplementedError, match="'helium'"):
        patch_causal_lm(make_model("helium"), verify=False)
    with pytest.raises(TypeError, match="verify"):
        patch_causal_lm(make_model("helium"), verify="yes")
    model, ref = pair("helium")
    patch_causal_lm(model)  # plain head: the automatic check passes
    ids, mask, labels = batch()
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, labels=labels).loss,
                               ref(input_ids=ids, attention_mask=mask, labels=labels).loss, rtol=1e-5, atol=1e-5)
    scaled = make_model("minicpm3")  # scales hidden states before its head: the check must refuse it
    with pytest.raises(ValueError, match="differs from MiniCPM3ForCausalLM's own"):
        patch_causal_lm(scaled)
    assert not is_patched(scaled)
    with pytest.raises(ValueError, match="differs from MiniCPM3ForCausalLM's own"):
        patch_causal_lm(make_model("minicpm3"), verify=True)


def test_checked_family_can_be_verified_too():
    model, _ = pair("llama")
    patch_causal_lm(model, verify=True)
    assert is_patched(model)


def test_all_ignored_labels_follow_hf_nan_loss_with_zero_gradients():
    model, ref = pair("llama")
    patch_causal_lm(model)
    ids, mask, labels = batch()
    labels[:] = -100
    expected = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    got = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert expected.isnan() and got.isnan()
    expected.backward()
    got.backward()
    assert max_grad_diff(model, ref) == 0.0
    assert all(p.grad is None or not p.grad.isnan().any() for p in model.parameters())


def test_mixture_of_experts_router_loss_is_refused():
    model = make_model("mixtral")
    patch_causal_lm(model)
    ids, mask, labels = batch()
    with pytest.raises(NotImplementedError, match="output_router_logits"):
        model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    model.config.output_router_logits = True
    with pytest.raises(NotImplementedError, match="output_router_logits"):
        model(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"return_entropy": "no"}, TypeError, "return_entropy must be a bool"),
    ({"ignore_index": True}, TypeError, "ignore_index must be an int"),
    ({"chunk_bytes": "big"}, ValueError, "chunk_bytes"),
    ({"backend": "cuda"}, ValueError, "backend must be"),
])
def test_options_are_checked_at_patch_time(kwargs, exc, match):
    model = make_model("llama")
    with pytest.raises(exc, match=match):
        patch_causal_lm(model, **kwargs)
    assert not is_patched(model)


def test_bad_options_and_logits_to_keep():
    model = make_model("llama")
    with pytest.raises(ValueError, match="output must be one of"):
        patch_causal_lm(model, output="logits")
    patch_causal_lm(model)
    ids, mask, labels = batch()
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=ids, labels=labels, logits_to_keep=1)
    with pytest.raises(ValueError, match="labels must have shape"):
        model(input_ids=ids, labels=labels[:, :-1])


def test_unpatch_restores_and_repatch_updates_options():
    model, ref = pair("llama")
    patch_causal_lm(model)
    patch_causal_lm(model, output="logprobs")  # options updated, still one wrapper deep
    ids, mask, labels = batch()
    assert model(input_ids=ids, attention_mask=mask, labels=labels).token_logps is not None
    unpatch_causal_lm(model)
    assert not is_patched(model) and "forward" not in vars(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, ref(input_ids=ids, attention_mask=mask, labels=labels).loss)
