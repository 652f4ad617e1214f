"""icl.py: candidate sources, successive halving against brute force, self-labelling, defaults."""
import functools
import json
import re
import zlib

import numpy as np
import pytest
import torch

import embed as E
import evaluate as ev
import icl


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    pytest.importorskip("transformers")
    from test_model import LLAMA_GQA, hf_model, save
    d = tmp_path_factory.mktemp("llama")
    save(hf_model(LLAMA_GQA), d)
    return str(d)


# ---------------------------------------------------------------- candidate sources
def test_paper_file_parses_to_its_300_demonstrations():
    c = icl.paper_candidates()
    assert len(c) == 300 and len({(d["sentence"], d["word"]) for d in c}) == 300
    assert c[0] == {"sentence": "Over 100 dead as typhoon slams central Philippines", "word": "Disaster",
                    "source": "paper"}
    assert c[-1]["word"] == "Apple" and c[-1]["sentence"].startswith("a round fruit with firm, white flesh")
    assert all("_" not in d["sentence"] + d["word"] and re.fullmatch(r"[A-Za-z-]+", d["word"]) for d in c)
    # The paper's per-model picks (its Table 8, our OPT defaults) are among them.
    pairs = {(d["sentence"], d["word"]) for d in c}
    picks = json.loads(E.DEFAULTS_FILE.read_text())
    assert all((v["sentence"], v["word"]) in pairs for k, v in picks.items() if k.startswith("opt-"))


def test_wordnet_filter_gives_common_single_words_with_short_definitions():
    c = icl.wordnet_candidates(n=150, seed=1)
    assert len(c) == 150 and len({d["word"] for d in c}) == 150
    for d in c:
        w = d["word"]
        assert w.isascii() and w.isalpha() and w[0].isupper() and w[1:].islower() and 3 <= len(w) <= 12
        assert d["source"] == "wordnet" and d["sentence"].endswith(".") and not d["sentence"].endswith("..")
        assert 3 <= len(d["sentence"].split()) <= 12
        assert all(not t.startswith(w.lower()[:4]) for t in re.findall(r"[a-z]+", d["sentence"].lower()))
    assert icl.wordnet_candidates(n=150, seed=1) == c != icl.wordnet_candidates(n=150, seed=2)


def test_candidate_files_round_trip_and_deduplicate(tmp_path):
    c = icl.paper_candidates()[:3]
    icl.write_jsonl(tmp_path / "a.jsonl", c)
    icl.write_jsonl(tmp_path / "b.jsonl", c[1:] + [{"sentence": "x y.", "word": "Z", "source": "self"}])
    got = icl.read_candidates([tmp_path / "a.jsonl", tmp_path / "b.jsonl"])
    assert got == c + [{"sentence": "x y.", "word": "Z", "source": "self"}]


# ---------------------------------------------------------------- search
@functools.lru_cache(maxsize=None)
def word_vector(w):
    return np.random.default_rng(zlib.crc32(w.encode())).normal(size=32)


class BagOfWords:
    """A fake Embedder: the sum of seeded random word vectors (it tracks STS-B gold a little)
    plus per-sentence noise as large as the demonstration's word says ("0.0" is the best; no
    demonstration is noisy). Counts the sentences it encodes."""
    encoded = 0

    def __init__(self, noise=4.0, demonstrations=()):
        self.noise, self.fingerprint = noise, {"fake": "bow", "demonstrations": [list(d) for d in demonstrations]}

    def with_demonstrations(self, demos):
        return BagOfWords(sum(float(w) for _, w in demos) / len(demos) if demos else 4.0, demos)

    def encode(self, sentences):
        BagOfWords.encoded += len(sentences)
        out = []
        for s in sentences:
            v = sum(word_vector(w) for w in s.split())
            rng = np.random.default_rng(zlib.crc32((s + json.dumps(self.fingerprint)).encode()))
            out.append(v + self.noise * rng.normal(size=32))
        return np.array(out, np.float32)


def fake_candidates(n=27, step=0.5):
    levels = np.random.default_rng(3).permutation(n) * step   # noise 0.0, 0.5, ... in shuffled order
    return [{"sentence": f"candidate {i}", "word": f"{x:.1f}", "source": "fake"} for i, x in enumerate(levels)]


