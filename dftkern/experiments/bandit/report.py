"""Summaries, markdown tables, paired comparisons and figures of a bandit run."""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict
from pathlib import Path

import torch

from dftkern.train import plotting

from .config import BanditConfig
from .env import NUM_ACTIONS, REWARDS, bandit_reward, expected_reward, reference_policy
from .methods import METHOD_LABELS, NEGATIVE_GRADIENT

__all__ = ["summarize", "paired_comparisons", "markdown_table", "plot_curves", "plot_final_policies",
           "write_outputs"]

#: the maximum-likelihood method every other one is compared with, seed by seed
BASELINE = "bon_sft"


def summarize(results: dict) -> list[dict]:
    """One row per (reward, regime, method): final and mean-over-training E[r], steps to threshold.

    ``auc`` is the mean of E[r] over the recorded steps (a speed measure: higher means the
    mass moved earlier). ``steps_to_threshold`` lists, per seed, the first recorded step with
    ``E[r] >= threshold`` (``None`` if never). ``*_std`` is the sample standard deviation over
    seeds (``n - 1``); ``final`` lists every seed's final E[r].
    """
    config: BanditConfig = results["config"]
    steps = results["steps"]
    rows = []
    for (method, regime, reward_name), curve in results["curves"].items():
        reached = []
        for seed_curve in curve:
            hits = (seed_curve >= config.threshold).nonzero()
            reached.append(int(steps[int(hits[0])]) if hits.numel() else None)
        final, auc = curve[:, -1].tolist(), curve.mean(dim=1).tolist()
        final_mean, final_std = plotting.mean_sd(final)
        auc_mean, auc_std = plotting.mean_sd(auc)
        rows.append(
            {
                "method": method,
                "regime": regime,
                "reward": reward_name,
                "final": final,
                "final_mean": final_mean,
                "final_std": final_std,
                "final_min": min(final),
                "final_max": max(final),
                "auc_mean": auc_mean,
                "auc_std": auc_std,
                "steps_to_threshold": reached,
                "samples": results["samples"][(method, regime, reward_name)],
            }
        )
    return rows


def paired_comparisons(results: dict) -> list[dict]:
    """Seed-by-seed differences (every method uses the same sampling seeds, common random numbers).

    Two kinds of rows: ``vs = "bon_sft"``: ``method - bon_sft`` within a (reward, regime), and
    ``vs = None``: the method's ``on_policy - offline`` for each reward. Each row carries
    :func:`dftkern.train.plotting.paired_difference` (``n, mean, sd, wins, t, p``) of the final
    E[r] (``"final"``) and of the mean E[r] over training (``"auc"``, a speed measure).
    """
    config: BanditConfig = results["config"]
    finals = {key: curve[:, -1].tolist() for key, curve in results["curves"].items()}
    aucs = {key: curve.mean(dim=1).tolist() for key, curve in results["curves"].items()}

    def compare(key_a, key_b) -> dict:
        return {"final": plotting.paired_difference(finals[key_a], finals[key_b]),
                "auc": plotting.paired_difference(aucs[key_a], aucs[key_b])}

    rows = []
    for reward_name in config.rewards:
        if BASELINE in config.methods:
            for regime in config.regimes:
                for method in config.methods:
                    if method != BASELINE:
                        rows.append({"reward": reward_name, "regime": regime, "method": method, "vs": BASELINE,
                                     **compare((method, regime, reward_name), (BASELINE, regime, reward_name))})
        if set(config.regimes) == {"offline", "on_policy"}:
            for method in config.methods:
                rows.append({"reward": reward_name, "regime": "on_policy - offline", "method": method, "vs": None,
                             **compare((method, "on_policy", reward_name), (method, "offline", reward_name))})
    return rows


def _median_steps(reached: list) -> str:
    """Median first-hit step over the seeds that reach the threshold, ``(k/N seeds)`` if not all do."""
    hit = sorted(s for s in reached if s is not None)
    if not hit:
        return "never"
    mid = len(hit) // 2
    median = hit[mid] if len(hit) % 2 else (hit[mid - 1] + hit[mid]) / 2
    text = f"{median:g}"
    return text if len(hit) == len(reached) else f"{text} ({len(hit)}/{len(reached)} seeds)"


def _p_value(p: float | None) -> str:
    if p is None:
        return "–"
    return "< 1e-4" if p < 1e-4 else f"{p:.2g}"


