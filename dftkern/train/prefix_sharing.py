"""Prefix sharing: run the backbone over a group's shared prompt once (issue 16).

Every group loss the trainer serves feeds the model one prompt with several responses (DFT: the
good answer and K negatives; DPO: a pair; RWR/REINFORCE/RLOO: n samples). The plain layouts of
:func:`dftkern.train.data.collate` repeat the prompt in every row, so the backbone runs over it
``rows_per_example`` times. Here each group becomes one sequence::

    [prompt, response_0, response_1, ..., response_K]

with an attention mask in which every response token attends to the prompt and to the earlier
tokens of its own response only, and position ids that restart at ``len(prompt)`` for every
response. Each response token therefore sees exactly the context, and the positions, it has in
the unshared row ``prompt + response_j``; its hidden state is the same function of the weights.

**The loss view.** With labels shifted as in ``collate`` (``labels[t] = x[t+1]``), row ``j`` of the
unshared layout carries labels at its positions ``P-1 .. P+L_j-2`` (``P`` prompt tokens, ``L_j``
response tokens): the first response token is predicted from the prompt's *last* hidden state,
which in the shared layout is one position used by every response. :func:`collate_shared`
records, for every label-carrying position of every unshared row, its position in the flattened
shared sequence (``gather_index``); :func:`shared_backbone_hidden` returns
``last_hidden_state.reshape(-1, H).index_select(0, gather_index)`` — rows that overlap at the
prompt's last position — and the fused losses take them as a packed batch with ``cu_seqlens``
row bounds (``SharedPromptBatch.loss_batch``). ``index_select``'s backward sums the gradients of
the repeated position over the responses, exactly what the unshared layout's separate copies of
the prompt accumulate, so the loss and every parameter gradient equal the unshared ones up to
floating-point summation order. The loss view holds only label-carrying positions (the
unshared layouts also push prompt and padding positions through the LM-head products).

**Attention kernels** (``causal_lm.config._attn_implementation``):

* ``"sdpa"`` — a boolean 4D mask ``[B, 1, S, S]`` (True = attend);
* ``"eager"`` — the same as an additive float mask (0 / ``finfo(dtype).min``), since HF's eager
  attention adds the mask to the scores (a boolean mask would be silently wrong there);
* ``"flex_attention"`` — a ``torch.nn.attention.flex_attention.BlockMask`` (no dense mask; blocks
  that are entirely masked are skipped). torch 2.13 has no FlexAttention backward on CPU, so on
  CPU it serves gradient-free scoring only;
* anything else (``flash_attention_2``/``_3``, paged or hub kernels) raises
  :class:`SharedPromptUnsupported`: FlashAttention's varlen API takes block-diagonal causal masks
  (``cu_seqlens``) only, and a response attending to a prompt that is not its own block cannot be
  expressed there.

Hugging Face models take the prepared 4D mask (or BlockMask) as-is through
``transformers.masking_utils.create_causal_mask`` (transformers >= 4.53; checked on 5.24). Models
with sliding-window layers would ignore the window under a prepared mask, so they are accepted
only when every unshared row fits inside the window (then the window masks nothing); other
non-full attention layer types (chunked, linear/recurrent) are rejected. Whether a model really
honours the mask is *measured*, not assumed: :func:`check_shared_prompt_support` runs a tiny
probe (shared vs unshared hidden states on random tokens) and raises on any mismatch.

Module entry point: ``python -m dftkern.train.prefix_sharing bench`` (CPU timing and peak-RSS of
one backbone + loss step, shared vs unshared; see :func:`benchmark`) and ``... mask`` (prints the
mask of a small example).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .data import Batch, Row, TrainExample, collate

__all__ = [
    "SHARED_PROMPT_ATTENTION",
    "SharedPromptUnsupported",
    "SharedPromptBatch",
    "collate_shared",
    "dense_shared_mask",
    "shared_attention_mask",
    "check_attention_support",
    "shared_backbone_hidden",
    "shared_forward",
    "check_shared_prompt_support",
    "mask_picture",
    "benchmark",
]

SHARED_PROMPT_ATTENTION = ("sdpa", "eager", "flex_attention")
"""Attention implementations (``config._attn_implementation``) that take the shared-prompt mask."""

_PAD_SEGMENT = -1


class SharedPromptUnsupported(ValueError):
    """The model, its attention kernel or the batch cannot run the prompt-shared layout exactly."""


@dataclass
class SharedPromptBatch:
    """A micro-batch of ``G`` groups in the prompt-shared layout (built by :func:`collate_shared`).

    Backbone inputs, ``[B, S]`` int64 each (``B = G`` with one group per row, right-padded, or
    ``B = 1`` with the groups packed one after another):

    * ``input_ids`` — ``prompt, response_0, ..., response_K`` per group (pad id at padding);
    * ``position_ids`` — ``0..P-1`` on the prompt, ``P..P+L_j-1`` on response ``j``;
    * ``sequence_ids`` — which group of the row a token belongs to (0-based within the row;
      ``-1`` at padding);
    * ``segment_ids`` — ``0`` on the prompt, ``j + 1`` on response ``j``, ``-1`` at padding.

    ``gather_index`` (int64 ``[N]``) maps each of the ``N`` label-carrying positions of the
    unshared rows (row-major: group, row, token) to its position in ``input_ids.reshape(-1)``;
    several rows of a group map their first position to the same prompt token.
    ``loss_batch`` is the packed :class:`~dftkern.train.data.Batch` the losses see: ``labels``
    ``[N]``, ``cu_seqlens`` int32 ``[R+1]`` (``R = G * rows_per_example``, row ``r`` of group ``g``
    at ``g * rows_per_example + r``), ``input_ids``/``position_ids`` ``[1, N]`` (the input token and
    position at each loss position), ``example_ids``, ``ref_logps`` and ``rewards`` exactly as
    :func:`~dftkern.train.data.collate` gives them, and ``num_tokens`` = ``num_tokens`` below.

    ``num_tokens`` counts the tokens of the unshared rows (what ``collate`` reports, so tokens/s
    stays comparable); ``backbone_tokens`` the non-padding tokens the backbone actually runs
    over; ``max_row_length`` the longest unshared row (``P + L_j``), for sliding-window checks.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    sequence_ids: torch.Tensor
    segment_ids: torch.Tensor
    gather_index: torch.Tensor
    loss_batch: Batch
    num_tokens: int
    backbone_tokens: int
    max_row_length: int

    @property
    def packed_groups(self) -> bool:
        """True when all groups share one row (``B == 1``) rather than one row each."""
        return self.input_ids.shape[0] == 1 and self.loss_batch.num_examples > 1

    @property
    def num_examples(self) -> int:
        return self.loss_batch.num_examples

    @property
    def rows_per_example(self) -> int:
        return self.loss_batch.rows_per_example

    def to(self, device) -> SharedPromptBatch:
        def move(t):
            return t.to(device, non_blocking=True)
        return SharedPromptBatch(move(self.input_ids), move(self.position_ids), move(self.sequence_ids),
                                 move(self.segment_ids), move(self.gather_index), self.loss_batch.to(device),
                                 self.num_tokens, self.backbone_tokens, self.max_row_length)