def test_schedule_shrinks_candidates_and_grows_pairs_to_the_full_set():
    assert icl.schedule(300, 1500, 100, 3) == [(300, 100), (100, 300), (34, 900), (12, 1500)]
    assert icl.schedule(300, 1500, 100, 3, rounds=2) == [(300, 100), (100, 1500)]
    assert icl.schedule(300, 1500, 100, 3, rounds=1) == [(300, 1500)]          # brute force


def test_successive_halving_finds_brute_force_winner_with_fewer_encodings():
    cands, dev = fake_candidates(), ev.load_stsb(ev.data_dir(), "dev")
    order = np.random.default_rng(0).permutation(len(dev.gold))
    results = {}
    for name, plan in (("halving", icl.schedule(len(cands), 450, 50, 3)), ("brute", [(len(cands), 450)])):
        BagOfWords.encoded = 0
        score = icl.Scorer(BagOfWords(), disk=False)
        ranked, rounds = icl.successive_halving(cands, score, order, plan, score.drop)
        needed = sum(icl.unique_sentences(dev, order[:c["pairs"]]) for c in ranked)
        # Every sentence is encoded once per demonstration: later rounds reuse earlier vectors.
        assert BagOfWords.encoded == score.n_encoded == needed == icl.planned_encodings(plan, dev, order)
        results[name] = ranked, needed, rounds
    (sh, sh_cost, rounds), (bf, bf_cost, _) = results["halving"], results["brute"]
    assert sh[0]["word"] == bf[0]["word"] == "0.0"
    assert [r["candidates"] for r in rounds] == [27, 9, 3] and [r["pairs"] for r in rounds] == [50, 150, 450]
    assert bf_cost == 27 * icl.unique_sentences(dev, order[:450]) and sh_cost < 0.4 * bf_cost
    assert [c["pairs"] for c in sh] == [450] * 3 + [150] * 6 + [50] * 18
    assert sh[0]["spearman"] == bf[0]["spearman"]


def test_search_reports_baseline_k_and_reuses_the_disk_cache(tmp_path):
    cands = fake_candidates(9, step=2.0)
    first = icl.search(BagOfWords(), cands, start_pairs=40, eta=3, dev_pairs=120, cache_dir=tmp_path)
    assert first["winner"]["word"] == "0.0" and first["winner"]["spearman"] > first["no_demonstration"]
    assert [m["k"] for m in first["k_greater_than_1"]] == [2, 3]
    assert first["k_greater_than_1"][0]["demonstrations"][-1] == ["candidate %d" % cands.index(
        next(c for c in cands if c["word"] == "0.0")), "0.0"]                   # the best sits last
    e = first["encodings"]
    assert e["spent_this_run"] == e["needed"] + 3 * first["dev_sentences"] and e["needed"] < e["brute_force"]
    again = icl.search(BagOfWords(), cands, start_pairs=40, eta=3, dev_pairs=120, cache_dir=tmp_path)
    assert again["encodings"]["spent_this_run"] == 0 and again["ranked"] == first["ranked"]


