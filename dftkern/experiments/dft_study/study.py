"""The multi-seed study: schedule every (seed, arm, learning rate) run, select learning rates on the
validation split, aggregate over seeds, test dft (and every other arm) against sft, write the reports.

Tasks and their order (at most ``cfg.workers`` processes, ``cfg.threads`` torch threads each, on
``cfg.device``):

1. ``prepare(seed)`` — base model, negatives, reference log-probs (:func:`.protocol.prepare_seed`);
2. ``arm(seed, arm, lr)`` for every one-stage arm and every lr of its grid, once ``prepare(seed)`` is
   done (:func:`.protocol.run_arm`);
3. ``dpo_prepare(seed)`` once every seed's ``sft`` runs are done: the SFT learning rate is selected
   first (validation), then the seed's SFT model samples the DPO pairs (:func:`.protocol.prepare_dpo`);
   ``dpo(seed, lr)`` then runs DPO from that SFT model with each lr of the DPO grid (:func:`.protocol.run_dpo`);
4. ``diagnose(seed)``: the gradient check at the base model (:mod:`.diagnostics`).

Learning-rate selection: for each arm, the lr with the highest validation accuracy averaged over the
seeds (ties: the first in the grid). Test numbers of the other lrs are computed (each run is evaluated
once, on both splits) but never used for anything but the record. Every number of the selected lr is
then reported per seed, with mean ± sd over seeds and paired comparisons against ``sft``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import replace
from pathlib import Path

import torch

from dftkern.train import plotting
from dftkern.train.plotting import mean_sd

from . import protocol
from .diagnostics import gradient_check
from .config import ABLATIONS, ARMS, METHODS, StudyConfig, resolve_study_device
from .stats import paired_t_test, sign_test

__all__ = ["run_study", "select_lr", "aggregate", "format_results_md", "plot_results", "environment",
           "METRICS"]

#: per-seed metrics reported for every method (key -> description)
METRICS = {
    "accuracy": "held-out (test) greedy exact match",
    "pass1": "test pass@1 at T = 0.7 (fraction of sampled answers that are correct)",
    "answer_logp": "mean log p of the test answers (sequence sum)",
    "wrong_logp": "mean log p of the base model's wrong test samples",
    "frac_negatives_correct": "fraction of the training negatives that are correct answers",
    "val_accuracy": "validation greedy exact match (selects the lr)",
    "steps": "optimizer steps (sft_dpo: SFT + DPO)",
    "grad_norm_mean": "mean gradient norm before clipping (training diagnostic)",
}


def _init_worker(threads: int = 1) -> None:
    """``threads`` torch threads in this process (0: leave torch's default); quiet third-party warnings
    and progress bars."""
    import warnings

    if threads:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _task(kind: str, cfg: StudyConfig, root: str, args: tuple) -> dict:
    if kind == "prepare":
        return protocol.prepare_seed(cfg, *args, root)
    if kind == "arm":
        return protocol.run_arm(cfg, *args, root)
    if kind == "dpo":
        return protocol.run_dpo(cfg, *args, root)
    if kind == "dpo_prepare":
        return protocol.prepare_dpo(cfg, *args, root)
    if kind == "diagnose":
        return gradient_check(cfg, *args, root)
    raise ValueError(f"unknown task kind {kind!r}")


def select_lr(runs_by_lr: dict[float, list[dict]]) -> float:
    """The lr whose runs have the highest mean ``val_accuracy`` (ties: the first lr given)."""
    best, best_value = None, -1.0
    for lr, runs in runs_by_lr.items():
        value = sum(r["val_accuracy"] for r in runs) / len(runs)
        if value > best_value:
            best, best_value = lr, value
    return best


def _describe(key: tuple, result: dict) -> str:
    if key[0] == "dpo_prepare":
        return (f"seed {key[1]} DPO pairs from the sft model (lr {result['sft_lr']:g}): {result['num_pairs']}; "
                f"its T=0.7 samples correct {100 * result['samples_frac_correct']:.1f}%")
    if key[0] == "diagnose":
        k = result["k"]
        return (f"seed {key[1]} negative term at the base: |g_dft - g_sft| / |g_sft| with K={k}: "
                f"{result['main'][f'ratio_k{k}']:.2f} (T=0.7), {result['exact'][f'ratio_k{k}']:.2f} (T=1)")
    if key[0] == "prepare":
        base = result["base"]
        return (f"seed {key[1]} base: {base['steps']} steps, test {100 * base['accuracy']:.1f}%, "
                f"T=0.7 samples correct {100 * base['train_samples_correct']:.1f}%")
    name = "sft_dpo" if key[0] == "dpo" else key[2]
    return (f"seed {key[1]} {name} lr {result['lr']:g}: val {100 * result['val_accuracy']:.1f}% "
            f"test {100 * result['accuracy']:.1f}% ({result['seconds']:.0f} s)")


def _children_cpu_seconds() -> float:
    """CPU time of this process's finished children (the worker processes, once the pool is shut down)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _execute(cfg: StudyConfig, root: Path, log) -> tuple[dict, dict]:
    """Run every task (dependency-ordered); returns ``(results by key, selected lrs)``."""
    arms = {seed: [(arm, lr) for arm in ARMS for lr in cfg.lr_grid[arm]] for seed in cfg.seeds}
    pending: list[tuple] = [("prepare", s) for s in cfg.seeds]
    pending += [("arm", s, arm, lr) for s in cfg.seeds for arm, lr in arms[s] if arm == "sft"]
    pending += [("arm", s, arm, lr) for s in cfg.seeds for arm, lr in arms[s] if arm != "sft"]
    pending += [("diagnose", s) for s in cfg.seeds]
    pending += [("dpo_prepare", s) for s in cfg.seeds]
    pending += [("dpo", s, lr) for s in cfg.seeds for lr in cfg.lr_grid["sft_dpo"]]
    total = len(pending)
    results: dict[tuple, dict] = {}
    selected: dict[str, float] = {}
    sft_keys = [("arm", s, "sft", lr) for s in cfg.seeds for lr in cfg.lr_grid["sft"]]

    def ready(key) -> bool:
        if key[0] in ("arm", "diagnose"):
            return ("prepare", key[1]) in results
        if key[0] == "dpo_prepare":
            return all(k in results for k in sft_keys)
        if key[0] == "dpo":  # after its seed's DPO data exist: two runs must not sample the same file
            return ("dpo_prepare", key[1]) in results
        return True

    def args_of(key) -> tuple:
        if key[0] in ("dpo_prepare", "dpo"):
            if "sft" not in selected:
                selected["sft"] = select_lr({lr: [results[("arm", s, "sft", lr)] for s in cfg.seeds]
                                             for lr in cfg.lr_grid["sft"]})
                log(f"      sft lr selected on validation: {selected['sft']:g} (DPO starts from it)")
            return (key[1], selected["sft"], *key[2:])
        return key[1:]

    if cfg.workers == 1:
        threads = torch.get_num_threads()
        _init_worker(cfg.threads)
        try:
            while pending:
                key = next(k for k in pending if ready(k))
                pending.remove(key)
                results[key] = _task(key[0], cfg, str(root), args_of(key))
                log(f"[{len(results)}/{total}] {_describe(key, results[key])}")
        finally:
            torch.set_num_threads(threads)
        return results, selected
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=context, initializer=_init_worker,
                             initargs=(cfg.threads,)) as pool:
        running = {}
        while pending or running:
            for key in [k for k in pending if ready(k)][:cfg.workers - len(running)]:
                pending.remove(key)
                running[pool.submit(_task, key[0], cfg, str(root), args_of(key))] = key
            if not running:
                raise RuntimeError(f"no task can start: {pending[:3]}")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                key = running.pop(future)
                results[key] = future.result()
                log(f"[{len(results)}/{total}] {_describe(key, results[key])}")
    return results, selected


