"""Under torchrun on 2 GPUs (NCCL): train the tiny default with plain fused AdamW, then with optimizer offload whose
copies in are held back on the GPU (a sleep on the copy stream), so the host reaches every block's FSDP all-gather
long before the block's update has landed. tests/parallel/test_optimizer_offload.py compares the losses."""

import os
import sys

import torch
import torch.distributed as dist

from fluxtrain import config as C
from fluxtrain.parallel.optimizer_offload import OffloadedAdamW, _local, ring_elems, units
from fluxtrain.train import train
from tests.helpers import FAST

VARIANTS = {
    "plain": [],
    "offload": ["--parallel.optimizer_offload", "true"],
    # a ring of a few units: copies in for the next step start under this one, and regions are reused
    "offload_ring": ["--parallel.optimizer_offload", "true", "--parallel.optimizer_offload_buffer_gib", "0.008"],
    # a ring that holds every unit: all of the next step's moments are copied in right after a step
    "offload_all": ["--parallel.optimizer_offload", "true", "--parallel.optimizer_offload_buffer_gib", "1"],
    # bf16 moments: not exact AdamW, but their rounding depends only on values, place and step, so the least ring and
    # a ring holding all must agree exactly; a stale read in either would not
    "offload_bf16": ["--parallel.optimizer_offload", "true", "--parallel.optimizer_offload_dtype", "bf16"],
    "offload_bf16_all": ["--parallel.optimizer_offload", "true", "--parallel.optimizer_offload_dtype", "bf16",
                         "--parallel.optimizer_offload_buffer_gib", "1"],
}


def held_back(copy_in):
    def slow(self, j):
        with torch.cuda.stream(self._h2d):
            torch.cuda._sleep(40_000_000)  # ~20 ms of GPU time before each unit's moments come in
        return copy_in(self, j)
    return slow


def nan_ring(init):
    """Before the optimizer is built, a temporary of the ring's size that the compute stream fills with NaN only after
    a long sleep is freed: the ring reuses that memory, with the fill still queued, and the copies in must not run
    before it. (gpu_run32: the trainer synchronises before its first step, so this passed without the optimizer's
    wait too; it covers callers that don't.) Then the ring itself is NaN-filled on the copy stream: an update that
    read its moments before they arrived would go NaN."""
    def filled(self, model, *a, buffer_bytes=0, **kw):
        sizes = [sum(_local(p).numel() for p in ps) for _, ps in units(model) if ps]
        tmp = torch.empty(ring_elems(sizes, buffer_bytes), device="cuda")
        torch.cuda._sleep(1_000_000_000)
        tmp.fill_(float("nan"))
        ptr = tmp.data_ptr()
        del tmp
        init(self, model, *a, buffer_bytes=buffer_bytes, **kw)
        print(f"ring reuses the queued temporary: {self._buf.data_ptr() == ptr}", flush=True)
        with torch.cuda.stream(self._h2d):
            self._buf.fill_(float("nan"))
    return filled


def main() -> None:
    out = sys.argv[1]
    OffloadedAdamW._copy_in = held_back(OffloadedAdamW._copy_in)
    OffloadedAdamW.__init__ = nan_ring(OffloadedAdamW.__init__)
    # one group for all variants, as tests/parallel/run_variants.py does (the trainer leaves a group it did not start)
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)
    # exact fp32 math (no TF32, the math attention kernel) so that the only difference could be stale weights
    base = FAST + ["--train.device", "cuda", "--parallel.tf32", "false", "--model.attention_backend", "math",
                   "--optim.grad_clip", "0.05"]
    for name, extra in VARIANTS.items():
        train(C.load("configs/tiny.toml", base + extra + ["--train.output_dir", f"{out}/{name}"]))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
