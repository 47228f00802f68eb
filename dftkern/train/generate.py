"""Stage 1, ``generate``: K sampled answers per prompt, written as JSONL; resumable.

Output: one line per prompt, written once all its K samples exist::

    {"prompt_id": "17", "prompt": "12+5=", "responses": ["17", ...], "response_token_ids": [[4, 10, 2], ...],
     "finished": [true, ...], "rewards": [1.0, ...], "positive_reward": 1.0}

(``rewards``/``positive_reward`` only with ``--reward``: a built-in name or ``module:function``). Re-running the same command
skips prompts already in the file (a torn last line from a killed run is dropped first). Settings
are recorded in ``<out>.meta.json``; resuming with different settings is an error.

Sample ``j`` of prompt ``p`` is drawn with its own generator seeded from ``(seed, p, j)``, so the
samples do not depend on the batch size, the order of prompts, or on resuming.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .batching import encode_prompt, has_chat_template
from .model import ModelConfig, dtype_option, load_causal_lm, load_tokenizer, progress_option, resolve_device
from .options import FlatKeywords, Function, Integer, Number, Text, flat_values, nested, option, validate
from .records import PromptRecord, read_prompt_records
from .rewards import RewardFn, resolve_reward
from .util import (
    atomic_write_json,
    derive_seed,
    require_single_process,
    resolve_dtype,
)

__all__ = ["SamplingConfig", "decode", "eos_token_ids", "GenerateConfig", "generate_samples"]


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings. ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` disable those filters."""

    max_new_tokens: int = option(128, Integer(low=1), "longest sample, in tokens", cli=False)
    temperature: float = option(1.0, Number(low=0), "0 = greedy", cli=False)
    top_k: int = option(0, Integer(low=0), "0 = off", cli=False)
    top_p: float = option(1.0, Number(low=0, high=1, low_open=True), "1.0 = off", cli=False)

    def __post_init__(self):
        validate(self)


