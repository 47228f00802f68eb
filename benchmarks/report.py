"""Turn a saved benchmark run into a Markdown table and a PNG chart.

    python benchmarks/report.py RESULTS.json [--markdown OUT.md] [--png OUT.png] [--no-png] [--quiet]

RESULTS.json is the file written by ``pytest benchmarks/ --benchmark-only --benchmark-json RESULTS.json``.
By default the outputs go next to it (``RESULTS.md``, ``RESULTS.png``) and the Markdown is also
printed to stdout. Columns per group (one group per operation and shape):

    median time   median of pytest-benchmark's rounds (one round = forward + backward)
    TFLOP/s       6*N*H*V / median time
    % of matmul   TFLOP/s over the measured square-matmul rate of the same device (bf16 on
                  CUDA, fp32 on CPU) -- the "matmul floor" a fused head can at best reach
    peak memory   CUDA: max_memory_allocated during one step minus what was allocated before
                  (inputs); CPU: peak-RSS growth of one step in a fresh process
    time / best peer, memory / best peer
                  this row over the fastest (resp. leanest) non-dftkern row of the group
                  (naive PyTorch, torch.compile, torch, Liger, CCE); below 1 is better

Skipped rows (peer not installed, OOM, time budget) are listed with their reason.
This script only needs the standard library and matplotlib (Agg backend).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

__all__ = ["load_results", "build_groups", "render_markdown", "render_png", "main"]

PEER_FAMILIES = ("naive", "peer")
OPERATION_ORDER = ("token_logprobs", "token_entropy", "dft_loss", "dpo_loss")  # report order of the groups


def load_results(path: str | Path) -> dict:
    """Read a ``--benchmark-json`` file; ValueError when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"results file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"results file {str(path)!r} is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"results file {str(path)!r} has no 'benchmarks' list; "
                         "write it with pytest --benchmark-json")
    return data


def _row_from_benchmark(bench: dict) -> dict:
    info = bench.get("extra_info") or {}
    stats = bench.get("stats") or {}
    median = info.get("median_s", stats.get("median"))
    flops = info.get("flops")
    tflops = info.get("tflops")
    if tflops is None and flops and median:
        tflops = flops / median / 1e12
    return {
        "implementation": info.get("implementation") or bench.get("param") or bench.get("name"),
        "family": info.get("family", "peer"),
        "median_s": median,
        "rounds": stats.get("rounds"),
        "stddev_s": stats.get("stddev"),
        "tflops": tflops,
        "pct_of_matmul": info.get("pct_of_matmul"),
        "peak_mem_bytes": info.get("peak_mem_bytes"),
        "peak_mem_error": info.get("peak_mem_error"),
        "skipped": None,
    }


def build_groups(data: dict) -> dict[str, list[dict]]:
    """``{group: [row, ...]}``: token groups, then DFT, then DPO (run order within each); skipped rows
    last in their group; ``time_vs_best_peer`` / ``mem_vs_best_peer`` filled in for rows that ran."""
    groups: dict[str, list[dict]] = {}
    for bench in data["benchmarks"]:
        groups.setdefault(bench.get("group") or "(no group)", []).append(_row_from_benchmark(bench))
    for skip in (data.get("dftkern_bench") or {}).get("skipped", []):
        groups.setdefault(skip.get("group") or "(no group)", []).append({
            "implementation": skip.get("implementation", "?"), "family": None, "median_s": None,
            "rounds": None, "stddev_s": None, "tflops": None, "pct_of_matmul": None, "peak_mem_bytes": None,
            "peak_mem_error": None, "skipped": skip.get("reason", "skipped"),
        })
    order = {op: i for i, op in enumerate(OPERATION_ORDER)}
    ranked = sorted(enumerate(groups), key=lambda item: (order.get(item[1].split(" ", 1)[0], len(order)), item[0]))
    groups = {name: groups[name] for _, name in ranked}
    for rows in groups.values():
        ran = [r for r in rows if r["skipped"] is None]
        peers = [r for r in ran if r["family"] in PEER_FAMILIES]
        peer_times = [r["median_s"] for r in peers if r["median_s"]]
        peer_mems = [r["peak_mem_bytes"] for r in peers if r["peak_mem_bytes"]]
        best_time = min(peer_times) if peer_times else None
        best_mem = min(peer_mems) if peer_mems else None
        for r in ran:
            r["time_vs_best_peer"] = r["median_s"] / best_time if best_time and r["median_s"] else None
            r["mem_vs_best_peer"] = (r["peak_mem_bytes"] / best_mem
                                     if best_mem and r["peak_mem_bytes"] is not None else None)
    return groups


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds >= 1.0:
        return f"{seconds:.3g} s"
    return f"{seconds * 1e3:.3g} ms"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.0f} KiB"


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{suffix}"


