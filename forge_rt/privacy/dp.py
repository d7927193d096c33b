"""DP-SGD for LoRA: Poisson-sampled batches, per-example clipping to C, Gaussian noise N(0, sigma^2 C^2) on
the clipped sum, divided by the expected batch size, with the privacy spent tracked by Opacus' accountant
(RDP by default, PRV on request): this module never computes an epsilon itself.

    grads = PerExampleGrads(model)                       # taps the LoRA layers (grads.py)
    step = PrivateStep(grads, clip=1.0, noise_multiplier=sigma, expected_batch=q * n)
    for chunk in micro_batches(poisson_batch(n, q, gen)):   # one logical batch
        example_losses(model, batch(chunk)).sum().backward()
        step.accumulate()
    step.finish()        # p.grad = (sum_i clip_C(g_i) + noise) / (q * n); then optimizer.step()
    accountant.step()

The accountant assumes exactly this sampling (each example in each step independently with probability
q) and one noise draw per logical batch: micro-batches of one Poisson batch are fine, a noise draw per
micro-batch or a fixed-size shuffled batch are not what it accounts for."""
from __future__ import annotations

import os

import torch

from forge_rt.core.errors import require_extra
from forge_rt.privacy.errors import DPError
from forge_rt.privacy.grads import PerExampleGrads

MECHANISMS = ("rdp", "prv")


def secure_generator(seed: int | None = None, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator for the noise, seeded from os.urandom unless `seed` is given (a known seed makes the
    noise predictable to whoever knows it: for tests and repeatable experiments only)."""
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(os.urandom(8), "little") if seed is None else seed)
    return g


def poisson_batch(n: int, sample_rate: float, generator: torch.Generator) -> list[int]:
    """Indices of one Poisson-sampled batch: each of the n examples independently with probability q."""
    if not 0 < sample_rate <= 1:
        raise DPError(f"sample rate must be in (0, 1], got {sample_rate}")
    keep = torch.rand(n, generator=generator, device=generator.device) < sample_rate
    return keep.nonzero().squeeze(1).tolist()


class PrivateStep:
    """Clips each example's LoRA gradient to `clip`, sums over a logical batch, adds the Gaussian noise once
    and writes p.grad = (sum + noise) / expected_batch on every tapped parameter."""

    def __init__(self, grads: PerExampleGrads, clip: float, noise_multiplier: float, expected_batch: float,
                 generator: torch.Generator | None = None):
        if not clip > 0 or not noise_multiplier >= 0 or not expected_batch > 0:
            raise DPError(f"clip ({clip}) and expected batch ({expected_batch}) must be > 0 and the noise "
                          f"multiplier ({noise_multiplier}) >= 0")
        self.grads, self.clip, self.sigma, self.expected = grads, float(clip), float(noise_multiplier), expected_batch
        self.generator = generator if generator is not None else secure_generator()
        self.params = grads.params()
        self._reset()

    def _reset(self) -> None:
        self.sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in self.params]
        self.examples, self.clipped = 0, 0

    def accumulate(self) -> torch.Tensor:
        """After a micro-batch's backward: adds its clipped per-example gradients to the batch's sum.
        Returns the micro-batch's per-example gradient norms (not private: for tests and diagnostics)."""
        norms = self.grads.squared_norms().sqrt()
        factors = (self.clip / (norms + 1e-6)).clamp(max=1.0)
        for acc, s in zip(self.sums, self.grads.weighted_sums(factors)):
            acc.add_(s)
        self.examples += int(norms.numel())
        self.clipped += int((norms > self.clip).sum())
        self.grads.clear()
        for p in self.params:  # autograd's own (unclipped) sum is not used
            p.grad = None
        return norms

    def noise(self, p: torch.nn.Parameter) -> torch.Tensor:
        """One draw of N(0, (sigma C)^2) in p's shape, from the step's generator."""
        z = torch.randn(p.shape, generator=self.generator, device=self.generator.device, dtype=torch.float32)
        return (z * (self.sigma * self.clip)).to(p.device)

    def finish(self) -> dict:
        """Writes the private gradient of the logical batch into p.grad (parameters in PerExampleGrads.params()
        order, each noised in that order) and starts the next batch. Returns {examples, clipped}."""
        for p, acc in zip(self.params, self.sums):
            p.grad = ((acc + self.noise(p)) / self.expected).to(p.dtype)
        stats = {"examples": self.examples, "clipped": self.clipped}
        self._reset()
        return stats


class Accountant:
    """The privacy spent by steps of the sampled Gaussian mechanism, by Opacus' accountant (`mechanism`:
    "rdp" or "prv"). Its state (the steps taken) is what a checkpoint keeps."""

    def __init__(self, noise_multiplier: float, sample_rate: float, mechanism: str = "rdp"):
        if mechanism not in MECHANISMS:
            raise DPError(f"accountant {mechanism!r}: use one of {', '.join(MECHANISMS)}")
        with require_extra("privacy", "differentially private training (forge_rt.privacy)"):
            from opacus.accountants import create_accountant
        self.sigma, self.q, self.mechanism = float(noise_multiplier), float(sample_rate), mechanism
        self._acc = create_accountant(mechanism)

    def step(self) -> None:
        self._acc.step(noise_multiplier=self.sigma, sample_rate=self.q)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self._acc.history)

    def epsilon(self, delta: float) -> float:
        return 0.0 if not self._acc.history else float(self._acc.get_epsilon(delta=delta))

    def state_dict(self) -> dict:
        return {"mechanism": self.mechanism, "history": [list(h) for h in self._acc.history]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mechanism") != self.mechanism:
            raise DPError(f"the checkpoint's accountant is {state.get('mechanism')!r}, this run's {self.mechanism!r}")
        self._acc.history = [tuple(h) for h in state["history"]]


def noise_for_epsilon(epsilon: float, delta: float, sample_rate: float, steps: int, mechanism: str = "rdp") -> float:
    """The noise multiplier sigma with which `steps` steps at `sample_rate` spend at most (epsilon, delta),
    by Opacus' search over its accountant."""
    if not epsilon > 0 or not 0 < delta < 1 or steps < 1:
        raise DPError(f"need epsilon > 0, 0 < delta < 1 and steps >= 1 (got {epsilon}, {delta}, {steps})")
    with require_extra("privacy", "differentially private training (forge_rt.privacy)"):
        from opacus.accountants.utils import get_noise_multiplier
    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=mechanism))
