"""The study's table and figure (built with the shared helpers of :mod:`dftkern.train.plotting`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dftkern.train import plotting

__all__ = ["format_table", "format_paired", "plot_curves"]

#: line colour per loss (losses not listed take matplotlib's next colour); dashed = offline arm
_COLORS = {"rwr": "tab:green", "dpo": "tab:blue", "reinforce": "tab:red"}


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


def plot_curves(summary: Sequence[dict], checkpoints: Sequence[int], path: Path, reference: dict) -> None:
    """One panel per reward: mean held-out reward vs training step per (loss, arm), band = min..max over seeds."""
    rewards = list(dict.fromkeys(row["reward"] for row in summary))
    fig, axes = plotting.subplot_grid(1, len(rewards), panel_size=(5.5, 4.0))
    for ax, reward in zip(axes[0], rewards):
        for row in (r for r in summary if r["reward"] == reward):
            stats = [row["reward_at_step"][s] for s in checkpoints]
            plotting.plot_mean_band(ax, checkpoints, [x["mean"] for x in stats], [x["min"] for x in stats],
                                    [x["max"] for x in stats], label=f"{row['loss']} {row['arm']}",
                                    color=_COLORS.get(row["loss"]), style="-" if row["arm"] == "on_policy" else "--",
                                    marker="o", alpha=0.12)
        title = "reward = -length" if reward == "min_length" else \
            f"reward peaked at the reference mode (length {reference['mode_length']})"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("gradient step")
        ax.set_ylabel("mean reward of held-out samples")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    plotting.save_figure(fig, path)