def _header_lines(data: dict) -> list[str]:
    machine = data.get("machine_info") or {}
    env = machine.get("dftkern_bench") or {}
    extra = data.get("dftkern_bench") or {}
    matmul = extra.get("matmul") or env.get("matmul")
    device = env.get("device_name") or machine.get("node") or "unknown device"
    if env.get("device", "").startswith("cpu") or device == "CPU":
        cpu = (machine.get("cpu") or {}).get("brand_raw")
        device = f"CPU{f' ({cpu})' if cpu else ''}, {env.get('cpu_threads', '?')} threads"
    elif env.get("device_memory_gib"):
        device = f"{device} ({env['device_memory_gib']} GiB, sm {env.get('compute_capability', '?')})"
    versions = [f"torch {env.get('torch', '?')}"
                + (f" (CUDA {env['cuda']})" if env.get("cuda") else ""),
                f"triton {env.get('triton') or 'not installed'}",
                f"transformers {env.get('transformers') or 'not installed'}",
                f"liger-kernel {env.get('liger_kernel') or 'not installed'}",
                f"cut-cross-entropy {env.get('cut_cross_entropy') or 'not installed'}"]
    commit = env.get("dftkern_commit") or (data.get("commit_info") or {}).get("id")
    lines = [
        "# dftkern benchmark results",
        "",
        f"- **Device:** {device}",
        f"- **Software:** {', '.join(versions)}",
        f"- **dftkern:** {env.get('dftkern', '?')}" + (f" @ `{commit[:12]}`" if commit else ""),
        f"- **Date:** {env.get('date_utc') or data.get('datetime', '?')}; shape set `{env.get('shape_set', '?')}`",
    ]
    if matmul:
        lines.append(f"- **Matmul floor:** {matmul['tflops']:.4g} TFLOP/s ({matmul['dtype']} {matmul['size']}^3 "
                     "square matmul, best of 3)")
    else:
        lines.append("- **Matmul floor:** not measured")
    lines.append("- **FLOP model:** 6·N·H·V per forward+backward, N = all token rows (rows·T for losses)")
    return lines


