"""Tiny random-init causal LMs of each family the integrations support, and comparison helpers."""

from __future__ import annotations

import copy
import socket

import torch

VOCAB = 61


def _common(**extra) -> dict:
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(extra)
    return cfg


def make_model(family: str, seed: int = 0):
    """A float32 random-init ``*ForCausalLM`` of ``family`` (2 layers, hidden 32, vocabulary 61), no dropout.

    Families: llama, llama_tied, llama_bias, qwen2, qwen3, mistral, gemma2 (final_logit_softcapping
    = 2.0), gemma3, cohere (logit_scale 0.25, tied), granite (logits_scaling 4.0), phi (head bias),
    gpt2, gemma, phi3, olmo, olmo2, gpt_neox, opt, starcoder2, stablelm, falcon, glm, smollm3, exaone4,
    mixtral, qwen2_moe and qwen3_moe (mixture of experts), helium (an unchecked family), minicpm3
    (scales hidden states before its head: unchecked).
    Parameters get extra noise so that no logit row is degenerate.
    """
    import transformers as T

    builders = {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_common())),
        "llama_tied": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_common(tie_word_embeddings=True))),
        "llama_bias": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_common())),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_common())),
        "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**_common(head_dim=8))),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**_common())),
        "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**_common(head_dim=8, final_logit_softcapping=2.0))),
        "gemma3": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**_common(head_dim=8, final_logit_softcapping=2.0))),
        "cohere": lambda: T.CohereForCausalLM(T.CohereConfig(**_common(logit_scale=0.25))),
        "granite": lambda: T.GraniteForCausalLM(T.GraniteConfig(**_common(logits_scaling=4.0))),
        "phi": lambda: T.PhiForCausalLM(T.PhiConfig(**_common())),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                       bos_token_id=1, eos_token_id=2)),
        "olmo": lambda: T.OlmoForCausalLM(T.OlmoConfig(**_common())),
        "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                                 num_attention_heads=4, intermediate_size=64)),
        "starcoder2": lambda: T.Starcoder2ForCausalLM(T.Starcoder2Config(**_common())),
        "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(**_common(num_local_experts=4, num_experts_per_tok=2))),
        "qwen2_moe": lambda: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**_common(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16))),
        "qwen3_moe": lambda: T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**_common(
            head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16))),
        "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**_common(head_dim=8))),
        "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**_common())),
        "olmo2": lambda: T.Olmo2ForCausalLM(T.Olmo2Config(**_common())),
        "opt": lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
                                                    max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                                                    layerdrop=0.0)),
        "stablelm": lambda: T.StableLmForCausalLM(T.StableLmConfig(**_common())),
        "falcon": lambda: T.FalconForCausalLM(T.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                             num_attention_heads=4)),
        "glm": lambda: T.GlmForCausalLM(T.GlmConfig(**_common(head_dim=8))),
        "smollm3": lambda: T.SmolLM3ForCausalLM(T.SmolLM3Config(**_common())),
        "exaone4": lambda: T.Exaone4ForCausalLM(T.Exaone4Config(**_common())),
        "helium": lambda: T.HeliumForCausalLM(T.HeliumConfig(**_common(head_dim=8))),
        "minicpm3": lambda: T.MiniCPM3ForCausalLM(T.MiniCPM3Config(**_common(num_key_value_heads=4))),
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = builders[family]().float()
        if family == "llama_bias":
            model.lm_head = torch.nn.Linear(32, VOCAB, bias=True)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.05)
    return model


def pair(family: str, seed: int = 0):
    """Two identical models: (the one to patch, the untouched reference)."""
    model = make_model(family, seed)
    return model, copy.deepcopy(model)


def batch(seed: int = 0, rows: int = 3, length: int = 10):
    """``input_ids [rows, length]``, an attention mask with right padding on row 1, and labels with a
    3-token prompt and the padding set to -100."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, length - 3:] = 0
    ids[mask == 0] = 0
    labels = ids.clone()
    labels[:, :3] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


def max_grad_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest |grad_a - grad_b| over parameters (same names); both must have the same grads set."""
    grads_b = dict(b.named_parameters())
    worst = 0.0
    for name, p in a.named_parameters():
        q = grads_b[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            worst = max(worst, (p.grad - q.grad).abs().max().item())
    return worst


def assert_same_loss_and_grads(model, ref, seed: int = 0) -> None:
    """One labelled forward + backward of both models on :func:`batch`: loss to 1e-5, grads to 1e-5."""
    ids, mask, labels = batch(seed)
    expected = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    got = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    expected.backward()
    got.backward()
    assert max_grad_diff(model, ref) < 1e-5


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
