"""Tests of the DFT-vs-SFT study (``python -m dftkern.experiments.dft_study``).

* statistics: the incomplete beta and Student-t tails against float64 references (closed forms for
  df = 1, 2, a quadrature of the density, mpmath when installed), the paired t-test and the sign test
  against their definitions; they are the shared ones of ``dftkern.train.plotting``, and recomputing
  the committed ``docs/dft_study/results.json`` statistics (and ``results.md``) from its per-seed
  numbers reproduces them bit for bit;
* execution settings (device, threads, progress output) reach the study's configuration and workers;
* negatives: per-epoch rotation is fresh while the pool lasts, wraps deterministically, the filter
  drops exactly the correct / equal-to-positive samples and falls back (counted) when nothing is left;
* splits are disjoint and reproducible; the lr is selected on validation only;
* the base model's stop rule (probe accuracy, checked every ``base_probe_every`` steps);
* ``--quick`` end to end: files, the pinned ``results.json`` schema, per-epoch negatives files,
  reference log-probs = the base model's float64 log-softmax under the training prompt at T = 1,
  SFT -> DPO step accounting, resuming without recomputation; the one-seed runner's table.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dftkern.experiments.dft_study import protocol, stats, study
from dftkern.experiments.dft_study.config import ABLATIONS, ARMS, METHODS, StudyConfig, resolve_study_device
from dftkern.train import plotting
from dftkern.train.data import PromptRecord, SampleRecord

REPO_ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                            if p])
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["OMP_NUM_THREADS"] = "1"
    return env


# --------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------


def _t_density(x: float, df: float) -> float:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))


def _tail_by_quadrature(t: float, df: float) -> float:
    """2 * integral_|t|^inf of the t density: substitute x = |t| + u/(1-u), composite Simpson in float64."""
    n = 20000
    h = 1.0 / n
    total = 0.0
    for i in range(n + 1):
        u = min(i * h, 1 - 1e-12)
        value = _t_density(abs(t) + u / (1 - u), df) / (1 - u) ** 2
        total += value * (1 if i in (0, n) else (4 if i % 2 else 2))
    return 2 * total * h / 3


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 7.0, 40.0])
def test_t_tail_matches_closed_forms_for_df_1_and_2(t):
    assert stats.t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(abs(t)), rel=1e-12, abs=1e-15)
    assert stats.t_two_sided_p(-t, 2) == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("df", [3, 4, 9, 30])
@pytest.mark.parametrize("t", [0.5, 2.0, 4.0])
def test_t_tail_matches_quadrature_of_the_density(df, t):
    assert stats.t_two_sided_p(t, df) == pytest.approx(_tail_by_quadrature(t, df), rel=1e-8)


def test_incomplete_beta_matches_mpmath():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    for a in (0.5, 1.0, 2.0, 4.5, 30.0):
        for b in (0.5, 1.0, 3.0, 12.0):
            for x in (1e-8, 0.01, 0.3, 0.5, 0.77, 0.999, 1 - 1e-9):
                want = float(mpmath.betainc(a, b, 0, x, regularized=True))
                assert stats.regularized_incomplete_beta(x, a, b) == pytest.approx(want, rel=1e-12, abs=1e-300)
    assert stats.regularized_incomplete_beta(0.0, 2, 3) == 0.0 and stats.regularized_incomplete_beta(1.0, 2, 3) == 1.0
    with pytest.raises(ValueError, match="x must be in"):
        stats.regularized_incomplete_beta(1.5, 1, 1)
    with pytest.raises(ValueError, match="a and b must be > 0"):
        stats.regularized_incomplete_beta(0.5, 0, 1)


def test_t_quantile_inverts_the_tail():
    assert stats.t_quantile(0.975, 4) == pytest.approx(2.7764451051977987, rel=1e-10)  # the textbook t_{0.975,4}
    for df in (1, 4, 12):
        for p in (0.6, 0.9, 0.995):
            q = stats.t_quantile(p, df)
            assert stats.t_two_sided_p(q, df) == pytest.approx(2 * (1 - p), rel=1e-9)
            assert stats.t_quantile(1 - p, df) == pytest.approx(-q, rel=1e-12)


def test_paired_t_test_follows_its_definition():
    a = [0.61, 0.70, 0.55, 0.66, 0.72]
    b = [0.48, 0.62, 0.57, 0.50, 0.61]
    result = stats.paired_t_test(a, b)
    d = [y - x for x, y in zip(a, b)]
    mean = sum(d) / 5
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / 4)
    t = mean / (sd / math.sqrt(5))
    assert result["mean_diff"] == pytest.approx(mean, rel=1e-14) and result["sd_diff"] == pytest.approx(sd, rel=1e-14)
    assert result["t"] == pytest.approx(t, rel=1e-12) and result["df"] == 4
    assert result["p"] == pytest.approx(_tail_by_quadrature(t, 4), rel=1e-8)
    half = 2.7764451051977987 * sd / math.sqrt(5)
    assert result["ci95"] == pytest.approx([mean - half, mean + half], rel=1e-9)
    assert stats.paired_t_test([1, 2], [1, 2])["p"] == 1.0
    assert stats.paired_t_test([1, 2], [2, 3])["p"] == 0.0
    with pytest.raises(ValueError, match="same length"):
        stats.paired_t_test([1, 2], [1])


def test_sign_test_is_the_exact_binomial_tail():
    def brute(pos, n):
        k = min(pos, n - pos)
        return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)

    assert stats.sign_test([0] * 5, [1] * 5) == {"n_pos": 5, "n_neg": 0, "n_ties": 0, "p": 0.0625}
    result = stats.sign_test([0, 0, 0, 0, 0, 0], [1, -1, 1, 1, 0, 1])
    assert (result["n_pos"], result["n_neg"], result["n_ties"]) == (4, 1, 1)
    assert result["p"] == pytest.approx(brute(4, 5))
    assert stats.sign_test([1, 2], [1, 2])["p"] == 1.0


def test_mean_sd():
    assert stats.mean_sd([2.0]) == (2.0, 0.0)
    mean, sd = stats.mean_sd([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and sd == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2
                                                                            + (4 - 7 / 3) ** 2) / 2))


def test_study_statistics_are_the_shared_ones():
    """One implementation: the study's names are :mod:`dftkern.train.plotting`'s functions."""
    assert stats.mean_sd is plotting.mean_sd and study.mean_sd is plotting.mean_sd
    assert stats.regularized_incomplete_beta is plotting.regularized_incomplete_beta
    assert stats.t_two_sided_p is plotting.student_t_two_sided_p
    assert stats.t_quantile is plotting.student_t_quantile
    a, b = [0.61, 0.70, 0.55, 0.66, 0.72], [0.48, 0.62, 0.57, 0.50, 0.61]
    shared = plotting.paired_difference(b, a, confidence=0.95)
    test = stats.paired_t_test(a, b)
    assert (test["mean_diff"], test["sd_diff"], test["t"], test["p"], test["ci95"]) == \
        (shared["mean"], shared["sd"], shared["t"], shared["p"], shared["ci"])
    assert stats.sign_test(a, b) == plotting.sign_test(b, a)


_COMMITTED = REPO_ROOT / "docs" / "dft_study"


def test_committed_statistics_are_reproduced_bit_for_bit():
    """Every statistic in the committed results.json, recomputed from its per-seed numbers, is the same
    float; results.md, regenerated from results.json, is the same text."""
    if not (_COMMITTED / "results.json").exists():
        pytest.skip("no committed study results in this checkout")
    results = json.loads((_COMMITTED / "results.json").read_text())
    entries = {**results["methods"], **results["ablations"]}
    checked = 0
    for name, entry in entries.items():
        for key in ("accuracy", "pass1", "answer_logp", "wrong_logp"):
            assert stats.mean_sd(entry[key]) == (entry[f"{key}_mean"], entry[f"{key}_sd"]), (name, key)
            checked += 1
        for metric, test in entry.get("vs_sft", {}).items():
            assert stats.paired_t_test(entries["sft"][metric], entry[metric]) == test["t_test"], (name, metric)
            assert stats.sign_test(entries["sft"][metric], entry[metric]) == test["sign_test"], (name, metric)
            checked += 1
    base = results["base"]
    for key in ("accuracy", "pass1", "train_samples_correct"):
        assert stats.mean_sd(base[key]) == (base[f"{key}_mean"], base[f"{key}_sd"]), key
    assert checked == 4 * len(entries) + 2 * (len(entries) - 1)
    assert study.format_results_md(results) == (_COMMITTED / "results.md").read_text()


# --------------------------------------------------------------------------------------
# negatives: rotation and filtering
# --------------------------------------------------------------------------------------


def _pool():
    records = [PromptRecord("p0", "5", prompt="2+3="), PromptRecord("p1", "9", prompt="4+5=")]
    eos = 2
    pool = {
        # p0: samples 0 and 3 are the right answer (0 without its EOS: equal as text, correct by reward)
        "p0": SampleRecord("p0", ("5", "6", "7", "5", "8", "4"), ((8,), (9, eos), (10, eos), (8, eos), (11, eos),
                                                                   (7, eos)), (1.0, 0.0, 0.0, 1.0, 0.0, 0.0), 1.0),
        # p1: every sample is correct: the filter has nothing left
        "p1": SampleRecord("p1", ("9",) * 6, tuple((12, eos) for _ in range(6)), (1.0,) * 6, 1.0),
    }
    return records, pool


def test_rotation_takes_fresh_negatives_each_epoch_then_wraps():
    records, pool = _pool()
    picks = [protocol.rotate_pool(records, pool, epoch=e, k=2, filtered=False)[1]["p0"]["indices"]
             for e in range(4)]
    assert picks == [[0, 1], [2, 3], [4, 5], [0, 1]]
    lines, _ = protocol.rotate_pool(records, pool, epoch=1, k=2, filtered=False)
    assert lines[0]["responses"] == ["7", "5"] and lines[0]["response_token_ids"] == [[10, 2], [8, 2]]
    assert lines[0]["rewards"] == [0.0, 1.0] and lines[0]["prompt"] == "2+3="
    again, _ = protocol.rotate_pool(records, pool, epoch=1, k=2, filtered=False)
    assert again == lines


def test_filter_drops_correct_and_equal_to_positive_and_counts_fallbacks():
    records, pool = _pool()
    per_epoch = [protocol.rotate_pool(records, pool, epoch=e, k=2, filtered=True)[1] for e in range(3)]
    assert [p["p0"]["indices"] for p in per_epoch] == [[1, 2], [4, 5], [1, 2]]
    assert all(not p["p0"]["fallback"] and p["p1"]["fallback"] for p in per_epoch)
    assert per_epoch[0]["p1"]["indices"] == [0, 1]
    s = protocol._negative_stats(records, pool, per_epoch, filtered=True)
    assert s["negatives_used"] == 12
    assert s["frac_correct"] == pytest.approx(6 / 12)  # p1's fallbacks are all correct, p0's picks none
    assert s["frac_equal_positive"] == pytest.approx(6 / 12)
    assert s["frac_fresh"] == pytest.approx((4 + 6) / 12)
    assert s["frac_pool_dropped"] == pytest.approx((2 + 6) / 12)
    assert s["frac_prompts_unfilterable"] == pytest.approx(0.5)
    assert s["pool_frac_correct"] == pytest.approx(8 / 12)


def test_rotation_needs_rewards():
    records, pool = _pool()
    pool["p0"] = SampleRecord("p0", ("5",), ((8, 2),), None, where="pool.jsonl:1")
    with pytest.raises(ValueError, match="pool.jsonl:1: the pool needs rewards"):
        protocol.rotate_pool(records, pool, epoch=0, k=1, filtered=False)


# --------------------------------------------------------------------------------------
# splits, lr selection, config
# --------------------------------------------------------------------------------------


def test_splits_are_disjoint_reproducible_and_sized(tmp_path):
    cfg = StudyConfig.quick_preset()
    paths = protocol.write_splits(cfg, tmp_path)
    first = {name: paths[name].read_text() for name in protocol.SPLITS}
    protocol.write_splits(cfg, tmp_path)
    assert {name: paths[name].read_text() for name in protocol.SPLITS} == first
    pairs = {}
    for name in protocol.SPLITS:
        records = [json.loads(line) for line in first[name].splitlines()]
        assert len(records) == getattr(cfg, f"num_{name}")
        assert all(r["id"] == f"{name}-{i}" for i, r in enumerate(records))
        assert all(int(r["response"]) == sum(map(int, r["prompt"][:-1].split("+"))) for r in records)
        pairs[name] = {r["prompt"] for r in records}
    names = list(pairs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not pairs[a] & pairs[b], (a, b)


def test_lr_is_selected_on_validation_only():
    runs = {1e-3: [{"val_accuracy": 0.5, "accuracy": 0.9}, {"val_accuracy": 0.7, "accuracy": 0.9}],
            3e-3: [{"val_accuracy": 0.6, "accuracy": 0.1}, {"val_accuracy": 0.65, "accuracy": 0.1}],
            1e-2: [{"val_accuracy": 0.6, "accuracy": 0.1}, {"val_accuracy": 0.6, "accuracy": 0.1}]}
    assert study.select_lr(runs) == 3e-3
    tie = {1e-3: [{"val_accuracy": 0.5}], 3e-3: [{"val_accuracy": 0.5}]}
    assert study.select_lr(tie) == 1e-3


def test_config_validates():
    with pytest.raises(ValueError, match="pool_size"):
        StudyConfig(pool_size=1, num_negatives=2)
    with pytest.raises(ValueError, match="seeds must be distinct"):
        StudyConfig(seeds=(0, 0))
    with pytest.raises(ValueError, match="lr_grid lacks"):
        StudyConfig(lr_grid={"sft": (1e-3,)})
    quick = StudyConfig.quick_preset()
    assert quick.quick and len(quick.seeds) == 2 and len(quick.lr_grid["sft"]) == 2
    assert StudyConfig().max_new_tokens == 4 and StudyConfig().steps_per_epoch == 31
    with pytest.raises(ValueError, match="threads must be an integer >= 0"):
        StudyConfig(threads=-1)
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got 'mps'"):
        StudyConfig(device="mps")
    assert (StudyConfig().device, StudyConfig().threads) == ("cpu", 1)  # the committed study's settings
    assert StudyConfig(device="cuda:1", threads=0).to_dict()["device"] == "cuda:1"


def test_device_is_resolved_and_a_missing_cuda_device_is_an_error():
    assert resolve_study_device("cpu") == "cpu"
    if torch.cuda.is_available():
        assert resolve_study_device("auto") == "cuda"
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_study_device(f"cuda:{torch.cuda.device_count()}")
        return
    assert resolve_study_device("auto") == "cpu"
    for device in ("cuda", "cuda:3"):
        with pytest.raises(ValueError, match=rf"device '{device}': CUDA is not available on this machine"):
            resolve_study_device(device)
    with pytest.raises(ValueError, match="CUDA is not available"):  # before any work starts
        study.run_study(StudyConfig.quick_preset(device="cuda"), work="/nonexistent/never-created", out=None,
                        command="test")


def test_worker_threads_follow_the_config():
    before = torch.get_num_threads()
    try:
        study._init_worker(3)
        assert torch.get_num_threads() == 3
        study._init_worker(0)  # torch's default: left alone
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert study.environment(StudyConfig(threads=2))["torch_threads_per_worker"] == 2
    assert "device" not in study.environment(StudyConfig())


def test_one_seed_runner_passes_device_threads_and_progress(monkeypatch):
    """run_one_seed puts device/threads/workers in the study config; without progress, the study's
    per-task lines are not printed (the table still is)."""
    from dftkern.experiments.dft_study import one_seed

    if not (_COMMITTED / "results.json").exists():
        pytest.skip("no committed study results in this checkout")
    seen = {}

    def fake_run_study(cfg, *, work, out, command, log):
        seen.update(cfg=cfg, command=command)
        log("[1/9] a task line")
        return json.loads((_COMMITTED / "results.json").read_text())

    monkeypatch.setattr(study, "run_study", fake_run_study)
    for progress in (True, False):
        printed = []
        result = one_seed.run_one_seed(seed=3, out="unused", quick=True, workers=1, device="cpu", threads=2,
                                       progress=progress, log=printed.append)
        cfg = seen["cfg"]
        assert (cfg.seeds, cfg.workers, cfg.device, cfg.threads, cfg.quick) == ((3,), 1, "cpu", 2, True)
        assert "device='cpu'" in seen["command"] and "threads=2" in seen["command"]
        assert ("[1/9] a task line" in printed) == progress
        assert result["table"] in printed and any("docs/dft_study.md" in line for line in printed)
    one_seed.run_one_seed(out="unused", threads=None, log=printed.append)
    assert seen["cfg"].threads == 0 and seen["cfg"].device == "cpu"


# --------------------------------------------------------------------------------------
# base model
# --------------------------------------------------------------------------------------


def test_base_pretraining_stops_at_the_first_probe_reaching_the_target(tmp_path):
    torch.set_num_threads(1)
    cfg = StudyConfig.quick_preset(base_max_steps=30, base_probe_every=10, base_stop_at=0.0)
    paths = protocol.write_splits(cfg, tmp_path)
    stopped = protocol.pretrain_base(cfg, 0, paths, tmp_path / "stop")
    assert stopped["steps"] == 10 and [s for s, _ in stopped["probe_history"]] == [10]
    assert Path(stopped["model"]).name == "step-00000010"
    never = protocol.pretrain_base(StudyConfig.quick_preset(base_max_steps=30, base_probe_every=10, base_stop_at=1.1),
                                   0, paths, tmp_path / "never")
    assert never["steps"] == 30 and [s for s, _ in never["probe_history"]] == [10, 20, 30]
    assert never["probe_accuracy"] == never["probe_history"][-1][1]


# --------------------------------------------------------------------------------------
# end to end (--quick)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    work = tmp_path_factory.mktemp("dft_study")
    out = work / "results"
    command = [sys.executable, "-m", "dftkern.experiments.dft_study", "--quick", "--work", str(work), "--out", str(out)]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return work, out, done.stdout, command


@pytest.mark.slow
def test_quick_study_writes_the_pinned_schema(quick_study):
    work, out, stdout, _ = quick_study
    for name in ("results.json", "results.md", "accuracy.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"seeds", "methods", "ablations", "base", "config"}
    assert results["seeds"] == [0, 1]
    assert set(results["methods"]) == set(METHODS) and set(results["ablations"]) == set(ABLATIONS)
    cfg = results["config"]
    for entry in list(results["methods"].values()) + list(results["ablations"].values()):
        for key in ("accuracy", "pass1", "answer_logp", "wrong_logp", "frac_negatives_correct", "val_accuracy"):
            assert len(entry[key]) == 2, key
        assert all(0.0 <= v <= 1.0 for v in entry["accuracy"] + entry["pass1"])
        assert all(v < 0 for v in entry["answer_logp"] + entry["wrong_logp"])
    for name in ARMS:
        entry = {**results["methods"], **results["ablations"]}[name]
        assert entry["lr"] in cfg["lr_grid"][name]
        assert entry["steps"] == [cfg["epochs"] * (cfg["num_train"] // cfg["batch_size"])] * 2
    assert results["methods"]["sft"]["frac_negatives_correct"] == [None, None]
    dft = results["methods"]["dft"]
    assert "t_test" in dft["vs_sft"]["accuracy"] and "sign_test" in dft["vs_sft"]["accuracy"]
    dpo = results["methods"]["sft_dpo"]
    assert dpo["sft_lr"] == results["methods"]["sft"]["lr"]
    assert dpo["steps"] == [s + d for s, d in zip(dpo["sft_steps"], dpo["dpo_steps"])]
    assert all(d >= 1 for d in dpo["dpo_steps"])
    for seed in (0, 1):  # the DPO data are sampled once per seed, never by two runs at the same time
        dpo_dir = work / f"seed-{seed}" / "dpo" / f"sft-lr-{dpo['sft_lr']:g}"
        sampled = [json.loads(line)["prompt_id"] for line in (dpo_dir / "samples.jsonl").read_text().splitlines()]
        assert len(sampled) == len(set(sampled)) == cfg["num_train"]
        pairs = (dpo_dir / "pairs.jsonl").read_text().splitlines()
        assert len(pairs) == dpo["num_pairs"][seed]
    assert len(results["base"]["accuracy"]) == 2 and "train_samples_correct" in results["base"]
    for check in results["base"]["gradient_check"]:
        for sampler in ("main", "exact"):
            row = check[sampler]
            assert all(math.isfinite(v) for v in row.values())
            # averaging 64 reference samples shrinks the negative term well below one step's K=2 estimate
            assert row["ratio_many"] < row[f"ratio_k{check['k']}"]
    assert cfg["command"].startswith("python -m dftkern.experiments.dft_study --quick")
    assert cfg["wall_seconds"] > 0 and cfg["environment"]["torch"] == torch.__version__
    assert [i["finished"] for i in cfg["invocations"]] == [True]
    assert "| dft |" in stdout and "| ablation: exact_sampling |" in stdout
    md = (out / "results.md").read_text()
    assert "Paired comparisons with sft" in md and cfg["command"] in md


@pytest.mark.slow
def test_quick_study_negatives_are_fresh_per_epoch_and_scored_at_t1_under_the_training_prompt(quick_study):
    work, _, _, _ = quick_study
    from safetensors import safe_open

    from dftkern.train.data import build_examples, read_prompt_records, read_sample_records
    from dftkern.train.model import load_causal_lm, load_tokenizer

    prepared = json.loads((work / "seed-0" / "prepared.json").read_text())
    meta = json.loads((work / "seed-0" / "pools" / "main.jsonl.meta.json").read_text())
    assert (meta["temperature"], meta["top_k"], meta["num_samples"]) == (0.7, 50, 4)
    exact_meta = json.loads((work / "seed-0" / "pools" / "exact.jsonl.meta.json").read_text())
    assert (exact_meta["temperature"], exact_meta["top_k"]) == (1.0, 0)
    files = prepared["variants"]["main"]["files"]
    assert len(files) == 2
    epochs = [[json.loads(line)["pool_index"] for line in Path(f).read_text().splitlines()] for f in files]
    assert all(a == [0, 1] and b == [2, 3] for a, b in zip(*epochs))
    assert prepared["variants"]["main"]["frac_fresh"] == 1.0

    base = prepared["base"]["model"]
    model = load_causal_lm(base, attn="eager").double()
    tokenizer = load_tokenizer(base)
    records = read_prompt_records(work / "data" / "train.jsonl")
    for variant in ("main", "exact", "filtered"):
        path = Path(prepared["variants"][variant]["files"][1])
        examples = build_examples(tokenizer, records, read_sample_records(path))
        (cache,) = path.parent.glob("ref_logps-*.safetensors")
        with safe_open(str(cache), framework="pt") as handle:
            cached = handle.get_tensor("row_logps")
        for i in (0, 7, len(examples) - 1):
            for r, row in enumerate(examples[i].rows):
                ids = torch.tensor([row.input_ids])
                with torch.no_grad():
                    logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)  # temperature 1
                targets = row.input_ids[1:]
                want = sum(float(logp[t, targets[t]]) for t in range(row.prompt_len - 1, len(row.input_ids) - 1))
                assert float(cached[i, r]) == pytest.approx(want, abs=2e-4), (variant, i, r)


@pytest.mark.slow
def test_quick_study_resumes_without_recomputing(quick_study):
    work, out, _, command = quick_study
    before = json.loads((out / "results.json").read_text())
    summary = work / "seed-1" / "runs" / "dft" / f"lr-{before['methods']['dft']['lr']:g}" / "summary.json"
    stamp = summary.stat().st_mtime_ns
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    after = json.loads((out / "results.json").read_text())
    assert summary.stat().st_mtime_ns == stamp
    assert len(after["config"]["invocations"]) == 2
    for name in METHODS:
        assert after["methods"][name]["accuracy"] == before["methods"][name]["accuracy"]


@pytest.mark.slow
def test_one_seed_runner_prints_its_table_and_points_to_the_study(tmp_path):
    out = tmp_path / "one"
    done = subprocess.run([sys.executable, "-m", "dftkern.experiments.dft_study.one_seed", "--quick", "--out", str(out),
                           "--workers", "1"], env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for text in ("| sft |", "| sft_mean |", "| dft |", "| dft2 |", "| sft_dpo |", "base model", "docs/dft_study.md",
                 str(out.resolve())):
        assert text in done.stdout, text
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0]
    from dftkern.experiments.dft_study.one_seed import STUDY_LRS

    assert {m: results["methods"][m]["lr"] for m in METHODS} == {m: STUDY_LRS[m] for m in METHODS}


def test_one_seed_learning_rates_are_the_committed_study_selection():
    """The main job runs at the lrs the committed study chose on validation; a rerun that selects others
    must update :data:`STUDY_LRS` (and the committed results) together."""
    from dftkern.experiments.dft_study.one_seed import STUDY_LRS

    path = REPO_ROOT / "docs" / "dft_study" / "results.json"
    if not path.exists():
        pytest.skip("no committed study results in this checkout")
    results = json.loads(path.read_text())
    selected = {name: entry["lr"] for group in ("methods", "ablations") for name, entry in results[group].items()}
    assert selected == STUDY_LRS
    for name, lr in selected.items():
        assert lr in results["config"]["lr_grid"][name]
