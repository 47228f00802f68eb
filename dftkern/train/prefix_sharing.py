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

* ``"dftkern_prefix_sdpa"`` (:data:`PREFIX_SDPA`, set by :func:`use_prefix_sdpa` on an ``sdpa``
  model; what :func:`prepare_shared_prompt_model` picks) — block-wise SDPA: per layer one call
  over the groups' prompts (causal) and one over the responses, each response's keys being its
  group's prompt and its own tokens (:class:`PromptBlocks`). Attention work is the unshared rows'
  minus the repeated prompt-prompt blocks; no ``S x S`` mask. Unshared batches, generation and
  scoring go to transformers' SDPA unchanged;
* ``"sdpa"`` — a boolean 4D mask ``[B, 1, S, S]`` (True = attend). Exact, but SDPA computes every
  ``S**2`` score of a group (``S = P + sum_j L_j``) — the cross-response blocks too — so with long
  responses, large K and small models attention can cost more than the tokens saved;
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

Models that do not pass keyword arguments down to their attention function, or do not dispatch
through transformers' AttentionInterface, cannot use :data:`PREFIX_SDPA`;
:func:`prepare_shared_prompt_model` then falls back to the dense SDPA mask with a warning.

Module entry point: ``python -m dftkern.train.prefix_sharing bench`` (time and peak memory of one
backbone + loss training step, shared vs unshared, on the CPU or a CUDA device, optionally at
Llama-3-8B's layer shapes with ``--preset llama3-8b-layers``; see :func:`benchmark`) and
``... mask`` (prints the mask of a small example).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

from .data import Batch, Row, TrainExample, collate

__all__ = [
    "PREFIX_SDPA",
    "SHARED_PROMPT_ATTENTION",
    "PromptBlocks",
    "use_prefix_sdpa",
    "prepare_shared_prompt_model",
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
    "bench_config",
    "bench_device",
    "BENCH_PRESETS",
]

PREFIX_SDPA = "dftkern_prefix_sdpa"
"""The block-wise attention kernel :func:`use_prefix_sdpa` registers with transformers' AttentionInterface."""

SHARED_PROMPT_ATTENTION = (PREFIX_SDPA, "sdpa", "eager", "flex_attention")
"""Attention implementations (``config._attn_implementation``) that run the prompt-shared layout."""

_PAD_SEGMENT = -1


class SharedPromptUnsupported(ValueError):
    """The model, its attention kernel or the batch cannot run the prompt-shared layout exactly."""


@dataclass
class PromptBlocks:
    """Index tensors for block-wise attention over a prompt-shared batch (the ``prefix_sdpa`` kernel).

    Flat positions index the batch's tokens as ``input_ids.reshape(-1)`` (``B * S``). ``G`` groups
    with prompts padded to ``Pm`` tokens; ``R`` responses padded to ``Lm`` tokens; padding slots
    repeat the group's first prompt position and are masked off as keys and dropped as queries.

    * ``prompt_index`` int64 ``[G, Pm]``, ``prompt_mask`` bool ``[G, 1, Pm, Pm]`` (causal, real keys);
    * ``response_index`` int64 ``[R, Lm]``, ``response_group`` int64 ``[R]`` (its group),
      ``response_mask`` bool ``[R, 1, Lm, Pm + Lm]`` over the keys ``[group's prompt, response]``
      (every real prompt key, and the response's own keys causally);
    * ``prompt_slots`` / ``response_slots`` int64: the real slots of ``prompt_index.reshape(-1)`` /
      ``response_index.reshape(-1)``; ``prompt_dest`` / ``response_dest`` int64: their flat positions.
    """

    prompt_index: torch.Tensor
    prompt_mask: torch.Tensor
    prompt_slots: torch.Tensor
    prompt_dest: torch.Tensor
    response_index: torch.Tensor
    response_group: torch.Tensor
    response_mask: torch.Tensor
    response_slots: torch.Tensor
    response_dest: torch.Tensor

    def to(self, device) -> PromptBlocks:
        return PromptBlocks(*(getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)))


