"""Peak memory of a LoRA training step, predicted from the model's shapes without loading its weights.

    est = estimate(config, batch=8, seq_len=144, checkpointing=True, chunked_loss=True)
    est.total, est.parts   # bytes; {"runtime", "tokenizer", "weights", "lora_adam", "activations", "logits", ...}

What each part counts (fp32 activations on a CPU, 16-bit on GPUs):
- runtime: the interpreter, torch, transformers and PEFT once imported (measured here, see RUNTIME);
  on a CUDA device the CUDA context instead (and on unified-memory Jetsons both);
- tokenizer: the fast tokenizer a run keeps (forge_rt.models.load caches one per GGUF and hands out a copy),
  affine in the vocabulary (TOKENIZER_BYTES);
- weights: targeted linears in NF4 (half a byte per weight plus a byte per 64-weight block),
  everything else (embeddings, norms, biases, an untied head) at `Shapes.embed_bytes` a weight: the
  trainer loads fp32 on every device (4), a bf16 load 2, an NF4 embedding NF4_BYTES_PER_WEIGHT. With a
  large vocabulary this part dominates (Gemma 3 270M: 168M of its 268M weights are the tied embedding);
  `Shapes.from_config` counts both parts on the model built on the meta device (every family's norms,
  q/k norms and biases; a tied head once);
- lora_adam: LoRA weights, their gradients and AdamW's two moments, all fp32;
- activations: what autograd saves in the decoder: per token and layer, SAVED_PER_TOKEN floats for
  the fused path (fitted to saved-tensor counts, tests/plan checks it against fresh counts), or with
  checkpointing only each layer's input plus one layer recomputed in backward;
- logits: the stock loss keeps logits, their log-softmax and the gradient for every position
  (3 x tokens x vocab fp32); the chunked loss one chunk of labelled rows at a time;
- workspace: the gradient flowing between layers and the kernels' scratch (two hidden states), and the
  gradients of one layer's saved tensors while that layer runs backward (as large as what it saved);
- heap: what the allocator holds beyond live tensors at the peak, a fraction (HEAP_RETAINED) of the three
  activation parts. On a CPU that is glibc's heap under the trainer's RSS cap (forge_rt.pager.heap): the
  cap trims it back at each decoder layer once RSS passes the prediction, and what stays was measured on the
  demo job (bench memory family) in the checkpointed and the plain plan alike. Not measured on GPUs: 0 there.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from forge_rt.core.errors import ForgeError

GiB = 1 << 30
# Measured RSS of `import torch, transformers, peft` plus forge_rt's extension, on this CPU box.
RUNTIME = {"cpu": int(0.50 * GiB), "cuda": int(0.60 * GiB), "orin": int(1.10 * GiB)}
# RSS over live tensors at the peak, as a fraction of the activation parts: 0.35 measured here with the RSS
# cap on (demo job: 1.34x in checkpointed `auto`, 1.35x in `speed`); glibc alone held 2-8x.
HEAP_RETAINED = {"cpu": 0.35}
# RSS that load_tokenizer adds (the cached tokenizer and one copy), fixed + per vocabulary id: 70 MiB for
# SmolLM2's 49k ids, 208 MiB for Gemma 3's 262k (GGUF tokenizers; bench/results/tokenizer_rss.json).
TOKENIZER_BYTES = (37 << 20, 689)
CHUNK_BYTES = 32 << 20  # the chunked loss's per-chunk logits budget (forge_rt.kernels.linear_ce_torch)
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64  # packed nibbles + one uint8 absmax per 64-weight block
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


class SizeError(ForgeError, ValueError):
    """A memory size that does not parse."""


def parse_bytes(text: str | int, name: str = "size") -> int:
    """'512M' / '2G' / '1048576' -> bytes (binary units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(?:i?[bB])?\s*", str(text))
    if not m:
        raise SizeError(f"{name} {text!r} is not a size; use e.g. 512M or 2G")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def saved_floats_per_token(hidden: int, intermediate: int, kv_dim: int, lora_r: int, n_targets: int) -> float:
    """Floats autograd keeps per token in one Llama-style decoder layer on the fused path (SDPA
    attention, LoRA on `n_targets` linears). Fitted to saved-tensor counts of tiny Llama layers:
    each hidden unit 4.5625 floats (norms, q, attention out, residual inputs), each MLP unit 3
    (gate, up, their product), each key/value unit 2, each LoRA rank 1 per target (x @ A^T)."""
    return 4.5625 * hidden + 3 * intermediate + 2 * kv_dim + n_targets * lora_r + 10


@dataclass
class Shapes:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool
    head_dim: int = 0
    embed_bytes: float = 4.0  # bytes per weight of everything but the NF4 linears
    counted: tuple[int, int] | None = None  # (linear, other) weights counted on the model, when known

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden // self.heads

    @classmethod
    def from_config(cls, cfg) -> "Shapes":
        text = getattr(cfg, "text_config", None) or cfg
        heads = text.num_attention_heads
        return cls(vocab=text.vocab_size, hidden=text.hidden_size, intermediate=text.intermediate_size,
                   layers=text.num_hidden_layers, heads=heads,
                   kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                   tied=bool(getattr(cfg, "tie_word_embeddings", False)),
                   head_dim=getattr(text, "head_dim", None) or 0, counted=count_weights(cfg))

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of the seven linears of one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_dim, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    def linear_params(self) -> int:
        if self.counted:
            return self.counted[0]
        return self.layers * sum(a * b for a, b in self.linear_shapes())

    def other_params(self) -> int:
        if self.counted:
            return self.counted[1]
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden


def count_weights(cfg) -> tuple[int, int] | None:
    """(weights of the linears forge_rt quantizes, all other weights) of `cfg`'s causal LM built on the meta
    device, as the streaming loader builds it (a tied head counted once); None when transformers cannot
    build it (the formula of Shapes then stands)."""
    import torch
    from torch import nn
    try:
        from forge_rt.models.stream_load import skeleton
        model = skeleton(cfg, torch.float32)
    except Exception:  # noqa: BLE001 - an architecture transformers cannot build: the shapes' formula
        return None
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules() if type(m) is nn.Linear and m is not head)
    return linear, sum(p.numel() for p in model.parameters()) - linear


