"""Stage 1, ``generate``: a pool of M sampled answers per prompt, written as JSONL; resumable.

Output: one line per prompt, written once all its M samples exist::

    {"prompt_id": "17", "prompt": "12+5=", "responses": ["17", ...], "response_token_ids": [[4, 10, 2], ...],
     "finished": [true, ...], "rewards": [1.0, ...], "positive_reward": 1.0}

(``rewards``/``positive_reward`` only with ``--reward``: a built-in name or ``module:function``; the
reward sees the training prompt, never the sampling instruction). Re-running the same command
skips prompts already in the file (a torn last line from a killed run is dropped first).

Metadata, ``<out>.meta.json`` (:func:`~.records.generate_meta_path`): the settings that determine
the samples -- ``model``, ``data``, ``num_samples`` (the pool size M), ``max_new_tokens``,
``temperature``, ``top_k``, ``top_p``, ``seed``, ``reward``, ``use_chat_template``, ``engine``
(resolved: ``"hf"`` or ``"vllm"``), ``sample_system_prompt``, ``sample_prompt_template`` -- checked
when resuming (a change is an error; files from before the last three count as hf / none / none);
then ``ref_logps_scoring`` (a reminder that ``ref-logps`` scores under the training prompt at
temperature 1), ``sample_prompt_example`` (the first prompt as the sampler saw it) and
``pool_stats`` (:func:`~.records.pool_stats`: the fractions of samples equal to the good answer,
correct by the verifier, and what a filter would drop), rewritten when the file is complete.

Sampling-only instruction (the DFT paper draws UltraFeedback negatives under "You are an unhelpful
assistant."): ``sample_system_prompt`` adds a system message (chat templates only; prepended to an
existing system message with a blank line), and/or ``sample_prompt_template`` rewrites the prompt
text -- the plain prompt, or the last user turn -- as the template with ``{prompt}`` replaced by it
(works without a chat template). Both change only the prompt the sampler continues: the file
records the training prompt, and ``ref-logps``/``train`` never see the instruction.

Engines. ``engine="hf"``: sample ``j`` of prompt ``p`` is drawn with its own generator seeded from
``(seed, p, j)``, so the samples do not depend on the batch size, the order of prompts, or on
resuming. ``engine="vllm"`` (``--engine vllm``, or ``auto`` when vLLM imports) samples with
:class:`~dftkern.train.vllm_engine.VLLMSampler`: the same records and metadata, the M samples of a
prompt in one vLLM request seeded ``request_seed(seed, p)`` (sample ``j`` uses that seed ``+ j``;
see :mod:`.vllm_engine`), which again do not depend on the batch, the order or resuming -- but are
not the HF engine's samples. ``GenerateConfig.engine`` defaults to ``"hf"`` (scripts keep their
samples wherever vLLM is installed); the command line defaults to ``auto``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .batching import encode_prompt, has_chat_template
from .model import ModelConfig, dtype_option, load_causal_lm, load_tokenizer, progress_option, resolve_device
from .options import Choice, FlatKeywords, Function, Integer, Number, Text, flat_values, nested, option, validate
from .records import (
    DataError,
    PromptRecord,
    generate_meta_path,
    pool_stats_of_file,
    read_generate_meta,
    read_prompt_records,
)
from .rewards import RewardFn, resolve_reward
from .util import (
    atomic_write_json,
    derive_seed,
    note,
    require_single_process,
    resolve_dtype,
)
from .vllm_engine import ENGINE_CHOICES, request_seed, resolve_engine

__all__ = ["SamplingConfig", "decode", "eos_token_ids", "GenerateConfig", "generate_samples",
           "encode_sampling_prompt", "REF_LOGPS_SCORING"]

REF_LOGPS_SCORING = ("ref-logps scores every sample under the training prompt (no sampling instruction) at "
                     "temperature 1")
# settings missing from the metadata of files written before they existed, and what those files used
_LEGACY_SETTINGS = {"engine": "hf", "sample_system_prompt": None, "sample_prompt_template": None}


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
    ``engine`` defaults to ``"hf"`` here and to ``"auto"`` on the command line (see the module docstring).
    """

    model: ModelConfig = nested(ModelConfig, help_for={"model": "local Hugging Face causal LM directory to sample "
                                                                "from"})
    data: str = option(spec=Text(), help="prompts: JSONL/Parquet of {prompt, response} or {messages}")
    out: str = option(spec=Text(), help="output JSONL (one line per prompt; re-running resumes); settings and "
                      "pool statistics go to OUT.meta.json")
    num_samples: int = option(4, Integer(low=1), "samples per prompt: the pool size M (training may take K of them "
                              "per epoch, rotating)", aliases=("-k",))
    batch_size: int = option(64, Integer(low=1), "sequences decoded together (vLLM: sequences per engine call)")
    max_new_tokens: int = option(128, Integer(low=1), "longest sample, in tokens")
    temperature: float = option(1.0, Number(low=0), "0 = greedy (the DFT paper samples at 0.7)")
    top_k: int = option(0, Integer(low=0), "keep the k most likely tokens; 0 = off")
    top_p: float = option(1.0, Number(low=0, high=1, low_open=True), "nucleus sampling mass; 1.0 = off")
    seed: int = option(0, Integer(low=0), "hf: sample j of prompt p uses seed (seed, p, j); vllm: the request of "
                       "prompt p is seeded (seed, p)")
    reward: RewardFn | str | None = option(None, Function(optional=True), "score samples with reward(prompt, "
                                           "response, reference) -> float (needed by rwr/reinforce/rloo): a built-in "
                                           "(exact_match, addition, neg_length, length_peak:MU[:WIDTH]) or "
                                           "MODULE:FUNCTION, e.g. dftkern.train.synthetic:addition_reward",
                                           metavar="NAME|MODULE:FUNCTION")
    limit: int | None = option(None, Integer(low=1, optional=True), "only the first N prompts")
    dtype: str = dtype_option()
    progress: bool = progress_option()
    sample_system_prompt: str | None = option(
        None, Text(optional=True), "a system message used ONLY while sampling, e.g. 'You are an unhelpful "
        "assistant.' (needs a chat template; ref-logps and train never see it)", metavar="TEXT")
    sample_prompt_template: str | None = option(
        None, Text(optional=True), "ONLY while sampling, the prompt (plain prompt, or the last user turn) becomes "
        "TEMPLATE with {prompt} replaced by it; works without a chat template, e.g. 'Answer wrongly: {prompt}', or "
        "wrong worked examples for the built-in task: '1+1=3<eos>2+2=5<eos>{prompt}'", metavar="TEMPLATE")
    engine: str = option("hf", Choice(ENGINE_CHOICES), "sampling engine: hf (transformers, KV cache), vllm (one "
                         "request of n samples per prompt; runs on the device its build targets, ignores "
                         "--device/--attn), auto = vllm when importable, else hf",
                         default_text="auto; GenerateConfig: hf")
    vllm_gpu_memory_utilization: float | None = option(
        None, Number(low=0, high=1, low_open=True, optional=True), "with vLLM on GPU: the fraction of device memory "
        "it may take (default: vLLM's 0.9); on CPU the KV cache is a fixed 256 MiB", metavar="FRACTION")
    correct_threshold: float | None = option(
        None, Number(optional=True), "with --reward: a sample counts as correct when its reward >= this (reported in "
        "OUT.meta.json's pool_stats)", default_text="the good answer's own reward", metavar="REWARD")

    def __post_init__(self):
        validate(self)
        if self.sample_prompt_template is not None and "{prompt}" not in self.sample_prompt_template:
            raise ValueError(f"sample_prompt_template (--sample-prompt-template) must contain '{{prompt}}' (where the "
                             f"training prompt goes), got {self.sample_prompt_template!r}")

    def settings(self) -> dict:
        """The settings that determine the samples (checked when resuming); ``engine`` as given."""
        keys = ("model", "data", "num_samples", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "reward",
                "use_chat_template", "engine", "sample_system_prompt", "sample_prompt_template")
        flat = flat_values(self)
        return {k: flat[k] for k in keys}


