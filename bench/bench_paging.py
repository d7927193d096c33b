"""Activation paging benchmark on SmolLM2-135M-Instruct (LoRA r=16 on all linear layers).

  python bench/bench_paging.py [--batch 4 --tokens 256 --bf16-layers 8 --budget-mb 256]

1. compression ratio of everything a LoRA step saves for backward: forge_rt's codec (bit-shuffle,
   bf16-in-fp32 halving, nvCOMP LZ4) vs plain LZ4 (python-lz4, 64 KiB blocks), fp32 and bf16 models;
2. codec GB/s (compress, decompress) on those activations vs memcpy of the same bytes;
3. peak RSS and time of training steps (the first, cold, and the later ones): paging off, compress-only,
   spill (budget; O_DIRECT by default, without handing freed heap back, and buffered with a shallow
   prefetch as it was first built), and torch.autograd.graph.save_on_cpu;
   each mode in its own process so peaks do not mix.
Prints markdown tables; --json PATH also writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import lz4.block
import torch

from forge_rt import testing
from forge_rt.testing import cut_layers, prose_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lora_model(dtype, layers=None):
    from forge_rt.train.model import load_model
    model, tok = load_model(dtype=torch.float32)
    if layers:
        cut_layers(model, layers)
    return testing.lora_model(model.to(dtype)), tok


def capture_saved(model, ids, min_bytes=65536):
    """Every distinct tensor a step saves for backward that paging would consider."""
    seen, out = set(), []

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if (key not in seen and t.numel() * t.element_size() >= min_bytes and not isinstance(t, torch.nn.Parameter)
                and not (t.is_leaf and t.requires_grad) and not isinstance(t._base, torch.nn.Parameter)):
            seen.add(key)
            out.append(t.detach().contiguous())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    return out


def plain_lz4_bytes(t):
    b = t.view(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes()
    return sum(min(len(lz4.block.compress(b[i:i + 65536], store_size=False)), len(b[i:i + 65536]))
               for i in range(0, len(b), 65536))


def ratio_and_speed(dtype, layers, batch, tokens):
    from forge_rt.pager import TensorCodec
    model, tok = lora_model(dtype, layers)
    saved = capture_saved(model, prose_ids(tok, batch, tokens))
    del model
    codec = TensorCodec(threads=2, min_ratio=0.0)
    raw = ours = plain = 0
    by_dtype: dict[str, list[int]] = {}
    comp_s = dec_s = copy_s = 0.0
    for t in saved:
        n = t.numel() * t.element_size()
        # Destinations are touched first so page faults (the allocator's cost, not the codec's) stay out.
        out, dst = torch.zeros_like(t), torch.zeros_like(t)
        t0 = time.perf_counter()
        enc = codec.encode(t.view(-1))
        t1 = time.perf_counter()
        codec.decode(enc.pieces, out, enc.half, "bench")
        t2 = time.perf_counter()
        dst.copy_(t)
        t3 = time.perf_counter()
        assert torch.equal(out.view(torch.uint8) if out.dtype != torch.bool else out,
                           t.view(torch.uint8) if t.dtype != torch.bool else t)
        copy_s += t3 - t2
        comp_s += t1 - t0
        dec_s += t2 - t1
        p = plain_lz4_bytes(t)
        raw, ours, plain = raw + n, ours + enc.nbytes, plain + p
        d = by_dtype.setdefault(str(t.dtype)[6:], [0, 0, 0])
        d[0] += n; d[1] += enc.nbytes; d[2] += p
    return dict(model=f"{str(dtype)[6:]} ({layers or 30} layers)", saved_mb=raw / 2**20, ratio=raw / ours,
                plain_lz4_ratio=raw / plain, by_dtype={k: dict(mb=v[0] / 2**20, ratio=v[0] / v[1], plain=v[0] / v[2])
                                                       for k, v in by_dtype.items()},
                compress_gbs=raw / comp_s / 1e9, decompress_gbs=raw / dec_s / 1e9, memcpy_gbs=raw / copy_s / 1e9)


def rss_bytes():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_step(mode, batch, tokens, budget_mb, layers, steps):
    """Runs in a child process: `steps` training steps under `mode` (the first one cold); prints JSON."""
    import forge_rt
    torch.set_num_threads(2)
    model, tok = lora_model(torch.float32, layers)
    ids = prose_ids(tok, batch, tokens)
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.005)

    spill_dir = tempfile.mkdtemp(prefix="forge_rt-bench-")
    ctx = {"off": None, "compress": lambda: forge_rt.paging(),
           "spill": lambda: forge_rt.paging(budget_bytes=budget_mb << 20, spill_dir=spill_dir),
           "spill_keep_heap": lambda: forge_rt.paging(budget_bytes=budget_mb << 20, spill_dir=spill_dir,
                                                      release_memory=False),
           "spill_buffered": lambda: forge_rt.paging(budget_bytes=budget_mb << 20, spill_dir=spill_dir,
                                                     direct_io=False, prefetch=2),
           "save_on_cpu": lambda: torch.autograd.graph.save_on_cpu()}[mode]
    before = rss_bytes()
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    times, peaks, stats = [], [], {}
    for _ in range(steps):
        peak[0] = 0
        t0 = time.perf_counter()
        if ctx is None:
            model(input_ids=ids, labels=ids).loss.backward()
        else:
            with ctx() as pager:
                model(input_ids=ids, labels=ids).loss.backward()
            stats = pager.stats() if hasattr(pager, "stats") else {}
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        peaks.append(max(peak[0], rss_bytes()) / 2**20)
    stop.set()
    th.join()
    print(json.dumps(dict(mode=mode, step_s=times, rss_before_mb=before / 2**20, peak_rss_mb=peaks,
                          spilled_mb=stats.get("bytes_spilled", 0) / 2**20, ratio=stats.get("ratio"),
                          stall_s=stats.get("stall_s"), codec_s=stats.get("codec_s"),
                          heap_trims=stats.get("heap_trims"))))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--bf16-layers", type=int, default=8)
    ap.add_argument("--step-layers", type=int, default=None, help="cut the fp32 model for the step timing")
    ap.add_argument("--budget-mb", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--skip", nargs="*", default=[], choices=["ratio", "step"])
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return one_step(a.child, a.batch, a.tokens, a.budget_mb, a.step_layers, a.steps)
    torch.set_num_threads(2)
    result = {"cmd": " ".join(sys.argv)}
    if "ratio" not in a.skip:
        rows = [ratio_and_speed(torch.float32, None, a.batch, a.tokens),
                ratio_and_speed(torch.bfloat16, a.bf16_layers, a.batch, a.tokens)]
        result["ratio"] = rows
        print(f"\n### Compression of saved activations ({a.batch} x {a.tokens} tokens of prose)\n")
        print("| model | saved MB | forge_rt ratio | plain LZ4 ratio | per dtype (MB: ours / plain) |"
              " compress GB/s | decompress GB/s | memcpy GB/s |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            per = "; ".join(f"{k} {v['mb']:.0f}: {v['ratio']:.2f}x / {v['plain']:.2f}x" for k, v in r["by_dtype"].items())
            print(f"| {r['model']} | {r['saved_mb']:.0f} | {r['ratio']:.2f}x | {r['plain_lz4_ratio']:.2f}x | {per} | "
                  f"{r['compress_gbs']:.2f} | {r['decompress_gbs']:.2f} | {r['memcpy_gbs']:.2f} |")
    if "step" not in a.skip:
        rows = []
        for mode in ("off", "compress", "spill", "spill_keep_heap", "spill_buffered", "save_on_cpu",
                     "off"):  # off twice: drift
            cmd = [sys.executable, __file__, "--child", mode, "--batch", str(a.batch), "--tokens", str(a.tokens),
                   "--budget-mb", str(a.budget_mb), "--steps", str(a.steps)] + (
                   ["--step-layers", str(a.step_layers)] if a.step_layers else [])
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                 p for p in (os.environ.get("PYTHONPATH"), ROOT) if p)})
            line = [x for x in out.stdout.splitlines() if x.startswith("{")]
            if not line:
                raise SystemExit(f"step bench {mode} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(line[-1]))
        result["step"] = rows
        base = rows[0]
        warm = lambda r: statistics.median(r["step_s"][1:] or r["step_s"])  # noqa: E731
        print(f"\n### LoRA training steps, fp32 model, {a.batch} x {a.tokens} tokens, budget {a.budget_mb} MB, "
              f"{a.steps} steps per mode (the first one cold)\n")
        print("| mode | first step s | x off | later steps s (median) | x off | peak RSS MB | x off | spilled MB/step |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            pk, bpk = max(r["peak_rss_mb"]), max(base["peak_rss_mb"])
            print(f"| {r['mode']} | {r['step_s'][0]:.1f} | {r['step_s'][0] / base['step_s'][0]:.2f} | {warm(r):.1f} | "
                  f"{warm(r) / warm(base):.2f} | {pk:.0f} | {pk / bpk:.2f} | {r['spilled_mb']:.0f} |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
