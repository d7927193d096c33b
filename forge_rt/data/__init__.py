"""Training and held-out data: `examples` (read and validate the accepted row forms; the shipped demo
task) and `tokenize` (chat template, response-only labels, packing, collation)."""
from forge_rt.data.examples import FORMATS, DataError, Examples, demo_paths, load_examples, read_text
from forge_rt.data.tokenize import TokenizedData, collate, prompt_text, tokenize_examples

__all__ = ["FORMATS", "DataError", "Examples", "demo_paths", "load_examples", "read_text", "TokenizedData", "collate",
           "prompt_text", "tokenize_examples"]