def _comparison_label(row: dict) -> str:
    """``"DFT − best-of-N SFT, offline"`` or ``"DFT, on-policy − offline"``."""
    if row["vs"]:
        return f"{METHOD_LABELS[row['method']]} − {METHOD_LABELS[row['vs']]}, {row['regime'].replace('_', '-')}"
    return f"{METHOD_LABELS[row['method']]}, on-policy − offline"


def markdown_table(results: dict) -> str:
    """Markdown tables: per reward the summary of every (method, regime), then the paired differences."""
    config: BanditConfig = results["config"]
    ref = reference_policy()
    summary = summarize(results)
    paired = paired_comparisons(results)
    lines = []
    for reward_name in config.rewards:
        base = expected_reward(ref, bandit_reward(reward_name))
        lines.append(f"### R_{reward_name} (optimum at action {REWARDS[reward_name]}; "
                     f"E[r] under pi_ref = {base:.3f})\n")
        header = ["method", "regime", "final E[r] (mean ± sd)", "min – max", "mean E[r] over training",
                  f"steps to E[r] ≥ {config.threshold:g} (median over seeds reaching it)"]
        body = [[METHOD_LABELS[row["method"]], row["regime"].replace("_", "-"),
                 f"{row['final_mean']:.3f} ± {row['final_std']:.3f}",
                 f"{row['final_min']:.3f} – {row['final_max']:.3f}",
                 f"{row['auc_mean']:.3f} ± {row['auc_std']:.3f}", _median_steps(row["steps_to_threshold"])]
                for row in summary if row["reward"] == reward_name]
        lines += [plotting.markdown_table(header, body), ""]
        mine = [row for row in paired if row["reward"] == reward_name]
        if mine:
            lines.append(f"Paired differences on R_{reward_name} (same seeds; mean ± sd over {config.seeds} seeds, "
                         "two-sided paired t-test p, seeds where the difference is > 0), of the final E[r] and of "
                         "the mean E[r] over training:\n")
            header = ["comparison", "final E[r]", "p", "> 0 in", "mean E[r] over training", "p", "> 0 in"]
            body = [[_comparison_label(row)] + [cell for part in ("final", "auc") for cell in (
                f"{row[part]['mean']:+.3f} ± {row[part]['sd']:.3f}", _p_value(row[part]["p"]),
                f"{row[part]['wins']}/{row[part]['n']}")] for row in mine]
            lines += [plotting.markdown_table(header, body), ""]
    return "\n".join(lines)


#: colour per method (others: matplotlib's next colour)
_PALETTE = {
    "bon_sft": "#1f77b4",
    "rwr": "#17becf",
    "dpo": "#d62728",
    "ipo": "#ff7f0e",
    "rloo": "#2ca02c",
    "dft": "#9467bd",
    "dft2": "#8c564b",
    "reinforce": "#bcbd22",
    "dft_unselected": "#e377c2",
    "ppo": "#7f7f7f",
}


def _style(method: str) -> str:
    """Solid for methods with a negative gradient, dashed for maximum likelihood."""
    return "-" if method in NEGATIVE_GRADIENT else "--"


def plot_curves(results: dict, path: Path) -> None:
    """Expected reward vs gradient step: rows = rewards, columns = regimes; mean ± sd band."""
    config: BanditConfig = results["config"]
    steps = results["steps"]
    ref = reference_policy()
    fig, axes = plotting.subplot_grid(len(config.rewards), len(config.regimes), panel_size=(5.2, 3.6), sharex=True)
    for i, reward_name in enumerate(config.rewards):
        base = expected_reward(ref, bandit_reward(reward_name))
        for j, regime in enumerate(config.regimes):
            ax = axes[i][j]
            for method in config.methods:
                curve = results["curves"][(method, regime, reward_name)]
                mean = curve.mean(0)
                std = curve.std(0) if curve.shape[0] > 1 else torch.zeros_like(mean)
                plotting.plot_mean_band(ax, steps, mean, mean - std, mean + std, label=METHOD_LABELS[method],
                                        color=_PALETTE.get(method), style=_style(method))
            ax.axhline(base, color="gray", lw=0.8, ls=":", label="pi_ref")
            ax.set_ylim(0, 1.02)
            ax.set_title(f"R_{reward_name} (optimum at a={REWARDS[reward_name]}), {regime.replace('_', '-')}")
            ax.grid(alpha=0.3)
            if i == len(config.rewards) - 1:
                ax.set_xlabel("gradient step")
            if j == 0:
                ax.set_ylabel("expected reward E_pi[R]")
    plotting.save_figure(
        fig, path, legend_from=axes[0][0], dpi=100, title_size=9,
        title=f"Bandit (100 actions): mean ± sd over {config.seeds} seeds; "
        f"{config.groups} groups × {config.group_size} samples per step, reuse {config.reuse}, "
        f"Adam lr {config.lr:g}, {config.policy} policy; dashed = no negative gradient",
    )


