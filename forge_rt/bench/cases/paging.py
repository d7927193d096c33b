"""Activation paging codec (bit-shuffle + nvCOMP LZ4, CPU library) against memcpy of the same bytes, and its
compression against plain LZ4 (python-lz4, 64 KiB blocks). Activation-like tensors: SiLU outputs in fp32 and
bf16, and fp32 tensors holding bf16 values (the upcasts of a bf16 model); the full suite adds everything a
SmolLM2 LoRA step saves for backward. On CUDA, nvCOMP's GPU LZ4 (forge_rt.pager.cuda_lz4) against a device copy."""
from __future__ import annotations

import sys
from functools import lru_cache

import torch
import torch.nn.functional as F

from forge_rt.bench.cases import have
from forge_rt.bench.record import row
from forge_rt.bench.runner import run_pytest

ESTIMATE_S = {"tiny": 2, "quick": 20, "full": 120}
KINDS = ("fp32 SiLU", "bf16-in-fp32", "bf16 SiLU")


def cases(ctx, test: str) -> list[dict]:
    ops = ("compress", "decompress", "memcpy")
    places = ("cpu",) + (("gpu",) if test == "test_codec" and ctx.device != "cpu" and _gpu_codec() else ())
    return [dict(id=f"{place}-{kind}-{op}", kind=kind, op=op, place=place, mib=ctx.pick(1, 32, 128))
            for place in places for kind in KINDS for op in ops]


def _gpu_codec() -> bool:
    from forge_rt.pager import cuda_lz4
    return cuda_lz4.available()


@lru_cache(maxsize=2)
def tensor(kind: str, mib: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    n = (mib << 20) // (2 if kind == "bf16 SiLU" else 4)
    x = F.silu(torch.randn(n, generator=g))
    x = {"fp32 SiLU": x, "bf16-in-fp32": x.bfloat16().float(), "bf16 SiLU": x.bfloat16()}[kind]
    return x.to(device)


def _ops(case):
    """(timed function, the tensor, its encoded form) for the case."""
    if case["place"] == "gpu":
        from forge_rt.pager import cuda_lz4
        t = tensor(case["kind"], case["mib"], "cuda")
        blob, out = cuda_lz4.compress(t), torch.empty_like(t)
        return {"compress": lambda: cuda_lz4.compress(t), "decompress": lambda: cuda_lz4.decompress(blob, out),
                "memcpy": lambda: out.copy_(t)}[case["op"]], t, blob.numel()
    from forge_rt.pager import TensorCodec
    codec, t = TensorCodec(min_ratio=0.0), tensor(case["kind"], case["mib"])
    enc, out = codec.encode(t), torch.zeros_like(t)  # destinations touched first: page faults are not the codec's
    return {"compress": lambda: codec.encode(t), "decompress": lambda: codec.decode(enc.pieces, out, enc.half, "bench"),
            "memcpy": lambda: out.copy_(t)}[case["op"]], t, enc.nbytes


def test_codec(benchmark, ctx, case):
    fn, t, stored = _ops(case)

    def run():
        fn()
        ctx.sync()
    benchmark.extra_info.update(case, nbytes=t.numel() * t.element_size(), stored=stored)
    benchmark.pedantic(run, rounds=ctx.pick(3, 5, 7), warmup_rounds=1)


def plain_lz4_bytes(t: torch.Tensor) -> int:
    import lz4.block
    b = t.view(-1).view(torch.uint8).numpy().tobytes()
    return sum(min(len(lz4.block.compress(b[i:i + 65536], store_size=False)), len(b[i:i + 65536]))
               for i in range(0, len(b), 65536))


def _rows(runs: list[dict]) -> list[dict]:
    by = {}
    for b in runs:
        e = b["extra_info"]
        by.setdefault((e["place"], e["kind"]), {})[e["op"]] = (e["nbytes"] / b["stats"]["median"] / 1e9, e)
    rows = []
    for (place, kind), ops in by.items():
        name = f"{'GPU ' if place == 'gpu' else ''}{kind} {ops['memcpy'][1]['mib']} MiB"
        for op in ("compress", "decompress"):
            rows.append(row("paging", f"{op} {name}", ops[op][0], "GB/s", better="higher", baseline="memcpy",
                            baseline_value=ops["memcpy"][0]))
        e = ops["compress"][1]
        plain = {"baseline": "plain LZ4", "baseline_value": e["nbytes"] / plain_lz4_bytes(tensor(kind, e["mib"]))} \
            if place == "cpu" and have("lz4") else {}
        rows.append(row("paging", f"ratio {name}", e["nbytes"] / e["stored"], "x", better="higher", **plain))
    return rows


def run(ctx) -> list[dict]:
    rows = _rows(run_pytest(sys.modules[__name__], ctx))
    if ctx.suite == "full":
        rows += saved_activation_rows(ctx)
    return rows


def saved_activation_rows(ctx) -> list[dict]:
    """Compression and codec speed over everything a SmolLM2 LoRA step (4 x 256 tokens of prose) saves:
    fp32 with 30 layers and bf16 with 8."""
    from forge_rt.bench.models import build, capture_saved
    from forge_rt.pager import TensorCodec
    from forge_rt.testing import lora_model
    rows, codec = [], TensorCodec(min_ratio=0.0)
    for dtype, layers in ((torch.float32, 30), (torch.bfloat16, 8)):
        model, ids = build("smollm2", layers, 4, 256, dtype)
        saved = [t for t in capture_saved(lora_model(model), ids) if t.dtype != torch.bool]
        del model
        raw = stored = plain = 0
        secs = {"compress": 0.0, "decompress": 0.0, "memcpy": 0.0}
        for t in saved:
            out, dst = torch.zeros_like(t), torch.zeros_like(t)
            secs["compress"] += _timed(lambda: codec.encode(t.view(-1)))
            enc = codec.encode(t.view(-1))
            secs["decompress"] += _timed(lambda: codec.decode(enc.pieces, out, enc.half, "bench"))
            secs["memcpy"] += _timed(lambda: dst.copy_(t))
            raw, stored = raw + t.numel() * t.element_size(), stored + enc.nbytes
            plain += plain_lz4_bytes(t) if have("lz4") else 0
        name = f"SmolLM2 {str(dtype)[6:]} {layers} layers, {raw >> 20} MiB saved"
        for op in ("compress", "decompress"):
            rows.append(row("paging", f"{op} {name}", raw / secs[op] / 1e9, "GB/s", better="higher",
                            baseline="memcpy", baseline_value=raw / secs["memcpy"] / 1e9))
        rows.append(row("paging", f"ratio {name}", raw / stored, "x", better="higher",
                        **({"baseline": "plain LZ4", "baseline_value": raw / plain} if plain else {})))
    return rows


def _timed(fn) -> float:
    import time
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
