"""Benchmark suite for dftkern against its peers (run with ``pytest benchmarks/ --benchmark-only``).

Modules:
    shapes           the benchmarked shapes and the FLOP model (``6 * N * H * V``)
    implementations  every row: dftkern engines/schedules, naive PyTorch, torch.compile, peers
    harness          running one row: skips (missing peer, OOM, time budget), timing, peak memory
    rss_probe        ``python -m benchmarks.rss_probe``: CPU peak-RSS growth in a fresh process
    report           ``python benchmarks/report.py RESULTS.json``: Markdown table + PNG chart

See docs/benchmarks.md.
"""