def _shared_prompt(example: TrainExample, keep: Sequence[int]) -> tuple[int, ...]:
    """The prompt every kept row of ``example`` starts with; a ValueError names the offending row."""
    first: Row = example.rows[keep[0]]
    prompt = first.input_ids[:first.prompt_len]
    if first.prompt_len < 1:
        raise ValueError(f"example {example.prompt_id!r}: row {keep[0]} has prompt_len 0; the prompt-shared "
                         f"layout needs a prompt of at least one token (its last hidden state predicts every "
                         f"response's first token)")
    for r in keep[1:]:
        row = example.rows[r]
        if row.prompt_len != first.prompt_len or row.input_ids[:row.prompt_len] != prompt:
            raise ValueError(f"example {example.prompt_id!r}: row {r} does not start with the same prompt as row "
                             f"{keep[0]} (prompt_len {row.prompt_len} vs {first.prompt_len}, or different tokens); "
                             f"only rows with one shared prompt can use the prompt-shared layout")
    return prompt


def collate_shared(examples: Sequence[TrainExample], *, pad_token_id: int, rows: Sequence[int] | None = None,
                   with_ref_logps: bool = False, with_rewards: bool = False,
                   pack_groups: bool = False) -> SharedPromptBatch:
    """Lay ``examples`` out prompt-shared: one sequence ``[prompt, response_0, ..., response_K]`` per example.

    Args:
        examples: groups whose kept rows all start with the same ``prompt_len >= 1`` prompt tokens
            (what :func:`~dftkern.train.data.build_examples` and on-policy sampling produce).
        pad_token_id: the id written at padding positions.
        rows / with_ref_logps / with_rewards: as in :func:`~dftkern.train.data.collate` (which builds
            the loss view's labels, ids, reference log-probs and rewards, so they are the same).
        pack_groups: False — one group per batch row, right-padded to the longest group (``[G, S]``;
            the dense masks of SDPA/eager cost ``G * S**2``); True — all groups in one row
            (``[1, N]``; good for FlexAttention, whose block mask skips the cross-group blocks).
    Returns:
        A :class:`SharedPromptBatch` on CPU.
    Raises:
        ValueError: a group's rows do not share one prompt, or a prompt is empty.
    """
    unshared = collate(examples, pad_token_id=pad_token_id, packed=True, rows=rows, with_ref_logps=with_ref_logps,
                       with_rewards=with_rewards)
    keep = list(range(len(examples[0].rows))) if rows is None else list(rows)
    row_starts = unshared.cu_seqlens.tolist()
    groups = []        # per group: (token ids, position ids, segment ids)
    local_gather = []  # per group: positions within the group's sequence, row-major over its rows
    unshared_index, loss_bounds, max_row_length = [], [0], 0
    for g, example in enumerate(examples):
        prompt = _shared_prompt(example, keep)
        p = len(prompt)
        ids, pos, seg, gather = list(prompt), list(range(p)), [0] * p, []
        for j, r in enumerate(keep):
            row = example.rows[r]
            response = row.input_ids[p:]
            n = len(response)
            if n:  # label positions: the prompt's last token, then the response's tokens but its last
                gather += [p - 1] + list(range(len(ids), len(ids) + n - 1))
            start = row_starts[g * len(keep) + j]
            unshared_index += range(start + p - 1, start + p - 1 + n)
            loss_bounds.append(loss_bounds[-1] + n)
            max_row_length = max(max_row_length, p + n)
            ids += response
            pos += range(p, p + n)
            seg += [j + 1] * n
        groups.append((ids, pos, seg))
        local_gather.append(gather)

    if pack_groups:
        offsets = [0]
        for ids, _, _ in groups[:-1]:
            offsets.append(offsets[-1] + len(ids))
        input_ids = torch.tensor([t for ids, _, _ in groups for t in ids], dtype=torch.int64)[None]
        position_ids = torch.tensor([t for _, pos, _ in groups for t in pos], dtype=torch.int64)[None]
        segment_ids = torch.tensor([t for _, _, seg in groups for t in seg], dtype=torch.int64)[None]
        sequence_ids = torch.repeat_interleave(torch.arange(len(groups)),
                                               torch.tensor([len(ids) for ids, _, _ in groups]))[None]
    else:
        width = max(len(ids) for ids, _, _ in groups)
        offsets = [g * width for g in range(len(groups))]
        input_ids = torch.full((len(groups), width), pad_token_id, dtype=torch.int64)
        position_ids = torch.zeros((len(groups), width), dtype=torch.int64)
        segment_ids = torch.full((len(groups), width), _PAD_SEGMENT, dtype=torch.int64)
        sequence_ids = torch.full((len(groups), width), _PAD_SEGMENT, dtype=torch.int64)
        for g, (ids, pos, seg) in enumerate(groups):
            n = len(ids)
            input_ids[g, :n] = torch.tensor(ids)
            position_ids[g, :n] = torch.tensor(pos)  # padding keeps position 0 (masked off; in range for any model)
            segment_ids[g, :n] = torch.tensor(seg)
            sequence_ids[g, :n] = 0
    gather_index = torch.tensor([offsets[g] + t for g, gather in enumerate(local_gather) for t in gather],
                                dtype=torch.int64)
    index = torch.tensor(unshared_index, dtype=torch.int64)
    loss_batch = Batch(input_ids=input_ids.reshape(-1)[gather_index][None], labels=unshared.labels[index],
                       example_ids=unshared.example_ids, rows_per_example=unshared.rows_per_example, packed=True,
                       position_ids=position_ids.reshape(-1)[gather_index][None],
                       cu_seqlens=torch.tensor(loss_bounds, dtype=torch.int32), ref_logps=unshared.ref_logps,
                       rewards=unshared.rewards, num_tokens=unshared.num_tokens)
    return SharedPromptBatch(input_ids, position_ids, sequence_ids, segment_ids, gather_index, loss_batch,
                             num_tokens=unshared.num_tokens, backbone_tokens=sum(len(ids) for ids, _, _ in groups),
                             max_row_length=max_row_length)


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def _allowed(seq_q, seg_q, seq_k, seg_k, q, k):
    """The mask rule on broadcastable index tensors: same group (or both padding), causal in the packed
    order, and the key is on the prompt or in the query's own response. Padding attends only to
    padding (each padding query at least to itself, so no softmax row is empty)."""
    return (seq_q == seq_k) & (k <= q) & ((seg_k == 0) | (seg_k == seg_q))