def _arm_entry(cfg: StudyConfig, runs_by_lr: dict[float, list[dict]]) -> dict:
    lr = select_lr(runs_by_lr)
    runs = runs_by_lr[lr]
    entry = {"lr": lr}
    for key in METRICS:
        entry[key] = [r.get(key) for r in runs]
    entry["grid_val_accuracy"] = {f"{g:g}": sum(r["val_accuracy"] for r in rs) / len(rs)
                                  for g, rs in runs_by_lr.items()}
    entry["grid_accuracy"] = {f"{g:g}": sum(r["accuracy"] for r in rs) / len(rs) for g, rs in runs_by_lr.items()}
    for key in ("accuracy", "pass1", "answer_logp", "wrong_logp"):
        entry[f"{key}_mean"], entry[f"{key}_sd"] = mean_sd(entry[key])
    return entry


def _compare(entry: dict, sft: dict) -> dict:
    out = {}
    for key in ("accuracy", "pass1"):
        if len(entry[key]) >= 2:
            out[key] = {"t_test": paired_t_test(sft[key], entry[key]), "sign_test": sign_test(sft[key], entry[key])}
    return out


def aggregate(cfg: StudyConfig, results: dict, prepared: dict) -> dict:
    """Build the pinned ``results.json`` structure from the task results (see the module docstring)."""
    entries = {}
    for arm in ARMS:
        entries[arm] = _arm_entry(cfg, {lr: [results[("arm", s, arm, lr)] for s in cfg.seeds]
                                        for lr in cfg.lr_grid[arm]})
    dpo = _arm_entry(cfg, {lr: [results[("dpo", s, lr)] for s in cfg.seeds] for lr in cfg.lr_grid["sft_dpo"]})
    chosen = [results[("dpo", s, dpo["lr"])] for s in cfg.seeds]
    dpo.update({"sft_lr": chosen[0]["sft_lr"], "sft_steps": [r["sft_steps"] for r in chosen],
                "dpo_steps": [r["dpo_steps"] for r in chosen], "num_pairs": [r["num_pairs"] for r in chosen],
                "dpo_samples_frac_correct": [r["dpo_samples_frac_correct"] for r in chosen]})
    entries["sft_dpo"] = dpo
    for name, entry in entries.items():
        if name != "sft":
            entry["vs_sft"] = _compare(entry, entries["sft"])
    ablations = {name: entries[name] for name in ABLATIONS}
    for name, variant in (("exact_sampling", "exact"), ("filtered", "filtered"), ):
        ablations[name]["negatives"] = [prepared[s]["variants"][variant] for s in cfg.seeds]
        for stats in ablations[name]["negatives"]:
            stats.pop("files", None)
    methods = {name: entries[name] for name in METHODS}
    methods["dft"]["negatives"] = [{k: v for k, v in prepared[s]["variants"]["main"].items() if k != "files"}
                                   for s in cfg.seeds]
    base_keys = ("steps", "probe_accuracy", "val_accuracy", "accuracy", "pass1", "answer_logp", "wrong_logp",
                 "train_samples_correct", "in_band")
    base = {key: [prepared[s]["base"][key] for s in cfg.seeds] for key in base_keys}
    base["probe_history"] = [prepared[s]["base"]["probe_history"] for s in cfg.seeds]
    base["gradient_check"] = [results[("diagnose", s)] for s in cfg.seeds]
    for key in ("accuracy", "pass1", "train_samples_correct"):
        base[f"{key}_mean"], base[f"{key}_sd"] = mean_sd(base[key])
    return {"seeds": list(cfg.seeds), "methods": methods, "ablations": ablations, "base": base,
            "config": cfg.to_dict()}


