"""Self-tests of the benchmark suite (run in ``--benchmark-disable`` CI runs; ``--benchmark-only`` skips them).

They check that every row computes the same loss and gradients as the naive reference, that the
harness turns missing peers / OOM / an exhausted time budget into recorded skips, that the CPU
memory probe sees a materialized logits tensor, the FLOP model, and the report.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from . import conftest, harness, implementations, report
from .implementations import (
    ENTROPY_BETA,
    IGNORE_INDEX,
    Implementation,
    entropy_implementations,
    find_implementation,
    loss_implementations,
    make_loss_problem,
    make_token_problem,
    naive_dpo_loss,
    naive_entropy_loss,
    naive_token_logprobs,
    token_implementations,
)
from .shapes import (
    MODEL_HEADS,
    SHAPE_SET_ENV,
    TRL_7244_HEAD,
    LossShape,
    TokenShape,
    head_flops,
    lean_token_shapes,
    loss_shapes,
    prompt_loss_shapes,
    selected_shape_set,
    token_shapes,
)

CPU = torch.device("cpu")
TINY_TOKEN = TokenShape("tiny", 32, 512, 24, torch.float32)
TINY_DFT = LossShape("dft", "tiny", 32, 512, 2, 4, 12, 3, torch.float32)
TINY_DPO = LossShape("dpo", "tiny", 32, 512, 3, 2, 12, 3, torch.float32)


# ---------------------------------------------------------------------------------------------
# Shapes and FLOP model
# ---------------------------------------------------------------------------------------------


def test_flop_model_counts_three_matmuls():
    assert head_flops(4, 5, 6) == 6 * 4 * 5 * 6
    assert TokenShape("llama3-8b", 4096, 128256, 4096, torch.bfloat16).flops == 6 * 4096 * 4096 * 128256
    dft = loss_shapes("full", "dft")[0]
    assert dft.tokens == 4 * 5 * 1024 and dft.flops == 6 * dft.tokens * 4096 * 128256
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="tokens"):
            head_flops(bad, 5, 6)


def test_shape_sets_match_the_issue():
    full = token_shapes("full")
    assert len(full) == 9 and {s.dtype for s in full} == {torch.bfloat16}
    assert {(s.hidden_size, s.vocab_size) for s in full} == set(MODEL_HEADS.values())
    assert sorted({s.tokens for s in full}) == [4096, 16384, 32768]
    assert [s.tokens for s in full][:3] == [4096] * 3  # smallest N first (time budget cuts the largest)
    assert [s.tokens for s in token_shapes("small")] == [4096] * 3
    assert [s.dtype for s in token_shapes("cpu")] == [torch.float32]
    dft, dpo = loss_shapes("full", "dft")[0], loss_shapes("full", "dpo")[0]
    assert (dft.groups, dft.num_negatives, dft.seq_len) == (4, 4, 1024)
    assert (dpo.groups, dpo.rows, dpo.seq_len) == (4, 8, 1024)
    with pytest.raises(ValueError, match="shape set"):
        token_shapes("huge")


def test_shape_set_env(monkeypatch):
    monkeypatch.delenv(SHAPE_SET_ENV, raising=False)
    assert selected_shape_set(cuda_available=True) == "full"
    assert selected_shape_set(cuda_available=False) == "cpu"
    monkeypatch.setenv(SHAPE_SET_ENV, "Small")
    assert selected_shape_set(cuda_available=True) == "small"
    monkeypatch.setenv(SHAPE_SET_ENV, "everything")
    with pytest.raises(ValueError, match=SHAPE_SET_ENV):
        selected_shape_set(cuda_available=True)


def test_memory_estimates_skip_only_hopeless_naive_rows():
    """On an 80 GB GPU the naive row at N=32k, V=256k must be skipped up front; N=4k must be tried."""
    by_id = {s.id: s for s in token_shapes("full")}
    naive = find_implementation("token", "naive")
    assert naive.workspace(by_id["gemma2-2b-N32768"]) > 80 * 2**30
    assert naive.workspace(by_id["llama3-8b-N4096"]) < 20 * 2**30
    for impl in token_implementations():
        if impl.family != "naive":
            assert impl.workspace(by_id["gemma2-2b-N32768"]) < 16 * 2**30, impl.name


# ---------------------------------------------------------------------------------------------
# Every row computes the same thing
# ---------------------------------------------------------------------------------------------


def test_naive_token_logprobs_matches_float64():
    p = make_token_problem(TINY_TOKEN, CPU, seed=3)
    labels = p.labels.clone()
    labels[::5] = implementations.IGNORE_INDEX
    got = naive_token_logprobs(p.hidden, p.weight, labels)
    ref = torch.log_softmax(p.hidden.double() @ p.weight.double().T, dim=-1)
    ref = ref.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1).masked_fill(labels < 0, 0.0)
    assert got.dtype == torch.float32 and got.shape == labels.shape
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert bool((got[::5] == 0).all())


def _loss_and_grads(impl: Implementation, problem) -> tuple[float, list[torch.Tensor]]:
    loss_fn, leaves = impl.build(problem)
    step = harness.make_step(loss_fn, leaves, CPU)
    loss = step()
    return float(loss), [leaf.grad.clone() for leaf in leaves]


def _runnable_here(impls):
    return [i for i in impls if i.unavailable(CPU) is None and not i.compiles and i.family != "naive"]


@pytest.mark.parametrize("operation", ["token", "dft", "dpo"])
def test_rows_agree_with_naive(operation):
    if operation == "token":
        impls, shape, make = token_implementations(), TINY_TOKEN, make_token_problem
    else:
        impls, make = loss_implementations(operation), make_loss_problem
        shape = TINY_DFT if operation == "dft" else TINY_DPO
    naive = find_implementation(operation, "naive")
    ref_loss, ref_grads = _loss_and_grads(naive, make(shape, CPU, seed=7))
    assert math.isfinite(ref_loss)
    others = [i for i in _runnable_here(impls) if i.name != "liger-dpo"]
    assert any(i.family == "dftkern" for i in others), "dftkern rows must run on CPU"
    for impl in others:
        loss, grads = _loss_and_grads(impl, make(shape, CPU, seed=7))
        assert loss == pytest.approx(ref_loss, rel=1e-4, abs=1e-5), impl.name
        for leaf_name, got, want in zip(("hidden", "weight"), grads, ref_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, row=impl.name, leaf=leaf_name: f"{row}, grad of {leaf}: {m}")


def test_lean_shapes():
    cpu = lean_token_shapes("cpu")
    assert [s.ignore_fraction for s in cpu] == [0.0, 0.75] and len({s.id for s in cpu}) == 2
    full = lean_token_shapes("full")
    assert (full[0].ignore_fraction, full[0].tokens) == (0.5, 16384)
    trl = full[1]
    assert (trl.hidden_size, trl.vocab_size, trl.tokens) == (*TRL_7244_HEAD, 8192) and trl.dtype == torch.bfloat16
    prompts = prompt_loss_shapes("full", "dft")
    assert [s.prompt_len for s in prompts] == [0, 512] and prompts[1].id.endswith("-P50")
    assert loss_shapes("full", "dft")[0].id == "llama3-8b-G4x5-T1024"  # the default keeps its earlier id
    with pytest.raises(ValueError, match="ignore_fraction"):
        TokenShape("x", 4, 8, 2, torch.float32, 1.0)
    masked = make_token_problem(TokenShape("tiny", 8, 64, 4000, torch.float32, 0.75), CPU, seed=1)
    assert abs((masked.labels == IGNORE_INDEX).float().mean().item() - 0.75) < 0.03


def test_entropy_rows_agree_with_naive():
    shape = TokenShape("tiny", 32, 512, 24, torch.float32, 0.25)
    naive = find_implementation("entropy", "naive")
    ref_loss, ref_grads = _loss_and_grads(naive, make_token_problem(shape, CPU, seed=9))
    p = make_token_problem(shape, CPU, seed=9)
    expected = naive_entropy_loss(p.hidden, p.weight, p.labels)
    assert ref_loss == pytest.approx(expected.item(), rel=1e-6)
    rows = [i for i in entropy_implementations() if i.unavailable(CPU) is None and not i.compiles]
    trained = [i for i in rows if i.family == "dftkern" and not i.forward_only]
    assert {i.name for i in trained} == {"dftkern-torch-entropy", "dftkern-torch-token-loss"}
    for impl in trained:
        loss, grads = _loss_and_grads(impl, make_token_problem(shape, CPU, seed=9))
        assert loss == pytest.approx(ref_loss, rel=1e-5), impl.name
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=lambda m, row=impl.name: f"{row}: {m}")
    forward = find_implementation("entropy", "dftkern-torch-entropy-fwd")
    p = make_token_problem(shape, CPU, seed=9)
    fn, leaves = forward.build(p)
    value = harness.make_step(fn, leaves, CPU, backward=False)()
    keep = p.labels != IGNORE_INDEX
    logp_all = torch.log_softmax(p.hidden.detach().double() @ p.weight.detach().double().T, -1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    picked = logp_all.gather(1, p.labels.clamp_min(0)[:, None])[:, 0]
    assert value.item() == pytest.approx(((picked + ent) * keep).sum().item(), rel=1e-5)
    assert all(leaf.grad is None for leaf in leaves) and ENTROPY_BETA > 0


@pytest.mark.parametrize("accum", ["fp32", "weight"])
def test_dpo_pair_chunk_rows_agree_with_naive(accum):
    """The triton-only pair-chunk DPO rows, built with the torch engine here: same loss and grads."""
    naive = find_implementation("dpo", "naive")
    ref_loss, ref_grads = _loss_and_grads(naive, make_loss_problem(TINY_DPO, CPU, seed=7))
    row = Implementation("pairchunks-torch", "dftkern", "", lambda d: None,
                         implementations._build_dftkern_dpo_pair_chunks("torch", accum), lambda s: 0)
    loss, grads = _loss_and_grads(row, make_loss_problem(TINY_DPO, CPU, seed=7))
    assert loss == pytest.approx(ref_loss, rel=1e-4)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_row_groups_of_entropy_and_forward_only_rows():
    shape = token_shapes("cpu")[0]
    assert harness.row_group("token", shape) == shape.group
    assert harness.row_group("entropy", shape).startswith("token_entropy fwd+bwd |")
    assert harness.row_group("entropy", shape, forward_only=True).startswith("token_entropy fwd only |")


def test_liger_dpo_row_uses_chosen_first_layout(monkeypatch):
    liger = find_implementation("dpo", "liger-dpo")
    reason = liger.unavailable(CPU)
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setattr(implementations, "LIGER_DPO_COMPILED", False)  # same math, no 10 s compile
    problem = make_loss_problem(TINY_DPO, CPU, seed=11)
    loss, (grad_hidden_stacked, grad_weight) = _loss_and_grads(liger, problem)
    # Liger has no precomputed reference input: compare with DPO at reference log-probs 0
    problem.weight.grad = None  # the Liger step wrote it (the weight leaf is shared)
    zero_ref = torch.zeros_like(problem.ref_logps)
    expected = naive_dpo_loss(problem.hidden, problem.weight, problem.labels, zero_ref)
    expected.backward()
    assert loss == pytest.approx(expected.item(), rel=1e-4)
    g = TINY_DPO.groups
    grad_hidden = torch.empty_like(problem.hidden.grad)
    grad_hidden[0::2], grad_hidden[1::2] = grad_hidden_stacked[:g], grad_hidden_stacked[g:]
    torch.testing.assert_close(grad_hidden, problem.hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_weight, problem.weight.grad, rtol=1e-4, atol=1e-6)


def test_loss_problem_masks_prompt_and_padding():
    p = make_loss_problem(TINY_DFT, CPU, seed=5)
    ignored = p.labels == implementations.IGNORE_INDEX
    assert bool(ignored[:, : TINY_DFT.prompt_len].all())
    response = (~ignored).sum(dim=1)
    max_response = TINY_DFT.seq_len - TINY_DFT.prompt_len
    assert bool(((response >= max_response // 2) & (response <= max_response)).all())
    assert p.ref_logps.shape == (TINY_DFT.groups, TINY_DFT.num_negatives)
    assert bool((p.hidden != 0).any()) and p.hidden.requires_grad and p.weight.requires_grad


# ---------------------------------------------------------------------------------------------
# Harness: skips, extra_info
# ---------------------------------------------------------------------------------------------


class FakeStats:
    def __init__(self, median):
        self.stats = type("S", (), {"median": median})()


class FakeBenchmark:
    """Stands in for pytest-benchmark's fixture: calls the step once."""

    def __init__(self, disabled=True, median=None):
        self.disabled = disabled
        self.group = None
        self.extra_info = {}
        self.stats = None if median is None else FakeStats(median)
        self.calls = 0

    def __call__(self, fn):
        self.calls += 1
        return fn()