def dense_shared_mask(batch: SharedPromptBatch) -> torch.Tensor:
    """Boolean ``[B, S, S]`` on ``batch``'s device: ``mask[b, q, k]`` True when query ``q`` attends to key ``k``."""
    seq, seg = batch.sequence_ids, batch.segment_ids
    s = seq.shape[1]
    idx = torch.arange(s, device=seq.device)
    return _allowed(seq[:, :, None], seg[:, :, None], seq[:, None, :], seg[:, None, :], idx[:, None], idx[None, :])


def shared_attention_mask(batch: SharedPromptBatch, attn_implementation: str, dtype: torch.dtype = torch.float32):
    """The mask in the form ``attn_implementation`` takes, on ``batch``'s device.

    Returns:
        ``"sdpa"``: bool ``[B, 1, S, S]`` (True = attend); ``"eager"``: ``dtype`` ``[B, 1, S, S]``
        with 0 where attended and ``finfo(dtype).min`` elsewhere (added to the scores);
        ``"flex_attention"``: a ``BlockMask`` for ``B`` batch rows, all heads.
    Raises:
        SharedPromptUnsupported: another attention implementation.
    """
    if attn_implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        seq, seg = batch.sequence_ids, batch.segment_ids

        def mask_mod(b, h, q, k):
            return _allowed(seq[b, q], seg[b, q], seq[b, k], seg[b, k], q, k)

        s = seq.shape[1]
        return create_block_mask(mask_mod, B=seq.shape[0], H=None, Q_LEN=s, KV_LEN=s, device=seq.device)
    if attn_implementation == "sdpa":
        return dense_shared_mask(batch)[:, None]
    if attn_implementation == "eager":
        additive = torch.zeros(batch.input_ids.shape[0], 1, batch.input_ids.shape[1], batch.input_ids.shape[1],
                               dtype=dtype, device=batch.input_ids.device)
        return additive.masked_fill_(~dense_shared_mask(batch)[:, None], torch.finfo(dtype).min)
    raise _unsupported_attention(attn_implementation)