def encode_sampling_prompt(tokenizer, record: PromptRecord, *, use_chat_template: bool = True,
                           system_prompt: str | None = None, template: str | None = None) -> list[int]:
    """Token ids the sampler continues: the training prompt (:func:`~.batching.encode_prompt`) with
    the sampling-only instruction applied (see the module docstring). Without one, exactly the
    training prompt's ids.

    Raises:
        ValueError: ``system_prompt`` without a chat template in use, or an instruction whose text
            the tokenizer cannot encode (it maps to the unknown token).
        DataError: ``template`` with chat ``messages`` that have no user turn (naming the record).
    """
    plain = encode_prompt(tokenizer, record, use_chat_template=use_chat_template)
    if system_prompt is None and template is None:
        return plain
    chat = use_chat_template and has_chat_template(tokenizer)
    if system_prompt is not None and not chat:
        why = "--no-chat-template disabled it" if has_chat_template(tokenizer) else "this tokenizer has none"
        raise ValueError(f"sample_system_prompt (--sample-system-prompt) needs a chat template ({why}); for plain "
                         f"prompts use sample_prompt_template (--sample-prompt-template), e.g. "
                         f"{system_prompt + chr(10) * 2 + '{prompt}'!r}")
    if not chat:
        changed = dataclasses.replace(record, prompt=template.replace("{prompt}", record.prompt))
    else:
        messages = record.prompt_messages()
        if template is not None:
            users = [i for i, m in enumerate(messages) if m["role"] == "user"]
            if not users:
                raise DataError(f"{record.where}: sample_prompt_template needs a 'user' turn in 'messages'")
            last = messages[users[-1]]
            last["content"] = template.replace("{prompt}", last["content"])
        if system_prompt is not None:
            if messages[0]["role"] == "system":
                messages[0]["content"] = system_prompt + "\n\n" + messages[0]["content"]
            else:
                messages.insert(0, {"role": "system", "content": system_prompt})
        changed = dataclasses.replace(record, prompt=None, messages=tuple(messages))
    ids = encode_prompt(tokenizer, changed, use_chat_template=use_chat_template)
    unk = tokenizer.unk_token_id
    if unk is not None and ids.count(unk) > plain.count(unk):
        raise ValueError(f"the sampling instruction (--sample-system-prompt / --sample-prompt-template) has text this "
                         f"tokenizer cannot encode: it becomes the unknown token {tokenizer.unk_token!r} in "
                         f"{tokenizer.decode(ids)!r}; use only characters and tokens of the model's vocabulary")
    return ids


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


