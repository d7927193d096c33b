"""Data-parallel training across the processes `torchrun` starts (gloo on CPU, nccl on GPU).

Every rank holds the whole frozen base and the same LoRA weights. Each optimizer step, every rank walks the
same deterministic global order, trains on its own contiguous shard of each global batch (global batch =
--batch-size, so the result equals one process with that batch), and one all-reduce per step sums the
LoRA gradients together with the losses, the token count and a pending-stop flag: the ranks agree on the
loss the divergence guard sees and on when to stop, so a NaN or a signal on any rank stops them all at
the same step. Rank 0 owns the run directory; the others write only their memory record.

The nccl path (GPU) is written but not run by the tests: the test machine has no GPU."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch

from forge_rt.core.errors import ForgeError


class DistributedError(ForgeError, RuntimeError):
    """Another rank failed, died or hung past the timeout; this rank stops with the reason."""


@dataclass(frozen=True)
class Dist:
    """Where this process stands among the ranks; the default is a plain single-process run."""
    rank: int = 0
    world: int = 1
    backend: str | None = None
    master: str | None = None   # MASTER_ADDR: the rendezvous host the offline guard lets through
    timeout_s: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def memory_name(self) -> str:
        return "memory.jsonl" if self.is_main else f"memory.rank{self.rank}.jsonl"

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's contiguous part of a global batch (empty when the batch has fewer rows than ranks)."""
        n = len(indices)
        return indices[self.rank * n // self.world:(self.rank + 1) * n // self.world]

    def reseed(self, seed: int, step: int) -> None:
        """Ranks past 0 draw their own dropout masks (rank 0 keeps the single-process stream)."""
        if self.rank > 0:
            torch.manual_seed(seed * 100_003 + step * 1_009 + self.rank)

    @contextlib.contextmanager
    def _collective(self, what: str):
        try:
            yield
        except RuntimeError as exc:  # gloo/nccl: a peer's socket closed, or the timeout passed
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            error = DistributedError(
                f"rank {self.rank} of {self.world} lost the other ranks during {what} ({first[:200]}): a rank "
                f"died or hung past --dist-timeout {self.timeout_s:g}s. The last checkpoint is kept: continue "
                "with --resume RUN_DIR, with any number of ranks and the same --batch-size")
            # Said now: torchrun SIGTERMs the survivors of a dead worker, and that signal can land anywhere on
            # the way out (seen in CI: the line was lost to "interrupted" when it beat the error to `main`).
            print(f"error: {error}", file=sys.stderr, flush=True)
            error.reported = True
            raise error from None

    def broadcast(self, obj, what: str = "setup"):
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        with self._collective(what):
            torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def from_main(self, fn, what: str):
        """fn() run on rank 0 only, its result (or its ForgeError, as this rank's error) on every rank."""
        if not self.enabled:
            return fn()
        value, error, failure = None, None, None
        if self.is_main:
            try:
                value = fn()
            except ForgeError as exc:
                error, failure = str(exc), exc
        value, error = self.broadcast((value, error), what)
        if failure is not None:
            raise failure
        if error is not None:
            raise DistributedError(f"rank 0 stopped during {what}: {error}")
        return value

    def barrier(self, what: str) -> None:
        if self.enabled:
            with self._collective(what):
                torch.distributed.barrier()

    def sync_step(self, params, losses: list[float], tokens: int, signum: int | None) -> tuple[list[float], int, int | None]:
        """One all-reduce per optimizer step: sums the LoRA gradients (written back), the per-micro-batch
        losses (each rank's part is already over the global label count), the tokens and the ranks that
        want to stop. Returns (global losses, global tokens, the agreed stop signal or None)."""
        params = list(params)
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
        extra = torch.tensor([*losses, float(tokens), float(signum is not None)], dtype=torch.float64)
        flat = torch.cat(parts).to(device)
        with self._collective("the gradient all-reduce"):
            torch.distributed.all_reduce(flat)
            extra = extra.to(device)
            torch.distributed.all_reduce(extra)
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.device, p.dtype)
            offset += p.numel()
        extra = extra.cpu().tolist()
        stop = (signum or signal.SIGTERM) if extra[-1] > 0 else None
        return extra[:len(losses)], int(extra[-2]), stop

    def gather(self, items: list, what: str) -> list:
        """The lists of every rank, concatenated in rank order."""
        if not self.enabled:
            return items
        out = [None] * self.world
        with self._collective(what):
            torch.distributed.all_gather_object(out, items)
        return [x for part in out for x in part]


SINGLE = Dist()


def backend_for(flag: str) -> str:
    if flag != "auto":
        return flag
    return "nccl" if torch.cuda.is_available() else "gloo"


def init(backend_flag: str = "auto", timeout_s: float = 300.0) -> Dist:
    """Joins the ranks when started by torchrun (WORLD_SIZE > 1), else the single-process Dist."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    backend = backend_for(backend_flag)
    if backend == "nccl":  # one GPU per rank on a node (not exercised here: no GPU on the test machine)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        torch.distributed.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"could not join the other ranks ({backend}, MASTER_ADDR="
                               f"{os.environ.get('MASTER_ADDR')!r}): {exc}") from None
    return Dist(torch.distributed.get_rank(), world, backend, os.environ.get("MASTER_ADDR"), timeout_s)


def teardown(d: Dist) -> None:
    if d.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def labelled_tokens(tok_data, indices: list[int]) -> int:
    """The positions the loss averages over in these rows (labels shifted left by one, -100 ignored)."""
    return sum(sum(t != -100 for t in tok_data.labels[i][1:]) for i in indices)
