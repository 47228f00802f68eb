"""The built-in synthetic task: multi-digit addition with a verifiable answer.

Everything the default run needs is made here, offline and from scratch:

* :func:`make_addition_records` — ``{"id", "prompt", "response"}`` records such as
  ``{"prompt": "127+58=", "response": "185"}``;
* :func:`build_char_tokenizer` — a character-level tokenizer built with ``tokenizers`` and wrapped as a
  Hugging Face ``PreTrainedTokenizerFast`` (so ``AutoTokenizer.from_pretrained`` loads it back);
* :func:`make_tiny_llama` — a small random-init Llama-style causal LM (``LlamaConfig``);
* :func:`addition_reward` — the verifier (1.0 when the response is the correct sum, else 0.0), usable
  as ``--reward dftkern.train.synthetic:addition_reward`` or ``--metric ...``.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch

__all__ = [
    "ADDITION_ALPHABET",
    "make_addition_records",
    "build_char_tokenizer",
    "make_tiny_llama",
    "addition_reward",
]

ADDITION_ALPHABET = "0123456789+="
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
_PROMPT_RE = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*=\s*$")


def make_addition_records(num_records: int, *, max_digits: int = 3, seed: int = 0,
                          id_prefix: str = "add", exclude: set[tuple[int, int]] | None = None) -> list[dict]:
    """Random addition problems ``a+b=`` with answer ``a+b``; operands have at most ``max_digits`` digits.

    Args:
        num_records: how many distinct problems to draw.
        max_digits: each operand is drawn uniformly below ``10**d`` with ``d`` uniform in 1..max_digits.
        seed: RNG seed (Python ``random``; the records depend on nothing else).
        id_prefix: records get ids ``f"{id_prefix}-{i}"``.
        exclude: operand pairs that must not appear (e.g. the training set when drawing a held-out set).
    Returns:
        A list of ``{"id": str, "prompt": "a+b=", "response": str(a+b)}`` dicts, no duplicate pairs.
    """
    if num_records < 0:
        raise ValueError(f"num_records must be >= 0, got {num_records}")
    if max_digits < 1:
        raise ValueError(f"max_digits must be >= 1, got {max_digits}")
    capacity = (10 ** max_digits) ** 2 - len(exclude or ())
    if num_records > capacity:
        raise ValueError(f"num_records={num_records} exceeds the {capacity} distinct problems with "
                         f"max_digits={max_digits}")
    rng = random.Random(seed)
    seen = set(exclude or ())
    records = []
    while len(records) < num_records:
        a = rng.randrange(10 ** rng.randint(1, max_digits))
        b = rng.randrange(10 ** rng.randint(1, max_digits))
        if (a, b) in seen:
            continue
        seen.add((a, b))
        records.append({"id": f"{id_prefix}-{len(records)}", "prompt": f"{a}+{b}=", "response": str(a + b)})
    return records


def addition_reward(prompt: str, response: str, reference: str | None = None) -> float:
    """1.0 if ``response`` (whitespace-stripped) is the correct sum for a prompt ``"a+b="``, else 0.0.

    ``reference`` is accepted for the reward/metric calling convention and ignored: the answer is
    recomputed from the prompt, so the verifier does not trust the data.
    """
    match = _PROMPT_RE.match(prompt)
    if match is None:
        raise ValueError(f"prompt {prompt!r} is not an addition problem of the form 'a+b='")
    return 1.0 if response.strip() == str(int(match.group(1)) + int(match.group(2))) else 0.0


def build_char_tokenizer(alphabet: str = ADDITION_ALPHABET, save_dir: str | Path | None = None):
    """A character-level ``PreTrainedTokenizerFast``: one token per character of ``alphabet``.

    Ids: 0 ``<pad>``, 1 ``<bos>``, 2 ``<eos>``, then the characters in order. Encoding with
    ``add_special_tokens=True`` prepends ``<bos>``; characters outside the alphabet are an error at
    encode time (they map to no token). Saved with ``save_pretrained`` when ``save_dir`` is given.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if len(set(alphabet)) != len(alphabet) or not alphabet:
        raise ValueError(f"alphabet must be a non-empty string of distinct characters, got {alphabet!r}")
    vocab = {PAD: 0, BOS: 1, EOS: 2}
    for char in alphabet:
        vocab[char] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                        unk_token=PAD)
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def make_tiny_llama(tokenizer, *, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                    intermediate_size: int | None = None, max_positions: int = 64, seed: int = 0,
                    save_dir: str | Path | None = None):
    """A random-init ``LlamaForCausalLM`` sized for a 2-core CPU (1.05M parameters by default).

    The embedding and LM head are tied; the vocabulary and special-token ids come from ``tokenizer``.
    When ``save_dir`` is given, the model (safetensors) and the tokenizer are saved there, so the
    directory is a complete local Hugging Face model that every stage can load.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True, rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    if save_dir is not None:
        model.save_pretrained(str(save_dir))
        tokenizer.save_pretrained(str(save_dir))
    return model