def _stats_line(out: Path, stats: dict) -> str:
    """One line for the user: pool size, and how many samples equal the good answer / are correct."""
    text = (f"generate: {out.name}: {stats['prompts']} prompts, {stats['samples']} samples; "
            f"{stats['frac_equal_positive']:.1%} equal the good answer")
    if "frac_correct" in stats:
        text += (f", {stats['frac_correct']:.1%} correct ({stats['correct_rule']}); a filter of correct/equal "
                 f"samples would drop {stats['frac_filtered']:.1%} and leave "
                 f"{stats['frac_prompts_unfilterable']:.1%} of prompts with none")
    return text


def generate_samples(cfg: GenerateConfig) -> Path:
    """Run the generate stage; returns the output path. See the module docstring.

    Prints one line with the pool statistics (also written to ``<out>.meta.json``).
    """
    require_single_process("generate")
    sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    engine = resolve_engine(cfg.engine)
    reward_fn = resolve_reward(cfg.reward) if cfg.reward else None
    all_records = read_prompt_records(cfg.data)
    records = all_records[:cfg.limit] if cfg.limit is not None else all_records
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta_path = generate_meta_path(out)
    settings = {**cfg.settings(), "engine": engine}
    if out.exists() and out.stat().st_size > 0 and meta_path.exists():
        previous = {**_LEGACY_SETTINGS, **(read_generate_meta(out) or {})}
        changed = sorted(k for k in settings if previous.get(k) != settings[k])
        if changed:
            raise ValueError(f"{out} was generated with different settings ({', '.join(changed)}); use the same "
                             f"settings to resume, or write to a new --out")

    m = cfg.model
    tokenizer = load_tokenizer(m.path, trust_remote_code=m.trust_remote_code)
    use_template = m.use_chat_template and has_chat_template(tokenizer)

    def sampling_prompt(record: PromptRecord) -> list[int]:
        return encode_sampling_prompt(tokenizer, record, use_chat_template=use_template,
                                      system_prompt=cfg.sample_system_prompt, template=cfg.sample_prompt_template)

    meta = {**settings, "ref_logps_scoring": REF_LOGPS_SCORING,
            "sample_prompt_example": tokenizer.decode(sampling_prompt(records[0]))}
    atomic_write_json(meta_path, meta)
    done = _finished_prompt_ids(out)
    todo = [r for r in records if r.prompt_id not in done]
    if todo:
        _sample_into(out, cfg, todo, len(records), engine=engine, sampling=sampling, tokenizer=tokenizer,
                     sampling_prompt=sampling_prompt, reward_fn=reward_fn)
    stats = pool_stats_of_file(out, all_records, correct_threshold=cfg.correct_threshold)
    atomic_write_json(meta_path, {**meta, "pool_stats": stats})
    note(_stats_line(out, stats))
    return out