def _prompt_blocks(prompts: list[list[int]], responses: list[list[int]], response_group: list[int]) -> PromptBlocks:
    """:class:`PromptBlocks` from the flat positions of each group's prompt and of each response."""
    pm = max(len(p) for p in prompts)
    lm = max(1, max(len(r) for r in responses))

    def pad(positions: list[list[int]], width: int, filler: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor([row + [fill] * (width - len(row)) for row, fill in zip(positions, filler)],
                             dtype=torch.int64).reshape(len(positions), width)
        lengths = torch.tensor([len(row) for row in positions])
        return index, lengths

    prompt_index, prompt_len = pad(prompts, pm, [p[0] for p in prompts])
    groups = torch.tensor(response_group, dtype=torch.int64)
    response_index, response_len = pad(responses, lm, [prompts[g][0] for g in response_group])
    q, k = torch.arange(pm)[:, None], torch.arange(pm)[None, :]
    prompt_mask = (k <= q) & (k < prompt_len[:, None, None])
    qr, kr = torch.arange(lm)[:, None], torch.arange(lm)[None, :]
    own = (kr <= qr) & (kr < response_len[:, None, None])                       # [R, Lm, Lm]
    shared = (torch.arange(pm) < prompt_len[groups][:, None]).unsqueeze(1)      # [R, 1, Pm]
    response_mask = torch.cat([shared.expand(-1, lm, -1), own], dim=2)
    prompt_slots = (torch.arange(pm) < prompt_len[:, None]).reshape(-1).nonzero().flatten()
    response_slots = (torch.arange(lm) < response_len[:, None]).reshape(-1).nonzero().flatten()
    return PromptBlocks(prompt_index, prompt_mask[:, None], prompt_slots, prompt_index.reshape(-1)[prompt_slots],
                        response_index, groups, response_mask[:, None], response_slots,
                        response_index.reshape(-1)[response_slots])


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
    over; ``max_row_length`` the longest unshared row (``P + L_j``), for sliding-window checks;
    ``blocks`` the index tensors of the block-wise ``prefix_sdpa`` kernel.
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
    blocks: PromptBlocks

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
                                 self.num_tokens, self.backbone_tokens, self.max_row_length, self.blocks.to(device))


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
    spans = []         # per group: (prompt length, [(start, length) of each response in the group's sequence])
    unshared_index, loss_bounds, max_row_length = [], [0], 0
    for g, example in enumerate(examples):
        prompt = _shared_prompt(example, keep)
        p = len(prompt)
        ids, pos, seg, gather, response_spans = list(prompt), list(range(p)), [0] * p, [], []
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
            response_spans.append((len(ids), n))
            ids += response
            pos += range(p, p + n)
            seg += [j + 1] * n
        groups.append((ids, pos, seg))
        local_gather.append(gather)
        spans.append((p, response_spans))

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
    blocks = _prompt_blocks([list(range(o, o + p)) for o, (p, _) in zip(offsets, spans)],
                            [list(range(o + a, o + a + n)) for o, (_, rs) in zip(offsets, spans) for a, n in rs],
                            [g for g, (_, rs) in enumerate(spans) for _ in rs])
    index = torch.tensor(unshared_index, dtype=torch.int64)
    loss_batch = Batch(input_ids=input_ids.reshape(-1)[gather_index][None], labels=unshared.labels[index],
                       example_ids=unshared.example_ids, rows_per_example=unshared.rows_per_example, packed=True,
                       position_ids=position_ids.reshape(-1)[gather_index][None],
                       cu_seqlens=torch.tensor(loss_bounds, dtype=torch.int32), ref_logps=unshared.ref_logps,
                       rewards=unshared.rewards, num_tokens=unshared.num_tokens)
    return SharedPromptBatch(input_ids, position_ids, sequence_ids, segment_ids, gather_index, loss_batch,
                             num_tokens=unshared.num_tokens, backbone_tokens=sum(len(ids) for ids, _, _ in groups),
                             max_row_length=max_row_length, blocks=blocks)


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
# Block-wise attention (prefix_sdpa)
# ---------------------------------------------------------------------------------------------

_BLOCKS_KWARG = "dftkern_prompt_blocks"


