"""The DP side of a training run (what the trainer's loop calls): the checks that protect the guarantee, the
noise calibrated to a target epsilon for the run's steps, one Poisson-sampled batch per optimizer step run
in micro-batches, the private step, and the accountant, whose state a checkpoint keeps."""
from __future__ import annotations

import time
from dataclasses import dataclass

from forge_rt.privacy.dp import Accountant, PrivateStep, noise_for_epsilon, poisson_batch, secure_generator
from forge_rt.privacy.errors import DPError
from forge_rt.privacy.grads import PerExampleGrads


@dataclass(frozen=True)
class DPSettings:
    epsilon: float | None      # target epsilon (the noise is calibrated to it), or None with `noise`
    noise: float | None        # noise multiplier sigma given directly
    delta: float
    clip: float
    accountant: str = "rdp"

    def check(self, pack: bool, grad_accum: int, world: int = 1) -> None:
        """Refusals that need no data: each names the flag and the fix."""
        if (self.epsilon is None) == (self.noise is None):
            raise DPError("--dp-* needs one of --dp-epsilon (the noise is calibrated to it) or --dp-noise (sigma), "
                          "not both")
        if pack:
            raise DPError("--dp-* with --pack: examples packed into one row cannot be clipped one by one; "
                          "drop --pack (DP trains one example per row)")
        if grad_accum != 1:
            raise DPError(f"--dp-* with --grad-accum {grad_accum}: the accountant counts one Poisson-sampled batch and "
                          "one noise draw per step; set the expected batch with --batch-size instead (a DP step "
                          "runs its sample in micro-batches of --batch-size itself)")
        if world > 1:
            raise DPError("--dp-* under torchrun is not supported yet (the ranks would need one shared Poisson sample "
                          "and one noise draw); train DP runs in one process")
        if not 0 < self.delta < 1 or not self.clip > 0:
            raise DPError(f"--dp-delta must be in (0, 1) and --dp-clip > 0 (got {self.delta}, {self.clip})")


class DPRun:
    """One DP training run: `step(losses_of)` takes an optimizer step's worth of gradient into p.grad."""

    def __init__(self, model, settings: DPSettings, n_examples: int, expected_batch: int, total_steps: int,
                 micro_batch: int | None = None):
        if n_examples < expected_batch:
            raise DPError(f"--dp-*: the dataset has {n_examples} examples, fewer than the batch of {expected_batch}: "
                          "Poisson sampling needs a rate below 1; lower --dp-batch (or --batch-size) or add data")
        if settings.delta >= 1 / n_examples:
            raise DPError(f"--dp-delta {settings.delta:g} is not below 1/n = {1 / n_examples:.3g}: such a delta allows "
                          "releasing a whole example; use a smaller --dp-delta (e.g. 1e-5)")
        self.settings, self.n, self.expected = settings, n_examples, expected_batch
        self.micro = micro_batch or expected_batch
        self.q = expected_batch / n_examples
        self.sigma = settings.noise if settings.noise is not None else noise_for_epsilon(
            settings.epsilon, settings.delta, self.q, total_steps, settings.accountant)
        self.grads = PerExampleGrads(model)
        self.private = PrivateStep(self.grads, settings.clip, self.sigma, expected_batch)
        self.accountant = Accountant(self.sigma, self.q, settings.accountant)
        self.sampler = secure_generator()
        self.clip_seconds, self.examples, self.clipped = 0.0, 0, 0

    @classmethod
    def start(cls, model, settings: DPSettings, n_examples: int, total_steps: int, cfg, world: int = 1) -> "DPRun":
        """The run's DP side, after the refusals (`cfg`: the trainer's config, for pack, grad_accum, the expected
        Poisson sample --dp-batch and the micro-batch --batch-size)."""
        settings.check(cfg.pack, cfg.grad_accum, world)
        expected_batch = cfg.dp_batch or cfg.batch_size
        dp = cls(model, settings, n_examples, expected_batch, total_steps, cfg.batch_size)
        print(f"dp: noise multiplier {dp.sigma:.4g}, clip {settings.clip:g}, Poisson rate {dp.q:.4g} (expected "
              f"batch {expected_batch} of {n_examples}, in micro-batches of {dp.micro}), delta {settings.delta:g}, "
              f"{settings.accountant} accountant; LoRA dropout off", flush=True)
        return dp

    def step(self, losses_of) -> tuple[list[float], list[int]]:
        """One logical batch: a Poisson sample in micro-batches; losses_of(indices) returns the per-example
        losses [b] of those examples (forward done). Returns (per-example losses, the indices sampled)."""
        idx = poisson_batch(self.n, self.q, self.sampler)
        losses = []
        for lo in range(0, len(idx), self.micro):
            per_example = losses_of(idx[lo:lo + self.micro])
            per_example.sum().backward()
            t0 = time.perf_counter()
            self.private.accumulate()
            self.clip_seconds += time.perf_counter() - t0
            losses += per_example.detach().tolist()
        stats = self.private.finish()
        self.accountant.step()
        self.examples += stats["examples"]
        self.clipped += stats["clipped"]
        return losses, idx

    def epsilon(self) -> float:
        return self.accountant.epsilon(self.settings.delta)

    def state_dict(self) -> dict:
        return {"accountant": self.accountant.state_dict(), "sigma": self.sigma, "q": self.q,
                "examples": self.examples, "clipped": self.clipped, "clip_seconds": self.clip_seconds}

    def load_state_dict(self, state: dict) -> None:
        if abs(state["sigma"] - self.sigma) > 1e-9 * self.sigma or abs(state["q"] - self.q) > 1e-12:
            raise DPError(f"the checkpoint was trained with noise {state['sigma']:.4g} at sample rate {state['q']:.4g}, "
                          f"this run would use {self.sigma:.4g} at {self.q:.4g}; resume with the same data and flags")
        self.accountant.load_state_dict(state["accountant"])
        self.examples, self.clipped = state.get("examples", 0), state.get("clipped", 0)  # what the record sums
        self.clip_seconds = state.get("clip_seconds", 0.0)

    def record(self) -> dict:
        """What metrics.json says of the run's privacy (clip_seconds: the per-example part of the steps,
        forming each example's LoRA gradients in backward plus clipping and summing them)."""
        s = self.settings
        return {"epsilon_target": s.epsilon, "epsilon_spent": self.epsilon(), "delta": s.delta, "clip": s.clip,
                "noise_multiplier": self.sigma, "sample_rate": self.q, "expected_batch": self.expected,
                "micro_batch": self.micro,
                "steps": self.accountant.steps, "accountant": s.accountant, "sampling": "poisson",
                "examples_seen": self.examples, "clipped_fraction": self.clipped / max(1, self.examples),
                "per_example_seconds": self.clip_seconds + self.grads.seconds}
