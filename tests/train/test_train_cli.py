"""Command line: --help covers every option, the stages chain from the CLI, errors are one clean line,
and the built-in default run completes in its fast mode (--quick)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
from train_helpers import subprocess_env, write_jsonl

from dftkern.train.cli import build_parser, main


def test_top_level_help_documents_every_option_of_every_stage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, stage in subparsers.choices.items():
        assert name in text
        for action in stage._actions:
            for option in action.option_strings:
                assert option in text, f"{name} {option} missing from --help"
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings[0]} has no help text"
    for loss in ("dft", "dft2", "sft", "dpo", "ipo", "simpo", "rwr", "reinforce", "rloo"):
        assert loss in text


def test_stages_chain_from_the_command_line(workspace, tmp_path, capsys):
    negatives = tmp_path / "neg.jsonl"
    assert main(["generate", "--model", str(workspace.model), "--data", str(workspace.data), "--out", str(negatives),
                 "-k", "2", "--max-new-tokens", "5", "--temperature", "0.8", "--top-k", "8", "--top-p", "0.95",
                 "--device", "cpu", "--no-progress"]) == 0
    assert len(negatives.read_text().splitlines()) == 24
    assert main(["ref-logps", "--model", str(workspace.model), "--data", str(workspace.data), "--negatives",
                 str(negatives), "--device", "cpu", "--no-progress"]) == 0
    assert len(list(tmp_path.glob("ref_logps-*.safetensors"))) == 1
    assert main(["train", "--model", str(workspace.model), "--data", str(workspace.data), "--negatives",
                 str(negatives), "--out", str(tmp_path / "run"), "--loss", "dpo", "--batch-size", "4", "--max-steps",
                 "2", "--lr", "1e-3", "--device", "cpu", "--no-progress", "--no-plot"]) == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert checkpoint.is_dir()
    capsys.readouterr()
    assert main(["eval", "--model", str(checkpoint), "--data", str(workspace.heldout), "--out",
                 str(tmp_path / "eval.json"), "--metric", "dftkern.train.synthetic:addition_reward",
                 "--max-new-tokens", "4", "--device", "cpu", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "eval.json").read_text())
    assert summary["num_prompts"] == 8 and 0.0 <= summary["task_metric"] <= 1.0 and summary["pos_logp"] < 0
    predictions = (tmp_path / "eval.predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 8 and set(json.loads(predictions[0])) >= {"prompt", "response", "reference", "score"}


def test_bad_record_is_one_error_line_naming_file_line_and_field(workspace, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1=", "response": "2"}, {"prompt": "2+2=", "response": 4}])
    code = main(["train", "--model", str(workspace.model), "--data", str(bad), "--out", str(tmp_path / "r"),
                 "--loss", "sft", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"error: {bad}:2: field 'response' must be a string, got int" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_default_run_quick_mode_end_to_end(tmp_path):
    """No stage: one seed of the DFT-vs-SFT study protocol (dftkern.experiments.dft_study.one_seed)."""
    out = tmp_path / "default"
    done = subprocess.run([sys.executable, "-m", "dftkern.train", "--quick", "--out", str(out), "--no-progress"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("| sft |", "| sft_mean |", "| dft |", "| dft2 |", "| sft_dpo |", "base model", "test accuracy",
                 "docs/dft_study.md", str(out.resolve())):
        assert name in done.stdout, name
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"sft", "sft_mean", "dft", "dft2", "sft_dpo"} and results["seeds"] == [0]
    for stage_output in ("results.md", "accuracy.png", "seed-0/prepared.json", "seed-0/pools/main.jsonl",
                         "seed-0/pools/main.jsonl.meta.json"):
        assert (out / stage_output).exists(), stage_output
    lr = results["methods"]["dft"]["lr"]
    dft_metrics = [json.loads(line) for line in
                   (out / "seed-0" / "runs" / "dft" / f"lr-{lr:g}" / "metrics.jsonl").read_text().splitlines()]
    assert len(dft_metrics) == results["methods"]["dft"]["steps"][0] and "omega_mean" in dft_metrics[-1]
    assert list((out / "seed-0" / "negatives" / "main" / "epoch-0").glob("ref_logps-*.safetensors"))


@pytest.mark.slow
def test_legacy_two_stage_default_run_still_runs(tmp_path):
    """--warmup-steps / --steps / --num-negatives select the earlier warm-up -> DFT vs continued SFT experiment."""
    out = tmp_path / "legacy"
    done = subprocess.run([sys.executable, "-m", "dftkern.train", "--quick", "--steps", "6", "--out", str(out),
                           "--no-progress"], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("warm-up (SFT)", "+SFT", "+DFT", "held-out exact match", str(out.resolve())):
        assert name in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == {"warm-up (SFT)", "+SFT", "+DFT"}
    for stage_output in ("base/model.safetensors", "negatives.jsonl", "warmup/metrics.jsonl", "warmup/curves.png",
                         "dft/metrics.jsonl", "sft/metrics.jsonl", "dft/curves.png", "results.md"):
        assert (out / stage_output).exists(), stage_output
    assert list(out.glob("ref_logps-*.safetensors"))
    dft_metrics = [json.loads(line) for line in (out / "dft" / "metrics.jsonl").read_text().splitlines()]
    assert len(dft_metrics) == results["config"]["steps"] and "omega_mean" in dft_metrics[-1]


def test_generate_engine_defaults_to_auto_on_the_command_line_and_hf_in_python():
    from dftkern.train.cli import build_parser
    from dftkern.train.generate import GenerateConfig

    args = build_parser().parse_args(["generate", "--model", "m", "--data", "d.jsonl", "--out", "o.jsonl"])
    assert args.engine == "auto"
    assert GenerateConfig(model="m", data="d.jsonl", out="o.jsonl").engine == "hf"


def test_sample_engine_is_an_on_policy_option(workspace, tmp_path):
    from dftkern.train.trainer import TrainConfig

    with pytest.raises(ValueError, match=r"sample_engine='vllm' \(--sample-engine\): only used with on_policy"):
        TrainConfig(model=str(workspace.model), data=str(workspace.data), out=str(tmp_path), loss="sft",
                    sample_engine="vllm")


def test_train_takes_k_negatives_of_a_pool_scored_once(workspace, tmp_path):
    """--ref-logps may name the cache of the whole pool when training uses fewer negatives per prompt."""
    from train_helpers import small_run

    from dftkern.train.trainer import train

    result = train(small_run(workspace, tmp_path / "k1", num_negatives=1, ref_logps=str(workspace.ref_cache),
                             max_steps=1))
    assert result.steps == 1
    other = write_jsonl(tmp_path / "other.jsonl", [
        {"prompt_id": json.loads(line)["id"], "responses": ["9"], "response_token_ids": [[12, 2]]}
        for line in workspace.data.read_text().splitlines()])
    with pytest.raises(ValueError, match="holds reference log-probs for other rows"):
        train(small_run(workspace, tmp_path / "other", negatives=str(other), ref_logps=str(workspace.ref_cache)))


def test_traceback_env_var_is_parsed_strictly(workspace, tmp_path, capsys, monkeypatch):
    from dftkern.train.records import DataError

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "2+2=", "response": 4}])
    argv = ["train", "--model", str(workspace.model), "--data", str(bad), "--out", str(tmp_path / "r"),
            "--loss", "sft", "--device", "cpu", "--no-progress"]
    monkeypatch.setenv("DFTKERN_TRACEBACK", "TRUE")
    with pytest.raises(DataError, match="field 'response'"):
        main(argv)
    monkeypatch.setenv("DFTKERN_TRACEBACK", "maybe")
    assert main(argv) == 2
    assert "DFTKERN_TRACEBACK='maybe' is not a boolean; accepted: 1/true/yes/on" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# the default job: every option it accepts is used (or rejected with one error line)
# --------------------------------------------------------------------------------------

_LEGACY_SIZES = {"warmup_steps", "steps", "num_negatives"}  # giving one selects the legacy experiment


def _default_job_dests() -> set[str]:
    parser = build_parser()
    return {a.dest for a in parser._actions if a.option_strings and a.dest != "help"}


@pytest.fixture
def study_calls(monkeypatch):
    """Replace the study protocol's one-seed run by a recorder (no training)."""
    from dftkern.experiments.dft_study import one_seed

    calls = []
    monkeypatch.setattr(one_seed, "run_one_seed", lambda **kwargs: calls.append(kwargs))
    return calls