def _fake_impl(check=lambda d: None, builder=None, name="fake"):
    naive = find_implementation("token", "naive")
    return Implementation(name, "peer", "test row", check, builder or naive.builder, naive.workspace)


def _run(benchmark, impl, shape=TINY_TOKEN):
    harness.run_row(benchmark, operation="token", shape=shape, shape_set="cpu", impl=impl,
                    make_problem=make_token_problem, matmul={"tflops": 2.0, "dtype": "fp32", "size": 8, "seconds": 1})


def test_unavailable_peer_is_a_recorded_skip(monkeypatch):
    monkeypatch.setattr(harness, "SKIPPED_ROWS", [])
    with pytest.raises(pytest.skip.Exception, match="peerlib not installed"):
        _run(FakeBenchmark(), _fake_impl(check=lambda d: "peerlib not installed"))
    (row,) = harness.SKIPPED_ROWS
    assert row == {"operation": "token", "group": TINY_TOKEN.group, "implementation": "fake",
                   "shape": TINY_TOKEN.id, "reason": "peerlib not installed"}


def test_out_of_memory_is_a_recorded_skip(monkeypatch):
    monkeypatch.setattr(harness, "SKIPPED_ROWS", [])

    def builder(problem):
        def loss():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return loss, (problem.hidden,)
    with pytest.raises(pytest.skip.Exception, match="^OOM"):
        _run(FakeBenchmark(), _fake_impl(builder=builder))
    assert harness.SKIPPED_ROWS[0]["reason"].startswith("OOM: CUDA out of memory")


