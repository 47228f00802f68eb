"""``DFTTrainer`` / ``DFTConfig``: Discriminative Fine-Tuning (DFT, DFT2) on TRL's conventions.

Guo et al. 2025, "Discriminative Finetuning of Generative LLMs without Reward Models and Human
Preference Data". Not TRL's ``SFTConfig(loss_type="dft")``: that is *Dynamic* Fine-Tuning
(arXiv 2508.05629), a token-reweighted SFT.

Dataset: columns ``prompt``, ``chosen`` (the good answer) and ``rejected`` (a list of the same K
answers per example, sampled from the base model), either all plain strings or conversational
(``prompt`` a list of messages, ``chosen`` a list of messages, ``rejected`` a list of K lists of
messages; the tokenizer's chat template renders them). Plain completions get the EOS token, as
TRL's trainers do. The example id that keys the :class:`~dftkern.DFTState` is the row index in
the training dataset (column ``dft_id``).

Loss: :func:`dftkern.fused_dft_loss` inside the model's forward (gradients computed in the
forward, no logits). DFT needs the reference log-probs of the negatives: by default they are
precomputed once with the initial model before training (``precompute_ref_log_probs=True``, as the
paper does); otherwise pass ``ref_model``. DFT2 is reference-free.

The state ``u`` is saved with every Trainer checkpoint (``dft_state.safetensors`` + JSON metadata;
never pickle) and restored by ``trainer.train(resume_from_checkpoint=...)``. Under
``torch.distributed`` (DDP, FSDP2 through accelerate) every rank keeps the same state: the updates
are all-gathered (see :class:`~dftkern.DFTState`). Evaluation does not touch the state: its ``u``
is the batch estimate (``logsumexp_j d_ij - log K``).

Metrics, named as TRL names its own: ``logps/chosen`` and ``logps/rejected`` (mean sequence
log-prob of the good answers / of the negatives), ``rewards/margins`` (mean of ``s(y_i) - s(y'_ij)``
on the loss's score: sums for DFT, token means for DFT2), ``rewards/accuracies`` (fraction of
negatives scored below their good answer), ``rewards/rejected`` (DFT: mean ``s(y') - r``, the
negatives' log-ratio to the reference), ``dft/u`` (mean ``u_i``), ``dft/weight_max`` (largest
``omega_ij``), ``num_tokens``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments

from ... import DFTState, fused_dft_loss, sequence_logprobs
from ...losses.dft import DFT_DEFAULTS
from ._common import patch_trainer_model, refuse

__all__ = ["DFTConfig", "DFTTrainer", "DataCollatorForDFT", "STATE_FILE"]

STATE_FILE = "dft_state.safetensors"


@dataclass
class DFTConfig(TrainingArguments):
    """Training arguments for :class:`DFTTrainer` (``transformers.TrainingArguments`` plus the fields below).

    Args:
        variant: "dft" (sum log-probs, needs reference log-probs) or "dft2" (mean log-probs, no reference).
        tau, gamma: DFT's temperature and moving-average weight; None -> the variant's defaults
            (DFT 1.0 / 0.85, DFT2 0.3 / 0.9).
        u_init: initial value of every ``u_i``.
        max_length: truncate each prompt+completion to this many tokens (keeping the start); None: no limit.
        precompute_ref_log_probs: compute the negatives' reference log-probs once before training with
            the initial model (default, needed for "dft" unless a ``ref_model`` is passed).
        precompute_ref_batch_size: examples per batch for that pass (default: per_device_train_batch_size).
        disable_dropout: set every dropout probability of the model to 0.
        dftkern_chunk_bytes, dftkern_backend: dftkern's workspace budget and engine.
    """

    variant: str = field(default="dft", metadata={"help": "'dft' or 'dft2'"})
    tau: float | None = field(default=None, metadata={"help": "temperature; None = the variant's default"})
    gamma: float | None = field(default=None, metadata={"help": "moving-average weight; None = variant default"})
    u_init: float = field(default=0.0, metadata={"help": "initial u_i"})
    max_length: int | None = field(default=1024, metadata={"help": "max tokens of prompt+completion"})
    precompute_ref_log_probs: bool = field(default=True, metadata={"help": "reference log-probs before training"})
    precompute_ref_batch_size: int | None = field(default=None, metadata={"help": "batch size of that pass"})
    disable_dropout: bool = field(default=True, metadata={"help": "zero every dropout probability"})
    dftkern_chunk_bytes: int | None = field(default=None, metadata={"help": "dftkern workspace budget (bytes)"})
    dftkern_backend: str = field(default="auto", metadata={"help": "dftkern engine: auto|triton|torch"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "keep the DFT columns"})

    def __post_init__(self):
        if self.variant not in DFT_DEFAULTS:
            raise ValueError(f"variant must be one of {sorted(DFT_DEFAULTS)}, got {self.variant!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 or None, got {self.max_length}")
        super().__post_init__()


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def _is_conversational(example: dict) -> bool:
    prompt = example["prompt"]
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _input_ids(encoded) -> list[int]:
    ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
    return list(ids)


def tokenize_example(example: dict, index: int, tokenizer) -> dict:
    """``{"dft_id", "prompt_ids", "chosen_ids", "rejected_ids" (K lists)}`` for one dataset row.

    The completion tokens are what follows the longest prefix that the tokenized prompt shares with
    every tokenized prompt+completion (a chat template or a token merge may change the prompt's end).
    """
    for key in ("prompt", "chosen", "rejected"):
        if key not in example:
            raise ValueError(f"dataset row {index}: missing column {key!r} (DFT needs prompt, chosen, rejected)")
    rejected = example["rejected"]
    if not isinstance(rejected, list) or not rejected:
        raise ValueError(f"dataset row {index}: 'rejected' must be a non-empty list of K responses, got "
                         f"{type(rejected).__name__}")
    completions = [example["chosen"], *rejected]
    if _is_conversational(example):
        prompt_ids = _input_ids(tokenizer.apply_chat_template(example["prompt"], tokenize=True,
                                                              add_generation_prompt=True))
        fulls = []
        for j, messages in enumerate(completions):
            if not (isinstance(messages, list) and messages and isinstance(messages[0], dict)):
                raise ValueError(f"dataset row {index}: conversational prompt but completion {j} is not a list of "
                                 f"messages ({type(messages).__name__})")
            fulls.append(_input_ids(tokenizer.apply_chat_template(example["prompt"] + messages, tokenize=True)))
    else:
        if not all(isinstance(c, str) for c in completions) or not isinstance(example["prompt"], str):
            raise ValueError(f"dataset row {index}: plain-text rows need a str prompt, a str chosen and a list of "
                             "str rejected")
        prompt_ids = _input_ids(tokenizer(example["prompt"]))
        eos = tokenizer.eos_token or ""
        fulls = [_input_ids(tokenizer(example["prompt"] + (c if c.endswith(eos) else c + eos))) for c in completions]
    prompt_len = min(_common_prefix(prompt_ids, full) for full in fulls)
    return {"dft_id": index, "prompt_ids": prompt_ids[:prompt_len], "chosen_ids": fulls[0][prompt_len:],
            "rejected_ids": [full[prompt_len:] for full in fulls[1:]]}


@dataclass
class DataCollatorForDFT:
    """Pads a list of tokenized examples into one DFT batch of ``G * (1 + K)`` rows.

    Returns ``input_ids``, ``attention_mask`` and ``labels`` (all ``[G*(1+K), T]``; rows grouped
    per example: good answer first, then its K negatives; labels unshifted, -100 on the prompt and
    padding), ``dft_ids`` int64 ``[G]`` and, when present, ``ref_rejected_logps`` float32 ``[G, K]``.
    """

    pad_token_id: int
    max_length: int | None = None

    def __call__(self, examples: list[dict]) -> dict:
        k = len(examples[0]["rejected_ids"])
        rows, label_rows = [], []
        for example in examples:
            if len(example["rejected_ids"]) != k:
                raise ValueError(f"every example needs the same number of rejected responses: example "
                                 f"{example['dft_id']} has {len(example['rejected_ids'])}, another has {k}")
            prompt = list(example["prompt_ids"])
            for completion in [example["chosen_ids"], *example["rejected_ids"]]:
                ids = prompt + list(completion)
                labels = [-100] * len(prompt) + list(completion)
                if self.max_length is not None:
                    ids, labels = ids[:self.max_length], labels[:self.max_length]
                rows.append(ids)
                label_rows.append(labels)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(zip(rows, label_rows)):
            input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            labels[i, :len(lab)] = torch.tensor(lab, dtype=torch.long)
            attention[i, :len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
                 "dft_ids": torch.tensor([int(e["dft_id"]) for e in examples], dtype=torch.long)}
        if "ref_rejected_logps" in examples[0]:
            batch["ref_rejected_logps"] = torch.tensor([list(e["ref_rejected_logps"]) for e in examples],
                                                       dtype=torch.float32)
        return batch


# ---------------------------------------------------------------------------------------------
# trainer
# ---------------------------------------------------------------------------------------------


class DFTTrainer(Trainer):
    """Discriminative Fine-Tuning with dftkern's fused loss, as a ``transformers.Trainer``.

    Args:
        model: a Hugging Face causal LM (or a PEFT model around one) of a family
            :func:`~dftkern.integrations.transformers.patch_causal_lm` supports; patched in place.
        ref_model: the reference model for variant "dft" when ``precompute_ref_log_probs=False``.
        args: :class:`DFTConfig`.
        train_dataset: a ``datasets.Dataset`` with ``prompt``, ``chosen``, ``rejected`` (see the module doc).
        eval_dataset: same format (optional).
        processing_class: the tokenizer (needs a pad or EOS token).
        callbacks, optimizers: as ``transformers.Trainer``.

    Attributes:
        dft_state: the :class:`~dftkern.DFTState` (one ``u_i`` per training example).
        num_negatives: K.
    """

    def __init__(self, model, ref_model=None, args: DFTConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, callbacks=None, optimizers=(None, None)):
        from datasets import Dataset

        args = args if args is not None else DFTConfig(output_dir="dft-output")
        if not isinstance(args, DFTConfig):
            raise TypeError(f"args must be a DFTConfig, got {type(args).__name__}")
        if not isinstance(train_dataset, Dataset):
            raise TypeError(f"train_dataset must be a datasets.Dataset, got {type(train_dataset).__name__}")
        if processing_class is None:
            raise ValueError("processing_class (the tokenizer) is required")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ValueError("the tokenizer needs a pad_token or an eos_token")
            tokenizer.pad_token = tokenizer.eos_token
        refuse(args.variant == "dft" and not args.precompute_ref_log_probs and ref_model is None,
               "variant='dft' needs reference log-probs of the negatives: set precompute_ref_log_probs=True "
               "(default) or pass ref_model")
        refuse(args.variant == "dft2" and ref_model is not None, "variant='dft2' is reference-free: drop ref_model")
        if args.disable_dropout:
            for module in list(model.modules()) + (list(ref_model.modules()) if ref_model is not None else []):
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        patch_trainer_model(model)
        if ref_model is not None:
            patch_trainer_model(ref_model)
            ref_model.eval().requires_grad_(False)
        self.ref_model = ref_model
        self._tokenizer = tokenizer
        train_dataset = self._prepare_dataset(train_dataset, args, "train")
        self.num_negatives = len(train_dataset[0]["rejected_ids"])
        if eval_dataset is not None:
            eval_dataset = self._prepare_dataset(eval_dataset, args, "eval")
        collator = DataCollatorForDFT(tokenizer.pad_token_id, args.max_length)
        super().__init__(model=model, args=args, data_collator=collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers)
        # compute_loss returns a mean over this micro-batch's groups (it does not use num_items_in_batch), so
        # the Trainer must divide by the accumulation steps itself; the patched forward takes **kwargs, which
        # would otherwise make it assume the loss was already normalized (TRL's trainers set the same).
        self.model_accepts_loss_kwargs = False
        if self.ref_model is not None:
            self.ref_model = self.ref_model.to(self.args.device)
        tau = DFT_DEFAULTS[args.variant]["tau"] if args.tau is None else args.tau
        gamma = DFT_DEFAULTS[args.variant]["gamma"] if args.gamma is None else args.gamma
        self.tau, self.gamma = float(tau), float(gamma)
        self.dft_state = DFTState(len(train_dataset), init=args.u_init)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._total_train_tokens = 0
        if args.variant == "dft" and args.precompute_ref_log_probs:
            self.train_dataset = self._precompute_ref(self.train_dataset)
            if self.eval_dataset is not None:
                self.eval_dataset = self._precompute_ref(self.eval_dataset)

    # -- data -----------------------------------------------------------------------------------
    def _prepare_dataset(self, dataset, args: DFTConfig, name: str):
        if "prompt_ids" in dataset.column_names:
            return dataset
        columns = dataset.column_names
        dataset = dataset.map(tokenize_example, with_indices=True, fn_kwargs={"tokenizer": self._tokenizer},
                              remove_columns=columns, desc=f"Tokenizing {name} dataset")
        counts = {len(r) for r in dataset["rejected_ids"]}
        if len(counts) != 1:
            raise ValueError(f"{name} dataset: every row needs the same number K of rejected responses, found "
                             f"{sorted(counts)}")
        if args.max_length is not None:
            # prompt + completion is cut to max_length: a prompt of >= max_length tokens leaves no completion
            cut = sum(len(p) >= args.max_length for p in dataset["prompt_ids"])
            message = (f"{name} dataset: {cut} of {len(dataset)} rows have a prompt of >= max_length = "
                       f"{args.max_length} tokens, so truncation removes all their completion tokens and they "
                       f"train nothing; raise max_length or shorten those prompts")
            if cut == len(dataset):
                raise ValueError(message)
            if cut:
                warnings.warn(message, stacklevel=3)
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["dft_id", "prompt_ids", "chosen_ids", "rejected_ids", "ref_rejected_logps"]

    def _sequence_logps(self, model, batch: dict) -> torch.Tensor:
        """Sequence log-probs ``[G*(1+K)]`` (sums over completion tokens) of ``model``, no gradient."""
        chunk_bytes, backend = self.args.dftkern_chunk_bytes, self.args.dftkern_backend

        def head_fn(hidden, shifted, head):
            return sequence_logprobs(hidden, head.weight, shifted, **head.kwargs(), chunk_bytes=chunk_bytes,
                                     backend=backend)

        with torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"], use_cache=False, dftkern_head=head_fn)

    def _precompute_ref(self, dataset):
        """Add ``ref_rejected_logps`` (K floats per row): the initial model's (or ``ref_model``'s) log-probs.

        Every rank computes the whole dataset (deterministic, so all ranks agree without communication).
        """
        model = self.ref_model if self.ref_model is not None else self.model
        was_training = model.training
        model.eval()
        device = self.args.device
        model.to(device)
        size = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        k = self.num_negatives
        values = []
        try:
            for start in range(0, len(dataset), size):
                batch = self.data_collator([dataset[i] for i in range(start, min(start + size, len(dataset)))])
                batch = {key: v.to(device) for key, v in batch.items()}
                seq = self._sequence_logps(model, batch).float().cpu()
                values.extend(seq.view(-1, 1 + k)[:, 1:].tolist())
        finally:
            model.train(was_training)
        if "ref_rejected_logps" in dataset.column_names:
            dataset = dataset.remove_columns("ref_rejected_logps")
        return dataset.add_column("ref_rejected_logps", values)

    # -- loss -----------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        args, k = self.args, self.num_negatives
        ids = inputs["dft_ids"]
        ref = None
        if args.variant == "dft":
            if "ref_rejected_logps" in inputs:
                ref = inputs["ref_rejected_logps"].float()
            else:
                ref = self._sequence_logps(self.ref_model, inputs).float().view(-1, 1 + k)[:, 1:]
        state = self.dft_state if mode == "train" else None
        tau, gamma = self.tau, self.gamma

        def head_fn(hidden, shifted, head):
            return fused_dft_loss(hidden, head.weight, shifted, num_negatives=k, ids=ids.cpu(), state=state,
                                  ref_logps=ref, tau=tau, gamma=gamma, variant=args.variant, return_stats=True,
                                  **head.kwargs(), chunk_bytes=args.dftkern_chunk_bytes, backend=args.dftkern_backend)

        loss, stats = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            labels=inputs["labels"], use_cache=False, dftkern_head=head_fn)
        self._log_dft_metrics(mode, inputs, stats, ref)
        return (loss, {"loss": loss}) if return_outputs else loss

    def _log_dft_metrics(self, mode: str, inputs: dict, stats: dict, ref) -> None:
        from ._common import gathered_mean

        acc, metrics, k = self.accelerator, self._metrics[mode], self.num_negatives
        sums = stats["seq_logps"].view(-1, 1 + k)
        scores = stats["scores"]
        margins = scores[:, :1] - scores[:, 1:]
        metrics["logps/chosen"].append(gathered_mean(acc, sums[:, 0]))
        metrics["logps/rejected"].append(gathered_mean(acc, sums[:, 1:].reshape(-1)))
        metrics["rewards/margins"].append(gathered_mean(acc, margins.reshape(-1)))
        metrics["rewards/accuracies"].append(gathered_mean(acc, (margins > 0).float().reshape(-1)))
        if ref is not None:
            metrics["rewards/rejected"].append(gathered_mean(acc, (sums[:, 1:] - ref.to(sums.device)).reshape(-1)))
        metrics["dft/u"].append(gathered_mean(acc, stats["u"]))
        metrics["dft/weight_max"].append(acc.gather(stats["weights"].detach().amax().reshape(1)).max().item())
        if mode == "train":
            self._total_train_tokens += acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
        metrics["num_tokens"] = [self._total_train_tokens]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(v) / len(v) for key, v in self._metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()

    # -- DFTState with checkpoints ----------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            save_dft_state(self.dft_state, folder)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_dft_state(self.dft_state, resume_from_checkpoint)


def save_dft_state(state: DFTState, folder: str) -> str:
    """Write ``state`` to ``folder/dft_state.safetensors`` (tensors ``u``, ``num_updates``; JSON metadata)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    sd = state.state_dict()
    path = os.path.join(folder, STATE_FILE)
    save_file({"u": sd["u"].contiguous(), "num_updates": sd["num_updates"].contiguous()}, path,
              metadata={"dftkern": json.dumps({"init": sd["init"], "num_examples": sd["num_examples"]})})
    return path


def load_dft_state(state: DFTState, folder: str) -> None:
    """Restore ``state`` from ``folder/dft_state.safetensors``.

    Raises:
        FileNotFoundError: the checkpoint has no DFT state (it was not written by :class:`DFTTrainer`).
        ValueError: the saved state is for a different number of examples.
    """
    from safetensors import safe_open

    path = os.path.join(folder, STATE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no DFT state in this checkpoint (resuming would restart every u_i at "
                                "u_init)")
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["dftkern"])
        saved = {"u": f.get_tensor("u"), "num_updates": f.get_tensor("num_updates"), **meta}
    state.load_state_dict(saved)