def plot_final_policies(results: dict, path: Path) -> None:
    """Final policy (mean over seeds) of every method next to pi_ref and the reward."""
    config: BanditConfig = results["config"]
    ref = reference_policy()
    actions = torch.arange(NUM_ACTIONS)
    fig, axes = plotting.subplot_grid(len(config.rewards), len(config.regimes), panel_size=(5.2, 3.4), sharex=True)
    for i, reward_name in enumerate(config.rewards):
        reward = bandit_reward(reward_name)
        for j, regime in enumerate(config.regimes):
            ax = axes[i][j]
            ax.fill_between(actions, 0, ref, step="mid", color="gray", alpha=0.35, label="pi_ref")
            for method in config.methods:
                probs = results["final_probs"][(method, regime, reward_name)].mean(0)
                plotting.plot_mean_band(ax, actions, probs, label=METHOD_LABELS[method], color=_PALETTE.get(method),
                                        style=_style(method), linewidth=1.3)
            ax.set_yscale("log")
            ax.set_ylim(1e-4, 1.0)
            twin = ax.twinx()
            twin.plot(actions, reward, color="black", lw=0.8, ls=":")
            twin.set_ylim(0, 1.05)
            twin.set_yticks([])
            ax.set_title(f"final policy, R_{reward_name}, {regime.replace('_', '-')} (dotted: reward)", fontsize=9)
            if i == len(config.rewards) - 1:
                ax.set_xlabel("action")
            if j == 0:
                ax.set_ylabel("probability (log scale)")
    plotting.save_figure(fig, path, legend_from=axes[0][0], dpi=100)


def _samples_per_run(config: BanditConfig) -> int:
    return math.ceil(config.steps / config.reuse) * config.groups * config.group_size


def write_outputs(results: dict, out_dir: Path, command: str, plots: bool = True) -> dict:
    """Write ``results.md`` (tables + command line), ``results.json`` and the PNGs to ``out_dir``.

    Returns:
        ``{name: Path}`` of the files written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config: BanditConfig = results["config"]
    written = {}
    if plots:
        written["curves_png"] = out_dir / "reward_curves.png"
        plot_curves(results, written["curves_png"])
        written["policies_png"] = out_dir / "final_policies.png"
        plot_final_policies(results, written["policies_png"])

    header = [
        "# Bandit experiment: results",
        "",
        f"Command: `{command}`",
        "",
        f"Wall time: {results['seconds']:.1f} s on {platform.machine()} "
        f"({results['threads']} torch thread(s)), torch {torch.__version__}, Python {platform.python_version()}.",
        "",
        "Configuration: " + ", ".join(f"{k}={v}" for k, v in asdict(config).items()) + ".",
        "",
        f"Each gradient step uses {config.groups} groups × {config.group_size} sampled actions; a new batch is drawn "
        f"every {config.reuse} step(s), so a run draws {_samples_per_run(config)} actions per seed. "
        "E[r] is the exact expected reward of the policy; spread is over seeds (sample sd, n - 1); "
        "\"mean E[r] over training\" averages the curve over all recorded steps (higher = mass moved earlier).",
        "",
    ]
    written["table_md"] = out_dir / "results.md"
    written["table_md"].write_text("\n".join(header) + "\n" + markdown_table(results))

    # curves thinned to at most ~100 points (the summary above uses every recorded step)
    stride = max(1, math.ceil((len(results["steps"]) - 1) / 100))
    keep = sorted(set(range(0, len(results["steps"]), stride)) | {len(results["steps"]) - 1})
    payload = {
        "command": command,
        "config": asdict(config),
        "seconds": round(results["seconds"], 2),
        "summary": summarize(results),
        "paired": paired_comparisons(results),
        "curve_steps": [results["steps"][i] for i in keep],
        "mean_curves": {
            "/".join(key): [round(float(curve[:, i].mean()), 4) for i in keep]
            for key, curve in results["curves"].items()
        },
        "std_curves": {
            "/".join(key): [round(plotting.mean_sd(curve[:, i].tolist())[1], 4) for i in keep]
            for key, curve in results["curves"].items()
        },
    }
    written["json"] = out_dir / "results.json"
    written["json"].write_text(json.dumps(payload, indent=None, separators=(",", ":")) + "\n")
    return written
