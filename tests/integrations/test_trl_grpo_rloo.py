"""FusedGRPOTrainer / FusedRLOOTrainer against TRL's own GRPOTrainer / RLOOTrainer (fp32, CPU).

Parity bar (issue 14): loss and every logged metric to 1e-5, gradients to 1e-4. Each case runs
(1) one ``compute_loss`` + backward of both trainers on the *same* batch, generated once by TRL's
own generation loop (tiny random-init Llama, 8 prompts x 2 completions, a length reward), with the
sampler's — and, with ``beta``, the reference's — per-token log-probs perturbed by N(0, 0.3) so
that ratios leave the clip range and the KL is non-zero; (2) a 3-step ``train()`` of each
(num_iterations=2, gradient accumulation 2) whose every logged number is compared; ``grad_norm``
is a norm of the gradients and is held to the gradient bar.
"""

from __future__ import annotations

import pytest

pytest.importorskip("trl", reason="TRL is not installed (pip install 'dftkern[trl]'); CI installs it")

import torch  # noqa: E402
from trl_parity import grpo_parity, rloo_parity, tiny_llama_and_tokenizer  # noqa: E402

CLIP_METRICS = ["clip_ratio/high_max", "clip_ratio/high_mean", "clip_ratio/low_mean", "clip_ratio/low_min",
                "clip_ratio/region_mean"]
BONUS_METRICS = ["entropy", "entropy_coef", "kl", "policy_loss"]  # with beta != 0 and an entropy bonus


def assert_parity(diffs: dict) -> None:
    assert diffs["loss"] <= 1e-5 and diffs["metrics"] <= 1e-5, diffs
    assert diffs["grads"] <= 1e-4, diffs
    if "log" in diffs:
        assert diffs["log"] <= 1e-5 and diffs["log_grad_norm"] <= 1e-4, {k: diffs[k] for k in ("log", "log_grad_norm")}


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo"])
def test_grpo_parity_every_fused_loss_type(loss_type, tmp_path):
    diffs = grpo_parity(loss_type, out_dir=str(tmp_path), beta=0.1, entropy_coef=0.01)
    extra = {"cispo": ["cispo_clip_ratio"], "sapo": []}.get(loss_type, CLIP_METRICS)
    assert diffs["metric_names"] == sorted(BONUS_METRICS + extra)
    values = diffs["metric_values"]  # the case exercises the KL and the clipping, not only r = 1
    assert values["kl"] > 0.01
    if extra:
        assert values[extra[-1]] > 0.0
    assert_parity(diffs)


def _switch_on_vllm_correction(trainer):
    """After generation (which would call vLLM), make the loss apply ``importance_sampling_ratio`` as with vLLM."""
    trainer.use_vllm = True
    trainer.vllm_importance_sampling_correction = True


def _random(shape, low, high, seed):
    gen = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(shape, generator=gen)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["clip_options", "vllm_token_ratio_tool_mask", "vllm_sequence_ratio", "eval_mode",
                                  "adaptive_entropy", "on_policy_defaults", "steps_per_generation"])
def test_grpo_parity_options(case, tmp_path):
    """Options that change the loss: each against TRL's own trainer."""
    kwargs = {"out_dir": str(tmp_path)}
    if case == "clip_options":  # two-sided clip, clip-higher, bias-corrected KL, sampling temperature, fp32 head
        kwargs.update(loss_type="grpo", beta=0.1, delta=1.08, epsilon_high=0.1, use_bias_correction_kl=True,
                      temperature=0.7, cast_lm_head_to_fp32=True)
    elif case == "vllm_token_ratio_tool_mask":
        kwargs.update(loss_type="dapo", beta=0.1, train_steps=0, before_loss=_switch_on_vllm_correction,
                      schedule={"gradient_accumulation_steps": 1},
                      extra=lambda batch: {
                          "importance_sampling_ratio": _random(batch["completion_ids"].shape, 0.5, 1.5, 1),
                          "tool_mask": (_random(batch["completion_ids"].shape, 0, 1, 2) > 0.3).long()})
    elif case == "vllm_sequence_ratio":
        kwargs.update(loss_type="grpo", train_steps=0, before_loss=_switch_on_vllm_correction,
                      schedule={"gradient_accumulation_steps": 1},
                      extra=lambda batch: {
                          "importance_sampling_ratio": _random((batch["completion_ids"].size(0), 1), 0.5, 1.5, 3)})
    elif case == "eval_mode":
        kwargs.update(loss_type="dapo", beta=0.1, entropy_coef=0.01, train_steps=0, training=False)
    elif case == "adaptive_entropy":  # Skywork-OR1's controller: target above the entropy -> coefficient grows
        kwargs.update(loss_type="dapo", entropy_coef=0.01, use_adaptive_entropy=True, entropy_target=10.0,
                      entropy_coef_delta=0.02)
    elif case == "on_policy_defaults":  # TRL's defaults: one update per batch, no sampler log-probs (r = 1)
        kwargs.update(loss_type="dapo", schedule={}, perturb=False)
    elif case == "steps_per_generation":  # the generation batch spans 4 micro-batches, DAPO's normalizer too
        kwargs.update(loss_type="dapo", schedule={"gradient_accumulation_steps": 2, "steps_per_generation": 4})
    diffs = grpo_parity(kwargs.pop("loss_type"), **kwargs)
    if case == "adaptive_entropy":
        coefs = [h["entropy_coef"] for h in diffs["log_history"] if "entropy_coef" in h]
        assert coefs == pytest.approx([0.03, 0.05, 0.07])  # the controller moved, identically in both
    assert_parity(diffs)


