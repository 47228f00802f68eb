""":class:`dftkern.DFTState` under ``torch.distributed``: every rank ends a step with the same ``u``.

Two CPU processes (gloo backend over 127.0.0.1) each run :func:`dftkern.fused_dft_loss` on
their own batch with their own example ids and a state of 8 examples. After the step, each
rank's ``u`` must hold the updates of *both* ranks, be identical across ranks, and equal what a
single process computes from the two batches. A second step has both ranks update one shared
id: the later rank's value wins, on every rank. A third step has a NaN in one rank's group: that
id is written on no rank (it keeps its value everywhere), the other ids are synchronized as usual.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dftkern import DFTState, fused_dft_loss

WORLD_SIZE = 2
NUM_EXAMPLES = 8
U_INIT = -1.0
K = 2
VOCAB, HIDDEN, SEQ = 40, 8, 5
STEP1_IDS = {0: [0, 1], 1: [5, 6]}
STEP2_IDS = {0: [2, 4], 1: [3, 4]}  # id 4 on both ranks
STEP3_IDS = {0: [0, 7], 1: [1, 2]}  # rank 0's group of id 7 has a NaN hidden row
STEPS = ((1, STEP1_IDS), (2, STEP2_IDS), (3, STEP3_IDS))


def rank_batch(rank: int, step: int):
    """The batch that ``rank`` sees at ``step``: ``hidden [2*(1+K), T, H]``, ``labels``, ``ref_logps [2, K]``."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    n_rows = 2 * (1 + K)
    hidden = torch.randn(n_rows, SEQ, HIDDEN, generator=gen)
    labels = torch.randint(0, VOCAB, (n_rows, SEQ), generator=gen)
    labels[:, 0] = -100  # a one-token prompt
    ref_logps = torch.randn(2, K, generator=gen) - 12.0
    if (step, rank) == (3, 0):
        hidden[1 + K] = float("nan")  # the positive of group 1 (id 7)
    return hidden, labels, ref_logps


def shared_weight() -> torch.Tensor:
    return torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(7)) / HIDDEN ** 0.5


def run_step(state: DFTState, rank: int, step: int, ids: list[int]) -> torch.Tensor:
    hidden, labels, ref_logps = rank_batch(rank, step)
    h = hidden.requires_grad_(True)
    w = shared_weight().requires_grad_(True)
    loss = fused_dft_loss(h, w, labels, num_negatives=K, ids=torch.tensor(ids), state=state, ref_logps=ref_logps,
                          backend="torch")
    loss.backward()
    return loss.detach()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: two steps on a shared DFTState; saves ``u``/``num_updates`` after each step."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        state = DFTState(NUM_EXAMPLES, init=U_INIT)
        results = {}
        for step, ids_by_rank in STEPS:
            run_step(state, rank, step, ids_by_rank[rank])
            results[f"u{step}"] = state.u.clone()
            results[f"updates{step}"] = state.num_updates.clone()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def single_process_expectation():
    """``u`` after each step, computed rank by rank in one process without torch.distributed."""
    expected = {}
    u = torch.full((NUM_EXAMPLES,), U_INIT)
    updates = torch.zeros(NUM_EXAMPLES, dtype=torch.int64)
    for step, ids_by_rank in STEPS:
        new_values, written = [], set()
        for rank in range(WORLD_SIZE):  # each rank starts the step from the same synchronized state
            local = DFTState(NUM_EXAMPLES, init=U_INIT)
            local.u.copy_(u)
            run_step(local, rank, step, ids_by_rank[rank])
            new_values.append((ids_by_rank[rank], local.u[ids_by_rank[rank]].clone()))
            written |= {i for i in ids_by_rank[rank] if local.num_updates[i] == 1}
        for ids, values in new_values:  # rank order: a later rank overwrites a shared id
            u[torch.tensor(ids)] = values
        updates[torch.tensor(sorted(written))] += 1  # once per step
        expected[f"u{step}"] = u.clone()
        expected[f"updates{step}"] = updates.clone()
    return expected


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.skipif(sys.platform == "win32", reason="gloo over tcp://127.0.0.1 is not set up on Windows here")
def test_state_is_synchronized_across_ranks(tmp_path):
    assert not dist.is_initialized()
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    expected = single_process_expectation()

    # step 1: disjoint ids; every rank holds both ranks' updates, identical bit for bit
    for r in range(1, WORLD_SIZE):
        for key in ("u1", "updates1", "u2", "updates2", "u3", "updates3"):
            assert torch.equal(per_rank[r][key], per_rank[0][key]), f"rank {r} differs from rank 0 in {key}"
    u1 = per_rank[0]["u1"]
    torch.testing.assert_close(u1, expected["u1"], rtol=0, atol=1e-6)
    assert per_rank[0]["updates1"].tolist() == [1, 1, 0, 0, 0, 1, 1, 0]
    assert bool((u1[[2, 3, 4, 7]] == U_INIT).all()), "ids no rank used keep u_init"
    assert bool((u1[[0, 1, 5, 6]] != U_INIT).all())

    # step 2: id 4 updated by both ranks -> rank 1's value everywhere
    torch.testing.assert_close(per_rank[0]["u2"], expected["u2"], rtol=0, atol=1e-6)
    assert torch.equal(per_rank[0]["updates2"], expected["updates2"])
    assert per_rank[0]["updates2"].tolist() == [1, 1, 1, 1, 1, 1, 1, 0]

    # step 3: the NaN group (id 7, rank 0) is written nowhere; ids 0, 1, 2 are
    u3, updates3 = per_rank[0]["u3"], per_rank[0]["updates3"]
    assert bool(torch.isfinite(u3).all())
    assert u3[7].item() == U_INIT and updates3[7].item() == 0
    torch.testing.assert_close(u3, expected["u3"], rtol=0, atol=1e-6)
    assert torch.equal(updates3, expected["updates3"])
    assert updates3.tolist() == [2, 2, 2, 1, 1, 1, 1, 0]
