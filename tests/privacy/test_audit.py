"""The canary audit: formats the scrubber does and does not find, insertion, cached batch scoring against a
plain full-sequence log-likelihood, and exposure/extraction on a tiny model before and after it was made to
memorise one canary."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from forge_rt.privacy.audit import _shared, audit, chat_encoder, exposure_of, markdown, score, summarize  # noqa: E402
from forge_rt.privacy.canary import FORMATS, candidates, insert_canaries, make_canaries  # noqa: E402

N_CAND = 200


@pytest.fixture(scope="module")
def tiny_lm(smol_tok):
    cfg = transformers.LlamaConfig(vocab_size=len(smol_tok), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, tie_word_embeddings=False,
                                   pad_token_id=smol_tok.pad_token_id)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_formats_are_what_the_scrubber_says():
    from forge_rt.sovereign.scrub import find
    for c in make_canaries(1, per_cell=2):
        found = find(c.text)
        secret_at = c.text.index(c.secret)
        covered = any(f.start <= secret_at and secret_at + len(c.secret) <= f.end for f in found)
        assert covered == c.fmt.scrubbable, (c.format, c.text, found)


def test_canaries_and_insertion():
    cs = make_canaries(3)
    assert [(c.format, c.repeats) for c in cs] == [(f, r) for f in FORMATS for r in (1, 4, 16)]
    assert len({c.secret for c in cs}) == len(cs) and len({c.prompt for c in cs}) == len(cs)
    assert make_canaries(3) == cs and make_canaries(4) != cs
    rows = [{"i": i} for i in range(30)]
    out = insert_canaries(rows, cs, lambda c: {"canary": c.noun}, seed=0)
    assert len(rows) == 30 and len(out) == 30 + 4 * 21
    for c in cs:
        assert sum(r.get("canary") == c.noun for r in out) == c.repeats
    cand = candidates(cs[0], 50, seed=0, exclude={cs[1].secret})
    assert len(set(cand)) == 50 and cs[0].secret not in cand and cand == candidates(cs[0], 50, seed=0)


def test_cached_batch_scores_equal_full_sequence_log_likelihood(tiny_lm, smol_tok):
    c = make_canaries(0, formats=("access_code",), repeats=(1,))[0]
    encode = chat_encoder(smol_tok)
    import dataclasses
    seqs = [encode(dataclasses.replace(c, secret=s).messages())[0] for s in [c.secret] + candidates(c, 9, 0)]
    start = _shared(seqs)
    got = score(tiny_lm, seqs, start, batch_size=4, pad_id=smol_tok.pad_token_id)
    want = []
    with torch.no_grad():
        for s in seqs:
            lp = torch.log_softmax(tiny_lm(input_ids=torch.tensor([s])).logits[0].double(), -1)
            want.append(sum(float(lp[t - 1, s[t]]) for t in range(start, len(s))))
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-4)
    assert exposure_of(-1.0, torch.tensor([-2.0, -0.5, -3.0])) == (2, 1.0)


def _memorise(model, encode, canary, steps=60):
    ids, first = encode(canary.messages())
    x = torch.tensor([ids])
    labels = x.clone()
    labels[0, :first] = -100
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=x, labels=labels).loss.backward()
        opt.step()
    return model.eval()


def test_exposure_high_after_memorising_and_low_before(tiny_lm, smol_tok):
    import copy
    encode = chat_encoder(smol_tok)
    cs = make_canaries(7, formats=("access_code", "email"), repeats=(1,))
    before = audit(tiny_lm, smol_tok, cs, encode, n_candidates=N_CAND, seed=1)
    tuned = _memorise(copy.deepcopy(tiny_lm), encode, cs[0])
    after = audit(tuned, smol_tok, cs, encode, n_candidates=N_CAND, seed=1)
    top = math.log2(N_CAND + 1)
    assert after[0]["rank"] == 1 and after[0]["exposure"] == pytest.approx(top) and after[0]["extracted"]
    assert all(r["exposure"] < top - 2 and not r["extracted"] for r in before)
    assert not after[1]["extracted"]  # the canary it was not trained on
    table = summarize({"base": before, "tuned": after})
    assert table[0]["tuned_exposure"] == pytest.approx(top) and table[0]["base_extracted"] == 0
    assert "| access_code | no | 1 |" in markdown(table, ["base", "tuned"])