def render_markdown(data: dict) -> str:
    """The whole report as Markdown."""
    lines = _header_lines(data)
    groups = build_groups(data)
    if not groups:
        lines += ["", "_No benchmark rows in this file._"]
    for group, rows in groups.items():
        lines += ["", f"## {group}", "",
                  "| implementation | median time | TFLOP/s | % of matmul | peak memory | time / best peer "
                  "| memory / best peer |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            name = f"**{r['implementation']}**" if r["family"] == "dftkern" else r["implementation"]
            if r["skipped"] is not None:
                reason = str(r["skipped"]).replace("|", "/")
                lines.append(f"| {name} | skipped: {reason} | | | | | |")
                continue
            memory = _fmt_bytes(r["peak_mem_bytes"]) if r["peak_mem_error"] is None else "probe failed"
            lines.append(
                f"| {name} | {_fmt_time(r['median_s'])} | {_fmt(r['tflops'], '.3g')} "
                f"| {_fmt(r['pct_of_matmul'], '.1f', '%')} | {memory} "
                f"| {_fmt(r.get('time_vs_best_peer'), '.2f', '×')} | {_fmt(r.get('mem_vs_best_peer'), '.2f', '×')} |")
    lines.append("")
    return "\n".join(lines)


def _short_reason(reason: str) -> str:
    """First clause of a skip reason, for chart labels ("OOM", "liger-kernel needs CUDA", ...)."""
    head = reason.split(";")[0].split(" (")[0].strip()
    return head if len(head) <= 60 else head[:57] + "..."


def _short_group(group: str) -> str:
    parts = [p.strip() for p in group.split("|")]
    return "\n".join(parts[:3]) if len(parts) >= 3 else group


def render_png(data: dict, path: str | Path) -> Path:
    """A grid of bar charts, one per group: median time per implementation (label: time, memory)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = build_groups(data)
    if not groups:
        raise ValueError("no benchmark rows to plot")
    n = len(groups)
    cols = 2 if n > 1 else 1
    rows_n = math.ceil(n / cols)
    max_rows = max(len(r) for r in groups.values())
    fig, axes = plt.subplots(rows_n, cols, figsize=(7.5 * cols, (0.45 * max_rows + 1.6) * rows_n), squeeze=False)
    colors = {"dftkern": "#1f77b4", "naive": "#7f7f7f", "peer": "#ff7f0e"}
    for ax, (group, rows) in zip(axes.flat, groups.items(), strict=False):
        names = [r["implementation"] for r in rows]
        times_ms = [(r["median_s"] or 0.0) * 1e3 for r in rows]
        ax.barh(range(len(rows)), times_ms, color=[colors.get(r["family"], "#cccccc") for r in rows])
        ax.set_yticks(range(len(rows)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("median time per forward+backward (ms)", fontsize=8)
        ax.set_title(_short_group(group), fontsize=8)
        right = max(times_ms) if any(times_ms) else 1.0
        ax.set_xlim(0, right * 1.6)
        for i, r in enumerate(rows):
            if r["skipped"] is not None:
                label = "skipped: " + _short_reason(str(r["skipped"]))
            else:
                label = (f"{_fmt_time(r['median_s'])}, {_fmt(r['tflops'], '.3g')} TFLOP/s, "
                         f"{_fmt_bytes(r['peak_mem_bytes'])}")
            ax.text(times_ms[i] + right * 0.02, i, label, va="center", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    env = (data.get("machine_info") or {}).get("dftkern_bench") or {}
    fig.suptitle(f"dftkern benchmarks on {env.get('device_name', '?')} (torch {env.get('torch', '?')}); "
                 "blue: dftkern, orange: peers, grey: naive", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Markdown table + PNG chart from a pytest-benchmark JSON file.")
    parser.add_argument("results", help="file written by pytest benchmarks/ --benchmark-json RESULTS.json")
    parser.add_argument("--markdown", help="output Markdown path (default: RESULTS.md next to the JSON)")
    parser.add_argument("--png", help="output chart path (default: RESULTS.png next to the JSON)")
    parser.add_argument("--no-png", action="store_true", help="skip the chart")
    parser.add_argument("--quiet", action="store_true", help="do not print the Markdown to stdout")
    args = parser.parse_args(argv)
    try:
        data = load_results(args.results)
    except ValueError as exc:
        parser.error(str(exc))
    results = Path(args.results)
    md_path = Path(args.markdown) if args.markdown else results.with_suffix(".md")
    markdown = render_markdown(data)
    md_path.write_text(markdown)
    written = [str(md_path)]
    if not args.no_png and build_groups(data):
        png_path = Path(args.png) if args.png else results.with_suffix(".png")
        written.append(str(render_png(data, png_path)))
    if not args.quiet:
        print(markdown)
    print("wrote " + ", ".join(written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
