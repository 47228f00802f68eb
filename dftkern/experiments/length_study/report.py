"""The study's table and figure (built with the shared helpers of :mod:`dftkern.train.plotting`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dftkern.train import plotting

__all__ = ["format_table", "format_paired", "format_steps_to_optimum", "format_train_metrics", "plot_curves"]

#: the training diagnostics shown by :func:`format_train_metrics` (metrics.jsonl key, column title)
_TRAIN_COLUMNS = (("margin_mean", "DPO margin"), ("clip_fraction_low", "clip fraction low"),
                  ("clip_fraction_high", "clip fraction high"), ("ratio_mean", "ratio"), ("kl_mean", "KL (k3)"),
                  ("entropy_mean", "token entropy"))

#: line colour per loss (losses not listed take matplotlib's next colour); dashed = offline arm
_COLORS = {"rwr": "tab:green", "dpo": "tab:blue", "dpo_sampler": "tab:cyan", "reinforce": "tab:red",
           "ppo": "tab:purple", "ppo_2ep": "tab:pink",
           "grpo": "tab:orange"}


def format_table(summary: Sequence[dict], checkpoints: Sequence[int], reference: dict) -> str:
    """Markdown: per (reward, loss, arm) the mean held-out reward at each checkpoint (± sd over seeds)
    and the final mean length."""
    header = ["reward", "loss", "data"] + [f"reward @ {s}" for s in checkpoints] + ["final length"]
    rows = []
    for row in summary:
        cells = [plotting.format_mean_sd(row["reward_at_step"][s]["values"], signed=True) for s in checkpoints]
        length = plotting.format_mean_sd(row["length_at_step"][checkpoints[-1]]["values"], digits=2)
        rows.append([row["reward"], row["loss"], row["arm"].replace("_", "-")] + cells + [length])
    return (f"Reference model: modal length {reference['mode_length']}, mean length "
            f"{reference['mean_length']:.2f}, length histogram {reference['length_histogram']}.\n\n"
            + plotting.markdown_table(header, rows))


def _p_value(p: float | None) -> str:
    return "–" if p is None else ("< 1e-4" if p < 1e-4 else f"{p:.2g}")


def format_paired(paired: Sequence[dict], num_seeds: int) -> str:
    """Markdown: the paired differences of :func:`~dftkern.experiments.length_study.study.paired_comparisons`."""
    rows = []
    for row in paired:
        what = f"{row['loss']} − {row['vs']}, {row['arm'].replace('_', '-')}" if row["vs"] else \
            f"{row['loss']}, on-policy − offline"
        cells = [row["reward"], what]
        for part in ("final", "auc"):
            diff = row[part]
            cells += [f"{diff['mean']:+.3f} ± {diff['sd']:.3f}", _p_value(diff["p"]), f"{diff['wins']}/{diff['n']}"]
        rows.append(cells)
    return (f"Paired differences of the held-out reward (same seeds; mean ± sd over {num_seeds} seeds, two-sided "
            "paired t-test p, seeds where the difference is > 0), at the last step and averaged over the "
            "checkpoints (step 0 included; higher = rose earlier):\n\n"
            + plotting.markdown_table(["reward", "comparison", "final", "p", "> 0 in", "mean over training", "p",
                                       "> 0 in"], rows))


def format_steps_to_optimum(rows: Sequence[dict]) -> str:
    """Markdown: per (reward, loss, arm) the first checkpoint at the optimum, seed by seed ("–": never)."""
    cells = [[row["reward"], row["loss"], row["arm"].replace("_", "-"), f"{row['threshold']:+.2f}",
              " / ".join("–" if s is None else str(s) for s in row["steps"])] for row in rows]
    return ("First checkpoint step at which the held-out reward is within tolerance of the optimum "
            "(reward >= threshold), per seed (\"–\": not within the run):\n\n"
            + plotting.markdown_table(["reward", "loss", "data", "threshold", "step per seed"], cells))


def format_train_metrics(runs: Sequence[dict], seeds: Sequence[int]) -> str:
    """Markdown: per (reward, loss, arm) that logged any, the training diagnostics of
    :data:`_TRAIN_COLUMNS` (each run's mean over its steps, then mean ± sd over ``seeds``; "–" when
    not logged). Empty string when no run logged one."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        if run.get("train_metrics"):
            groups.setdefault((run["reward"], run["loss"], run["arm"]), []).append(run)
    if not groups:
        return ""
    rows = []
    for (reward, loss, arm), mine in groups.items():
        mine = sorted(mine, key=lambda r: list(seeds).index(r["seed"]))
        cells = []
        for key, _ in _TRAIN_COLUMNS:
            values = [r["train_metrics"][key]["mean"] for r in mine if key in r["train_metrics"]]
            cells.append(plotting.format_mean_sd(values, digits=3) if len(values) == len(mine) else "–")
        rows.append([reward, loss, arm.replace("_", "-")] + cells)
    return ("Training diagnostics (the trainer's metrics.jsonl: each run's mean over its steps; mean ± sd over "
            "seeds):\n\n" + plotting.markdown_table(["reward", "loss", "data"] + [t for _, t in _TRAIN_COLUMNS],
                                                      rows))


def plot_curves(summary: Sequence[dict], checkpoints: Sequence[int], path: Path, reference: dict) -> None:
    """Mean held-out reward vs training step per (loss, arm), band = min..max over seeds; one column per
    reward. Top row: the losses run in both arms (dashed = offline, solid = on-policy); bottom row:
    every on-policy run (when any loss is on-policy only; else one row)."""
    rewards = list(dict.fromkeys(row["reward"] for row in summary))
    both = {row["loss"] for row in summary if row["arm"] == "offline"}
    panels = [("offline vs on-policy", lambda row: row["loss"] in both)]
    if any(row["loss"] not in both for row in summary):
        panels.append(("on-policy", lambda row: row["arm"] == "on_policy"))
    fig, axes = plotting.subplot_grid(len(panels), len(rewards), panel_size=(6.0, 4.2))
    for i, (what, keep) in enumerate(panels):
        for ax, reward in zip(axes[i], rewards):
            for row in (r for r in summary if r["reward"] == reward and keep(r)):
                stats = [row["reward_at_step"][s] for s in checkpoints]
                plotting.plot_mean_band(ax, checkpoints, [x["mean"] for x in stats], [x["min"] for x in stats],
                                        [x["max"] for x in stats],
                                        label=f"{row['loss']} {row['arm'].replace('_', '-')}",
                                        color=_COLORS.get(row["loss"]),
                                        style="-" if row["arm"] == "on_policy" else "--", marker="o", alpha=0.12)
            title = "reward = -length" if reward == "min_length" else \
                f"reward peaked at the reference mode (length {reference['mode_length']})"
            ax.set_title(f"{title}: {what}", fontsize=10)
            ax.set_xlabel("gradient step")
            ax.set_ylabel("mean reward of held-out samples")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, handlelength=3)
    plotting.save_figure(fig, path)