def test_other_errors_are_not_swallowed(monkeypatch):
    def builder(problem):
        def loss():
            raise RuntimeError("shape mismatch")
        return loss, (problem.hidden,)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        _run(FakeBenchmark(), _fake_impl(builder=builder))


def test_time_budget_skips_remaining_rows(monkeypatch):
    monkeypatch.setattr(harness, "SKIPPED_ROWS", [])
    monkeypatch.setenv(harness.BUDGET_ENV, "5")
    monkeypatch.setitem(harness.SESSION_STATE, "start", harness.SESSION_STATE["start"] - 10_000)
    bench = FakeBenchmark()
    with pytest.raises(pytest.skip.Exception, match="time budget exhausted"):
        _run(bench, _fake_impl())
    assert bench.calls == 0
    monkeypatch.setenv(harness.BUDGET_ENV, "soon")
    with pytest.raises(ValueError, match=harness.BUDGET_ENV):
        harness.budget_seconds()


def test_row_extra_info(monkeypatch):
    monkeypatch.setattr(harness, "cpu_peak_rss_growth",
                        lambda *a, **k: {"peak_rss_growth_bytes": 12345, "method": "stub"})
    bench = FakeBenchmark(disabled=False, median=0.5)
    _run(bench, find_implementation("token", "naive"))
    info = bench.extra_info
    assert bench.group == TINY_TOKEN.group and bench.calls == 1
    assert info["flops"] == TINY_TOKEN.flops and info["flop_model"] == "6*N*H*V"
    assert info["tflops"] == pytest.approx(TINY_TOKEN.flops / 0.5 / 1e12)
    assert info["pct_of_matmul"] == pytest.approx(100 * info["tflops"] / 2.0)
    assert info["peak_mem_bytes"] == 12345 and info["peak_mem_method"] == "stub"
    assert info["loss_value"] == pytest.approx(math.log(TINY_TOKEN.vocab_size), rel=0.2)
    assert info["implementation"] == "naive" and info["dtype"] == "fp32"


