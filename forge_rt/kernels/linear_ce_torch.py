"""Chunked linear + cross-entropy in plain PyTorch, any device (the `cpu` backend).

Tokens go through the LM head a chunk at a time: a chunk's logits are turned, in place, into their
gradient (softmax - onehot, times the chain factor of the softcap and the reduction's scale), which is
multiplied out into grad_hidden / grad_weight / grad_bias before the next chunk, so neither the [N, V]
logits nor their gradient ever exist whole (Liger's FusedLinearCrossEntropy scheme). Everything is
computed in fp32 (bf16 matmul is several times slower on CPUs); a 16-bit weight is upcast once.

The chunk loop (`run_chunks`) is shared with the Triton backend, which supplies its own row kernel."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# Bytes of [chunk, V] buffers one chunk may hold. The chunk GEMMs stay large enough to run at full speed
# (even V = 256k leaves 16+ rows), while the buffers stay small next to a model's activations; the
# stock path holds [N, V] fp32 logits plus their gradient, i.e. hundreds of MiB to GiB.
CHUNK_BUDGET_BYTES = 32 << 20

# (logits chunk [C, V], labels [C], softcap, grad_scale, want_grad) -> (per-row losses [C] fp32, the
# chunk's logit gradient [C, V] or None); it may consume the logits buffer to hold that gradient
RowKernel = Callable[[torch.Tensor, torch.Tensor, "float | None", float, bool],
                     "tuple[torch.Tensor, torch.Tensor | None]"]


def chunk_rows(vocab: int, bytes_per_logit: int, chunk_tokens: int | None = None) -> int:
    """Tokens per chunk: `chunk_tokens` if given, else as many as keep [rows, vocab] under the budget."""
    if chunk_tokens is not None:
        return int(chunk_tokens)
    return max(1, CHUNK_BUDGET_BYTES // (max(vocab, 1) * bytes_per_logit))


def run_chunks(hidden, weight, labels, bias, *, softcap, grad_scale, needs, rows: int, compute_dtype,
               row_kernel: RowKernel):
    """loss_and_grads over chunks of `rows` tokens, GEMMs in `compute_dtype` (fp32 accumulation inside
    each), `row_kernel` turning each chunk's logits into their gradient in place."""
    want_h, want_w, want_b = needs
    want_b = want_b and bias is not None
    want_grad = want_h or want_w or want_b
    n = hidden.shape[0]
    w = weight.to(compute_dtype)
    b = None if bias is None else bias.to(compute_dtype)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    gh = torch.empty_like(hidden) if want_h else None
    # With 16-bit GEMMs (triton backend) grad_weight accumulates in the weight's dtype: the GEMM adds each
    # chunk's product to the running sum in fp32 and rounds once per chunk. An fp32 accumulator would need
    # a weight-sized 16-bit product per chunk (torch has no 16-bit x 16-bit -> fp32 addmm off CUDA).
    gw = torch.zeros(weight.shape, dtype=compute_dtype, device=weight.device) if want_w else None
    gb = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
    for s in range(0, n, rows):
        e = min(n, s + rows)
        h = hidden[s:e].to(compute_dtype)
        losses, g = row_kernel(F.linear(h, w, b), labels[s:e], softcap, grad_scale, want_grad)
        loss += losses.sum()
        if want_h:
            gh[s:e] = g @ w
        if want_w:
            gw.addmm_(g.T, h)
        if want_b:
            gb += g.sum(0, dtype=torch.float32)
        del g  # free this chunk's buffer before the next one is allocated
    cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
    return loss, gh, cast(gw, weight), cast(gb, bias)


def softmax_grad_(logits: torch.Tensor, labels: torch.Tensor, softcap: float | None, grad_scale: float,
                  want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The RowKernel of fp32 logits z: losses lse(c) - c[label] of c = z or cap * tanh(z / cap), and
    d(grad_scale * loss)/dz = grad_scale * (softmax(c) - onehot) * dc/dz, overwriting z's buffers."""
    capped = logits
    if softcap is not None:
        t = logits.div_(softcap).tanh_()  # keep tanh(z / cap): the chain factor is 1 - tanh^2
        capped = t * softcap
    lse = torch.logsumexp(capped, dim=1)
    rows = torch.arange(labels.numel(), device=labels.device)
    losses = lse - capped[rows, labels]
    if not want_grad:
        return losses, None
    g = capped.sub_(lse[:, None]).exp_()
    g[rows, labels] -= 1.0
    if softcap is not None:
        g.mul_(t.mul_(t).neg_().add_(1.0))
    return losses, g.mul_(grad_scale)


def loss_and_grads(hidden, weight, labels, bias, *, softcap, grad_scale, needs, chunk_tokens=None):
    """hidden [n, H], weight [V, H], labels [n] (all in [0, V)), bias [V] or None ->
    (sum of the n losses as a 0-d fp32 tensor, grad_hidden, grad_weight, grad_bias), each grad that of
    grad_scale * loss in its tensor's dtype, None where `needs` (hidden, weight, bias) says False."""
    buffers = 2 if softcap is None else 3  # logits and logsumexp's temporary, plus tanh when capped
    rows = chunk_rows(weight.shape[0], 4 * buffers, chunk_tokens)
    return run_chunks(hidden, weight, labels, bias, softcap=softcap, grad_scale=grad_scale, needs=needs,
                      rows=rows, compute_dtype=torch.float32, row_kernel=softmax_grad_)
