"""Under `torchrun --nproc_per_node 2`: one (1, 32) parameter sharded by FSDP2 (rank 0 holds its row, rank 1
nothing), stepped once by cascade's torchao AdamW8bit with a gradient of ones. Rank 0 prints how far its
row moved (lr 1e-2: Adam's first step moves each value by lr)."""
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor

from stages.optimizers import torchao_lowbit

if __name__ == "__main__":
    dist.init_process_group("gloo")
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(1, 32))])
    fully_shard(model)
    opt = torchao_lowbit.make(model.parameters(), lr=1e-2, weight_decay=0.0, bf16_stochastic_round=False)
    p = model[0]
    p.grad = distribute_tensor(torch.ones(1, 32), p.device_mesh, p.placements)
    opt.step()
    if dist.get_rank() == 0:
        print(f"moved {p.to_local().abs().max().item():.6g}", file=sys.stdout, flush=True)
    dist.destroy_process_group()
