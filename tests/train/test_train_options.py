"""Strict options: every config field is checked (type, finiteness, range) with the accepted values in
the message, and the command line, generated from the same declarations, parses with the same rules."""

from __future__ import annotations

import pytest

from dftkern.train.cli import build_parser, main
from dftkern.train.default_run import DefaultRunConfig
from dftkern.train.evaluate import EvalConfig
from dftkern.train.generate import GenerateConfig, SamplingConfig
from dftkern.train.objectives import ObjectiveConfig
from dftkern.train.options import option_names
from dftkern.train.ref_logps import RefLogpsConfig
from dftkern.train.trainer import TrainConfig

NAN, INF = float("nan"), float("inf")
BASE = dict(model="m", data="d", out="o")


@pytest.mark.parametrize("key, value, message", [
    ("lr", INF, "lr must be > 0 (a finite number), got inf"),
    ("lr", NAN, "lr must be > 0 (a finite number), got nan"),
    ("lr", 0, "lr must be > 0 (a finite number), got 0"),
    ("epochs", INF, "epochs must be > 0 (a finite number)"),
    ("batch_size", True, "batch_size must be >= 1 (an integer), got True"),
    ("batch_size", 2.0, "batch_size must be >= 1 (an integer), got 2.0"),
    ("max_steps", 0, "max_steps must be >= 1 (an integer) (or None), got 0"),
    ("warmup_steps", -1, "warmup_steps must be >= 0 (an integer) (or None)"),
    ("min_lr_ratio", 1.5, "min_lr_ratio must be in [0, 1] (a number), got 1.5"),
    ("warmup_ratio", 1.0, "warmup_ratio must be in [0, 1) (a number)"),
    ("adam_beta1", 1.0, "adam_beta1 must be in [0, 1) (a number)"),
    ("adam_eps", 0.0, "adam_eps must be > 0"),
    ("max_grad_norm", INF, "max_grad_norm must be > 0 (a finite number), got inf"),
    ("weight_decay", -0.1, "weight_decay must be >= 0"),
    ("seed", -1, "seed must be >= 0 (an integer)"),
    ("shuffle", "no", "shuffle must be True or False (a bool), got 'no'"),
    ("gradient_checkpointing", 1, "gradient_checkpointing must be True or False (a bool), got 1"),
    ("plot", None, "plot must be True or False (a bool), got None"),
    ("device", "gpu0", "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu0'"),
    ("precision", "fp16", "precision must be one of ('auto', 'fp32', 'bf16'), got 'fp16'"),
    ("packing", True, "packing must be one of ('auto', 'on', 'off'), got True"),
    ("max_length", 1, "max_length must be >= 2 (an integer) (or None), got 1"),
    ("keep_checkpoints", 0, "keep_checkpoints must be >= 1 (an integer) (or None)"),
    ("max_nonfinite_steps", 0, "max_nonfinite_steps must be >= 1 (an integer)"),
    ("dft_u_init", NAN, "dft_u_init must be a finite number, got nan"),
    ("average", "yes", "average must be True or False (a bool), got 'yes'"),
    ("baseline", True, "baseline must be 'mean', 'none' or a number in [-1e+09, 1e+09], got True"),
    ("baseline", NAN, "baseline must be 'mean', 'none' or a number in [-1e+09, 1e+09], got nan"),
    ("beta", 0.0, "beta must be in [1e-06, 1e+06] (a number), got 0.0"),
    ("beta", 1e-30, "beta must be in [1e-06, 1e+06] (a number), got 1e-30"),
    ("tau", -1.0, "tau must be in [1e-06, 1e+06] (a number) (or None), got -1.0"),
    ("gamma", 1.5, "gamma must be in (0, 1] (a number) (or None), got 1.5"),
    ("unlikelihood_alpha", INF, "unlikelihood_alpha must be in [0, 1e+06] (a number), got inf"),
    ("data", "", "data must be a non-empty string, got ''"),
])
def test_train_config_rejects_loose_values_and_states_the_range(key, value, message):
    with pytest.raises(ValueError) as err:
        TrainConfig(**{**BASE, key: value})
    assert message in str(err.value)


@pytest.mark.parametrize("key, value, message", [
    ("sample_temperature", 0.0, "temperature must be > 0 (a finite number), got 0.0: on-policy sampling needs"),
    ("sample_temperature", INF, "temperature must be > 0 (a finite number), got inf"),
    ("sample_top_p", 0.0, "top_p must be in (0, 1] (a number), got 0.0"),
    ("samples_per_prompt", 0, "samples_per_prompt must be >= 1 (an integer)"),
    ("reward", 5, "reward must be a callable or a name (a built-in or 'package.module:function'), got 5"),
    ("samples_per_prompt", 1, "loss 'rloo' needs at least 2 samples per prompt, got samples_per_prompt=1"),
])
def test_on_policy_settings_are_strict(key, value, message):
    with pytest.raises(ValueError) as err:
        TrainConfig(**BASE, loss="rloo", on_policy=True, **{"reward": "addition", key: value})
    assert message in str(err.value)