def _sample_into(out: Path, cfg: GenerateConfig, todo: list[PromptRecord], total: int, *, engine: str,
                 sampling: SamplingConfig, tokenizer, sampling_prompt: Callable[[PromptRecord], list[int]],
                 reward_fn) -> None:
    """Sample the prompts ``todo`` with ``engine`` and append their lines to ``out`` (one fsync per batch)."""
    m, n = cfg.model, cfg.num_samples
    with contextlib.ExitStack() as stack:
        if engine == "vllm":
            from .vllm_engine import VLLMSampler

            sampler = stack.enter_context(VLLMSampler(m.path, dtype=cfg.dtype, seed=cfg.seed,
                                                      trust_remote_code=m.trust_remote_code,
                                                      gpu_memory_utilization=cfg.vllm_gpu_memory_utilization))
            eos_ids = sampler.eos_token_ids(tokenizer)

            def draw(chunk: list[PromptRecord], prompts: list[list[int]]) -> list[tuple[list[int], bool]]:
                return sampler.sample(prompts, n=n, sampling=sampling, eos_ids=eos_ids,
                                      seeds=[request_seed(cfg.seed, r.prompt_id) for r in chunk])
        else:
            device = resolve_device(m.device)
            model = load_causal_lm(m.path, attn=m.attn, device=device, dtype=resolve_dtype(cfg.dtype, device),
                                   trust_remote_code=m.trust_remote_code)
            eos_ids = eos_token_ids(model, tokenizer)

            def draw(chunk: list[PromptRecord], prompts: list[list[int]]) -> list[tuple[list[int], bool]]:
                return decode(model, [ids for ids in prompts for _ in range(n)], sampling=sampling, eos_ids=eos_ids,
                              pad_token_id=tokenizer.pad_token_id,
                              seeds=[derive_seed(cfg.seed, r.prompt_id, j) for r in chunk for j in range(n)])

        prompts_per_batch = max(1, cfg.batch_size // n)
        bar = stack.enter_context(tqdm(total=total, initial=total - len(todo), desc="generate", unit="prompt",
                                       disable=not cfg.progress))
        handle = stack.enter_context(open(out, "a", encoding="utf-8"))
        for start in range(0, len(todo), prompts_per_batch):
            chunk = todo[start:start + prompts_per_batch]
            results = draw(chunk, [sampling_prompt(r) for r in chunk])
            lines = []
            for i, record in enumerate(chunk):
                mine = results[i * n:(i + 1) * n]
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