@dataclass
class Estimate:
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def activation_total(self) -> int:
        return self.parts["activations"] + self.parts["logits"] + self.parts["workspace"] + self.parts["heap"]


def estimate(shapes: Shapes, batch: int, seq_len: int, *, checkpointing: bool, chunked_loss: bool,
             labelled_fraction: float = 1.0, lora_r: int = 16, device: str = "cpu",
             spill_budget: int | None = None) -> Estimate:
    """Predicted peak bytes of one training step. `labelled_fraction`: share of tokens with a label
    (the chunked loss only evaluates those). `spill_budget`: paging keeps at most this many bytes of
    saved activations in memory and spills the rest to disk."""
    act_bytes = 4 if device == "cpu" else 2
    tokens = batch * seq_len
    per_token = saved_floats_per_token(shapes.hidden, shapes.intermediate, shapes.kv_dim, lora_r, 7) * act_bytes
    one_layer = per_token * tokens
    if checkpointing:
        activations = shapes.layers * tokens * shapes.hidden * act_bytes + one_layer
    else:
        activations = shapes.layers * one_layer
    if spill_budget is not None:
        activations = min(activations, spill_budget + one_layer)
    if chunked_loss:
        rows = max(1, int(tokens * labelled_fraction))
        logits = min(CHUNK_BYTES, rows * shapes.vocab * 4) + 2 * rows * shapes.hidden * 4
    else:
        logits = 3 * tokens * shapes.vocab * 4
    lora = lora_r * shapes.layers * sum(a + b for a, b in shapes.linear_shapes())
    runtime = RUNTIME["orin" if device.startswith("orin") else ("cuda" if device == "cuda" else "cpu")]
    workspace = 2 * tokens * shapes.hidden * act_bytes + one_layer
    heap = HEAP_RETAINED.get(device, 0.0) * (activations + logits + workspace)
    return Estimate({
        "runtime": runtime,
        "tokenizer": TOKENIZER_BYTES[0] + TOKENIZER_BYTES[1] * shapes.vocab,
        "weights": int(shapes.linear_params() * NF4_BYTES_PER_WEIGHT + shapes.other_params() * shapes.embed_bytes),
        "lora_adam": lora * 4 * 4,
        "activations": int(activations),
        "logits": int(logits),
        "workspace": int(workspace),
        "heap": int(heap),
    })