@pytest.mark.parametrize("make, message", [
    (lambda: GenerateConfig(**BASE, temperature=NAN), "temperature must be >= 0 (a finite number), got nan"),
    (lambda: GenerateConfig(**BASE, num_samples=0), "num_samples must be >= 1 (an integer)"),
    (lambda: GenerateConfig(**BASE, top_k=-1), "top_k must be >= 0 (an integer)"),
    (lambda: SamplingConfig(top_p=INF), "top_p must be in (0, 1] (a number), got inf"),
    (lambda: RefLogpsConfig(model="m", data="d", negatives="n", batch_size=0), "batch_size must be >= 1"),
    (lambda: RefLogpsConfig(model="m", data="d", negatives="n", overlong="cut"), "overlong must be one of"),
    (lambda: EvalConfig(model="m", data="d", max_new_tokens=0), "max_new_tokens must be >= 1"),
    (lambda: EvalConfig(model="m", data="d", trust_remote_code="yes"), "trust_remote_code must be True or False"),
    (lambda: DefaultRunConfig(threads=-1), "threads must be >= 0 (an integer) (or None), got -1"),
    (lambda: ObjectiveConfig(loss="dpo", simpo_gamma=INF), "simpo_gamma must be in [-1e+06, 1e+06] (a number)"),
])
def test_every_stage_config_is_strict(make, message):
    with pytest.raises(ValueError) as err:
        make()
    assert message in str(err.value)


@pytest.mark.parametrize("argv, message", [
    (["--lr", "inf"], "argument --lr: must be > 0 (a finite number), got 'inf'"),
    (["--lr", "nan"], "argument --lr: must be > 0 (a finite number), got 'nan'"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1 (an integer), got '0'"),
    (["--batch-size", "2.5"], "argument --batch-size: must be >= 1 (an integer), got '2.5'"),
    (["--adam-beta2", "1"], "argument --adam-beta2: must be in [0, 1) (a number), got '1'"),
    (["--tau", "nan"], "argument --tau: must be in [1e-06, 1e+06] (a number), got 'nan'"),
    (["--baseline", "avg"], "argument --baseline: must be 'mean', 'none' or a number in [-1e+09, 1e+09], got 'avg'"),
    (["--seed", "-1"], "argument --seed: must be >= 0 (an integer), got '-1'"),
    (["--device", "gpu"], "argument --device: must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    (["--sample-top-p", "1.5"], "argument --sample-top-p: must be in (0, 1] (a number), got '1.5'"),
])
def test_command_line_values_are_checked_with_the_range_in_the_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "m", "--data", "d", "--out", "o", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_command_line_defaults_are_the_config_defaults():
    """The CLI is generated from the configs: parsing only the required flags gives the config defaults."""
    parser = build_parser()
    required = {"generate": ["--model", "m", "--data", "d", "--out", "o"],
                "ref-logps": ["--model", "m", "--data", "d", "--negatives", "n"],
                "train": ["--model", "m", "--data", "d", "--out", "o"],
                "eval": ["--model", "m", "--data", "d"]}
    configs = {"generate": GenerateConfig, "ref-logps": RefLogpsConfig, "train": TrainConfig, "eval": EvalConfig}
    for stage, argv in required.items():
        args = vars(parser.parse_args([stage, *argv]))
        args.pop("stage")
        names = option_names(configs[stage])
        assert names <= set(args), stage  # every option is on the command line
        built = configs[stage](**{k: v for k, v in args.items() if k in names})
        # the one documented command-line default that differs from the config's: generate --engine auto
        cli_only = {"generate": {"engine": "auto"}}.get(stage, {})
        plain = configs[stage](**{k: args[k] for k in ("model", "data", "out", "negatives") if k in names},
                               **cli_only)
        assert built == plain, stage
    help_text = parser.format_help()
    assert "--lr LR               peak learning rate (default: 1e-05)" in help_text
    assert "--keep-checkpoints KEEP_CHECKPOINTS" in help_text and "newest checkpoints kept (default: 2)" in help_text


@pytest.mark.parametrize("kwargs", [{"progress": "no"}, {"batch_size": 2.5}, {"loss": 3}, {"device": 3},
                                    {"plot": 1}])
def test_wrongly_typed_options_are_type_and_value_errors(kwargs):
    """A wrong type is a TypeError (Python callers) and a ValueError (the CLI's one error line)."""
    with pytest.raises(TypeError) as caught:
        TrainConfig(model="m", data="d", out="o", **kwargs)
    assert isinstance(caught.value, ValueError) and next(iter(kwargs)) in str(caught.value)


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"loss": "nope"}, {"lr": float("nan")}, {"device": "gpu"}])
def test_out_of_range_options_are_value_errors_only(kwargs):
    with pytest.raises(ValueError) as caught:
        TrainConfig(model="m", data="d", out="o", **kwargs)
    assert not isinstance(caught.value, TypeError)