def test_rss_probe_sees_materialized_logits():
    """The naive row holds several fp32 [N, V] buffers at once: the probe must see at least two."""
    shape = token_shapes("cpu")[0]
    result = harness.cpu_peak_rss_growth("token", "cpu", shape.id, "naive", timeout_s=120)
    logits_bytes = shape.tokens * shape.vocab_size * 4
    assert 2 * logits_bytes <= result["peak_rss_growth_bytes"] <= 12 * logits_bytes
    assert "fresh subprocess" in result["method"]


def test_matmul_floor_is_measured():
    result = harness.measure_matmul_tflops(CPU, size=128, iters=2)
    assert result["dtype"] == "fp32" and result["size"] == 128 and result["tflops"] > 0


def test_json_hook_carries_skips_and_matmul(monkeypatch):
    monkeypatch.setattr(harness, "SKIPPED_ROWS", [{"group": "g", "implementation": "x", "reason": "OOM"}])
    monkeypatch.setitem(harness.SESSION_STATE, "matmul", {"tflops": 1.0})
    out = {}
    conftest.pytest_benchmark_update_json(None, [], out)
    assert out["dftkern_bench"]["skipped"][0]["reason"] == "OOM"
    assert out["dftkern_bench"]["matmul"] == {"tflops": 1.0}
    info = {}
    conftest.pytest_benchmark_update_machine_info(None, info)
    assert info["dftkern_bench"]["torch"] == torch.__version__ and info["dftkern_bench"]["date_utc"]


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _bench(group, impl, family, median, mem, flops=6e12):
    return {"group": group, "name": f"test[{impl}]", "stats": {"median": median, "rounds": 3},
            "extra_info": {"implementation": impl, "family": family, "median_s": median, "flops": flops,
                           "tflops": flops / median / 1e12, "pct_of_matmul": 100 * flops / median / 1e12 / 600,
                           "peak_mem_bytes": mem}}


