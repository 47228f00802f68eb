"""The offline arm's inputs: reference samples turned into the trainer's ``--negatives`` files."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from dftkern.train.onpolicy import online_pair
from dftkern.train.rewards import RewardFn

from .config import GROUP_LOSSES, ON_POLICY_ONLY
from .models import write_jsonl
from .rewards import length_reward

__all__ = ["build_offline_files", "score_lengths"]


def score_lengths(reward: RewardFn, lengths: Sequence[int]) -> float:
    """Mean reward of answers with these lengths (the rewards only look at the length)."""
    return statistics.fmean(reward("", "1" * n, "") for n in lengths)


def build_offline_files(loss: str, reward: RewardFn | str, prompts_file: Path, samples_file: Path,
                        out_dir: Path) -> tuple[Path, Path]:
    """Turn reference samples into the trainer's offline inputs, rows chosen by the on-policy rule.

    ``reward``: a reward function, or ``"min_length"``. ``rwr``/``reinforce``: data answer :=
    sample 0, negatives := samples 1..n-1 (so the group is the n samples with their rewards).
    ``dpo``: the trainer's online pair rule (:func:`dftkern.train.onpolicy.online_pair`): data
    answer := chosen (the correct sum unless a sample is strictly better), one negative := the
    lowest-reward sample. Returns ``(data_file, negatives_file)``. The on-policy-only losses
    (``ppo``, ``grpo``, ``dpo_sampler``) have no offline arm: a ValueError.
    """
    if loss in ON_POLICY_ONLY:
        raise ValueError(f"loss {loss!r} has no offline arm (it is run on-policy only)")
    from dftkern.train.data import read_prompt_records, read_sample_records

    fn = length_reward(reward) if isinstance(reward, str) else reward
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
            chosen, worst = online_pair(rewards, fn(record.prompt_text(), record.response, record.response))
            data.append({"id": record.prompt_id, "prompt": record.prompt,
                         "response": record.response if chosen is None else sample.responses[chosen]})
            negatives.append({"prompt_id": record.prompt_id, "responses": [sample.responses[worst]],
                              "response_token_ids": [list(sample.response_token_ids[worst])],
                              "rewards": [rewards[worst]]})
    data_file, negatives_file = out_dir / "data.jsonl", out_dir / "negatives.jsonl"
    write_jsonl(data_file, data)
    write_jsonl(negatives_file, negatives)
    return data_file, negatives_file
