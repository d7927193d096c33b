import copy
import os
import tempfile

import pytest

# Tests run offline: the hub libraries must never try the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Caches (base GGUFs, base scores, machine probe) are the session's own: a test never hits another run's entry.
os.environ.setdefault("FORGE_RT_CACHE", tempfile.mkdtemp(prefix="forge_rt-test-cache-"))
# Without a GPU, Triton kernels run in its interpreter on CPU tensors; it must be set before import.
try:
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the shipped SmolLM2-135M-Instruct, fp32, loaded once. Don't mutate it:
    use `fresh_smollm2` for a private copy."""
    import torch
    from forge_rt.models import load_model
    return load_model(dtype=torch.float32)


@pytest.fixture
def fresh_smollm2(smollm2):
    model, tok = smollm2
    return copy.deepcopy(model), tok


@pytest.fixture(scope="session")
def smol_tok():
    """SmolLM2's tokenizer, read from the shipped GGUF without loading the model."""
    from forge_rt.models import load_tokenizer
    return load_tokenizer()


@pytest.fixture(scope="session")
def small_tok(smol_tok):
    """SmolLM2's tokenizer cut to its first 1024 ids (special tokens, bytes, the first 772 merges; same
    pre-tokenizer and chat template), for the architecture tests' tiny models: with all 49152 ids their
    embeddings and GGUF vocabularies took most of the suite's time (test_archs: 570 s of 1460). Its chat
    rows are longer (a tiny_rows prompt: 72 tokens, not 45): train with --max-len 160."""
    import json
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    tok, n = smol_tok, 1024
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = {k: v for k, v in spec["model"]["vocab"].items() if v < n}
    spec["model"]["merges"] = [m for m in spec["model"]["merges"]
                               if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    spec["model"]["vocab"] = vocab
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["id"] < n]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=tok.bos_token,
                                   eos_token=tok.eos_token, unk_token=tok.unk_token, pad_token=tok.pad_token,
                                   chat_template=tok.chat_template)