def eos_token_ids(model, tokenizer) -> set[int]:
    """Every id that ends a response: the tokenizer's EOS and the generation config's ``eos_token_id``(s)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    if not ids:
        raise ValueError("neither the tokenizer nor the generation config defines an EOS token")
    return ids


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) tokens outside the top-k and outside the top-p nucleus. logits: float32 ``[B, V]``."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))  # the top token always stays
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def decode(model, prompts: Sequence[Sequence[int]], *, sampling: SamplingConfig, eos_ids: set[int],
           pad_token_id: int, seeds: Sequence[int] | None = None, forward: Callable | None = None,
           all_done: Callable[[bool], bool] | None = None) -> list[tuple[list[int], bool]]:
    """Continue every prompt (token-id lists, one row each) with a KV cache, left-padded in one batch.

    Args:
        model: the causal LM (its config, device and train/eval mode are used).
        seeds: one seed per row (required unless greedy); row i samples from its own generator.
        forward: called with the causal-LM keyword arguments instead of ``model(...)`` (e.g. through
            an FSDP-sharded wrapper).
        all_done: maps "every row here finished" to "every process finished" (a collective), so that
            all ranks of a sharded model make the same number of forward calls. Default: identity.
    Returns:
        per row ``(new_token_ids, finished)``; ``finished`` means an EOS id was produced (and is the
        last id of ``new_token_ids``), otherwise ``max_new_tokens`` ran out.
    """
    from transformers import DynamicCache

    greedy = sampling.temperature == 0
    if not greedy and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError("sampling (temperature > 0) needs one seed per prompt row")
    device = next(model.parameters()).device
    rows = len(prompts)
    width = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("every prompt needs at least one token")
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((rows, width), dtype=torch.int64)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt):] = torch.tensor(list(prompt))
        attention_mask[i, width - len(prompt):] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0)
    generators = None if greedy else [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    eos = torch.tensor(sorted(eos_ids), device=device)

    was_training = model.training
    model.eval()
    cache = DynamicCache(config=model.config)
    out_tokens = [[] for _ in range(rows)]
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    step_ids = input_ids
    try:
        for _ in range(sampling.max_new_tokens):
            out = (forward or model)(input_ids=step_ids, attention_mask=attention_mask, position_ids=position_ids,
                                     past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            logits = out.logits[:, -1, :].float()
            if greedy:
                next_ids = logits.argmax(-1)
            else:
                probs = torch.softmax(_filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p),
                                      dim=-1).cpu()
                next_ids = torch.stack([torch.multinomial(probs[i], 1, generator=generators[i])[0]
                                        for i in range(rows)]).to(device)
            next_ids = torch.where(finished, torch.full_like(next_ids, pad_token_id), next_ids)
            for tokens, token, was_finished in zip(out_tokens, next_ids.tolist(), finished.tolist()):
                if not was_finished:
                    tokens.append(token)
            finished |= torch.isin(next_ids, eos)
            done = bool(finished.all())
            if all_done(done) if all_done is not None else done:
                break
            step_ids = next_ids[:, None]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((rows, 1))], dim=1)
            position_ids = position_ids[:, -1:] + 1
    finally:
        model.train(was_training)
    return [(tokens, bool(done)) for tokens, done in zip(out_tokens, finished.tolist())]


@dataclass(init=False)
class GenerateConfig(FlatKeywords):
    """Options of the generate stage (``python -m dftkern.train generate --help`` lists them).

    ``model`` is a :class:`~.model.ModelConfig` or, flat, its path (``GenerateConfig(model="dir",
    data=..., out=..., device="cpu")`` works). ``reward`` is a :data:`~.rewards.RewardFn` or its name.
    """

    model: ModelConfig = nested(ModelConfig, help_for={"model": "local Hugging Face causal LM directory to sample "
                                                                "from"})
    data: str = option(spec=Text(), help="prompts: JSONL/Parquet of {prompt, response} or {messages}")
    out: str = option(spec=Text(), help="output JSONL (one line per prompt; re-running resumes)")
    num_samples: int = option(4, Integer(low=1), "samples per prompt K", aliases=("-k",))
    batch_size: int = option(64, Integer(low=1), "sequences decoded together")
    max_new_tokens: int = option(128, Integer(low=1), "longest sample, in tokens")
    temperature: float = option(1.0, Number(low=0), "0 = greedy")
    top_k: int = option(0, Integer(low=0), "keep the k most likely tokens; 0 = off")
    top_p: float = option(1.0, Number(low=0, high=1, low_open=True), "nucleus sampling mass; 1.0 = off")
    seed: int = option(0, Integer(low=0), "sample j of prompt p uses seed (seed, p, j)")
    reward: RewardFn | str | None = option(None, Function(optional=True), "score samples with reward(prompt, "
                                           "response, reference) -> float (needed by rwr/reinforce/rloo): a built-in "
                                           "(exact_match, addition, neg_length, length_peak:MU[:WIDTH]) or "
                                           "MODULE:FUNCTION, e.g. dftkern.train.synthetic:addition_reward",
                                           metavar="NAME|MODULE:FUNCTION")
    limit: int | None = option(None, Integer(low=1, optional=True), "only the first N prompts")
    dtype: str = dtype_option()
    progress: bool = progress_option()

    def __post_init__(self):
        validate(self)

    def settings(self) -> dict:
        """The settings that determine the samples (checked when resuming)."""
        keys = ("model", "data", "num_samples", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "reward",
                "use_chat_template")
        flat = flat_values(self)
        return {k: flat[k] for k in keys}


def _finished_prompt_ids(out: Path) -> set[str]:
    """Prompt ids already complete in ``out``; a torn last line (killed mid-write) is truncated away."""
    if not out.exists():
        return set()
    done, good_bytes = set(), 0
    with open(out, "rb") as handle:
        for raw in handle:
            if not raw.endswith(b"\n"):
                break
            try:
                done.add(str(json.loads(raw)["prompt_id"]))
            except (ValueError, KeyError):
                break
            good_bytes += len(raw)
    if good_bytes != out.stat().st_size:
        with open(out, "r+b") as handle:
            handle.truncate(good_bytes)
    return done


def generate_samples(cfg: GenerateConfig) -> Path:
    """Run the generate stage; returns the output path. See the module docstring."""
    require_single_process("generate")
    sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    reward_fn = resolve_reward(cfg.reward) if cfg.reward else None
    records = read_prompt_records(cfg.data)
    if cfg.limit is not None:
        records = records[:cfg.limit]
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta_path = out.with_name(out.name + ".meta.json")
    settings = cfg.settings()
    if out.exists() and out.stat().st_size > 0 and meta_path.exists():
        previous = json.loads(meta_path.read_text())
        changed = sorted(k for k in settings if previous.get(k) != settings[k])
        if changed:
            raise ValueError(f"{out} was generated with different settings ({', '.join(changed)}); use the same "
                             f"settings to resume, or write to a new --out")
    atomic_write_json(meta_path, settings)
    done = _finished_prompt_ids(out)
    todo = [r for r in records if r.prompt_id not in done]
    if not todo:
        return out

    m = cfg.model
    device = resolve_device(m.device)
    tokenizer = load_tokenizer(m.path, trust_remote_code=m.trust_remote_code)
    model = load_causal_lm(m.path, attn=m.attn, device=device, dtype=resolve_dtype(cfg.dtype, device),
                           trust_remote_code=m.trust_remote_code)
    eos_ids = eos_token_ids(model, tokenizer)
    use_template = cfg.model.use_chat_template and has_chat_template(tokenizer)
    prompts_per_batch = max(1, cfg.batch_size // cfg.num_samples)
    bar = tqdm(total=len(records), initial=len(records) - len(todo), desc="generate", unit="prompt",
               disable=not cfg.progress)
    with open(out, "a", encoding="utf-8") as handle:
        for start in range(0, len(todo), prompts_per_batch):
            chunk: list[PromptRecord] = todo[start:start + prompts_per_batch]
            prompt_ids = [encode_prompt(tokenizer, r, use_chat_template=use_template) for r in chunk]
            rows = [ids for ids in prompt_ids for _ in range(cfg.num_samples)]
            seeds = [derive_seed(cfg.seed, r.prompt_id, j) for r in chunk for j in range(cfg.num_samples)]
            results = decode(model, rows, sampling=sampling, eos_ids=eos_ids, pad_token_id=tokenizer.pad_token_id,
                             seeds=seeds)
            lines = []
            for i, record in enumerate(chunk):
                mine = results[i * cfg.num_samples:(i + 1) * cfg.num_samples]
                token_ids = [tokens for tokens, _ in mine]
                texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in token_ids]
                line = {"prompt_id": record.prompt_id, "prompt": record.prompt_text(), "responses": texts,
                        "response_token_ids": token_ids, "finished": [done for _, done in mine]}
                if reward_fn is not None:
                    line["rewards"] = [float(reward_fn(record.prompt_text(), t, record.response)) for t in texts]
                    line["positive_reward"] = float(reward_fn(record.prompt_text(), record.response, record.response))
                lines.append(json.dumps(line) + "\n")
            handle.write("".join(lines))
            handle.flush()
            os.fsync(handle.fileno())
            bar.update(len(chunk))
    bar.close()
    return out
