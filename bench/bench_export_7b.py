"""Streaming GGUF export of the 7B-shaped checkpoint (tools/make_7b_checkpoint.py: RANDOM weights, it measures
memory and time, not quality) with a random r=16 LoRA adapter on every linear, to q4_k_m:

  adapter  written over the base's shapes only (no weight read);
  nf4      the NF4 model's own bytes (forge_rt's streaming load, as training and the export load it);
  export   `python -m forge_rt.export --adapter A --model CKPT --to gguf --quant q4_k_m` in its own process,
           VmRSS of that process polled from here every 0.1 s (peak), wall time, file size;
  llama    the file loaded by llama.cpp (xllamacpp) answering a prompt (random weights: any text).

    python bench/bench_export_7b.py CKPT [--workdir DIR] [--out bench/results/export_7b.json]"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this tree's forge_rt, not an installed copy
GiB = 2**30


def make_adapter(model: Path, out: Path, r: int = 16) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from forge_rt.export.source import shapes_only
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(shapes_only(model), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                          init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)  # a visible but moderate delta
    peft.save_pretrained(out)
    return out


def nf4_bytes(model: Path) -> int:
    """Bytes of the tensors the NF4 model holds (packed weights, block scales, fp32 embeddings/head/norms)."""
    import dataclasses

    import torch
    from forge_rt.models import load_model
    from forge_rt.nn import NF4Linear
    m, _ = load_model(model, nf4=True)
    total = 0
    for mod in m.modules():
        if isinstance(mod, NF4Linear):
            w = mod.nf4
            parts = [getattr(w, f.name) for f in dataclasses.fields(w) if f.name != "_absmax_cache"]
            total += sum(v.numel() * v.element_size() for v in parts if isinstance(v, torch.Tensor))
            total += 0 if mod.bias is None else mod.bias.numel() * mod.bias.element_size()
            continue
        for p in list(mod._parameters.values()) + list(mod._buffers.values()):
            if p is not None:
                total += p.numel() * p.element_size()
    return total


def polled(cmd: list[str], interval: float = 0.1) -> dict:
    """Runs `cmd`; its peak VmRSS read from /proc every `interval` s, and its wall time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(interval)
    out = proc.stdout.read()
    return {"rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 1), "peak_rss_bytes": peak,
            "tail": out.strip().splitlines()[-3:]}


def llama_answer(gguf_path: Path) -> str:
    from forge_rt.eval.llamacpp import LlamaCppEngine
    eng = LlamaCppEngine(gguf_path, n_ctx=256)
    return eng.chat([{"role": "user", "content": "List three parts of a pump."}], max_tokens=8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/e23"))
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/export_7b.json")
    p.add_argument("--phase", choices=["adapter", "nf4", "llama"], help="internal: one phase in this process")
    a = p.parse_args(argv)
    adapter, gguf_out = a.workdir / "adapter7b", a.workdir / "export7b_q4_k_m.gguf"
    if a.phase == "adapter":
        make_adapter(a.model, adapter)
        return 0
    if a.phase == "nf4":
        print(json.dumps({"nf4_bytes": nf4_bytes(a.model)}))
        return 0
    if a.phase == "llama":
        print(json.dumps({"answer": llama_answer(gguf_out)}))
        return 0
    me = [sys.executable, str(Path(__file__).resolve()), str(a.model), "--workdir", str(a.workdir)]
    if not (adapter / "adapter_config.json").is_file():
        subprocess.run(me + ["--phase", "adapter"], check=True)
    gguf_out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "forge_rt.export", "--adapter", str(adapter), "--model", str(a.model), "--to", "gguf",
           "--quant", "q4_k_m", "--out", str(gguf_out)]
    rec = {"weights": "RANDOM (Llama-2-7B shape, SmolLM2 vocabulary 49152)", "cpu_count": os.cpu_count(),
           "loadavg_before": os.getloadavg(), "command": " ".join(["python"] + cmd[1:])}
    rec["export"] = polled(cmd)
    rec["loadavg_after"] = os.getloadavg()
    if rec["export"]["rc"] == 0:
        size = gguf_out.stat().st_size
        rec["export"].update(file_bytes=size, seconds_per_gib_written=round(rec["export"]["seconds"] / (size / GiB), 1))
    nf4 = subprocess.run(me + ["--phase", "nf4"], capture_output=True, text=True, check=True)
    rec["nf4_model_bytes"] = json.loads(nf4.stdout.strip().splitlines()[-1])["nf4_bytes"]
    rec["peak_over_nf4_gib"] = round((rec["export"]["peak_rss_bytes"] - rec["nf4_model_bytes"]) / GiB, 2)
    rec["acceptance"] = "peak RSS <= NF4 model + 3 GiB: " + str(rec["peak_over_nf4_gib"] <= 3)
    if rec["export"]["rc"] == 0:
        ans = subprocess.run(me + ["--phase", "llama"], capture_output=True, text=True)
        rec["llamacpp"] = {"rc": ans.returncode, "out": (ans.stdout.strip().splitlines() or [""])[-1][:300]}
    a.out.write_text(json.dumps(rec, indent=1) + "\n")
    print(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