def test_search_cli_on_a_tiny_model(tiny_llama, tmp_path):
    icl.write_jsonl(tmp_path / "c.jsonl", icl.paper_candidates()[:4])
    out = tmp_path / "r.json"
    common = ["search", "--model", tiny_llama, "--candidates", str(tmp_path / "c.jsonl"), "--dev-pairs", "12",
              "--start-pairs", "6", "--eta", "2", "--max-k", "2", "--cache-dir", str(tmp_path)]
    assert icl.main(common + ["--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["n_candidates"] == 4 and [s["pairs"] for s in r["schedule"]] == [6, 12]
    assert len(r["ranked"]) == 4 and r["encoder"]["demonstrations"] == [] and r["candidates"]
    assert icl.main(common + ["--write-default"]) == 1        # a smoke run never becomes a default


# ---------------------------------------------------------------- self-labelling
def scripted(e, monkeypatch, text):
    """Make the model 'say' text token by token; returns the list of decoding steps taken."""
    script, steps = e.tok.encode(text, bos=False), []

    def lm_logits(h):
        logits = torch.full((h.shape[0], e.model.config.vocab_size), -1e9)
        logits[:, script[min(len(steps), len(script) - 1)]] = 0
        steps.append(1)
        return logits
    monkeypatch.setattr(e.model, "lm_logits", lm_logits)
    return script, steps


@pytest.mark.parametrize("text, word", [('Sunny" and then many more words follow', "Sunny"),
                                        ('Sunny day" and more', None), ("no quote at all in this long reply", None)])
def test_self_labelling_stops_at_the_closing_quote(tiny_llama, monkeypatch, text, word):
    e = E.Embedder(tiny_llama, demonstrations=[])
    script, steps = scripted(e, monkeypatch, text)
    assert icl.label_words(e, ["A man plays a guitar."], max_new_tokens=6) == [word]
    quote = next((i + 1 for i in range(len(script)) if '"' in e.tok.decode(script[:i + 1])), None)
    assert len(steps) == (quote if quote and quote <= 6 else 6)


def test_cached_greedy_decoding_equals_full_recomputation(tiny_llama, monkeypatch):
    e = E.Embedder(tiny_llama, demonstrations=[("A jockey riding a horse.", "Equestrian")])
    real, seen = e.model.lm_logits, []
    monkeypatch.setattr(e.model, "lm_logits", lambda h: seen.append(real(h).argmax(-1)) or real(h))
    icl.label_words(e, ["Two dogs run."], max_new_tokens=5)
    assert seen
    ids = torch.tensor([e.tok.encode(e.prompt("Two dogs run.")[0])])
    with torch.no_grad():
        for got in seen:
            nxt = real(e.model(ids)[:, -1]).argmax(-1)
            assert nxt.item() == got.item()
            ids = torch.cat([ids, nxt[:, None]], dim=1)


# ---------------------------------------------------------------- defaults
def test_written_default_is_what_embed_uses(tmp_path, monkeypatch):
    f = tmp_path / "demonstrations.json"
    f.write_text(E.DEFAULTS_FILE.read_text())
    before = {k: v for k, v in json.loads(f.read_text()).items() if k != "smollm2-135m"}
    icl.write_default("smollm2-135m", {"sentence": "A.", "word": "B"}, f)
    icl.write_default("smollm2-135m", {"sentence": "A cat naps.", "word": "Sleep", "dev_spearman": 0.5}, f)
    table = json.loads(f.read_text())
    assert list(table) == list(before) + ["smollm2-135m"] and {k: table[k] for k in before} == before
    assert len(f.read_text().splitlines()) == len(table) + 2                   # one line per alias
    monkeypatch.setattr(E, "DEFAULTS_FILE", f)
    assert E.default_demonstrations("smollm2-135m") == [("A cat naps.", "Sleep")]


def test_search_write_default_stores_the_full_dev_winner(tmp_path, monkeypatch):
    f = tmp_path / "demonstrations.json"
    f.write_text(E.DEFAULTS_FILE.read_text())
    monkeypatch.setattr(icl, "DEFAULTS_FILE", f)
    monkeypatch.setattr(E, "DEFAULTS_FILE", f)
    monkeypatch.setattr(E, "Embedder", lambda *a, **k: BagOfWords())
    icl.write_jsonl(tmp_path / "c.jsonl", fake_candidates(3, step=2.0))
    assert icl.main(["search", "--model", "smollm2-135m", "--candidates", str(tmp_path / "c.jsonl"), "--start-pairs",
                     "500", "--max-k", "1", "--cache-dir", str(tmp_path), "--out", str(tmp_path / "r.json"),
                     "--write-default"]) == 0
    entry, r = json.loads(f.read_text())["smollm2-135m"], json.loads((tmp_path / "r.json").read_text())
    assert (entry["word"], entry["source"], entry["dev_spearman"]) == ("0.0", "fake", round(r["winner"]["spearman"], 4))
    assert r["winner"]["pairs"] == 1500 and entry["search"]["dev_pairs"] == 1500 and entry["date"]
    assert E.default_demonstrations("smollm2-135m") == [(r["winner"]["sentence"], "0.0")]
