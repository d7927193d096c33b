"""GGUF parsing, gguf's own reader vs forge_rt's (models.gguf_reader), and transformers' weights map with and
without the memoised tensor-name table: median of 3 wall times each, in this process, alone.

    .venv/bin/python bench/gguf_parse.py [GGUF ...] [--out bench/results/gguf_parse.json]
(default: the shipped SmolLM2-135M-Instruct Q4_1)"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def _median_s(fn, n: int = 3) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times), 3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", nargs="*")
    ap.add_argument("--out", default="bench/results/gguf_parse.json")
    args = ap.parse_args(argv)
    import gguf
    import torch
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map
    from forge_rt.models import default_gguf_path
    from forge_rt.models.gguf_reader import GGUFReader, fast_gguf
    from forge_rt.models.paths import model_config
    from forge_rt.models.stream_load import skeleton

    record = {"command": "python bench/gguf_parse.py " + " ".join(args.gguf), "load_start": os.getloadavg(),
              "files": []}
    for path in [Path(p) for p in args.gguf] or [default_gguf_path()]:
        r = GGUFReader(path)
        row = {"file": path.name, "fields": len(r.fields), "tensors": len(r.tensors),
               "vocabulary": len(r.fields["tokenizer.ggml.tokens"].data),
               "stock_reader_s": _median_s(lambda: gguf.GGUFReader(path)),
               "forge_rt_reader_s": _median_s(lambda: GGUFReader(path))}
        model = skeleton(model_config(path), torch.float32)
        proc = TENSOR_PROCESSORS.get(model.config.model_type, TensorProcessor)(config=model.config.to_dict())
        row["weights_map_stock_s"] = _median_s(lambda: get_gguf_hf_weights_map(model, proc))

        def memoised():
            with fast_gguf():
                get_gguf_hf_weights_map(model, proc)
        row["weights_map_memoised_s"] = _median_s(memoised)
        row["reader_speedup"] = round(row["stock_reader_s"] / row["forge_rt_reader_s"], 2)
        record["files"].append(row)
        print(json.dumps(row), flush=True)
    record["load_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
