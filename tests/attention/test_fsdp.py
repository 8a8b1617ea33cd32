"""FSDP2 (``torch.distributed.fsdp.fully_shard``): a chapter-4 GPT with swapped attention, sharded over two CPU
processes (gloo), gets the single-process gradients. README's multi-GPU section runs the same with torchrun."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port
from torch import nn

from bench.distributed import wrap
from bench.gpt import GPT_CONFIG_124M, GPTModel
from chapter3_flash import attention

CFG = {
    **GPT_CONFIG_124M,
    "vocab_size": 61,
    "context_length": 24,
    "emb_dim": 24,
    "n_heads": 3,
    "n_layers": 2,
    "drop_rate": 0.0,
}
STEPS, BATCH, T = 2, 4, 17


def _model() -> nn.Module:
    torch.manual_seed(42)
    return attention.swap_attention(GPTModel(CFG))


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, CFG["vocab_size"], (BATCH, T), generator=g), torch.randint(
        0, CFG["vocab_size"], (BATCH, T), generator=g
    )


def _train(model: nn.Module, rank: int, world: int) -> list[dict[str, torch.Tensor]]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for step in range(STEPS):
        idx, target = _data(step)
        shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        logits = model(idx[shard])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), target[shard].flatten())
        opt.zero_grad()
        loss.backward()
        full = lambda g: g.full_tensor() if hasattr(g, "full_tensor") else g
        grads.append({name: full(p.grad).detach().clone() for name, p in model.named_parameters()})
        opt.step()
    return grads


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = wrap(_model(), "fsdp2", torch.device("cpu"))  # as the README's torchrun command shards it
    torch.save(_train(model, rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    os._exit(0)  # leave without gloo's teardown, which aborts now and then after the work is done


def test_fsdp2_gradients_equal_single_process(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    single = _train(_model(), rank=0, world=1)
    assert len(attention.fused_layers(_model())) == CFG["n_layers"]
    for rank in range(world):
        sharded = torch.load(tmp_path / f"rank{rank}.pt")
        for step in range(STEPS):
            assert sharded[step].keys() == single[step].keys()
            for name, g in single[step].items():
                torch.testing.assert_close(
                    sharded[step][name], g, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
                )
