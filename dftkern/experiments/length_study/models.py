"""The reference model (SFT warm-up of the tiny default Llama) and sampling answer lengths from a model."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .config import LengthStudyConfig
from .rewards import response_length

__all__ = ["addition_operands", "build_reference", "sample_lengths", "write_jsonl"]


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def addition_operands(prompt: str) -> tuple[int, int]:
    """``(a, b)`` of an ``"a+b="`` prompt."""
    a, b = prompt[:-1].split("+")
    return int(a), int(b)


def build_reference(cfg: LengthStudyConfig, work: Path, log: Callable[[str], None]) -> Path:
    """SFT warm-up of the tiny default model on addition (or reuse a cached one); returns its directory."""
    from dftkern.train import synthetic
    from dftkern.train.trainer import TrainConfig, train

    ref_dir = work / "reference"
    meta = ref_dir / "reference.json"
    if meta.exists():
        saved = json.loads(meta.read_text())
        if saved.get("key") == cfg.reference_key() and Path(saved["model"]).is_dir():
            log(f"reusing the reference model {saved['model']}")
            return Path(saved["model"])
    shutil.rmtree(ref_dir, ignore_errors=True)
    records = synthetic.make_addition_records(cfg.num_warmup_records, max_digits=cfg.max_digits, seed=1234,
                                              id_prefix="warmup")
    write_jsonl(ref_dir / "warmup.jsonl", records)
    tokenizer = synthetic.build_char_tokenizer()
    synthetic.make_tiny_llama(tokenizer, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=4,
                              max_positions=4 * cfg.max_digits + 12, seed=0, save_dir=ref_dir / "base")
    log(f"SFT warm-up of the reference model: {cfg.warmup_steps} steps")
    result = train(TrainConfig(model=str(ref_dir / "base"), data=str(ref_dir / "warmup.jsonl"),
                               out=str(ref_dir / "warmup"), loss="sft", max_steps=cfg.warmup_steps,
                               batch_size=cfg.warmup_batch_size, lr=cfg.warmup_lr, weight_decay=0.01,
                               keep_checkpoints=1, device="cpu", plot=False, progress=cfg.progress))
    meta.write_text(json.dumps({"key": cfg.reference_key(), "model": str(result.final_checkpoint)}, indent=2))
    return Path(result.final_checkpoint)


@torch.no_grad()
def sample_lengths(model_dir: str | Path, prompts: Sequence[str], *, samples_per_prompt: int, max_new_tokens: int,
                   seed: int = 0) -> list[int]:
    """Sample ``samples_per_prompt`` answers per prompt (temperature 1, fixed seeds); their lengths, prompt-major."""
    from dftkern.train.data import PromptRecord, encode_prompt
    from dftkern.train.generate import SamplingConfig, decode, eos_token_ids
    from dftkern.train.model import load_causal_lm, load_tokenizer
    from dftkern.train.util import derive_seed

    tokenizer = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), attn="sdpa", device="cpu", dtype=torch.float32)
    rows, seeds = [], []
    for p, prompt in enumerate(prompts):
        ids = encode_prompt(tokenizer, PromptRecord(prompt_id=str(p), response="", prompt=prompt),
                            use_chat_template=False)
        for j in range(samples_per_prompt):
            rows.append(ids)
            seeds.append(derive_seed("length-study-eval", seed, p, j))
    lengths = []
    for start in range(0, len(rows), 512):
        outputs = decode(model, rows[start:start + 512], sampling=SamplingConfig(max_new_tokens, 1.0),
                         eos_ids=eos_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
                         seeds=seeds[start:start + 512])
        lengths += [response_length(tokenizer.decode(tokens, skip_special_tokens=True)) for tokens, _ in outputs]
    return lengths

