"""DFTTrainer: the loss equals a float64 plain-definition DFT on the model's own logits; the
DFTState follows the paper's update, survives checkpoint/resume, and agrees across DDP ranks."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="TRL is not installed (pip install 'dftkern[trl]'); CI installs it")

from integ_helpers import free_port  # noqa: E402
from trl_parity import PROMPTS, tiny_llama_and_tokenizer  # noqa: E402

from dftkern.integrations.trl import DFTConfig, DFTTrainer  # noqa: E402
from dftkern.integrations.trl.dft import STATE_FILE, DataCollatorForDFT, load_dft_state  # noqa: E402

REJECTED = [["4", "5"], ["8", "1"], ["51", "16"], ["41", "0"], ["24", "33"], ["1", "19"]]
CHOSEN = ["3", "7", "15", "14", "42", "10"]


def dft_dataset(n: int = 6):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": PROMPTS[:n], "chosen": CHOSEN[:n], "rejected": REJECTED[:n]})


def make_trainer(tmp_path, *, model=None, dataset=None, **config):
    base, tokenizer = tiny_llama_and_tokenizer()
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, report_to=[],
                    logging_steps=1, use_cpu=True, save_strategy="no", learning_rate=1e-2, seed=0)
    settings.update(config)
    ref_model = settings.pop("ref_model", None)
    return DFTTrainer(model=model if model is not None else base, ref_model=ref_model, args=DFTConfig(**settings),
                      train_dataset=dataset if dataset is not None else dft_dataset(), processing_class=tokenizer)


def _plain_sequence_logps(model, batch) -> torch.Tensor:
    """float64 sums of completion-token log-probs from the model's own full logits (unpatched path)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    labels = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(labels == -100, 0.0).sum(1)


@pytest.mark.parametrize("variant", ["dft", "dft2"])
def test_loss_state_and_grads_match_plain_definition(tmp_path, variant):
    trainer = make_trainer(tmp_path, variant=variant, u_init=-0.5)
    reference = copy.deepcopy(trainer.model)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    k, tau, gamma = trainer.num_negatives, trainer.tau, trainer.gamma
    ids = batch["dft_ids"].cpu()

    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()

    sums = _plain_sequence_logps(reference, batch).view(-1, 1 + k)
    counts = (batch["labels"][:, 1:] != -100).sum(1).double().view(-1, 1 + k)
    scores = sums if variant == "dft" else sums / counts
    d = scores[:, 1:].detach() / tau
    if variant == "dft":
        d = d - batch["ref_rejected_logps"].double()
    u = torch.logaddexp(torch.full_like(d[:, 0], math.log1p(-gamma) - 0.5),
                        math.log(gamma) + torch.logsumexp(d, 1) - math.log(k))
    omega = torch.exp(d - u.unsqueeze(1))
    expected = (-scores[:, 0] + (omega * scores[:, 1:]).mean(1)).mean()
    expected.backward()

    assert abs(loss.item() - expected.item()) <= 1e-5
    torch.testing.assert_close(trainer.dft_state.u[ids].double(), u, rtol=0, atol=1e-5)
    assert trainer.dft_state.num_updates.tolist() == [int(i in ids.tolist()) for i in range(6)]
    ref_grads = dict(reference.named_parameters())
    worst = max((p.grad.double() - ref_grads[n].grad).abs().max().item() for n, p in trainer.model.named_parameters())
    assert worst <= 1e-4
    if variant == "dft":  # at step 0 the precomputed reference is the policy itself
        torch.testing.assert_close(batch["ref_rejected_logps"].double(), sums[:, 1:].detach(), rtol=0, atol=1e-5)


def test_ref_model_gives_the_same_loss_as_precompute(tmp_path):
    base, _ = tiny_llama_and_tokenizer()
    pre = make_trainer(tmp_path / "a", model=copy.deepcopy(base))
    live = make_trainer(tmp_path / "b", model=copy.deepcopy(base), ref_model=copy.deepcopy(base),
                        precompute_ref_log_probs=False)
    assert "ref_rejected_logps" not in live.train_dataset.column_names
    losses = []
    for trainer in (pre, live):
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        losses.append(trainer.compute_loss(trainer.model, batch).item())
    assert abs(losses[0] - losses[1]) <= 1e-6