def _unsupported_attention(attn_implementation: str) -> SharedPromptUnsupported:
    why = ("FlashAttention's varlen kernels take only block-diagonal causal masks (cu_seqlens), and a response that "
           "attends to a prompt outside its own block cannot be expressed there"
           if "flash" in str(attn_implementation) else "no shared-prompt mask is built for it")
    return SharedPromptUnsupported(
        f"the prompt-shared layout needs an attention kernel that takes a custom mask, one of "
        f"{SHARED_PROMPT_ATTENTION}; this model uses attn_implementation={attn_implementation!r} ({why}). "
        f"Load it with attn='sdpa' (or 'flex_attention' on CUDA), or train without --share-prompt")


# ---------------------------------------------------------------------------------------------
# Support checks and the backbone call
# ---------------------------------------------------------------------------------------------


def _attention_window(config) -> int | None:
    """The sliding window the model applies somewhere (None: full attention everywhere).

    Raises SharedPromptUnsupported for layer types other than full and sliding attention."""
    if getattr(config, "attention_chunk_size", None):
        raise SharedPromptUnsupported(f"{config.model_type} uses chunked attention (attention_chunk_size="
                                      f"{config.attention_chunk_size}), which a prepared mask would override")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        other = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if other:
            raise SharedPromptUnsupported(f"{config.model_type} has layers of type {other}; the prompt-shared "
                                          f"layout supports full (and bounded sliding-window) attention only")
        if "sliding_attention" not in layer_types:
            return None
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


