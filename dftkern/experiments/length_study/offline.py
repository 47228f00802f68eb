"""The offline arm's inputs: reference samples turned into the trainer's ``--negatives`` files."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from .config import GROUP_LOSSES
from .models import write_jsonl
from .rewards import _REWARD_CALLS, _REWARD_FUNCTIONS

__all__ = ["build_offline_files", "score_lengths"]


def score_lengths(reward: str, lengths: Sequence[int]) -> float:
    """Mean reward of answers with these lengths (not counted as training reward calls)."""
    fn = _REWARD_FUNCTIONS[reward]
    before = _REWARD_CALLS[reward]
    value = statistics.fmean(fn("", "1" * n) for n in lengths)
    _REWARD_CALLS[reward] = before  # evaluation is not training: keep the sample counter for training only
    return value


def build_offline_files(loss: str, reward: str, prompts_file: Path, samples_file: Path, out_dir: Path) -> tuple[Path, Path]:
    """Turn reference samples into the trainer's offline inputs, rows chosen by the on-policy rule.

    ``rwr``/``reinforce``: data answer := sample 0, negatives := samples 1..n-1 (so the group is the n
    samples with their rewards). ``dpo``: data answer := chosen (the correct sum unless a sample is strictly
    better), one negative := the lowest-reward sample. Returns ``(data_file, negatives_file)``.
    """
    from dftkern.train.data import read_prompt_records, read_sample_records

    fn = _REWARD_FUNCTIONS[reward]
    before = _REWARD_CALLS[reward]
    records = read_prompt_records(prompts_file)
    samples = read_sample_records(samples_file)
    data, negatives = [], []
    for record in records:
        sample = samples[record.prompt_id]
        rewards = [fn(record.prompt_text(), text, record.response) for text in sample.responses]
        if loss in GROUP_LOSSES:
            first = sample.responses[0]
            data.append({"id": record.prompt_id, "prompt": record.prompt, "response": first})
            negatives.append({"prompt_id": record.prompt_id, "responses": list(sample.responses[1:]),
                              "response_token_ids": [list(t) for t in sample.response_token_ids[1:]],
                              "rewards": rewards[1:], "positive_reward": rewards[0]})
        else:
            positive_reward = fn(record.prompt_text(), record.response, record.response)
            best = max(range(len(rewards)), key=lambda j: (rewards[j], -j))
            worst = min(range(len(rewards)), key=lambda j: (rewards[j], j))
            chosen = sample.responses[best] if rewards[best] > positive_reward else record.response
            data.append({"id": record.prompt_id, "prompt": record.prompt, "response": chosen})
            negatives.append({"prompt_id": record.prompt_id, "responses": [sample.responses[worst]],
                              "response_token_ids": [list(sample.response_token_ids[worst])],
                              "rewards": [rewards[worst]]})
    _REWARD_CALLS[reward] = before
    data_file, negatives_file = out_dir / "data.jsonl", out_dir / "negatives.jsonl"
    write_jsonl(data_file, data)
    write_jsonl(negatives_file, negatives)
    return data_file, negatives_file

