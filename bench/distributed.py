"""A chapter-4 GPT with fused attention trained data-parallel: DDP or FSDP2, one process per device.

Run with torchrun from the repository root (NCCL on GPUs, one per process; gloo on CPUs)::

    torchrun --nproc_per_node=2 -m bench.distributed --mode fsdp2
    torchrun --nproc_per_node=2 -m bench.distributed --mode ddp --steps 50 --batch 8

Every rank builds the same model from one seed, converts its attention with ``swap_attention`` (before
wrapping: FSDP2 shards the converted layers' own Parameters), and trains on its slice of each global
batch of random tokens. Rank 0 prints the loss and the tokens per second of every step.
``tests/attention/test_fsdp.py`` and ``test_ddp.py`` check that the gradients equal one process's.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn

from bench.gpt import GPT_CONFIG_124M, GPTModel
from chapter3_flash import attention


def wrap(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """The model data-parallel over the initialized process group: DDP, or FSDP2 with one unit per transformer
    block (``model.trf_blocks``, as in the book's GPTModel) and one for the rest."""
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.trf_blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="torchrun --nproc_per_node=N -m bench.distributed", description=__doc__)
    ap.add_argument("--mode", choices=("ddp", "fsdp2"), default="fsdp2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4, help="sequences per rank and step")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=GPT_CONFIG_124M["n_layers"])
    args = ap.parse_args(argv)
    if "RANK" not in os.environ:
        ap.error("run under torchrun (it sets RANK, WORLD_SIZE and LOCAL_RANK)")

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    cfg = {**GPT_CONFIG_124M, "context_length": args.context, "n_layers": args.layers}
    torch.manual_seed(123)
    model = wrap(attention.swap_attention(GPTModel(cfg)).to(device), args.mode, device)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)

    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own slice of the global batch
    tokens = args.batch * args.context * world
    for step in range(args.steps):
        idx = torch.randint(0, cfg["vocab_size"], (args.batch, args.context + 1), generator=g).to(device)
        start = time.perf_counter()
        logits = model(idx[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # a sum (gloo has no average)
        if rank == 0:
            print(f"{args.mode} step {step:3d}  loss {mean.item() / world:.4f}  {tokens / elapsed:,.0f} tokens/s")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