def check_attention_support(causal_lm, batch: SharedPromptBatch | None = None) -> str:
    """Static checks of ``causal_lm`` (and ``batch``) for the prompt-shared layout; returns the attention kernel.

    Raises:
        SharedPromptUnsupported: the kernel takes no custom mask (flash_attention_2, ...); the model has
            chunked/recurrent layers; it has sliding-window layers and a row of ``batch`` is longer than
            the window (the prepared mask would silently widen the window); FlexAttention on CPU while
            gradients are needed (torch has no CPU backward for it).
    """
    config = causal_lm.config
    impl = getattr(config, "_attn_implementation", None)
    if impl not in SHARED_PROMPT_ATTENTION:
        raise _unsupported_attention(impl)
    window = _attention_window(config)
    if window is not None and batch is not None and batch.max_row_length > window:
        raise SharedPromptUnsupported(
            f"{config.model_type} has sliding-window attention (window {window}) and a row of this batch has "
            f"{batch.max_row_length} tokens; a prepared mask replaces the window, so the layout is exact only "
            f"when every row fits in it. Use --max-length <= {window} or train without --share-prompt")
    if impl == "flex_attention" and torch.is_grad_enabled() and any(
            p.requires_grad and p.device.type == "cpu" for p in causal_lm.parameters()):
        raise SharedPromptUnsupported(f"FlexAttention has no backward on CPU (torch {torch.__version__}); on CPU "
                                      f"train with attn='sdpa' (FlexAttention serves gradient-free scoring there)")
    return impl


def shared_forward(causal_lm, batch: Batch | SharedPromptBatch) -> tuple[torch.Tensor, Batch]:
    """Backbone hidden states and the batch the loss reads, for either layout (the trainer's one call).

    Returns:
        ``(hidden, loss_batch)``: for a :class:`SharedPromptBatch`, ``hidden`` ``[N, H]`` from
        :func:`shared_backbone_hidden` and ``batch.loss_batch`` (packed, ``cu_seqlens`` ``[R+1]``);
        for a plain :class:`~dftkern.train.data.Batch`, :func:`~dftkern.train.model.backbone_hidden`
        (``[R, T, H]`` padded or ``[N, H]`` packed) and ``batch`` itself.
    """
    if isinstance(batch, SharedPromptBatch):
        return shared_backbone_hidden(causal_lm, batch), batch.loss_batch
    from .model import backbone_hidden

    return backbone_hidden(causal_lm, batch), batch


def shared_backbone_hidden(causal_lm, batch: SharedPromptBatch) -> torch.Tensor:
    """The backbone's last hidden state at the loss positions of ``batch`` (``[N, H]``, the model's dtype).

    Runs ``causal_lm.base_model`` once over the shared sequences with the shared-prompt mask and
    gathers ``batch.gather_index``; feed the result to a fused loss with ``batch.loss_batch.labels``
    and ``cu_seqlens=batch.loss_batch.cu_seqlens``. Differentiable (``index_select`` sums the
    gradients of the prompt's last position over the responses).

    Raises:
        SharedPromptUnsupported: see :func:`check_attention_support`.
    """
    impl = check_attention_support(causal_lm, batch)
    mask_dtype = causal_lm.get_input_embeddings().weight.dtype
    mask = shared_attention_mask(batch, impl, dtype=mask_dtype)
    out = causal_lm.base_model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask,
                               use_cache=False)
    hidden = out.last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.gather_index)