def environment(cfg: StudyConfig | None = None) -> dict:
    """What determines bit-exactness: torch version and CPU kernel path, CPU model, threads (``cfg.threads``;
    0 = torch's default) and device (``cfg.device``, with the GPU's name on CUDA). Without ``cfg``: the
    defaults (1 thread, CPU)."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # pragma: no cover - old torch
        capability = None
    out = {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
           "cpu_capability": capability, "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"),
           "torch_threads_per_worker": 1 if cfg is None else cfg.threads}
    if cfg is not None and cfg.device != "cpu":
        out["device"] = cfg.device
        out["gpu"] = torch.cuda.get_device_name(torch.device(cfg.device)) if cfg.device.startswith("cuda") else None
    return out


def _pct(values) -> str:
    """``"mean ± sd"`` of fractions, in percent (1 decimal)."""
    return plotting.format_mean_sd([100 * v for v in values], 1)


def _num(values, digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    return plotting.format_mean_sd(values, digits) if values else "—"


def _p(value: float) -> str:
    return f"{value:.2g}" if value >= 1e-3 else f"{value:.1e}"


def _rows(results: dict) -> list[tuple[str, dict]]:
    """``(name, entry)`` of every method, then every ablation."""
    return list(results["methods"].items()) + list(results["ablations"].items())


def format_table(results: dict) -> str:
    """The headline Markdown table: mean ± sd over seeds per method and ablation."""
    n = len(results["seeds"])
    header = ["method", "lr (val.)", "test accuracy %", "pass@1 (T=0.7) %", "log p(answer)", "log p(wrong sample)",
              "negatives correct %", "steps", "Δ accuracy vs sft (paired t p)"]
    rows = [(m, results["methods"][m]) for m in METHODS] + [(f"ablation: {a}", results["ablations"][a])
                                                             for a in ABLATIONS]
    cells = []
    for name, entry in rows:
        negatives = [v for v in entry["frac_negatives_correct"] if v is not None]
        steps = sorted(set(entry["steps"]))
        versus = "—"
        test = entry.get("vs_sft", {}).get("accuracy")
        if test:
            t = test["t_test"]
            versus = f"{100 * t['mean_diff']:+.1f} ± {100 * t['sd_diff']:.1f} (p = {_p(t['p'])})"
        cells.append([name, f"{entry['lr']:g}", _pct(entry["accuracy"]), _pct(entry["pass1"]),
                      _num(entry["answer_logp"]), _num(entry["wrong_logp"]), _pct(negatives) if negatives else "—",
                      str(steps[0]) if len(steps) == 1 else f"{min(steps)}–{max(steps)}", versus])
    base = results["base"]
    cells.append(["base model (start of every run)", "—", _pct(base["accuracy"]), _pct(base["pass1"]),
                  _num(base["answer_logp"]), _num(base["wrong_logp"]), "—", _num(base["steps"], 0), "—"])
    return (plotting.markdown_table(header, cells) + "\n\n"
            f"mean ± sd over {n} seed(s); Δ = arm − sft in test accuracy points, paired by seed.")


def format_results_md(results: dict) -> str:
    """``results.md``: headline table, comparisons, per-seed numbers, lr grids, base model, negatives."""
    table = plotting.markdown_table
    cfg = results["config"]
    seeds = results["seeds"]
    threads = {0: "torch's default threads", 1: "1 thread"}.get(cfg.get("threads", 1), f"{cfg.get('threads')} threads")
    device = "" if cfg.get("device", "cpu") == "cpu" else f"; device {cfg['device']} ({cfg['environment'].get('gpu')})"
    comparisons = []
    for name, entry in _rows(results):
        for metric, test in entry.get("vs_sft", {}).items():
            t, s = test["t_test"], test["sign_test"]
            comparisons.append([name, metric, f"{100 * t['mean_diff']:+.2f}", f"{100 * t['sd_diff']:.2f}",
                                f"[{100 * t['ci95'][0]:+.2f}, {100 * t['ci95'][1]:+.2f}]", f"{t['t']:.2f} ({t['df']})",
                                _p(t["p"]), f"{s['n_pos']}/{s['n_neg']}/{s['n_ties']}", _p(s["p"])])
    per_seed = [[name] + [f"{100 * v:.1f}" for v in entry["accuracy"]] for name, entry in _rows(results)]
    per_seed.append(["base"] + [f"{100 * v:.1f}" for v in results["base"]["accuracy"]])
    grids = [[name, f"{lr} **(selected)**" if float(lr) == entry["lr"] else lr, f"{100 * value:.1f}",
              f"{100 * entry['grid_accuracy'][lr]:.1f}"]
             for name, entry in _rows(results) for lr, value in entry["grid_val_accuracy"].items()]
    out = [f"# DFT vs SFT, one stage from a weak base model — {len(seeds)} seeds", "",
           f"Command: `{cfg['command']}`  ", f"Wall time {cfg['wall_seconds'] / 60:.1f} min, "
           f"CPU time {cfg['cpu_seconds'] / 60:.1f} min ({cfg['workers']} worker processes × {threads}); "
           f"{cfg['environment']['cpu']}, torch {cfg['environment']['torch']}, "
           f"kernel path {cfg['environment']['cpu_capability']}{device}.", "", format_table(results), "",
           "## Paired comparisons with sft (test, by seed)", "",
           table(["arm", "metric", "mean Δ", "sd Δ", "95% CI", "t (df)", "p (t)", "sign test +/−/0", "p (sign)"],
                 comparisons), "", "## Test accuracy per seed (%)", "",
           table(["arm"] + [f"seed {s}" for s in seeds], per_seed), "",
           "## Learning-rate grids (mean over seeds; the lr is chosen on validation)", "",
           table(["arm", "lr", "validation accuracy %", "test accuracy %"], grids)]
    base = results["base"]
    negatives = []
    for name, stats in (("dft / dft2 (T=0.7, top-k 50)", results["methods"]["dft"]["negatives"]),
                        ("exact_sampling (T=1)", results["ablations"]["exact_sampling"]["negatives"]),
                        ("filtered", results["ablations"]["filtered"]["negatives"])):
        dropped = [s["frac_pool_dropped"] for s in stats if "frac_pool_dropped" in s]
        negatives.append([name, _pct([s["frac_correct"] for s in stats]),
                          _pct([s["frac_equal_positive"] for s in stats]), _pct([s["frac_fresh"] for s in stats]),
                          _pct(dropped) if dropped else "—"])
    out += ["", "## Base model", "",
            f"Pretraining steps per seed: {', '.join(map(str, base['steps']))}; probe accuracy at the stop: "
            + ", ".join("—" if v is None else f"{100 * v:.1f}%" for v in base["probe_accuracy"]) + ".  ",
            f"Test greedy accuracy {_pct(base['accuracy'])}% (band {cfg['base_band'][0]:.0%}–"
            f"{cfg['base_band'][1]:.0%}: {sum(base['in_band'])}/{len(base['in_band'])} seeds inside); "
            f"T = 0.7 samples correct: {_pct(base['train_samples_correct'])}% on the training prompts, "
            f"{_pct(base['pass1'])}% on the test prompts.", "", "## Negatives", "",
            table(["arm", "correct %", "equal to the positive %", "fresh %", "pool dropped by the filter %"],
                  negatives),
            "", "## Training diagnostics (selected lr, mean ± sd over seeds)", "",
            table(["arm", "mean gradient norm before clipping (clip at 1.0)", "log p(answer)", "log p(wrong sample)"],
                  [[name, _num(entry["grad_norm_mean"]), _num(entry["answer_logp"]), _num(entry["wrong_logp"])]
                   for name, entry in _rows(results)])]
    checks = results["base"]["gradient_check"]
    k, many = checks[0]["k"], checks[0]["many"]
    check_rows = []
    for name, label in (("main", "T = 0.7, top-k 50 (dft)"), ("exact", "T = 1 (exact_sampling)")):
        rows = [c[name] for c in checks]
        check_rows.append([label, _num([r[f"ratio_k{k}"] for r in rows]), _num([r[f"cos_k{k}"] for r in rows]),
                           _num([r["ratio_many"] for r in rows]), _num([r["neg_cos_many"] for r in rows])])
    out += ["", f"## DFT's negative term at the start of training (θ = base, ω = 1; {checks[0]['num_prompts']} "
            f"training prompts; mean ± sd over seeds)", "",
            table(["negatives", f"‖g_dft − g_sft‖ / ‖g_sft‖, K = {k}", f"cos(g_dft, g_sft), K = {k}",
                   f"‖g_dft − g_sft‖ / ‖g_sft‖, K = {many}", f"cos(g_dft − g_sft, g_sft), K = {many}"],
                  check_rows)]
    dpo = results["methods"]["sft_dpo"]
    out += ["", f"sft_dpo: DPO (beta {cfg['dpo_beta']}) from the sft model trained with lr {dpo['sft_lr']:g}; "
            f"pairs per seed {', '.join(map(str, dpo['num_pairs']))}; steps SFT + DPO = "
            f"{', '.join(f'{a} + {b}' for a, b in zip(dpo['sft_steps'], dpo['dpo_steps']))}.", ""]
    return "\n".join(out)


def plot_results(results: dict, path: str | Path) -> Path:
    """Two panels: test accuracy per seed and method (mean ± sd), and log p(answer) vs log p(wrong sample)."""
    names = list(METHODS) + list(ABLATIONS)
    entries = {**results["methods"], **results["ablations"]}
    fig, axes = plotting.subplot_grid(1, 2, panel_size=(6.0, 4.2))
    left, right = axes[0]
    for i, name in enumerate(names):
        values = [100 * v for v in entries[name]["accuracy"]]
        mean, sd = mean_sd(values)
        left.scatter([i] * len(values), values, s=14, alpha=0.6, color="C0")
        left.errorbar([i + 0.15], [mean], yerr=[sd], fmt="o", color="C3", capsize=4)
    base = [100 * v for v in results["base"]["accuracy"]]
    left.axhline(sum(base) / len(base), color="grey", ls="--", lw=1, label="base model (mean)")
    left.set_xticks(range(len(names)), names, rotation=30, ha="right")
    left.set_ylabel("test greedy accuracy (%)")
    left.set_title(f"per seed (dots) and mean ± sd, {len(results['seeds'])} seeds")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    for i, name in enumerate(names):
        entry = entries[name]
        right.scatter(entry["wrong_logp"], entry["answer_logp"], s=18, color=f"C{i}", label=name)
    right.scatter(results["base"]["wrong_logp"], results["base"]["answer_logp"], s=18, color="grey", marker="x",
                  label="base")
    right.set_xlabel("mean log p of the base model's wrong test samples")
    right.set_ylabel("mean log p of the test answers")
    right.set_title("what each method moved (one point per seed)")
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    return plotting.save_figure(fig, path)


def _record_invocation(work: Path, entry: dict) -> list[dict]:
    """Append this invocation's time to ``work/timing.json``; a resumed study adds up every invocation."""
    path = work / "timing.json"
    timing = json.loads(path.read_text()) if path.exists() else {"invocations": []}
    timing["invocations"].append(entry)
    path.write_text(json.dumps(timing, indent=2) + "\n")
    return timing["invocations"]