def _prefix_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                           **kwargs):
    """transformers attention function: block-wise SDPA on prompt-shared batches, plain SDPA otherwise.

    ``query`` ``[B, Hq, S, D]``, ``key``/``value`` ``[B, Hkv, S, D]`` (after RoPE). With the
    ``dftkern_prompt_blocks`` keyword (a :class:`PromptBlocks`, passed through the model's forward
    kwargs): one SDPA call over every group's prompt (causal) and one over every response, whose
    keys are its group's prompt followed by its own tokens — so the attention work is that of the
    unshared rows without their repeated prompt-prompt block, not ``S**2`` per group as with a
    dense mask. Returns ``([B, S, Hq, D], None)`` like transformers' SDPA function; padding
    positions of the layout get zeros.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    blocks = kwargs.pop(_BLOCKS_KWARG, None)
    if blocks is None:
        if attention_mask is not None and attention_mask.numel() == 0:
            raise SharedPromptUnsupported(f"{type(module).__name__} did not pass the prompt-block keyword through "
                                          f"to its attention function; use attn='sdpa' with the dense mask instead")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    for name in ("softcap", "position_bias", "s_aux"):
        if kwargs.get(name) is not None:
            raise SharedPromptUnsupported(f"{PREFIX_SDPA} does not implement attention {name!r} "
                                          f"({type(module).__name__}); use attn='eager' or 'flex_attention'")
    b, hq, s, _ = query.shape
    rep = hq // key.shape[1]

    def tokens(x):  # [B, H, S, D] -> [B*S, H, D]
        return x.transpose(1, 2).reshape(b * s, x.shape[1], x.shape[-1])

    def block(x, index):  # [B*S, H, D] at index [n, m] -> [n, H, m, D]
        return x[index].transpose(1, 2)

    q, k, v = tokens(query), tokens(key), tokens(value)
    kp, vp = block(k, blocks.prompt_index), block(v, blocks.prompt_index)
    kr = torch.cat([kp.index_select(0, blocks.response_group), block(k, blocks.response_index)], dim=2)
    vr = torch.cat([vp.index_select(0, blocks.response_group), block(v, blocks.response_index)], dim=2)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    out_p = sdpa(block(q, blocks.prompt_index), kp.repeat_interleave(rep, 1), vp.repeat_interleave(rep, 1),
                 attn_mask=blocks.prompt_mask, dropout_p=dropout, scale=scaling)
    out_r = sdpa(block(q, blocks.response_index), kr.repeat_interleave(rep, 1), vr.repeat_interleave(rep, 1),
                 attn_mask=blocks.response_mask, dropout_p=dropout, scale=scaling)
    dv = value.shape[-1]
    out = q.new_zeros(b * s, hq, dv)
    out = out.index_copy(0, blocks.prompt_dest, out_p.transpose(1, 2).reshape(-1, hq, dv)[blocks.prompt_slots])
    out = out.index_copy(0, blocks.response_dest, out_r.transpose(1, 2).reshape(-1, hq, dv)[blocks.response_slots])
    return out.view(b, s, hq, dv), None


def use_prefix_sdpa(causal_lm) -> None:
    """Switch ``causal_lm`` from ``sdpa`` to the block-wise :data:`PREFIX_SDPA` kernel (in place).

    Registers :func:`_prefix_sdpa_attention` (and SDPA's mask builder) under :data:`PREFIX_SDPA`
    with transformers' ``AttentionInterface``/``AttentionMaskInterface``, then
    ``causal_lm.set_attn_implementation(PREFIX_SDPA)``. Every call without prompt blocks (unshared
    batches, generation, scoring) still runs transformers' SDPA with the masks it builds, so the
    model behaves exactly as before; the setting is not saved with the config.

    Raises:
        SharedPromptUnsupported: the model does not use ``sdpa`` (or already the kernel), or it cannot
            switch attention implementations (not written against the AttentionInterface).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    impl = getattr(causal_lm.config, "_attn_implementation", None)
    if impl == PREFIX_SDPA:
        return
    if impl != "sdpa":
        raise SharedPromptUnsupported(f"{PREFIX_SDPA} replaces the 'sdpa' attention kernel; this model uses {impl!r}")
    AttentionInterface.register(PREFIX_SDPA, _prefix_sdpa_attention)
    AttentionMaskInterface.register(PREFIX_SDPA, sdpa_mask)
    causal_lm.set_attn_implementation(PREFIX_SDPA)
    if causal_lm.config._attn_implementation != PREFIX_SDPA:
        raise SharedPromptUnsupported(f"{type(causal_lm).__name__} cannot switch its attention implementation to "
                                      f"{PREFIX_SDPA} (it does not dispatch through transformers' AttentionInterface)")


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
    extra = {}
    if impl == PREFIX_SDPA:
        # an empty 4D mask: transformers passes a prepared 4D mask through untouched (no dense mask is built),
        # and the kernel raises if it ever reaches an attention call without the blocks
        mask = torch.ones(batch.input_ids.shape[0], 1, 0, 0, dtype=torch.bool, device=batch.input_ids.device)
        extra[_BLOCKS_KWARG] = batch.blocks
    else:
        mask = shared_attention_mask(batch, impl, dtype=causal_lm.get_input_embeddings().weight.dtype)
    out = causal_lm.base_model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask,
                               use_cache=False, **extra)
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


def prepare_shared_prompt_model(causal_lm, *, block_attention: bool = True) -> str:
    """Get ``causal_lm`` ready for prompt-shared batches and prove it on the probe; returns the kernel.

    With ``block_attention`` and an ``sdpa`` model, switches to :data:`PREFIX_SDPA`
    (:func:`use_prefix_sdpa`); if the model cannot take it (it does not dispatch through the
    AttentionInterface, or does not pass keyword arguments down to attention), it goes back to
    ``sdpa`` with the dense mask and warns. Then :func:`check_shared_prompt_support`. Call it once,
    after loading and before sharding (FSDP2) or compiling.

    Returns:
        the attention implementation the model now uses (``config._attn_implementation``).
    Raises:
        SharedPromptUnsupported: the model cannot run the layout exactly with any kernel tried.
    """
    import warnings

    if block_attention and getattr(causal_lm.config, "_attn_implementation", None) == "sdpa":
        try:
            use_prefix_sdpa(causal_lm)
            check_shared_prompt_support(causal_lm)
            return PREFIX_SDPA
        except SharedPromptUnsupported as err:
            if causal_lm.config._attn_implementation == PREFIX_SDPA:
                causal_lm.set_attn_implementation("sdpa")
            warnings.warn(f"prefix sharing: block-wise attention unavailable ({err}); using SDPA with a dense "
                          f"[B, 1, S, S] mask (exact, but attention costs S**2 per group)", stacklevel=2)
    check_shared_prompt_support(causal_lm)
    return causal_lm.config._attn_implementation


# ---------------------------------------------------------------------------------------------
# Pictures and the benchmark
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


BENCH_PRESETS: dict[str, dict] = {
    # Llama-3-8B's layer shapes (meta-llama/Meta-Llama-3-8B config.json: hidden 4096, 32 query / 8 KV heads,
    # MLP 14336, vocabulary 128256, RoPE base 500000, untied LM head); 2 of its 32 layers, random init
    "llama3-8b-layers": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                             vocab_size=128256, num_hidden_layers=2, rope_theta=500000.0, rms_norm_eps=1e-5,
                             max_position_embeddings=8192, tie_word_embeddings=False),
}
"""Model presets of :func:`benchmark` (``--preset``); any shape option given explicitly overrides the preset's."""