def _probe_examples(vocab_size: int, seed: int) -> list[TrainExample]:
    """Two groups of random tokens: prompts of 5 and 2 tokens, responses of 3/4/1 and 2/3/2 tokens."""
    gen = torch.Generator().manual_seed(seed)

    def tokens(n):
        return tuple(torch.randint(0, vocab_size, (n,), generator=gen).tolist())

    out = []
    for index, (p, lengths) in enumerate(((5, (3, 4, 1)), (2, (2, 3, 2)))):
        prompt = tokens(p)
        out.append(TrainExample(index, f"probe-{index}", [Row(prompt + tokens(n), p) for n in lengths]))
    return out


@torch.no_grad()
def check_shared_prompt_support(causal_lm, *, tolerance: float | None = None, seed: int = 0) -> float:
    """Verify that ``causal_lm`` computes the prompt-shared layout exactly; returns the measured error.

    Runs :func:`check_attention_support`, then a probe: two groups of random tokens (3 responses
    each) through :func:`shared_backbone_hidden` (one group per row, and packed) and through the
    plain backbone one unshared row at a time, in eval mode without gradients (the training mode
    is restored). A model that drops or rebuilds the 4D mask, or computes positions from the
    mask/packing instead of ``position_ids`` (ALiBi from mask cumsums, multimodal RoPE), shows an
    O(1) difference. Call it before sharding (FSDP) or compiling the model.

    Args:
        tolerance: allowed ``max |shared - unshared| / max(1, max |unshared|)``; default 1e-4 for
            float32/float64 weights, 5e-2 for 16-bit ones.
    Returns:
        The relative error measured (float).
    Raises:
        SharedPromptUnsupported: a static check fails, the model rejects the mask, or the probe's
            error exceeds ``tolerance``.
    """
    impl = check_attention_support(causal_lm)
    dtype = causal_lm.get_input_embeddings().weight.dtype
    if tolerance is None:
        tolerance = 5e-2 if torch.finfo(dtype).bits <= 16 else 1e-4
    device = causal_lm.get_input_embeddings().weight.device
    examples = _probe_examples(int(causal_lm.config.vocab_size), seed)
    was_training = causal_lm.training
    causal_lm.eval()
    try:
        reference = []
        for example in examples:
            for row in example.rows:
                ids = torch.tensor(row.input_ids, device=device)[None]
                hidden = causal_lm.base_model(input_ids=ids, use_cache=False).last_hidden_state[0]
                reference.append(hidden[row.prompt_len - 1:len(row.input_ids) - 1])
        reference = torch.cat(reference).float()
        scale = max(1.0, float(reference.abs().max()))
        worst = 0.0
        for pack_groups in (False, True):
            batch = collate_shared(examples, pad_token_id=0, pack_groups=pack_groups).to(device)
            try:
                shared = shared_backbone_hidden(causal_lm, batch).float()
            except SharedPromptUnsupported:
                raise
            except Exception as err:  # the model's forward rejects a 4D mask / position ids
                raise SharedPromptUnsupported(f"{type(causal_lm).__name__} ({impl}) failed on the prompt-shared "
                                              f"layout: {type(err).__name__}: {err}") from err
            worst = max(worst, float((shared - reference).abs().max()) / scale)
    finally:
        causal_lm.train(was_training)
    if not worst <= tolerance:
        raise SharedPromptUnsupported(
            f"{type(causal_lm).__name__} with attn_implementation={impl!r} does not honour the prompt-shared "
            f"mask: hidden states differ from the unshared layout by {worst:.3g} (relative; tolerance "
            f"{tolerance:.1g}). The model likely rebuilds its attention mask or derives positions from it; train "
            f"without --share-prompt")
    return worst