def test_checkpoint_resume_restores_the_state(tmp_path):
    full = make_trainer(tmp_path / "full", max_steps=4, save_strategy="steps", save_steps=2)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / STATE_FILE).exists()
    resumed = make_trainer(tmp_path / "resumed", max_steps=4, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    torch.testing.assert_close(resumed.dft_state.u, full.dft_state.u, rtol=0, atol=1e-6)
    assert torch.equal(resumed.dft_state.num_updates, full.dft_state.num_updates)
    assert int(full.dft_state.num_updates.sum()) == 8  # 4 steps x 2 examples
    fresh = make_trainer(tmp_path / "fresh")
    with pytest.raises(FileNotFoundError, match="no DFT state"):
        load_dft_state(fresh.dft_state, str(tmp_path))


def test_metrics_are_logged(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train()
    first = trainer.state.log_history[0]
    for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "rewards/accuracies",
                "rewards/rejected", "dft/u", "dft/weight_max", "num_tokens"):
        assert key in first, key
    assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at step 0


def test_conversational_dataset(tmp_path):
    from datasets import Dataset

    base, tokenizer = tiny_llama_and_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}"
                               "{{ eos_token }}{% endif %}{% endfor %}")
    rows = {"prompt": [[{"role": "user", "content": p}] for p in PROMPTS[:4]],
            "chosen": [[{"role": "assistant", "content": c}] for c in CHOSEN[:4]],
            "rejected": [[[{"role": "assistant", "content": r}] for r in rs] for rs in REJECTED[:4]]}
    trainer = DFTTrainer(model=base, args=DFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                                    max_steps=1, report_to=[], use_cpu=True, save_strategy="no"),
                         train_dataset=Dataset.from_dict(rows), processing_class=tokenizer)
    row = trainer.train_dataset[2]
    encode = tokenizer.convert_tokens_to_ids
    assert row["prompt_ids"] == [encode(c) for c in "10+5="]
    assert row["chosen_ids"] == [encode("1"), encode("5"), tokenizer.eos_token_id]
    assert row["rejected_ids"][1] == [encode("1"), encode("6"), tokenizer.eos_token_id]
    trainer.train()
    assert int(trainer.dft_state.num_updates.sum()) == 2


def test_plain_completions_get_eos_and_prompt_is_masked(tmp_path):
    trainer = make_trainer(tmp_path)
    row = trainer.train_dataset[0]
    eos = trainer.processing_class.eos_token_id
    assert row["chosen_ids"][-1] == eos and all(r[-1] == eos for r in row["rejected_ids"])
    batch = DataCollatorForDFT(pad_token_id=0)([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert batch["input_ids"].shape[0] == 2 * 3 and batch["dft_ids"].tolist() == [0, 1]
    n_prompt = len(row["prompt_ids"])
    assert (batch["labels"][0, :n_prompt] == -100).all() and (batch["labels"][0, n_prompt:n_prompt + 2] >= 0).all()


@pytest.mark.parametrize("variant", ["dft", "dft2"])
def test_gradient_accumulation_gives_the_same_steps(tmp_path, variant):
    """2 micro-batches of 1 example = 1 batch of 2: same logged losses and gradient norms (before, the
    loss and gradient were multiplied by gradient_accumulation_steps)."""
    logs = []
    for batch, accumulation in ((2, 1), (1, 2)):
        trainer = make_trainer(tmp_path / f"b{batch}", dataset=dft_dataset(4), variant=variant,
                               per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
        trainer.train()
        logs.append([(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h])
    assert len(logs[0]) == len(logs[1]) == 2
    for (loss_a, norm_a), (loss_b, norm_b) in zip(*logs):
        assert abs(loss_a - loss_b) <= 1e-5 * max(1.0, abs(loss_a)) and abs(norm_a - norm_b) <= 1e-4 * norm_a


def test_prompts_longer_than_max_length_are_reported(tmp_path):
    """A prompt of >= max_length tokens leaves no completion after truncation: a warning for some rows,
    an error when no row would train anything."""
    with pytest.raises(ValueError, match="rows have a prompt of >= max_length = 3 tokens"):
        make_trainer(tmp_path, max_length=3)
    lengths = sorted(len(p) for p in make_trainer(tmp_path).train_dataset["prompt_ids"])
    if lengths[0] == lengths[-1]:
        pytest.skip("the test prompts all have one length")
    with pytest.warns(UserWarning, match=r"of 6 rows have a prompt of >= max_length"):
        make_trainer(tmp_path / "some", max_length=lengths[-1])


def test_clear_errors(tmp_path):
    from datasets import Dataset

    with pytest.raises(ValueError, match="same number K"):
        make_trainer(tmp_path, dataset=Dataset.from_dict({"prompt": ["1+2=", "3+4="], "chosen": ["3", "7"],
                                                          "rejected": [["4", "5"], ["8"]]}))
    with pytest.raises(ValueError, match="missing column 'rejected'"):
        make_trainer(tmp_path, dataset=Dataset.from_dict({"prompt": ["1+2="], "chosen": ["3"]}))
    with pytest.raises(ValueError, match="needs reference log-probs"):
        make_trainer(tmp_path, precompute_ref_log_probs=False)
    with pytest.raises(ValueError, match="variant must be one of"):
        DFTConfig(output_dir=str(tmp_path), variant="dpo")


@pytest.mark.slow
def test_ddp_two_processes_keep_one_state(tmp_path):
    """torchrun, 2 CPU processes (gloo): each rank trains on its shard; the DFTState must be the same on
    both ranks and hold every example's update (the all-gather), and the state file is written once."""
    script = Path(__file__).with_name("dft_ddp_worker.py")
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]) + ":" +
           str(Path(__file__).resolve().parent), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["u"] == ranks[1]["u"] and ranks[0]["num_updates"] == ranks[1]["num_updates"]
    assert ranks[0]["world_size"] == 2
    assert ranks[0]["num_updates"] == [1] * 4  # 1 step x 2 ranks x 2 examples: every example once
    assert (tmp_path / "out" / "checkpoint-1" / STATE_FILE).exists()