# without a preset (the CPU benchmark's model since it was written): key/value heads default to the query heads,
# the MLP to 4 x hidden, max_position_embeddings to the longest row, RoPE base to LlamaConfig's
_BENCH_DEFAULTS = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, vocab_size=1024,
                       tie_word_embeddings=True)
_BENCH_OPTIONS = {"hidden_size": "--hidden", "num_hidden_layers": "--layers", "num_attention_heads": "--heads",
                  "num_key_value_heads": "--kv-heads", "intermediate_size": "--intermediate-size",
                  "vocab_size": "--vocab"}
_BENCH_DTYPES = {"fp32": None, "bf16": torch.bfloat16}
_BENCH_ATTN = ("prefix_sdpa", "sdpa", "eager")


def bench_config(*, preset: str | None = None, hidden_size: int | None = None, num_layers: int | None = None,
                 num_heads: int | None = None, num_kv_heads: int | None = None, intermediate_size: int | None = None,
                 vocab_size: int | None = None, max_length: int = 256):
    """The :func:`benchmark` model's ``transformers.LlamaConfig`` (a config only: nothing is allocated).

    Without ``preset``: hidden 128, 4 layers, 4 heads, key/value heads = heads, MLP 4 x hidden,
    vocabulary 1024, tied embeddings, ``max_position_embeddings = max_length`` (the model the CPU
    benchmark always used). ``preset`` (a key of :data:`BENCH_PRESETS`) starts from that preset's
    fields instead (``max_position_embeddings`` at least ``max_length``). Every argument that is not
    None overrides. ``max_length``: the longest row, prompt + response.

    Raises:
        ValueError: naming the CLI option — unknown preset, a non-positive size, heads that do not
            divide the hidden size, key/value heads that do not divide the heads, an odd head
            dimension (RoPE rotates pairs), a vocabulary under 4 (tokens 0-2 are not drawn).
    """
    from transformers import LlamaConfig

    if preset is not None and preset not in BENCH_PRESETS:
        raise ValueError(f"--preset {preset!r}: unknown preset; choose from {', '.join(sorted(BENCH_PRESETS))}")
    fields = dict(BENCH_PRESETS[preset]) if preset is not None else dict(_BENCH_DEFAULTS)
    given = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                 num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size, vocab_size=vocab_size)
    for name, value in given.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{_BENCH_OPTIONS[name]} must be a positive integer, got {value!r}")
        fields[name] = value
    fields.setdefault("num_key_value_heads", fields["num_attention_heads"])
    fields.setdefault("intermediate_size", 4 * fields["hidden_size"])
    hidden, heads, kv = fields["hidden_size"], fields["num_attention_heads"], fields["num_key_value_heads"]
    if hidden % heads:
        raise ValueError(f"--heads {heads} does not divide --hidden {hidden}")
    if heads % kv:
        raise ValueError(f"--kv-heads {kv} does not divide --heads {heads} (grouped-query attention)")
    if (hidden // heads) % 2:
        raise ValueError(f"--hidden {hidden} / --heads {heads} = head dimension {hidden // heads}, which must be even "
                         f"(RoPE rotates pairs of dimensions)")
    if fields["vocab_size"] < 4:
        raise ValueError(f"--vocab must be at least 4 (the benchmark draws tokens 3 .. vocab-1), got "
                         f"{fields['vocab_size']}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    fields["max_position_embeddings"] = max(max_length, fields.get("max_position_embeddings", 0))
    theta = fields.pop("rope_theta", None)
    if theta is not None:  # transformers 5 takes the RoPE base inside rope_parameters, 4.x as rope_theta
        import inspect

        if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:
            fields["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
        else:
            fields["rope_theta"] = theta
    return LlamaConfig(**fields)


def _rope_theta(config) -> float | None:
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(config, "rope_theta", None))


def bench_device(device: str | torch.device) -> torch.device:
    """``--device`` (``cpu``, ``cuda`` or ``cuda:N``) as a torch device; ValueError naming ``--device`` if unusable."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device {device!r}: not a device name (use cpu, cuda or cuda:N)") from err
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"--device {device}: only cpu, cuda and cuda:N are supported")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available (torch {torch.__version__}, CUDA build "
                         f"{torch.version.cuda}; no usable GPU visible)")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= count:
        raise ValueError(f"--device {device}: only {count} CUDA device(s) visible")
    return torch.device("cuda", index)


def _bench_autocast(dtype: str, dev: torch.device) -> torch.dtype | None:
    if dtype not in _BENCH_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose fp32 or bf16")
    if dtype == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--dtype bf16: {torch.cuda.get_device_name(dev)} does not support bfloat16")
    return _BENCH_DTYPES[dtype]


def _bench_cases(ks, shapes, groups, repeats, warmup, attn) -> tuple[list[int], list[tuple[int, int]]]:
    def positive(name, value, low=1):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

    ks = list(ks)
    if not ks:
        raise ValueError("--ks: give at least one K")
    for k in ks:
        positive("--ks", k)
    shapes = [tuple(s) for s in shapes]
    if not shapes:
        raise ValueError("--shapes: give at least one PROMPT/RESPONSE")
    for shape in shapes:
        if len(shape) != 2:
            raise ValueError(f"--shapes: expected (prompt, response) lengths, got {shape!r}")
        positive("--shapes prompt length", shape[0])
        positive("--shapes response length", shape[1])
    positive("--groups", groups)
    positive("--repeats", repeats)
    positive("--warmup", warmup, low=0)
    if attn not in _BENCH_ATTN:
        raise ValueError(f"--attn {attn!r}: choose from {', '.join(_BENCH_ATTN)}")
    return ks, shapes


def _bench_loss(loss: str):
    """The trainer's :class:`Objective` for ``loss``; policy losses (ppo, grpo, ...) are refused: they need the
    sampler's per-token log-probs, which these random offline groups do not have."""
    from .objectives import Objective, ObjectiveConfig

    objective = Objective(ObjectiveConfig(loss=loss))
    if objective.spec.family == "policy":
        raise ValueError(f"--loss {loss}: policy losses need the sampler's per-token log-probs (on-policy sampling), "
                         f"which the benchmark's random groups do not have; use an offline loss (dft2, dft, sft, dpo, "
                         f"rloo, ...)")
    return objective


def benchmark(*, ks: Sequence[int] = (2, 4, 8), shapes: Sequence[tuple[int, int]] = ((128, 128), (256, 64)),
              groups: int = 2, hidden_size: int | None = None, num_layers: int | None = None,
              vocab_size: int | None = None, repeats: int = 3, attn: str = "prefix_sdpa", loss: str = "dft2",
              seed: int = 0, num_heads: int | None = None, num_kv_heads: int | None = None,
              intermediate_size: int | None = None, preset: str | None = None, device: str | torch.device = "cpu",
              dtype: str = "fp32", warmup: int = 1, progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Time and peak memory of one backbone + fused-loss training step (forward + backward), shared vs unshared.

    Model: random-init Llama from :func:`bench_config` (default: hidden 128, 4 layers, 4 heads, MLP
    4x, vocabulary 1024; ``preset="llama3-8b-layers"``: Llama-3-8B's layer shapes, 2 layers), with
    float32 weights, built on ``device``. Each case: ``groups`` groups of ``1 + K`` rows, a prompt
    of ``P`` and responses of ``L`` random tokens; unshared = :func:`collate` padded (all rows of
    equal length, so no padding) through :func:`~dftkern.train.model.backbone_hidden`; shared = one
    group per row through :func:`shared_backbone_hidden`. The step is the trainer's:
    :class:`~dftkern.train.model.PolicyWithLoss` around the trainer's :class:`Objective` for
    ``loss``. ``dtype``: ``"fp32"`` (no autocast) or ``"bf16"`` — bf16 autocast over the float32
    master weights, hidden states and LM head cast to bf16 for the fused loss, which is what the
    trainer runs for ``--precision bf16`` and for its default ``--precision auto`` on CUDA.
    ``attn``: ``"prefix_sdpa"`` (block-wise kernel), ``"sdpa"`` or ``"eager"`` (dense shared
    mask); the unshared layout runs plain SDPA/eager in every case.

    Measurement: ``warmup`` steps (not timed), then the median of ``repeats`` steps.

    * CPU: wall clock (``step_s``) and this process's CPU time (``cpu_s``; with one thread it is
      insensitive to other load on the machine); memory = growth of the resident set's peak
      (``VmHWM`` after the step minus ``VmRSS`` before it, peak mark reset by
      ``/proc/self/clear_refs``; run with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed buffers leave the
      resident set). ``tokens_per_s`` is per CPU second.
    * CUDA: wall clock between ``torch.cuda.synchronize`` calls (``step_s``; ``cpu_s`` is then only
      the host's time); ``peak_mib`` = ``torch.cuda.max_memory_allocated`` over the timed steps
      (weights included; the counter is reset for every layout and case), ``peak_base_mib`` = the
      allocation when the timed steps start (weights + batch). ``tokens_per_s`` is per wall second.

    ``progress``, if given, is called with each result dict as soon as it is measured.

    Returns one dict per (P, L, K, layout), in order: ``P, L, K, layout, groups, device, dtype,
    row_tokens`` (tokens of the unshared rows), ``backbone_tokens`` (tokens the backbone runs
    over), ``trained_tokens`` (response tokens carrying a label, ``groups * (1 + K) * L``; the same
    in both layouts), ``step_s, cpu_s, clock`` (``"process_cpu"`` or ``"cuda_synchronized_wall"``:
    the clock of ``tokens_per_s``), ``tokens_per_s`` (``trained_tokens`` per second of ``clock``),
    ``row_tokens_per_cpu_s``, ``peak_rss_mib`` (CPU; None where the peak mark cannot be reset, and
    on CUDA), ``peak_mib`` (CUDA: max allocated; CPU: = ``peak_rss_mib``), ``peak_base_mib`` (CUDA
    only, else None).

    Raises:
        ValueError: an unusable option (the message names the CLI option: ``--device`` without
            CUDA, ``--dtype``, the model shape, ``--ks``/``--shapes``/``--groups``/``--repeats``/
            ``--warmup``/``--attn``).
    """
    import time

    from transformers import LlamaForCausalLM

    from dftkern import DFTState

    from .model import PolicyWithLoss

    ks, shapes = _bench_cases(ks, shapes, groups, repeats, warmup, attn)
    dev = bench_device(device)
    autocast_dtype = _bench_autocast(dtype, dev)
    cuda = dev.type == "cuda"
    config = bench_config(preset=preset, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                          num_kv_heads=num_kv_heads, intermediate_size=intermediate_size, vocab_size=vocab_size,
                          max_length=max(p + n for p, n in shapes))
    vocab_size = config.vocab_size
    config._attn_implementation = "sdpa" if attn == "prefix_sdpa" else attn
    with torch.random.fork_rng(devices=[dev.index] if cuda else []):
        torch.manual_seed(seed)
        if cuda:  # initialised in place on the GPU (a 2-layer Llama-3-8B-shaped model has 1.5e9 parameters)
            with dev:
                model = LlamaForCausalLM(config).train()
        else:
            model = LlamaForCausalLM(config).train()
    if attn == "prefix_sdpa":  # unshared batches still run plain SDPA
        use_prefix_sdpa(model)
    objective = _bench_loss(loss)
    wrapper = PolicyWithLoss(model, objective, autocast_dtype=autocast_dtype)
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
                labels = batch.loss_batch.labels if name == "shared" else batch.labels
                trained = int((labels != -100).sum())
                if cuda:
                    batch = batch.to(dev)

                def step():
                    value, _ = wrapper(batch, state=DFTState(groups, device=dev if cuda else None))
                    value.backward()
                    model.zero_grad(set_to_none=True)

                for _ in range(warmup):
                    step()
                times, cpu_times, peak_rss, peak, base = [], [], None, None, None
                if cuda:
                    torch.cuda.synchronize(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                    base = torch.cuda.memory_allocated(dev) / 2**20
                for _ in range(repeats):
                    if cuda:
                        torch.cuda.synchronize(dev)
                    else:
                        can_reset = _peak_rss_reset()
                        before = _rss_kib("VmRSS")
                    started, cpu_started = time.perf_counter(), time.process_time()
                    step()
                    if cuda:
                        torch.cuda.synchronize(dev)
                    times.append(time.perf_counter() - started)
                    cpu_times.append(time.process_time() - cpu_started)
                    if not cuda and can_reset:
                        growth = (_rss_kib("VmHWM") - before) / 1024
                        peak_rss = growth if peak_rss is None else max(peak_rss, growth)
                if cuda:
                    peak = torch.cuda.max_memory_allocated(dev) / 2**20
                else:
                    peak = peak_rss
                step_s, cpu_s = sorted(times)[len(times) // 2], sorted(cpu_times)[len(cpu_times) // 2]
                backbone = batch.backbone_tokens if name == "shared" else batch.num_tokens
                result = dict(P=p, L=n, K=k, layout=name, row_tokens=batch.num_tokens, backbone_tokens=backbone,
                              step_s=step_s, cpu_s=cpu_s, row_tokens_per_cpu_s=batch.num_tokens / cpu_s,
                              peak_rss_mib=peak_rss, groups=groups, device=str(dev), dtype=dtype,
                              trained_tokens=trained, clock="cuda_synchronized_wall" if cuda else "process_cpu",
                              tokens_per_s=trained / (step_s if cuda else cpu_s), peak_mib=peak, peak_base_mib=base)
                results.append(result)
                if progress is not None:
                    progress(result)
    return results


def _bench_cases_table(results: list[dict]) -> list[dict]:
    """One dict per (P, L, K) with both layouts side by side and ``ratio`` = shared / unshared tokens per second."""
    by_case: dict = {}
    for r in results:
        by_case.setdefault((r["P"], r["L"], r["K"]), {})[r["layout"]] = r
    cases = []
    for (p, n, k), case in by_case.items():
        u, s = case.get("unshared"), case.get("shared")
        if u is None or s is None:  # an interrupted run (partial JSON)
            continue
        cases.append(dict(P=p, L=n, K=k, trained_tokens=u["trained_tokens"], row_tokens=u["row_tokens"],
                          unshared_backbone_tokens=u["backbone_tokens"], shared_backbone_tokens=s["backbone_tokens"],
                          unshared_step_s=u["step_s"], shared_step_s=s["step_s"],
                          unshared_tokens_per_s=u["tokens_per_s"], shared_tokens_per_s=s["tokens_per_s"],
                          ratio=s["tokens_per_s"] / u["tokens_per_s"], unshared_peak_mib=u["peak_mib"],
                          shared_peak_mib=s["peak_mib"]))
    return cases


def _format_benchmark(results: list[dict]) -> str:
    lines = ["| P/L | K | row tokens | backbone tokens (shared) | unshared step s (CPU s) | "
             "shared step s (CPU s) | speedup wall (CPU) | unshared row tok/CPU-s | shared row tok/CPU-s | "
             "unshared peak MiB | shared peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    by_case: dict = {}
    for r in results:
        by_case.setdefault((r["P"], r["L"], r["K"]), {})[r["layout"]] = r
    for (p, n, k), case in by_case.items():
        u, s = case["unshared"], case["shared"]

        def mib(v):
            return "n/a" if v is None else f"{v:.0f}"

        lines.append(f"| {p}/{n} | {k} | {u['row_tokens']} | {s['backbone_tokens']} | {u['step_s']:.3f} "
                     f"({u['cpu_s']:.3f}) | {s['step_s']:.3f} ({s['cpu_s']:.3f}) | {u['step_s'] / s['step_s']:.2f}x "
                     f"({u['cpu_s'] / s['cpu_s']:.2f}x) | {u['row_tokens_per_cpu_s']:.0f} | "
                     f"{s['row_tokens_per_cpu_s']:.0f} | {mib(u['peak_rss_mib'])} | {mib(s['peak_rss_mib'])} |")
    return "\n".join(lines)


def _format_device_benchmark(results: list[dict]) -> str:
    """The CUDA table: trained tokens per second shared and unshared, their ratio, peak allocated memory."""
    lines = ["| P/L | K | trained tokens | backbone tokens unshared / shared | unshared ms/step | shared ms/step | "
             "unshared tok/s | shared tok/s | ratio (shared/unshared) | unshared peak MiB | shared peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in _bench_cases_table(results):
        lines.append(f"| {c['P']}/{c['L']} | {c['K']} | {c['trained_tokens']} | {c['unshared_backbone_tokens']} / "
                     f"{c['shared_backbone_tokens']} | {1e3 * c['unshared_step_s']:.1f} | "
                     f"{1e3 * c['shared_step_s']:.1f} | {c['unshared_tokens_per_s']:.0f} | "
                     f"{c['shared_tokens_per_s']:.0f} | {c['ratio']:.2f}x | {c['unshared_peak_mib']:.0f} | "
                     f"{c['shared_peak_mib']:.0f} |")
    return "\n".join(lines)


def _bench_precision(dtype: str) -> str:
    if dtype == "bf16":
        return ("bf16 autocast over float32 master weights, hidden states and LM head cast to bf16 for the fused "
                "loss (the trainer's --precision bf16, and --precision auto on CUDA)")
    return "float32 weights and compute, no autocast (the trainer's --precision fp32, and auto on CPU)"


def _bench_parameters(config) -> int:
    """Parameter count of the benchmark model (built on the meta device: nothing allocated)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def _write_json(path: str, report: dict) -> None:
    import json
    import os

    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(report, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m dftkern.train.prefix_sharing",
                                     description="Prefix sharing: shared vs unshared training-step benchmark "
                                                 "(CPU or CUDA) and the mask picture.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="backbone + loss step, shared vs unshared (markdown table, optional JSON)")
    bench.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    bench.add_argument("--shapes", nargs="+", default=["128/128", "256/64"], help="PROMPT/RESPONSE lengths")
    bench.add_argument("--groups", type=int, default=2)
    bench.add_argument("--preset", choices=sorted(BENCH_PRESETS), default=None,
                       help="llama3-8b-layers: hidden 4096, 32 heads, 8 KV heads, MLP 14336, vocabulary 128256, "
                            "RoPE base 500000, untied head, 2 layers; the shape options below override it")
    bench.add_argument("--hidden", "--hidden-size", dest="hidden_size", type=int, default=None,
                       help="hidden size (default 128, or the preset's)")
    bench.add_argument("--layers", type=int, default=None, help="decoder layers (default 4, or the preset's)")
    bench.add_argument("--heads", type=int, default=None, help="attention heads (default 4, or the preset's)")
    bench.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads, or the preset's)")
    bench.add_argument("--intermediate-size", type=int, default=None,
                       help="MLP size (default 4 x --hidden, or the preset's)")
    bench.add_argument("--vocab", type=int, default=None, help="vocabulary (default 1024, or the preset's)")
    bench.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    bench.add_argument("--dtype", default="fp32", choices=sorted(_BENCH_DTYPES),
                       help="fp32 (default) or bf16 = the trainer's bf16 autocast over float32 master weights")
    bench.add_argument("--repeats", type=int, default=3, help="timed steps per case and layout (median)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default 1)")
    bench.add_argument("--attn", default="prefix_sdpa", choices=list(_BENCH_ATTN),
                       help="prefix_sdpa: block-wise kernel; sdpa/eager: dense shared mask (default: prefix_sdpa)")
    bench.add_argument("--loss", default="dft2")
    bench.add_argument("--threads", type=int, default=1)
    bench.add_argument("--json", default=None, metavar="PATH",
                       help="also write the results as JSON (rewritten after every measurement; 'complete' is "
                            "false until the run ends)")
    mask = sub.add_parser("mask", help="print the mask of a small example")
    mask.add_argument("--prompt", type=int, default=3)
    mask.add_argument("--responses", type=int, nargs="+", default=[2, 3, 2])
    args = parser.parse_args(argv)
    if args.command == "mask":
        p = args.prompt
        rows = [Row(tuple(range(p + n)), p) for n in args.responses]
        print(mask_picture(collate_shared([TrainExample(0, "example", rows)], pad_token_id=0)))
        return

    def fail(message: str):
        parser.exit(2, f"{parser.prog} bench: error: {message}\n")

    shapes = []
    for text in args.shapes:
        p, _, n = text.partition("/")
        try:
            shapes.append((int(p), int(n)))
        except ValueError:
            fail(f"--shapes {text!r}: expected PROMPT/RESPONSE, e.g. 512/512")
    if args.threads < 1:
        fail(f"--threads must be an integer >= 1, got {args.threads}")
    shape = dict(preset=args.preset, hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads,
                 num_kv_heads=args.kv_heads, intermediate_size=args.intermediate_size, vocab_size=args.vocab)
    try:  # every option checked before anything is built or timed
        _bench_cases(args.ks, shapes, args.groups, args.repeats, args.warmup, args.attn)
        dev = bench_device(args.device)
        _bench_autocast(args.dtype, dev)
        config = bench_config(**shape, max_length=max(p + n for p, n in shapes))
        from .objectives import ObjectiveConfig

        try:
            ObjectiveConfig(loss=args.loss)
        except ValueError as err:
            raise ValueError(f"--loss: {err}") from err
        _bench_loss(args.loss)
    except ValueError as err:
        fail(str(err).splitlines()[0] if str(err) else repr(err))
    if args.json is not None:
        import os

        if os.path.isdir(args.json):
            fail(f"--json {args.json}: is a directory")
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    torch.set_num_threads(args.threads)
    cuda = dev.type == "cuda"
    import transformers

    meta = dict(command=["python", "-m", "dftkern.train.prefix_sharing",
                         *(sys.argv[1:] if argv is None else list(argv))],
                device=str(dev), device_name=torch.cuda.get_device_name(dev) if cuda else "cpu",
                dtype=args.dtype, precision=_bench_precision(args.dtype), attn=args.attn, loss=args.loss,
                groups=args.groups, repeats=args.repeats, warmup=args.warmup, threads=torch.get_num_threads(),
                preset=args.preset,
                model=dict(family="llama (random init)", **{f: getattr(config, f) for f in (
                    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "vocab_size", "tie_word_embeddings")},
                    rope_theta=_rope_theta(config), parameters=_bench_parameters(config)),
                clock=("CUDA-synchronized wall clock" if cuda else "process CPU time") + f", median of "
                      f"{args.repeats} step(s) after {args.warmup} warm-up step(s)",
                tokens="trained_tokens = response tokens carrying a label (groups x (1 + K) x L), the same in both "
                       "layouts; tokens_per_s = trained_tokens per second of that clock",
                memory="torch.cuda.max_memory_allocated over the timed steps (weights included), reset per case "
                       "and layout" if cuda else "growth of the resident set's peak over a step (VmHWM - VmRSS)",
                torch=torch.__version__, cuda=torch.version.cuda, transformers=transformers.__version__,
                tf32_matmul=torch.backends.cuda.matmul.allow_tf32 if cuda else None)
    results: list[dict] = []

    def progress(result: dict) -> None:
        results.append(result)
        print(f"  P/L {result['P']}/{result['L']} K {result['K']} {result['layout']}: {result['step_s']:.4f} s/step, "
              f"{result['tokens_per_s']:.0f} trained tok/s", file=sys.stderr, flush=True)
        if args.json is not None:
            _write_json(args.json, dict(meta=meta, complete=False, results=results,
                                        cases=_bench_cases_table(results)))

    benchmark(ks=args.ks, shapes=shapes, groups=args.groups, repeats=args.repeats, attn=args.attn, loss=args.loss,
              device=dev, dtype=args.dtype, warmup=args.warmup, progress=progress, **shape)
    if args.json is not None:
        _write_json(args.json, dict(meta=meta, complete=True, results=results, cases=_bench_cases_table(results)))
    m = meta["model"]
    model_text = (f"Llama hidden {m['hidden_size']}, {m['num_attention_heads']} heads / {m['num_key_value_heads']} "
                  f"KV heads, MLP {m['intermediate_size']}, vocab {m['vocab_size']} x {m['num_hidden_layers']} "
                  f"layers ({m['parameters']:,} parameters)")
    if cuda:
        print(_format_device_benchmark(results))
        print(f"(torch {torch.__version__}, {meta['device_name']}, {meta['precision']}; attn={args.attn}, "
              f"loss={args.loss}, {args.groups} groups; {model_text}; tok/s = trained response tokens (those carrying "
              f"a label) per second, {meta['clock']}; peak = torch.cuda.max_memory_allocated, weights included)")
    else:
        print(_format_benchmark(results))
        print(f"(torch {torch.__version__}, {torch.get_num_threads()} thread(s), attn={args.attn}, loss={args.loss}, "
              f"{args.groups} groups, hidden {m['hidden_size']} x {m['num_hidden_layers']} layers, vocab "
              f"{m['vocab_size']}; row tok/CPU-s = tokens of the unshared rows per second of CPU time)")
        if args.dtype != "fp32" or args.preset is not None or any(
                v is not None for v in (args.heads, args.kv_heads, args.intermediate_size)):
            print(f"({model_text}; {meta['precision']})")


if __name__ == "__main__":
    # run the package's copy of this module: under ``python -m`` this file also gets imported as
    # dftkern.train.prefix_sharing (by the trainer modules the benchmark uses), and those pieces
    # (PolicyWithLoss -> shared_forward) check batches against that copy's SharedPromptBatch
    from dftkern.train.prefix_sharing import _main as _package_main

    _package_main()
