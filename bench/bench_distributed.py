"""Data-parallel overhead (issue 16). Run alone on a quiet machine.

    python bench/bench_distributed.py sync [--params 4.9e6] [--iters 20]
        2 processes x 1 thread on gloo: DistributedDataParallel over the LoRA-sized parameters vs the
        trainer's one flat all-reduce of their gradients per step (time per step, median).
    python bench/bench_distributed.py train [--model DIR --data FILE] [--steps 8] [--smoke]
        the trainer's tokens/s: 1 process x 2 threads vs `torchrun --nproc-per-node 2` x 1 thread each,
        same global batch. On a 2-core machine this measures the overhead of data parallelism, not scaling.

Results go to bench/results/distributed_<mode>.json (not with --smoke)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def _sync_worker(rank: int, n_params: int, iters: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    class Adapter(torch.nn.Module):
        # 210 LoRA matrices (SmolLM2-135M, r 16, all linear layers) of equal size stand in for the adapter.
        def __init__(self):
            super().__init__()
            self.ps = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(n_params // 210)) for _ in range(210))

        def forward(self):
            return sum((p * p).sum() for p in self.ps)

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    plain = Adapter()
    ddp = torch.nn.parallel.DistributedDataParallel(Adapter())
    times = {"ddp": [], "flat_allreduce": []}
    for _ in range(iters):
        for kind, model in (("ddp", ddp), ("flat_allreduce", plain)):
            t0 = time.perf_counter()
            model().backward()  # DDP all-reduces in buckets from its backward hooks
            params = list(model.parameters())
            if kind == "flat_allreduce":  # the trainer's way: one all-reduce after backward
                flat = torch.cat([p.grad.reshape(-1) for p in params])
                dist.all_reduce(flat)
                for p, g in zip(params, flat.split([p.numel() for p in params])):
                    p.grad = g.view_as(p)
            times[kind].append(time.perf_counter() - t0)
            for p in params:
                p.grad = None
    if rank == 0:
        Path(out).write_text(json.dumps({k: statistics.median(v) for k, v in times.items()}))
    dist.destroy_process_group()


def sync(args) -> dict:
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "r.json")
        mp.spawn(_sync_worker, args=(int(args.params), args.iters, 29511, out), nprocs=2)
        res = json.loads(Path(out).read_text())
    return {"mode": "sync", "params": int(args.params), "iters": args.iters, "median_s": res}


def _train(cmd: list[str], threads: int, run: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    subprocess.run(cmd + ["--output", str(run)], env=env, check=True, capture_output=True)
    return json.loads((run / "metrics.json").read_text())["tokens_per_s_mean"]


def train(args) -> dict:
    flags = ["--no-live", "--no-eval", "--max-steps", str(args.steps), "--lora-dropout", "0"]
    if args.model:
        flags += ["--model", args.model]
    if args.data:
        flags += ["--data", args.data]
    if args.smoke:
        flags += ["--batch-size", "4", "--max-len", "64", "--lora-r", "4"]
    with tempfile.TemporaryDirectory() as tmp:
        one = _train([sys.executable, "-m", "forge_rt.train", *flags], 2, Path(tmp) / "one")
        two = _train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                      "-m", "forge_rt.train", *flags], 1, Path(tmp) / "two")
    return {"mode": "train", "steps": args.steps, "tokens_per_s": {"1proc_x_2threads": one, "2procs_x_1thread": two},
            "note": "2 cores: measures the overhead of data parallelism, not scaling"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["sync", "train"])
    p.add_argument("--params", type=float, default=4.9e6)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--smoke", action="store_true", help="tiny shapes; check the script runs, record nothing")
    args = p.parse_args()
    res = sync(args) if args.mode == "sync" else train(args)
    print(json.dumps(res, indent=1))
    if not args.smoke:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"distributed_{args.mode}.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
