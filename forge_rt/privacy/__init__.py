"""Privacy of what a run learns: differentially private LoRA (per-example clipping of the LoRA gradients,
Gaussian noise, Poisson sampling, Opacus' accountant) and the canary audit of memorisation.

    grads.py   per-example LoRA gradients from each layer's input and output gradient (PerExampleGrads)
    loss.py    per-example losses of a causal LM (example_losses)
    dp.py      clipping + noise (PrivateStep), Poisson batches, the accountant, noise calibration
    canary.py  canary formats, secrets, insertion into a copy of the training rows
    audit.py   exposure (rank among random candidates) and greedy extraction of each canary"""
from forge_rt.privacy.dp import Accountant, PrivateStep, noise_for_epsilon, poisson_batch, secure_generator
from forge_rt.privacy.errors import DPError
from forge_rt.privacy.grads import PerExampleGrads
from forge_rt.privacy.loss import example_losses

__all__ = ["Accountant", "DPError", "PerExampleGrads", "PrivateStep", "example_losses", "noise_for_epsilon",
           "poisson_batch", "secure_generator"]
