"""The DP step (clip, sum, noise, / expected batch) against a naive per-example reference; the adapter after
a DP step against the non-private step (their difference must be the noise, of its expected size, on every
LoRA matrix and nowhere else); the accountant against Opacus' own analysis; Poisson sampling."""
import math

import pytest
import torch

from forge_rt.privacy import (Accountant, PerExampleGrads, PrivateStep, example_losses, noise_for_epsilon,
                              poisson_batch)
from forge_rt.testing import rel_err

from dp_models import batch, naive_per_example, tiny_lora

TOL = 1e-5


def _dp_grads(model, b, clip, sigma, expected, seed, micro=None):
    """p.grad of a DP step over batch b, fed in micro-batches of `micro` rows."""
    step = PrivateStep(PerExampleGrads(model), clip, sigma, expected, torch.Generator().manual_seed(seed))
    n = b["input_ids"].shape[0]
    for lo in range(0, n, micro or n):
        example_losses(model, **{k: v[lo:lo + (micro or n)] for k, v in b.items()}).sum().backward()
        step.accumulate()
    stats = step.finish()
    step.grads.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, stats


def _naive_dp(ref, clip, sigma, expected, seed):
    """Clip each example's whole-adapter gradient to `clip`, sum, add N(0, (sigma clip)^2) drawn in the
    model's parameter order, divide by `expected`."""
    total = {k: torch.zeros_like(g) for k, g in ref[0].items()}
    for r in ref:
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in r.values()))
        for k, g in r.items():
            total[k] += g * min(1.0, clip / (norm + 1e-6))
    gen = torch.Generator().manual_seed(seed)
    return {k: (t + torch.randn(t.shape, generator=gen) * sigma * clip) / expected for k, t in total.items()}


@pytest.mark.parametrize("micro", [None, 3])
def test_clipped_noised_gradient_equals_naive_reference(micro):
    model = tiny_lora()
    b = batch(lengths=(10, 7, 9, 5, 8))
    ref = naive_per_example(model, b)
    norms = sorted(math.sqrt(sum(float(g.pow(2).sum()) for g in r.values())) for r in ref)
    clip = norms[2]  # some examples clipped, some not
    got, stats = _dp_grads(model, b, clip, 0.7, 4.0, seed=11, micro=micro)
    want = _naive_dp(ref, clip, 0.7, 4.0, seed=11)
    assert got.keys() == want.keys()
    for k in want:
        assert rel_err(got[k], want[k]) < TOL, k
    assert stats == {"examples": 5, "clipped": 2}


def test_dp_step_differs_from_the_non_private_step_by_the_noise():
    """SGD from the same adapter: the non-private step on the per-example-loss sum / L, and the DP step with
    a clip above every example's norm (nothing clipped): the weights must differ by lr * N(0, (sigma C)^2) / L
    on every LoRA matrix, A and B alike, and nothing else may move."""
    b, lr, sigma, expected = batch(), 0.5, 1.3, 4.0
    plain, private = tiny_lora(), tiny_lora()
    before = {n: p.detach().clone() for n, p in plain.named_parameters()}
    ref = naive_per_example(plain, b)
    clip = 2 * max(math.sqrt(sum(float(g.pow(2).sum()) for g in r.values())) for r in ref)
    (example_losses(plain, **b).sum() / expected).backward()
    torch.optim.SGD([p for p in plain.parameters() if p.requires_grad], lr=lr).step()
    _dp_grads(private, b, clip, sigma, expected, seed=5)
    torch.optim.SGD([p for p in private.parameters() if p.requires_grad], lr=lr).step()
    after_plain, after_dp = dict(plain.named_parameters()), dict(private.named_parameters())
    want_std = lr * sigma * clip / expected
    diffs = []
    for name, p in after_plain.items():
        d = (after_dp[name] - p).detach()
        if not p.requires_grad:
            assert torch.equal(after_dp[name], before[name]) and torch.equal(p, before[name]), name
            continue
        assert not torch.equal(p, before[name]), f"{name}: the non-private step did not move it"
        # each matrix gets its own noise: >= 128 entries, so its std is within 30% (over 4 sigma)
        assert abs(d.std().item() / want_std - 1) < 0.3, (name, d.std().item(), want_std)
        diffs.append(d.flatten())
    d = torch.cat(diffs)
    assert len(diffs) == 28 and abs(d.std().item() / want_std - 1) < 0.03 and abs(d.mean().item()) < 0.03 * want_std
    # with no noise the DP step is the non-private step exactly
    zero = tiny_lora()
    got, _ = _dp_grads(zero, b, clip, 0.0, expected, seed=5)
    for name, g in got.items():
        assert rel_err(before[name] - lr * g, after_plain[name]) < TOL, name


def test_accountant_matches_opacus_analysis_and_resumes():
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant
    sigma, q, steps, delta = 1.1, 256 / 60000, 1000, 1e-5
    acc = Accountant(sigma, q)
    for _ in range(steps // 2):
        acc.step()
    resumed = Accountant(sigma, q)
    resumed.load_state_dict(acc.state_dict())
    for _ in range(steps - steps // 2):
        resumed.step()
    orders = RDPAccountant.DEFAULT_ALPHAS
    want, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=q, noise_multiplier=sigma, steps=steps,
                                                               orders=orders), delta=delta)
    assert resumed.steps == steps and resumed.epsilon(delta) == pytest.approx(float(want), rel=1e-9)
    assert Accountant(sigma, q).epsilon(delta) == 0.0
    prv = Accountant(sigma, q, "prv")
    prv.load_state_dict({"mechanism": "prv", "history": [[sigma, q, steps]]})
    assert 0.5 * want < prv.epsilon(delta) <= want  # PRV is tighter than the RDP bound, not far off it


def test_noise_for_epsilon_spends_at_most_the_target():
    q, steps = 8 / 500, 120
    sigma = noise_for_epsilon(8.0, 1e-5, q, steps)
    acc = Accountant(sigma, q)
    acc.load_state_dict({"mechanism": "rdp", "history": [[sigma, q, steps]]})
    assert 8.0 - 0.1 < acc.epsilon(1e-5) <= 8.0


def test_poisson_batch_samples_each_example_with_rate_q():
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(50)
    for _ in range(2000):
        idx = poisson_batch(50, 0.1, gen)
        assert idx == sorted(set(idx))
        counts[idx] += 1
    rate = counts / 2000
    # each example's inclusion count is Binomial(2000, 0.1): sd 13.4, so 0.1 +- 0.03 is over 4 sd
    assert float((rate - 0.1).abs().max()) < 0.03 and abs(float(rate.mean()) - 0.1) < 0.005
