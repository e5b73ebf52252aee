"""A tiny, real distributed training run for sovereign-operator's workers.

Started by torchrun (`python3 -m torch.distributed.run train.py ...`), which
reads everything about the group from the environment the operator gives each
worker: PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR (worker
0's name under the namespace's rendezvous Service) and PET_MASTER_PORT. No flag
names a host.

DDP over gloo on CPU (`--backend nccl` on GPUs): a linear model learns a fixed
linear map from synthetic data. Rank 0 writes a checkpoint every few steps and
when it is asked to stop (SIGTERM, e.g. preemption, on any rank); every rank
resumes from the latest checkpoint when one exists. At the end each rank prints
one line with the SHA-256 of its final parameters: DDP keeps them equal.

Lines it prints (one per event, all with the rank):
  start rank=R world=W resumed_from=S rendezvous=NAME ip=IP   (NAME: PET_MASTER_ADDR)
  step rank=R step=S loss=L
  checkpoint rank=0 step=S reason=periodic|stop
  stopped rank=R step=S          (asked to stop; exits 143)
  final rank=R step=S loss=L params_sha256=H
"""

import argparse
import hashlib
import os
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

FEATURES = 8
BATCH = 64


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="total optimizer steps")
    p.add_argument("--checkpoint-dir", default="/checkpoints", help="shared by every rank and every restart")
    p.add_argument("--checkpoint-every", type=int, default=5, help="steps between checkpoints")
    p.add_argument("--step-seconds", type=float, default=0.0, help="pause after each step (paces a demo)")
    p.add_argument("--backend", default="gloo", help="gloo on CPU, nccl on NVIDIA GPUs")
    p.add_argument("--lr", type=float, default=0.1)
    return p.parse_args()


def batch(rank, step):
    """The synthetic batch of (rank, step): the same after a restart."""
    g = torch.Generator().manual_seed(1_000_003 * (rank + 1) + step)
    x = torch.randn(BATCH, FEATURES, generator=g)
    true_w = torch.arange(1, FEATURES + 1, dtype=torch.float32).unsqueeze(1) / FEATURES
    y = x @ true_w + 0.5 + 0.01 * torch.randn(BATCH, 1, generator=g)
    return x, y


def params_hash(model):
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save(path, step, model, opt):
    tmp = f"{path}.tmp"
    torch.save({"step": step, "model": model.state_dict(), "opt": opt.state_dict()}, tmp)
    os.replace(tmp, path)  # atomic: a reader sees the old or the new checkpoint, never half of one


def main():
    args = parse_args()
    stop = {"asked": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(asked=True))
    torch.set_num_threads(1)

    dist.init_process_group(args.backend)  # env:// from torchrun: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if args.backend == "nccl" else torch.device("cpu")

    torch.manual_seed(0)
    model = nn.Linear(FEATURES, 1).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    os.makedirs(args.checkpoint_dir, exist_ok=True)
    latest = os.path.join(args.checkpoint_dir, "latest.pt")
    start = 0
    if os.path.exists(latest):
        state = torch.load(latest, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    # Every rank starts from rank 0's step (DDP also broadcasts rank 0's parameters).
    agreed = torch.tensor([start], dtype=torch.int64, device=device)
    dist.broadcast(agreed, src=0)
    start = int(agreed.item())
    ddp = DistributedDataParallel(model)
    # The group formed through this name; say where it led.
    rendezvous = os.environ.get("PET_MASTER_ADDR", os.environ["MASTER_ADDR"])
    ip = socket.gethostbyname(rendezvous)
    print(f"start rank={rank} world={world} resumed_from={start} rendezvous={rendezvous} ip={ip}", flush=True)

    loss_value = float("nan")
    step = start
    while step < args.steps:
        # Stop together: any rank that was asked to stop stops every rank at the same step.
        asked = torch.tensor([1 if stop["asked"] else 0], device=device)
        dist.all_reduce(asked, op=dist.ReduceOp.MAX)
        if asked.item():
            if rank == 0:
                save(latest, step, model, opt)
                print(f"checkpoint rank=0 step={step} reason=stop", flush=True)
            dist.barrier()
            print(f"stopped rank={rank} step={step}", flush=True)
            dist.destroy_process_group()
            sys.exit(143)
        x, y = (t.to(device) for t in batch(rank, step))
        loss = nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()  # DDP averages the gradients over every rank
        opt.step()
        step += 1
        loss_value = loss.item()
        print(f"step rank={rank} step={step} loss={loss_value:.6f}", flush=True)
        if rank == 0 and step % args.checkpoint_every == 0:
            save(latest, step, model, opt)
            print(f"checkpoint rank=0 step={step} reason=periodic", flush=True)
        if args.step_seconds > 0:
            time.sleep(args.step_seconds)

    dist.barrier()
    print(f"final rank={rank} step={step} loss={loss_value:.6f} params_sha256={params_hash(model)}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
