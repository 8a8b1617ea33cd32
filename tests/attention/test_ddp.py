"""DistributedDataParallel: two CPU processes over gloo get the single-process gradients."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port
from torch import nn

from bench.distributed import wrap
from chapter3_flash import attention

STEPS, BATCH, T, D = 2, 4, 19, 12


def _model() -> nn.Module:
    torch.manual_seed(42)
    return attention.MultiHeadAttention(D, D, 32, 0.0, 3)


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, T, D, generator=g), torch.randn(BATCH, T, D, generator=g)


def _train(model: nn.Module, rank: int, world: int) -> list[list[torch.Tensor]]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for step in range(STEPS):
        x, y = _data(step)
        shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        loss = nn.functional.mse_loss(model(x[shard]), y[shard])
        opt.zero_grad()
        loss.backward()
        grads.append([p.grad.detach().clone() for p in model.parameters()])
        opt.step()
    return grads


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ddp = wrap(_model(), "ddp", torch.device("cpu"))
    torch.save(_train(ddp, rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    os._exit(0)  # leave without gloo's teardown, which aborts now and then after the work is done


def test_ddp_gradients_equal_single_process(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    single = _train(_model(), rank=0, world=1)
    for rank in range(world):
        ddp_grads = torch.load(tmp_path / f"rank{rank}.pt")
        for step in range(STEPS):
            for g_ddp, g_one in zip(ddp_grads[step], single[step]):
                torch.testing.assert_close(g_ddp, g_one, atol=1e-6, rtol=1e-5)
