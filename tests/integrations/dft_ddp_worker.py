"""One rank of test_trl_dft.py::test_ddp_two_processes_keep_one_state (run under torchrun, gloo, CPU)."""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from test_trl_dft import dft_dataset  # noqa: E402
from trl_parity import tiny_llama_and_tokenizer  # noqa: E402

from dftkern.integrations.trl import DFTConfig, DFTTrainer  # noqa: E402


def main(out: str) -> None:
    torch.set_num_threads(1)
    model, tokenizer = tiny_llama_and_tokenizer()
    args = DFTConfig(output_dir=os.path.join(out, "out"), per_device_train_batch_size=2, max_steps=1, report_to=[],
                     use_cpu=True, ddp_backend="gloo", save_strategy="steps", save_steps=1, learning_rate=1e-2,
                     seed=0, dataloader_drop_last=True)
    trainer = DFTTrainer(model=model, args=args, train_dataset=dft_dataset(4), processing_class=tokenizer)
    trainer.train()
    rank = dist.get_rank()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"u": trainer.dft_state.u.tolist(), "num_updates": trainer.dft_state.num_updates.tolist(),
                   "world_size": dist.get_world_size()}, f)
    # The HF Trainer leaves the gloo group alive; tearing it down at interpreter exit races gloo's worker
    # threads ("terminate called without an active exception", SIGABRT, seen once in CI). Close it here.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