SAMPLE = {
    "machine_info": {"node": "gpu-box", "dftkern_bench": {
        "device": "cuda:0", "device_name": "NVIDIA H100 80GB HBM3", "device_memory_gib": 79.1,
        "compute_capability": "9.0", "torch": "2.11.0", "cuda": "12.8", "triton": "3.6.0",
        "transformers": "5.0", "liger_kernel": "0.8.5", "cut_cross_entropy": None, "dftkern": "0.1.0",
        "dftkern_commit": "0123456789abcdef", "date_utc": "2026-11-23T00:00:00Z", "shape_set": "full"}},
    "benchmarks": [
        _bench("dft_loss fwd+bwd | m | x", "dftkern-triton-fused", "dftkern", 0.020, 3 * 2**30),
        _bench("dft_loss fwd+bwd | m | x", "naive", "naive", 0.050, 40 * 2**30),
        _bench("token_logprobs fwd+bwd | m | N=4096", "dftkern-triton", "dftkern", 0.010, 2**30),
        _bench("token_logprobs fwd+bwd | m | N=4096", "naive", "naive", 0.040, 8 * 2**30),
        _bench("token_logprobs fwd+bwd | m | N=4096", "liger-flce", "peer", 0.020, 2 * 2**30),
    ],
    "datetime": "2026-11-23T00:00:00",
    "dftkern_bench": {"matmul": {"tflops": 600.0, "dtype": "bf16", "size": 8192, "seconds": 0.0018},
                      "skipped": [{"group": "token_logprobs fwd+bwd | m | N=4096", "implementation": "cce",
                                   "reason": "cut-cross-entropy not installed"},
                                  {"group": "token_logprobs fwd+bwd | m | N=32768", "implementation": "naive",
                                   "reason": "OOM (estimated 117.0 GiB needed, 77.0 GiB free; not attempted)"}]},
}


def test_report_markdown():
    md = report.render_markdown(SAMPLE)
    assert "NVIDIA H100 80GB HBM3 (79.1 GiB, sm 9.0)" in md
    assert "torch 2.11.0 (CUDA 12.8), triton 3.6.0" in md and "cut-cross-entropy not installed" in md
    assert "`0123456789ab`" in md and "600 TFLOP/s" in md
    headers = [line for line in md.splitlines() if line.startswith("## ")]
    assert headers[0].startswith("## token_logprobs") and headers[-1].startswith("## dft_loss")
    # dftkern 10 ms vs best peer liger 20 ms -> 0.50x time; 1 GiB vs 2 GiB -> 0.50x memory
    assert "| **dftkern-triton** | 10 ms | 600 | 100.0% | 1.00 GiB | 0.50× | 0.50× |" in md
    assert "| liger-flce | 20 ms | 300 | 50.0% | 2.00 GiB | 1.00× | 1.00× |" in md
    assert "| cce | skipped: cut-cross-entropy not installed |" in md
    assert "skipped: OOM (estimated 117.0 GiB needed" in md


def test_report_cli_writes_next_to_json(tmp_path, capsys):
    results = tmp_path / "run.json"
    results.write_text(json.dumps(SAMPLE))
    assert report.main([str(results)]) == 0
    assert (tmp_path / "run.md").read_text().startswith("# dftkern benchmark results")
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## token_logprobs" in capsys.readouterr().out
    custom = tmp_path / "out" / "table.md"
    custom.parent.mkdir()
    assert report.main([str(results), "--markdown", str(custom), "--no-png", "--quiet"]) == 0
    assert custom.exists() and capsys.readouterr().out == ""


def test_report_rejects_bad_input(tmp_path):
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "missing.json")])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"results": []}))
    with pytest.raises(ValueError, match="benchmark-json"):
        report.load_results(bad)


def test_gpu_script_is_valid_bash():
    script = Path(__file__).with_name("gpu_run.sh")
    subprocess.run(["bash", "-n", str(script)], check=True)
