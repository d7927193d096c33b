"""Evaluation: `score` (the composite score of answers against references), `hf` (generation and retention
perplexity in PyTorch) and `llamacpp` (the same held-out set scored on a GGUF in llama.cpp)."""
from forge_rt.eval.score import parse_json, score_predictions

__all__ = ["parse_json", "score_predictions"]