def run_study(cfg: StudyConfig, *, work: str | Path, out: str | Path | None, command: str, log=print) -> dict:
    """Run (or resume) the whole study in ``work``; write ``results.json``, ``results.md`` and
    ``accuracy.png`` to ``out`` (when given). Returns the results dict.

    ``cfg.device`` is resolved first (:func:`.config.resolve_study_device`: a CUDA device this machine
    does not have is a ValueError before any work starts). ``log`` receives the progress lines (one per
    task). Every invocation, finished or not, appends its wall and CPU time (this process and its finished
    worker processes) to ``work/timing.json``; the results report their sum."""
    cfg = replace(cfg, device=resolve_study_device(cfg.device))
    started, cpu_started, children_started = time.perf_counter(), time.process_time(), _children_cpu_seconds()
    work = Path(work)
    protocol.write_splits(cfg, work)
    log(f"[dft_study] {len(cfg.seeds)} seeds, work directory {work.resolve()}, {cfg.workers} worker(s), "
        f"device {cfg.device}")
    finished = False
    try:
        results, _ = _execute(cfg, work, log)
        finished = True
    finally:
        invocations = _record_invocation(work, {
            "command": command, "wall_seconds": round(time.perf_counter() - started, 1),
            "cpu_seconds": round(time.process_time() - cpu_started + _children_cpu_seconds() - children_started, 1),
            "workers": cfg.workers, "finished": finished})
    prepared = {s: results[("prepare", s)] for s in cfg.seeds}
    summary = aggregate(cfg, results, prepared)
    summary["config"].update({
        "command": command, "wall_seconds": round(sum(i["wall_seconds"] for i in invocations), 1),
        "cpu_seconds": round(sum(i["cpu_seconds"] for i in invocations), 1),
        "invocations": invocations, "environment": environment(cfg)})
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "results.md").write_text(format_results_md(summary))
        plot_results(summary, out / "accuracy.png")
    return summary