# ---------------------------------------------------------------------------------------------
# Pictures and the CPU benchmark
# ---------------------------------------------------------------------------------------------


def mask_picture(batch: SharedPromptBatch, row: int = 0) -> str:
    """ASCII picture of batch row ``row``'s mask: one line per query, ``#`` attended, ``.`` masked.

    The header names each position: ``p`` prompt, ``0``-``9``/letters the response index, ``_`` padding.
    """
    mask = dense_shared_mask(batch)[row].cpu()
    seg = batch.segment_ids[row].tolist()
    names = ["_" if s < 0 else "p" if s == 0 else "0123456789abcdefghijklmnopqrstuvwxyz"[(s - 1) % 36] for s in seg]
    lines = ["    " + " ".join(names)]
    for q, name in enumerate(names):
        lines.append(f"{name} {q:>2} " + " ".join("#" if m else "." for m in mask[q].tolist()))
    return "\n".join(lines)


def _peak_rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def benchmark(*, ks: Sequence[int] = (2, 4, 8), shapes: Sequence[tuple[int, int]] = ((128, 128), (256, 64)),
              groups: int = 2, hidden_size: int = 128, num_layers: int = 4, vocab_size: int = 1024,
              repeats: int = 3, attn: str = "sdpa", loss: str = "dft2", seed: int = 0) -> list[dict]:
    """CPU timing and peak-RSS growth of one backbone + fused-loss step (forward + backward), shared vs unshared.

    Model: random-init Llama (``hidden_size``, ``num_layers``, 4 heads, MLP 4x, vocabulary
    ``vocab_size``), float32. Each case: ``groups`` groups of ``1 + K`` rows, a prompt of ``P`` and
    responses of ``L`` random tokens; unshared = :func:`collate` padded (all rows of equal length,
    so no padding) through :func:`~dftkern.train.model.backbone_hidden`; shared = one group per row
    through :func:`shared_backbone_hidden`. Loss: the trainer's :class:`Objective` for ``loss``.
    Time: median of ``repeats`` steps after one warm-up. Memory: growth of the resident set's peak
    (``VmHWM`` after the step minus ``VmRSS`` before it, peak mark reset by ``/proc/self/clear_refs``;
    run with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed buffers leave the resident set).

    Returns one dict per (P, L, K, layout): ``P, L, K, layout, row_tokens, backbone_tokens,
    step_s, row_tokens_per_s, peak_rss_mib`` (None where the peak mark cannot be reset).
    """
    import time

    from transformers import LlamaConfig, LlamaForCausalLM

    from dftkern import DFTState

    from .model import backbone_hidden, lm_head_params
    from .objectives import Objective, ObjectiveConfig

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=max(p + n for p, n in shapes), tie_word_embeddings=True)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).train()
    weight, bias = lm_head_params(model)
    objective = Objective(ObjectiveConfig(loss=loss))
    gen = torch.Generator().manual_seed(seed)
    results = []
    for p, n in shapes:
        for k in ks:
            examples = []
            for g in range(groups):
                prompt = tuple(torch.randint(3, vocab_size, (p,), generator=gen).tolist())
                rows = [Row(prompt + tuple(torch.randint(3, vocab_size, (n,), generator=gen).tolist()), p)
                        for _ in range(1 + k)]
                examples.append(TrainExample(g, f"bench-{g}", rows, ref_logps=[0.0] * (1 + k),
                                             rewards=[float(j) for j in range(1 + k)]))
            needs = dict(with_ref_logps=objective.spec.needs_ref_logps, with_rewards=objective.spec.needs_rewards)
            layouts = {"unshared": collate(examples, pad_token_id=0, packed=False, **needs),
                       "shared": collate_shared(examples, pad_token_id=0, **needs)}
            for name, batch in layouts.items():
                def step():
                    if name == "shared":
                        hidden, loss_batch = shared_backbone_hidden(model, batch), batch.loss_batch
                    else:
                        hidden, loss_batch = backbone_hidden(model, batch), batch
                    value, _ = objective(hidden, weight, bias, loss_batch, state=DFTState(groups))
                    value.backward()
                    model.zero_grad(set_to_none=True)

                step()  # warm-up
                times, peak = [], None
                for _ in range(repeats):
                    can_reset = _peak_rss_reset()
                    before = _rss_kib("VmRSS")
                    started = time.perf_counter()
                    step()
                    times.append(time.perf_counter() - started)
                    if can_reset:
                        growth = (_rss_kib("VmHWM") - before) / 1024
                        peak = growth if peak is None else max(peak, growth)
                times.sort()
                step_s = times[len(times) // 2]
                backbone = batch.backbone_tokens if name == "shared" else batch.num_tokens
                results.append(dict(P=p, L=n, K=k, layout=name, row_tokens=batch.num_tokens,
                                    backbone_tokens=backbone, step_s=step_s,
                                    row_tokens_per_s=batch.num_tokens / step_s, peak_rss_mib=peak))
    return results


def _format_benchmark(results: list[dict]) -> str:
    lines = ["| P/L | K | row tokens | backbone tokens (shared) | unshared step s | shared step s | speedup | "
             "unshared tok/s | shared tok/s | unshared peak MiB | shared peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    by_case: dict = {}
    for r in results:
        by_case.setdefault((r["P"], r["L"], r["K"]), {})[r["layout"]] = r
    for (p, n, k), case in by_case.items():
        u, s = case["unshared"], case["shared"]

        def mib(v):
            return "n/a" if v is None else f"{v:.0f}"

        lines.append(f"| {p}/{n} | {k} | {u['row_tokens']} | {s['backbone_tokens']} | {u['step_s']:.3f} | "
                     f"{s['step_s']:.3f} | {u['step_s'] / s['step_s']:.2f}x | {u['row_tokens_per_s']:.0f} | "
                     f"{s['row_tokens_per_s']:.0f} | {mib(u['peak_rss_mib'])} | {mib(s['peak_rss_mib'])} |")
    return "\n".join(lines)


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dftkern.train.prefix_sharing",
                                     description="Prefix sharing: CPU benchmark and mask picture.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="backbone + loss step, shared vs unshared (markdown table)")
    bench.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    bench.add_argument("--shapes", nargs="+", default=["128/128", "256/64"], help="PROMPT/RESPONSE lengths")
    bench.add_argument("--groups", type=int, default=2)
    bench.add_argument("--hidden-size", type=int, default=128)
    bench.add_argument("--layers", type=int, default=4)
    bench.add_argument("--vocab", type=int, default=1024)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    bench.add_argument("--loss", default="dft2")
    bench.add_argument("--threads", type=int, default=1)
    mask = sub.add_parser("mask", help="print the mask of a small example")
    mask.add_argument("--prompt", type=int, default=3)
    mask.add_argument("--responses", type=int, nargs="+", default=[2, 3, 2])
    args = parser.parse_args(argv)
    if args.command == "mask":
        p = args.prompt
        rows = [Row(tuple(range(p + n)), p) for n in args.responses]
        print(mask_picture(collate_shared([TrainExample(0, "example", rows)], pad_token_id=0)))
        return
    torch.set_num_threads(args.threads)
    shapes = []
    for text in args.shapes:
        p, _, n = text.partition("/")
        shapes.append((int(p), int(n)))
    results = benchmark(ks=args.ks, shapes=shapes, groups=args.groups, hidden_size=args.hidden_size,
                        num_layers=args.layers, vocab_size=args.vocab, repeats=args.repeats, attn=args.attn,
                        loss=args.loss)
    print(_format_benchmark(results))
    print(f"(torch {torch.__version__}, {torch.get_num_threads()} thread(s), attn={args.attn}, loss={args.loss}, "
          f"{args.groups} groups, hidden {args.hidden_size} x {args.layers} layers, vocab {args.vocab}; "
          f"row tokens/s = tokens of the unshared rows per second)")


if __name__ == "__main__":
    _main()