@pytest.mark.slow
def test_grpo_peft_parity(tmp_path):
    """LoRA, beta > 0, no reference model: the reference is the base model (adapter disabled), through dftkern."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    diffs = grpo_parity("grpo", out_dir=str(tmp_path), beta=0.1, trainer_kwargs={"peft_config": config})
    assert diffs["log_history"][-2]["kl"] > 0  # the adapter moved the policy away from the reference
    assert_parity(diffs)


@pytest.mark.slow
def test_rloo_parity(tmp_path):
    """RLOO's sequence-level loss. Plain SGD: AdamW's first steps move each weight by about lr * sign(g), so the
    1e-6 gradient differences of this case (TRL's fp32 log-probs are the farther from float64 here) would flip
    near-zero gradients into lr-sized weight differences and the 3-step log would compare two optimizer paths."""
    diffs = rloo_parity(out_dir=str(tmp_path), optim="sgd")
    assert diffs["metric_names"] == ["clip_ratio/high_max", "clip_ratio/high_mean", "clip_ratio/low_mean",
                                     "clip_ratio/low_min", "clip_ratio/region_mean", "entropy"]
    assert diffs["metric_values"]["clip_ratio/region_mean"] > 0
    assert_parity(diffs)


def _tiny_trainer(cls_name: str, tmp_path, model=None, tokenizer=None, trainer_kwargs=None, **config):
    import trl

    import dftkern.integrations.trl as fused

    module = trl if cls_name in ("GRPOTrainer", "RLOOTrainer") else fused
    if model is None:
        model, tokenizer = tiny_llama_and_tokenizer()
    elif tokenizer is None:
        tokenizer = tiny_llama_and_tokenizer()[1]
    kind = cls_name.replace("Fused", "").replace("Trainer", "")
    config.setdefault("beta", 0.0)  # RLOO's default 0.05 builds a reference model from a path; these are instances
    args = getattr(trl, f"{kind}Config")(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                                         max_completion_length=4, max_steps=1, report_to=[], use_cpu=True,
                                         save_strategy="no", bf16=False, gradient_checkpointing=False, **config)
    from datasets import Dataset
    from trl_parity import length_reward

    return getattr(module, cls_name)(model=model, reward_funcs=length_reward, args=args, processing_class=tokenizer,
                                    train_dataset=Dataset.from_dict({"prompt": ["1+2=", "3+4="]}),
                                    **(trainer_kwargs or {}))


@pytest.mark.parametrize("config,match", [
    ({"loss_type": "vespo"}, "loss_type='vespo' is not fused"),
    ({"loss_type": "grpo", "importance_sampling_level": "sequence"}, "importance_sampling_level"),
    ({"top_entropy_quantile": 0.2}, "top_entropy_quantile"),
    ({"off_policy_mask_threshold": 0.5}, "off_policy_mask_threshold"),
])
def test_grpo_refuses_what_it_does_not_fuse(tmp_path, config, match):
    with pytest.raises(ValueError, match=match):
        _tiny_trainer("FusedGRPOTrainer", tmp_path, **config)


@pytest.mark.parametrize("cls_name", ["FusedGRPOTrainer", "FusedRLOOTrainer"])
def test_softcap_needs_temperature_one(tmp_path, cls_name):
    """Gemma-2 softcaps its logits; TRL divides by the temperature after the softcap, dftkern before it."""
    from integ_helpers import make_model

    with pytest.raises(ValueError, match="softcaps its logits"):
        _tiny_trainer(cls_name, tmp_path, model=make_model("gemma2"), temperature=0.7)
    _tiny_trainer(cls_name, tmp_path, model=make_model("gemma2"), temperature=1.0)  # exact: accepted


@pytest.mark.parametrize("cls_name", ["FusedGRPOTrainer", "FusedRLOOTrainer"])
def test_refuses_moe_aux_loss_and_images(tmp_path, cls_name):
    import transformers as T
    from integ_helpers import VOCAB

    moe = T.MixtralForCausalLM(T.MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                               num_local_experts=2, num_experts_per_tok=1, router_aux_loss_coef=0.01,
                                               output_router_logits=True))
    with pytest.raises(ValueError, match="auxiliary loss"):
        _tiny_trainer(cls_name, tmp_path, model=moe)
    trainer = _tiny_trainer(cls_name, tmp_path)
    ids = torch.ones(2, 3, dtype=torch.long)
    batch = {"prompt_ids": ids, "prompt_mask": ids, "completion_ids": ids, "completion_mask": ids,
             "advantages": torch.zeros(2), "old_logps": torch.zeros(2), "num_items_in_batch": torch.tensor(6),
             "pixel_values": torch.zeros(2, 3, 4, 4)}
    with pytest.raises(ValueError, match="image inputs"):
        trainer.compute_loss(trainer.model, batch)


@pytest.mark.slow
def test_every_lm_head_product_goes_through_dftkern(tmp_path, monkeypatch):
    """With TRL's own fused LM-head kernel disabled, TRL's trainer fails and the fused one trains (sampler and
    reference log-probs included: num_iterations=2 and beta > 0)."""
    import trl.trainer.utils as trl_utils
    from trl import GRPOTrainer
    from trl_parity import RL_SCHEDULE, _rl_make

    from dftkern.integrations.trl import FusedGRPOTrainer

    class Disabled:
        @staticmethod
        def apply(*args, **kwargs):
            raise AssertionError("TRL's fused LM head was called")

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Disabled)
    from trl import GRPOConfig

    make = _rl_make(GRPOConfig, str(tmp_path), RL_SCHEDULE, {"beta": 0.1})
    with pytest.raises(AssertionError, match="TRL's fused LM head"):
        make(GRPOTrainer, 1).train()
    trainer = make(FusedGRPOTrainer, 2)
    trainer.train()
    assert trainer.state.log_history[-2]["kl"] > 0


def test_rloo_without_logit_metrics_skips_only_entropy(tmp_path):
    trainer = _tiny_trainer("FusedRLOOTrainer", tmp_path, trainer_kwargs={"logit_metrics": False})
    trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer._metrics["train"].clear()  # generation's metrics
    trainer.compute_loss(trainer.model, batch).backward()
    assert sorted(trainer._metrics["train"]) == ["clip_ratio/high_max", "clip_ratio/high_mean", "clip_ratio/low_mean",
                                                 "clip_ratio/low_min", "clip_ratio/region_mean"]


def test_grpo_token_math_is_dftkern_policy_math():
    """For the PPO-clip family without TRL's extras, TRL's per-token loss is dftkern's policy_token_terms."""
    from dftkern.integrations.trl.grpo import GRPOTokenMath
    from dftkern.losses.formulas import policy_token_terms

    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(200, generator=gen, dtype=torch.float64) * 3
    old = logp + 0.4 * torch.randn(200, generator=gen, dtype=torch.float64)
    ref = logp + 0.4 * torch.randn(200, generator=gen, dtype=torch.float64)
    adv = torch.randn(200, generator=gen, dtype=torch.float64)
    math = GRPOTokenMath("grpo", epsilon_low=0.2, epsilon_high=0.28, beta=0.05)
    ours, ratio, kl = math.terms(logp, adv, old, ref)
    theirs = policy_token_terms(logp, advantages=adv, old_logps=old, ref_logps=ref, clip_eps=0.2, clip_eps_high=0.28,
                                kl_beta=0.05)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert bool(((ratio < 0.8) | (ratio > 1.28)).any()) and bool((kl > 0).all())


@pytest.mark.parametrize("family,temperature", [("cohere", 0.7), ("granite", 0.7), ("phi", 0.7), ("llama_tied", 0.7),
                                                ("gemma2", 1.0)])
def test_sampler_logprobs_match_trl_per_family(tmp_path, family, temperature):
    """The log-probs and entropies every loss reads: the family's logit transform (Cohere's logit_scale, Granite's
    logits_scaling, a head bias, tied embeddings, Gemma-2's softcap), then / temperature — as TRL's fused head."""
    import copy

    from integ_helpers import VOCAB, make_model

    model = make_model(family)
    trainers = [_tiny_trainer(name, tmp_path, model=copy.deepcopy(model), temperature=temperature)
                for name in ("GRPOTrainer", "FusedGRPOTrainer")]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left-padded prompt
    mask[1, 7:] = 0  # a completion that ended early
    out = [t._get_per_token_logps_and_entropies(t.model, ids, mask, 5, compute_entropy=True) for t in trainers]
    assert out[1][0].shape == (3, 5)
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-5, atol=1e-5)