def test_default_job_passes_every_option_to_the_study(study_calls, tmp_path):
    assert main(["--quick", "--seed", "3", "--out", str(tmp_path / "x"), "--device", "cpu", "--threads", "2",
                 "--no-progress", "--workers", "1"]) == 0
    assert study_calls == [{"seed": 3, "out": str(tmp_path / "x"), "quick": True, "workers": 1, "device": "cpu",
                            "threads": 2, "progress": False}]
    # every option of the default job's parser reaches the study run, except the legacy experiment's sizes
    assert _default_job_dests() - _LEGACY_SIZES == set(study_calls[0])
    assert main([]) == 0 and main(["default"]) == 0  # the defaults: the committed study's settings
    assert study_calls[1] == study_calls[2] == {"seed": 0, "out": None, "quick": False, "workers": 2,
                                                "device": "cpu", "threads": 1, "progress": True}


@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_default_job_on_a_missing_cuda_device_is_one_error_line(study_calls, capsys, device):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for argv in (["--quick", "--device", device, "--threads", "2"], ["--quick", "--steps", "6", "--device", device]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert err[0].startswith("python -m dftkern.train: error: --device: ")
        assert f"device '{device}': CUDA is not available on this machine" in err[0]
    assert study_calls == []


def test_default_job_rejects_what_its_legacy_experiment_does_not_use(study_calls, monkeypatch, capsys):
    from dftkern.train import default_run

    runs = []
    monkeypatch.setattr(default_run, "run_default_experiment", runs.append)
    assert main(["--quick", "--steps", "6", "--workers", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "error: --workers does not apply to the default job's legacy two-stage experiment" in err[0]
    assert main(["--quick", "--device", "mps"]) == 2  # a torch device, but not one the study runs on
    assert "error: --device: device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got 'mps'" in capsys.readouterr().err
    assert runs == [] and study_calls == []
    assert main(["--quick", "--steps", "6", "--device", "cpu", "--threads", "2", "--no-progress"]) == 0
    (cfg,) = runs
    assert (cfg.steps, cfg.device, cfg.threads, cfg.progress) == (6, "cpu", 2, False)


def test_default_job_help_describes_what_each_option_does():
    parser = build_parser()
    helps = {a.dest: a.help for a in parser._actions}
    assert "CUDA device this machine lacks is an error" in helps["device"]
    assert "per worker process of the study protocol" in helps["threads"]
    assert "line per finished task" in helps["progress"]
    assert "worker processes of the study protocol (default: 2)" in helps["workers"]
    assert "legacy" in helps["workers"]
    default = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["default"]
    assert {a.dest: a.help for a in default._actions}["device"] == helps["device"]


def _train_argv(workspace, out, *extra):
    return ["train", "--model", str(workspace.model), "--data", str(workspace.data), "--out", str(out),
            "--batch-size", "4", "--device", "cpu", "--no-progress", "--no-plot", *extra]


def test_a_fresh_run_into_a_run_directory_with_checkpoints_is_refused(workspace, tmp_path, capsys):
    """Before, the second run pruned its own newest checkpoint (keeping the earlier run's higher steps)
    and a later --resume loaded the earlier run's weights."""
    out = tmp_path / "run"
    assert main(_train_argv(workspace, out, "--loss", "sft", "--max-steps", "2", "--save-every", "2")) == 0
    capsys.readouterr()
    assert main(_train_argv(workspace, out, "--loss", "sft", "--max-steps", "2", "--lr", "1e-4")) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints of an earlier run (newest step-00000002): pass --resume" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]


def test_non_finite_rewards_in_a_negatives_file_name_file_line_and_field(workspace, tmp_path, capsys):
    lines = workspace.negatives.read_text().splitlines()
    row = json.loads(lines[1])
    row["rewards"][1] = float("nan")
    lines[1] = json.dumps(row)
    bad = tmp_path / "nan.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    assert main(_train_argv(workspace, tmp_path / "r", "--loss", "rloo", "--negatives", str(bad),
                            "--max-steps", "1")) == 2
    assert f"error: {bad}:2: field 'rewards[1]' must be finite, got nan" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--device", "cuda"], "--device 'cuda': CUDA is not available on this machine"),
    (["--device", "mps"], "--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'mps'"),
    (["--attn", "flash_attention_2"], "--attn flash_attention_2 needs a CUDA device and the flash-attn package"),
    (["--attn", "flex_attention", "--no-share-prompt"], "--attn flex_attention: FlexAttention has no backward"),
    (["--eval-every", "2"], "eval_every (--eval-every) needs eval_data (--eval-data)"),
])
def test_settings_this_machine_cannot_run_are_one_error_line(workspace, tmp_path, capsys, extra, message):
    import torch

    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = _train_argv(workspace, tmp_path / "r", "--loss", "sft", "--max-steps", "1")
    argv = [a for i, a in enumerate(argv) if not (a == "--device" or (i and argv[i - 1] == "--device"))] \
        if "--device" in extra else argv
    assert main(argv + extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_eval_data_without_eval_every_evaluates_at_the_last_step(workspace, tmp_path):
    out = tmp_path / "r"
    assert main(_train_argv(workspace, out, "--loss", "sft", "--max-steps", "3",
                            "--eval-data", str(workspace.heldout))) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r["step"] for r in records if "eval_pos_logp" in r]
    assert evaluated == [3]


def test_resume_with_a_stop_step_already_reached_is_an_error(workspace, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(_train_argv(workspace, out, "--loss", "sft", "--max-steps", "6", "--stop-after", "4")) == 0
    capsys.readouterr()
    assert main(_train_argv(workspace, out, "--loss", "sft", "--max-steps", "6", "--resume", "--stop-after", "2")) == 2
    assert "--stop-after 2 is at or before the step of the checkpoint resumed from (4" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004"]
