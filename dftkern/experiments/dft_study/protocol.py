"""One seed of the study, stage by stage, on top of the reference trainer's Python API.

Directory layout under the study root ``R`` (every stage is skipped when its output exists, so an
interrupted study resumes task by task)::

    R/data/{pretrain,train,val,test,probe}.jsonl       the disjoint splits (seed-independent)
    R/seed-S/base/                                     the base model's pretraining run
    R/seed-S/pools/{main,exact}.jsonl                  negative pools sampled from the base model
    R/seed-S/negatives/{variant}/epoch-E/negatives.jsonl  the K negatives used in epoch E (+ ref-logps cache)
    R/seed-S/wrong_test.jsonl                          base-model wrong answers on test prompts (a fixed probe)
    R/seed-S/prepared.json                             what the stages above produced and measured
    R/seed-S/runs/{arm}/lr-{lr}/summary.json           one training run and its evaluation
    R/seed-S/dpo/                                      SFT -> DPO: pairs sampled from the SFT model, DPO runs

Negatives (``variant``):

* ``main``: ``pool_size`` samples per training prompt from the base model at ``cfg.sampling``
  (T = 0.7, top-k 50 as the paper; top-k 50 is a no-op on this 15-token vocabulary); epoch ``e``
  takes samples ``e*K .. e*K+K-1`` (cyclically), so every epoch sees fresh negatives while the
  pool lasts (``pool_size >= K * epochs``).
* ``exact``: ``K * epochs`` samples at ``cfg.exact_sampling`` (T = 1, no filter): the reference's own
  distribution under the training prompt, where DFT's negative term has zero expected gradient.
* ``filtered``: the ``main`` pool without the samples the verifier marks correct or whose tokens equal
  the positive's; prompts whose whole pool is correct keep their unfiltered samples (counted).

Reference log-probs (``dft``) are always the base model's, scored under the training prompt at
temperature 1 by the trainer's ``ref-logps`` stage, whatever the sampling settings were.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import torch

from dftkern.train import synthetic
from dftkern.train.checkpoint import latest_checkpoint
from dftkern.train.data import build_examples, encode_prompt, read_prompt_records, read_sample_records
from dftkern.train.records import judge_samples, pool_candidates, pool_stats, rotate_negatives
from dftkern.train.evaluate import evaluate_model
from dftkern.train.generate import GenerateConfig, SamplingConfig, decode, eos_token_ids, generate_samples
from dftkern.train.model import load_causal_lm, load_tokenizer
from dftkern.train.ref_logps import RefLogpsConfig, compute_ref_logps, score_examples
from dftkern.train.trainer import TrainConfig, train
from dftkern.train.util import atomic_write_json, derive_seed

from .config import ARMS, SamplingSpec, StudyConfig

__all__ = ["SPLITS", "write_splits", "split_paths", "pretrain_base", "rotate_pool", "prepare_seed", "run_arm",
           "prepare_dpo", "run_dpo", "evaluate_checkpoint", "seed_dir"]

SPLITS = ("pretrain", "train", "val", "test", "probe")
_EVAL_BATCH = 512


def seed_dir(root: str | Path, seed: int) -> Path:
    return Path(root) / f"seed-{seed}"


def split_paths(root: str | Path) -> dict[str, Path]:
    return {name: Path(root) / "data" / f"{name}.jsonl" for name in SPLITS}


def write_splits(cfg: StudyConfig, root: str | Path) -> dict[str, Path]:
    """Draw all problems once (``cfg.data_seed``), shuffle, cut into disjoint splits; write them (idempotent).

    Records get ids ``"<split>-<i>"``. The draw is shuffled before cutting because the generator
    exhausts the 100 one-digit pairs early, which would otherwise all land in the first split.
    """
    paths = split_paths(root)
    sizes = {"pretrain": cfg.num_pretrain, "train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test,
             "probe": cfg.num_probe}
    records = synthetic.make_addition_records(sum(sizes.values()), max_digits=cfg.max_digits, seed=cfg.data_seed)
    random.Random(cfg.data_seed).shuffle(records)
    start = 0
    for name in SPLITS:
        part = records[start:start + sizes[name]]
        start += sizes[name]
        lines = "".join(json.dumps({"id": f"{name}-{i}", "prompt": r["prompt"], "response": r["response"]}) + "\n"
                        for i, r in enumerate(part))
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        if not paths[name].exists() or paths[name].read_text() != lines:
            paths[name].write_text(lines)
    return paths


def _load(model_dir: str | Path, device: str):
    model = load_causal_lm(str(model_dir), attn="sdpa", device=torch.device(device))
    return model, load_tokenizer(str(model_dir))


def _greedy_accuracy(model, tokenizer, records, max_new_tokens: int) -> float:
    return evaluate_model(model, tokenizer, records, metric=synthetic.addition_reward, max_new_tokens=max_new_tokens,
                          batch_size=_EVAL_BATCH)["task_metric"]


class _ProbeReached(Exception):
    """Raised from the trainer's ``on_step_end`` to stop the base model's pretraining."""


def pretrain_base(cfg: StudyConfig, seed: int, paths: dict[str, Path], out: Path) -> dict:
    """The built-in base model: a random-init tiny Llama trained with SFT on the ``pretrain`` split
    (problems disjoint from every other split), checked on the ``probe`` split every
    ``base_probe_every`` steps and stopped at the first probe accuracy ``>= base_stop_at``.

    Returns ``{"model", "steps", "probe_accuracy", "probe_history"}`` (``model``: the checkpoint directory).
    """
    tokenizer = synthetic.build_char_tokenizer()
    synthetic.make_tiny_llama(tokenizer, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                              num_heads=cfg.num_heads, max_positions=4 * cfg.max_digits + 8, seed=seed,
                              save_dir=out / "init")
    probe = read_prompt_records(paths["probe"])
    run_dir = out / "run"
    history: list[list] = []

    def on_step_end(step: int, metrics: dict) -> None:
        if step % cfg.base_probe_every:
            return
        model, tok = _load(latest_checkpoint(run_dir), cfg.device)
        accuracy = _greedy_accuracy(model, tok, probe, cfg.max_new_tokens)
        history.append([step, accuracy])
        if accuracy >= cfg.base_stop_at:
            raise _ProbeReached

    try:
        train(_train_config(cfg, seed, model=str(out / "init"), data=str(paths["pretrain"]), out=str(run_dir),
                            loss="sft", max_steps=cfg.base_max_steps, lr=cfg.base_lr, warmup_ratio=0.05,
                            weight_decay=0.01, save_every=cfg.base_probe_every), on_step_end=on_step_end)
    except _ProbeReached:
        pass
    model_dir = latest_checkpoint(run_dir)
    steps = int(model_dir.name.split("-")[-1])
    probe_accuracy = history[-1][1] if history and history[-1][0] == steps else None
    return {"model": str(model_dir), "steps": steps, "probe_accuracy": probe_accuracy, "probe_history": history}


def _sample(model_dir, data: Path, out: Path, *, num_samples: int, spec: SamplingSpec, seed: int,
            max_new_tokens: int, device: str) -> Path:
    return generate_samples(GenerateConfig(
        model=str(model_dir), data=str(data), out=str(out), num_samples=num_samples, batch_size=2048,
        max_new_tokens=max_new_tokens, temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p, seed=seed,
        reward="addition", device=device, progress=False))


def rotate_pool(records, pool: dict, *, epoch: int, k: int, filtered: bool) -> tuple[list[dict], dict]:
    """The K negatives of every prompt for ``epoch``, by the trainer's pool rules: the candidates of
    :func:`~dftkern.train.records.pool_candidates` (all samples, or with ``filtered`` those neither
    correct nor equal to the good answer; every sample again, flagged, when none is left) and the
    rotation of :func:`~dftkern.train.records.rotate_negatives` (entries ``(epoch*K + j) mod n``).

    Args:
        records: the training :class:`PromptRecord` s (output order).
        pool: ``{prompt_id: SampleRecord}`` with rewards (the generate stage's output).
    Returns:
        ``(lines, picks)``: generate-format dicts (``prompt_id``, ``prompt``, ``responses``,
        ``response_token_ids``, ``rewards``, ``positive_reward``, ``pool_index``) and per prompt the pool
        indices taken plus whether the filter had to fall back to the unfiltered pool.
    """
    lines, picks = [], {}
    for record in records:
        sample = pool[record.prompt_id]
        if sample.rewards is None:
            raise ValueError(f"{sample.where}: the pool needs rewards (generate with reward='addition')")
        candidates, fallback = pool_candidates(record, sample, filtered=filtered)
        chosen = rotate_negatives(candidates, k, epoch)
        picks[record.prompt_id] = {"indices": chosen, "fallback": fallback}
        lines.append({"prompt_id": record.prompt_id, "prompt": record.prompt_text(),
                      "responses": [sample.responses[i] for i in chosen],
                      "response_token_ids": [list(sample.response_token_ids[i]) for i in chosen],
                      "rewards": [sample.rewards[i] for i in chosen], "positive_reward": sample.positive_reward,
                      "pool_index": chosen})
    return lines, picks


def _negative_stats(records, pool: dict, picks_per_epoch: list[dict], *, filtered: bool) -> dict:
    """Fractions over every negative used in training (all epochs; correct / equal to the good answer
    as :func:`~dftkern.train.records.judge_samples` says), and what the filter removed from the pools."""
    used, correct, equal, seen, fallback_prompts = 0, 0, 0, set(), set()
    judged = {r.prompt_id: judge_samples(r, pool[r.prompt_id]) for r in records}
    for picks in picks_per_epoch:
        for prompt_id, pick in picks.items():
            is_correct, is_equal = judged[prompt_id]
            for i in pick["indices"]:
                used += 1
                correct += is_correct[i]
                equal += is_equal[i]
                seen.add((prompt_id, i))
            if pick["fallback"]:
                fallback_prompts.add(prompt_id)
    summary = pool_stats(records, pool)
    out = {"negatives_used": used, "frac_correct": correct / used, "frac_equal_positive": equal / used,
           "frac_fresh": len(seen) / used, "pool_size": summary["samples"], "pool_frac_correct": summary["frac_correct"]}
    if filtered:
        out.update({"frac_pool_dropped": summary["frac_filtered"],
                    "frac_prompts_unfilterable": len(fallback_prompts) / len(picks_per_epoch[0])})
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _pass_at_1(model, tokenizer, records, *, samples: int, temperature: float, top_k: int, seed: int,
               max_new_tokens: int) -> float:
    """Fraction of correct answers among ``samples`` draws per prompt at ``temperature`` (seeded per prompt)."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
    eos = eos_token_ids(model, tokenizer)
    correct, total = 0.0, 0
    for start in range(0, len(records), _EVAL_BATCH):
        chunk = records[start:start + _EVAL_BATCH]
        prompts = [encode_prompt(tokenizer, r) for r in chunk for _ in range(samples)]
        seeds = [derive_seed(seed, "pass1", r.prompt_id, j) for r in chunk for j in range(samples)]
        outputs = decode(model, prompts, sampling=sampling, eos_ids=eos, pad_token_id=tokenizer.pad_token_id,
                         seeds=seeds)
        for i, (tokens, _) in enumerate(outputs):
            record = chunk[i // samples]
            correct += synthetic.addition_reward(record.prompt_text(), tokenizer.decode(tokens, skip_special_tokens=True))
            total += 1
    return correct / total


def evaluate_checkpoint(cfg: StudyConfig, seed: int, model_dir: str | Path, root: str | Path) -> dict:
    """The study's metrics of one model.

    Returns ``{"val_accuracy", "accuracy"`` (test, greedy), ``"pass1"`` (test, T = pass1_temperature),
    ``"answer_logp"`` (mean sequence log-prob of the test answers), ``"answer_logp_per_token",
    "wrong_logp"`` (mean sequence log-prob of the base model's wrong test samples), ``"num_wrong"}``.
    """
    paths = split_paths(root)
    model, tokenizer = _load(model_dir, cfg.device)
    val = read_prompt_records(paths["val"])
    test = read_prompt_records(paths["test"])
    val_result = evaluate_model(model, tokenizer, val, metric=synthetic.addition_reward,
                                max_new_tokens=cfg.max_new_tokens, batch_size=_EVAL_BATCH)
    test_result = evaluate_model(model, tokenizer, test, metric=synthetic.addition_reward,
                                 max_new_tokens=cfg.max_new_tokens, batch_size=_EVAL_BATCH)
    pass1 = _pass_at_1(model, tokenizer, test, samples=cfg.pass1_samples, temperature=cfg.pass1_temperature,
                       top_k=cfg.sampling.top_k, seed=seed, max_new_tokens=cfg.max_new_tokens)
    wrong_path = seed_dir(root, seed) / "wrong_test.jsonl"
    wrong_samples = read_sample_records(wrong_path)
    wrong_logp, num_wrong = float("nan"), len(wrong_samples)
    if wrong_samples:
        wrong_records = [r for r in test if r.prompt_id in wrong_samples]
        examples = build_examples(tokenizer, wrong_records, wrong_samples, num_negatives=1)
        row_logps, _ = score_examples(model, examples, pad_token_id=tokenizer.pad_token_id, rows_per_batch=_EVAL_BATCH)
        wrong_logp = float(row_logps[:, 1].mean())
    return {"val_accuracy": val_result["task_metric"], "accuracy": test_result["task_metric"], "pass1": pass1,
            "answer_logp": test_result["pos_logp"], "answer_logp_per_token": test_result["pos_logp_per_token"],
            "wrong_logp": wrong_logp, "num_wrong": num_wrong}


def _prepare_variant(cfg: StudyConfig, seed: int, root: Path, name: str, pool_path: Path, *, filtered: bool,
                     base_model: str, train_path: Path, records) -> dict:
    pool = read_sample_records(pool_path)
    picks_per_epoch, files = [], []
    for epoch in range(cfg.epochs):
        lines, picks = rotate_pool(records, pool, epoch=epoch, k=cfg.num_negatives, filtered=filtered)
        path = seed_dir(root, seed) / "negatives" / name / f"epoch-{epoch}" / "negatives.jsonl"
        _write_jsonl(path, lines)
        compute_ref_logps(RefLogpsConfig(model=base_model, data=str(train_path), negatives=str(path),
                                         device=cfg.device, batch_size=_EVAL_BATCH, progress=False))
        picks_per_epoch.append(picks)
        files.append(str(path))
    return {"files": files, **_negative_stats(records, pool, picks_per_epoch, filtered=filtered)}


def prepare_seed(cfg: StudyConfig, seed: int, root: str | Path) -> dict:
    """Base model, negative pools, per-epoch negatives with reference log-probs, the wrong-answer probe,
    and the base model's metrics. Cached in ``seed-S/prepared.json``."""
    root = Path(root)
    out = seed_dir(root, seed)
    done = out / "prepared.json"
    if done.exists():
        return json.loads(done.read_text())
    if out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    paths = split_paths(root)
    base = pretrain_base(cfg, seed, paths, out / "base")
    base_model = base["model"]
    records = read_prompt_records(paths["train"])
    pools = out / "pools"
    main_pool = _sample(base_model, paths["train"], pools / "main.jsonl", num_samples=cfg.pool_size,
                        spec=cfg.sampling, seed=seed, max_new_tokens=cfg.max_new_tokens, device=cfg.device)
    exact_pool = _sample(base_model, paths["train"], pools / "exact.jsonl",
                         num_samples=cfg.num_negatives * cfg.epochs, spec=cfg.exact_sampling,
                         seed=derive_seed(seed, "exact"), max_new_tokens=cfg.max_new_tokens, device=cfg.device)
    common = dict(base_model=base_model, train_path=paths["train"], records=records)
    variants = {"main": _prepare_variant(cfg, seed, root, "main", main_pool, filtered=False, **common),
                "exact": _prepare_variant(cfg, seed, root, "exact", exact_pool, filtered=False, **common),
                "filtered": _prepare_variant(cfg, seed, root, "filtered", main_pool, filtered=True, **common)}
    # the wrong-answer probe: the first wrong base sample (T = sampling temperature) of each test prompt
    test_samples = _sample(base_model, paths["test"], out / "base_test_samples.jsonl", num_samples=2,
                           spec=cfg.sampling, seed=derive_seed(seed, "wrong"), max_new_tokens=cfg.max_new_tokens,
                           device=cfg.device)
    wrong = []
    for line in map(json.loads, test_samples.read_text().splitlines()):
        bad = [j for j, r in enumerate(line["rewards"]) if r <= 0]
        if bad:
            j = bad[0]
            wrong.append({"prompt_id": line["prompt_id"], "prompt": line["prompt"], "responses": [line["responses"][j]],
                          "response_token_ids": [line["response_token_ids"][j]], "rewards": [line["rewards"][j]]})
    _write_jsonl(out / "wrong_test.jsonl", wrong)
    metrics = evaluate_checkpoint(cfg, seed, base_model, root)
    prepared = {"seed": seed, "base": {**base, **metrics,
                                       "train_samples_correct": variants["main"]["pool_frac_correct"],
                                       "in_band": cfg.base_band[0] <= metrics["accuracy"] <= cfg.base_band[1]},
                "variants": variants, "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_json(done, prepared)
    return prepared


def _run_dir(root: Path, seed: int, arm: str, lr: float) -> Path:
    return seed_dir(root, seed) / "runs" / arm / f"lr-{lr:g}"


def _cleanup(run_dir: Path, *, keep_model: bool) -> None:
    """Drop optimizer states (and the weights unless kept): a study writes a few hundred runs."""
    for checkpoint in (run_dir / "checkpoints").glob("step-*"):
        if keep_model:
            (checkpoint / "trainer_state.pt").unlink(missing_ok=True)
        else:
            shutil.rmtree(checkpoint)


def _train_config(cfg: StudyConfig, seed: int, **kwargs) -> TrainConfig:
    """The study's trainer settings. ``share_prompt=False`` pins the batch layout: the trainer's automatic
    prompt sharing turns itself on or off by what the attention kernel supports, and the two layouts
    differ in the last bits, so leaving it automatic would make the numbers depend on the machine."""
    kwargs = {"batch_size": cfg.batch_size, "warmup_ratio": cfg.warmup_ratio, **kwargs}
    return TrainConfig(seed=seed, device=cfg.device, keep_checkpoints=1, plot=False, progress=False,
                       share_prompt=False, **kwargs)


def _mean_grad_norm(run_dir: Path) -> float | None:
    """Mean gradient norm (before clipping) over the steps in the run's ``metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    norms = [json.loads(line)["grad_norm"] for line in path.read_text().splitlines() if line.strip()]
    return sum(norms) / len(norms) if norms else None


def run_arm(cfg: StudyConfig, seed: int, arm: str, lr: float, root: str | Path) -> dict:
    """Train one one-stage arm from the seed's base model for ``cfg.epochs`` epochs and evaluate it.

    Arms with negatives train epoch by epoch (``stop_after`` at each epoch's end, then ``resume``) so
    that epoch ``e`` reads its own negatives file; the schedule, optimizer and DFT state carry over.
    Cached in ``runs/{arm}/lr-{lr}/summary.json``.
    """
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {sorted(ARMS)}, got {arm!r}")
    root = Path(root)
    prepared = prepare_seed(cfg, seed, root)
    out = _run_dir(root, seed, arm, lr)
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    if out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    loss, average, variant = ARMS[arm]
    total = cfg.epochs * cfg.steps_per_epoch
    common = dict(model=prepared["base"]["model"], data=str(split_paths(root)["train"]), out=str(out), loss=loss,
                  average=average, max_steps=total, lr=lr)
    if variant is None:
        result = train(_train_config(cfg, seed, **common))
    else:
        for epoch, negatives in enumerate(prepared["variants"][variant]["files"]):
            result = train(_train_config(cfg, seed, negatives=negatives, stop_after=(epoch + 1) * cfg.steps_per_epoch,
                                         resume="auto" if epoch else None, **common))
    metrics = evaluate_checkpoint(cfg, seed, result.final_checkpoint, root)
    summary = {"seed": seed, "arm": arm, "lr": lr, "steps": result.steps, "model": str(result.final_checkpoint),
               **metrics, "frac_negatives_correct": prepared["variants"][variant]["frac_correct"] if variant else None,
               "grad_norm_mean": _mean_grad_norm(out),
               "train_last": {k: v for k, v in result.last_metrics.items()
                              if k in ("loss", "pos_logp", "neg_logp", "omega_mean", "u_mean")},
               "seconds": round(time.perf_counter() - started, 1)}
    _cleanup(out, keep_model=cfg.keep_models or arm == "sft")
    atomic_write_json(out / "summary.json", summary)
    return summary


def prepare_dpo(cfg: StudyConfig, seed: int, sft_lr: float, root: str | Path) -> dict:
    """SFT -> DPO data: ``dpo_samples`` answers per training prompt sampled from the seed's SFT model
    (the run with ``sft_lr``) at ``cfg.sampling``, labelled by the verifier. A prompt with a wrong sample
    gives the pair (its answer, its first wrong sample); the answer of a 2-digit sum is unique, so a
    correct sample *is* the data's answer. Reference log-probs: the SFT model's. Cached in ``dpo/prepared.json``."""
    root = Path(root)
    out = seed_dir(root, seed) / "dpo" / f"sft-lr-{sft_lr:g}"
    done = out / "prepared.json"
    if done.exists():
        return json.loads(done.read_text())
    if out.exists():  # an interrupted preparation: start it over
        shutil.rmtree(out)
    sft = json.loads((_run_dir(root, seed, "sft", sft_lr) / "summary.json").read_text())
    paths = split_paths(root)
    samples = _sample(sft["model"], paths["train"], out / "samples.jsonl", num_samples=cfg.dpo_samples,
                      spec=cfg.sampling, seed=derive_seed(seed, "dpo"), max_new_tokens=cfg.max_new_tokens,
                      device=cfg.device)
    records = {r.prompt_id: r for r in read_prompt_records(paths["train"])}
    prompts, rejected, total, correct = [], [], 0, 0
    for line in map(json.loads, samples.read_text().splitlines()):
        total += len(line["rewards"])
        correct += sum(r > 0 for r in line["rewards"])
        bad = [j for j, r in enumerate(line["rewards"]) if r <= 0]
        if bad:
            record = records[line["prompt_id"]]
            prompts.append({"id": record.prompt_id, "prompt": record.prompt, "response": record.response})
            rejected.append({"prompt_id": record.prompt_id, "prompt": record.prompt,
                             "responses": [line["responses"][bad[0]]],
                             "response_token_ids": [line["response_token_ids"][bad[0]]]})
    info = {"sft_lr": sft_lr, "sft_model": sft["model"], "sft_steps": sft["steps"], "num_pairs": len(prompts),
            "samples_frac_correct": correct / total, "data": str(out / "pairs.jsonl"),
            "negatives": str(out / "rejected" / "negatives.jsonl")}
    if prompts:
        _write_jsonl(Path(info["data"]), prompts)
        _write_jsonl(Path(info["negatives"]), rejected)
        compute_ref_logps(RefLogpsConfig(model=sft["model"], data=info["data"], negatives=info["negatives"],
                                         device=cfg.device, batch_size=_EVAL_BATCH, progress=False))
    atomic_write_json(done, info)
    return info


def run_dpo(cfg: StudyConfig, seed: int, sft_lr: float, lr: float, root: str | Path) -> dict:
    """DPO (beta ``cfg.dpo_beta``) from the SFT model on the pairs of :func:`prepare_dpo`, ``dpo_epochs`` epochs."""
    root = Path(root)
    info = prepare_dpo(cfg, seed, sft_lr, root)
    out = seed_dir(root, seed) / "dpo" / f"sft-lr-{sft_lr:g}" / f"lr-{lr:g}"
    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    if out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    pairs = info["num_pairs"]
    batch = min(cfg.batch_size, pairs)
    dpo_steps = cfg.dpo_epochs * (pairs // batch) if pairs else 0
    model = info["sft_model"]
    if dpo_steps:
        result = train(_train_config(cfg, seed, model=info["sft_model"], data=info["data"],
                                     negatives=info["negatives"], out=str(out), loss="dpo", beta=cfg.dpo_beta,
                                     max_steps=dpo_steps, lr=lr, batch_size=batch))
        model = result.final_checkpoint
    metrics = evaluate_checkpoint(cfg, seed, model, root)
    summary = {"seed": seed, "arm": "sft_dpo", "lr": lr, "sft_lr": sft_lr, "sft_steps": info["sft_steps"],
               "dpo_steps": dpo_steps, "steps": info["sft_steps"] + dpo_steps, "num_pairs": pairs, **metrics,
               "frac_negatives_correct": 0.0 if pairs else None,
               "dpo_samples_frac_correct": info["samples_frac_correct"],
               "grad_norm_mean": _mean_grad_norm(out) if dpo_steps else None,
               "seconds": round(time.perf_counter() - started, 1)}
    if dpo_steps:
        _cleanup(out, keep_model=cfg.keep_models)
    atomic_write_json(out / "summary.json", summary)
    return summary
