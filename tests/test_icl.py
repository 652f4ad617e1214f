"""icl.py: the paper's candidates and search, successive halving against it, WordNet and
self-labelled candidates, defaults, and the CLI's flags and endings. Unit tests read
tests/fixtures/icl/, a data folder in miniature."""
import functools
import json
import re
import zlib

import numpy as np
import pytest
import torch

import embed as E
import icl
from support.cli import UserError, cli
from conftest import FIXTURES

MINI = FIXTURES / "icl"   # 11 of the paper's lines, 41 WordNet rows, 24 STS-B dev, 12 train pairs


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    pytest.importorskip("transformers")
    from helpers import LLAMA_GQA, hf_model, save
    d = tmp_path_factory.mktemp("llama")
    save(hf_model(LLAMA_GQA), d)
    return str(d)


def run(argv, capsys):
    """The CLI as a user meets it: exit status and stderr."""
    rc = cli(icl.main, argv, interrupted=icl.KEPT)
    return rc, capsys.readouterr().err


# ---------------------------------------------------------------- candidate sources
def test_paper_file_parses_to_sentence_and_word():
    c = icl.paper_candidates(MINI)
    first = {"sentence": "Over 100 dead as typhoon slams central Philippines", "word": "Disaster",
             "source": "paper"}
    assert len(c) == 11 and c[0] == first
    assert c[-1]["word"] == "Apple"
    assert c[-1]["sentence"].startswith("a round fruit with firm, white flesh")
    assert all("_" not in d["sentence"] + d["word"] for d in c)
    assert all(re.fullmatch(r"[A-Za-z-]+", d["word"]) for d in c)


def test_full_paper_file_holds_300_and_the_papers_picks(data_root):
    c = icl.paper_candidates(data_root)
    pairs = {(d["sentence"], d["word"]) for d in c}
    assert len(c) == len(pairs) == 300
    picks = json.loads(E.DEFAULTS_FILE.read_text())   # the paper's Table 8: our OPT defaults
    opt = [(v["sentence"], v["word"]) for k, v in picks.items() if k.startswith("opt-")]
    assert opt and all(pick in pairs for pick in opt)


def test_bad_paper_line_names_file_and_line(tmp_path):
    (tmp_path / "sts").mkdir()
    (tmp_path / "icl").mkdir()
    lines = (MINI / "icl" / "icl_examples.txt").read_text().splitlines()
    bad = lines[:2] + ["no quotes here"]
    (tmp_path / "icl" / "icl_examples.txt").write_text("\n".join(bad) + "\n")
    with pytest.raises(UserError, match=r"icl_examples.txt:3: expected the demonstration"):
        icl.paper_candidates(tmp_path)


def test_wordnet_filter_keeps_the_first_clean_sense_of_common_words():
    c = icl.wordnet_candidates(MINI, n=200)
    # Out: 'hood and Paris (form), venison (one sense), acetate ("acetic" gives it away), dog's and
    # abandon's first noun senses (too long; a semicolon): their first clean sense (a verb) is kept.
    words = ["Abandon", "Biscuit", "Coffer", "Dog", "Frizz", "Harbor", "Sparkly", "Swimming"]
    assert [d["word"] for d in c] == words
    assert c[0] == {"sentence": "forsake, leave behind.", "word": "Abandon", "source": "wordnet"}
    assert icl.wordnet_candidates(MINI, n=3, seed=1) == icl.wordnet_candidates(MINI, n=3, seed=1)
    assert icl.wordnet_candidates(MINI, n=3, seed=1) != icl.wordnet_candidates(MINI, n=3, seed=2)


def test_wordnet_sample_of_the_full_file(data_root):
    if not (data_root / "dict" / "wordnet30_word_definitions.tsv.gz").exists():   # derived
        pytest.skip("no dict/wordnet30_word_definitions.tsv.gz in the data folder "
                    "(data/download.py does not fetch it)")
    c = icl.wordnet_candidates(data_root, n=150, seed=1)
    assert len(c) == 150 and len({d["word"] for d in c}) == 150
    for d in c:
        w = d["word"]
        assert w.isascii() and w.isalpha() and w[0].isupper() and w[1:].islower()
        assert 3 <= len(w) <= 12 and 3 <= len(d["sentence"].split()) <= 12
        assert d["sentence"].endswith(".") and not d["sentence"].endswith("..")
        tokens = re.findall(r"[a-z]+", d["sentence"].lower())
        assert all(not t.startswith(w.lower()[:4]) for t in tokens)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_candidate_files_round_trip_and_deduplicate(tmp_path):
    c = icl.paper_candidates(MINI)[:3]
    a = write_jsonl(tmp_path / "a.jsonl", c)
    b = write_jsonl(tmp_path / "b.jsonl", c[1:] + [{"sentence": "x y.", "word": "Z"}])
    assert icl.read_candidates([a, b]) == c + [{"sentence": "x y.", "word": "Z", "source": "b"}]


@pytest.mark.parametrize("line",
                         ['{"sentence": "x", "wor', '["x", "y"]', '{"sentence": "x"}', "null"])
def test_bad_candidate_line_names_file_and_line(tmp_path, line):
    f = tmp_path / "c.jsonl"
    f.write_text('{"sentence": "a b.", "word": "C"}\n\n' + line + "\n")
    expected = re.escape(f"{f}:3: expected a JSON object with sentence, word")
    with pytest.raises(UserError, match=expected):
        icl.read_candidates([f])


def test_missing_or_empty_candidate_file(tmp_path):
    with pytest.raises(UserError, match=r"cannot read .*nope.jsonl: No such file"):
        icl.read_candidates([tmp_path / "nope.jsonl"])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no candidates in"):
        icl.read_candidates([tmp_path / "empty.jsonl"])


# ---------------------------------------------------------------- the search
@functools.lru_cache(maxsize=None)
def word_vector(w):
    return np.random.default_rng(zlib.crc32(w.encode())).normal(size=32)


class BagOfWords:
    """A fake Embedder: the sum of seeded random word vectors (it tracks word overlap, hence the
    gold of the synthetic dev set) plus per-sentence noise as large as the demonstration's word
    says ("0.0" is the best; no demonstration is noisy). Counts the sentences it encodes."""
    encoded = 0

    def __init__(self, noise=4.0, demonstrations=()):
        self.noise = noise
        self.fingerprint = {"fake": "bow", "demonstrations": [list(d) for d in demonstrations]}

    def with_demonstrations(self, demos):
        noise = sum(float(w) for _, w in demos) / len(demos) if demos else 4.0
        return BagOfWords(noise, demos)

    def encode(self, sentences):
        BagOfWords.encoded += len(sentences)
        out = []
        for s in sentences:
            seed = zlib.crc32((s + json.dumps(self.fingerprint)).encode())
            rng = np.random.default_rng(seed)
            out.append(sum(word_vector(w) for w in s.split()) + self.noise * rng.normal(size=32))
        return np.array(out, np.float32)


@pytest.fixture(scope="module")
def dev_data(tmp_path_factory):
    """A data folder whose STS-B dev has 600 synthetic pairs: a sentence of 8 words and a copy with
    some replaced, gold = 5 x the share kept."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    (root / "sts" / "stsb").mkdir(parents=True)
    vocab = [f"w{i}" for i in range(60)]
    rows = []
    for i in range(600):
        a = list(rng.choice(vocab, 8))
        keep = rng.integers(0, 9)
        b = a[:keep] + list(rng.choice(vocab, 8 - keep))
        gold = 5 * keep / 8
        rows.append(f"synthetic\tnone\t2024\t{i:04d}\t{gold:.3f}\t{' '.join(a)}\t{' '.join(b)}")
    (root / "sts" / "stsb" / "sts-dev.csv").write_text("\n".join(rows) + "\n")
    return root


def fake_candidates(n=27, step=0.5):
    levels = np.random.default_rng(3).permutation(n) * step   # noise 0.0, 0.5, ... shuffled
    return [{"sentence": f"candidate {i}", "word": f"{x:.1f}", "source": "fake"}
            for i, x in enumerate(levels)]


def test_schedule_shrinks_candidates_and_grows_pairs_to_the_full_set():
    assert icl.schedule(300, 1500, 100, 3) == [(300, 100), (100, 300), (34, 900), (12, 1500)]
    assert icl.schedule(300, 1500, 100, 3, rounds=2) == [(300, 100), (100, 1500)]
    assert icl.schedule(300, 1500, 100, 3, rounds=1) == [(300, 1500)]          # brute force
    with pytest.raises(UserError, match=r"^--eta 1: must be above 1$"):
        icl.schedule(300, 1500, 100, 1)
    with pytest.raises(UserError, match=r"^--start-pairs 1: must be at least 2$"):
        icl.schedule(300, 1500, 1, 3)
    with pytest.raises(UserError, match=r"^--rounds 0: must be at least 1$"):
        icl.schedule(300, 1500, 100, 3, rounds=0)


def test_successive_halving_finds_the_papers_winner_with_fewer_encodings(dev_data):
    cands = fake_candidates()
    dev = icl.ev.load_stsb(dev_data, "dev")
    order = np.random.default_rng(0).permutation(len(dev.gold))
    BagOfWords.encoded = 0
    paper = icl.Scorer(BagOfWords(), dev_data, disk=False)
    brute = icl.paper_search(lambda c: paper(c, sorted(order[:450])), cands)   # all on every pair
    brute_cost = BagOfWords.encoded
    BagOfWords.encoded = 0
    plan = icl.schedule(len(cands), 450, 50, 3)
    score = icl.Scorer(BagOfWords(), dev_data, disk=False)
    ranked, rounds = icl.successive_halving(cands, score, order, plan, score.drop)
    # Every sentence is encoded once per demonstration: later rounds reuse earlier vectors.
    assert BagOfWords.encoded == score.n_encoded == icl.planned_encodings(plan, dev, order)
    assert brute_cost == 27 * icl.unique_sentences(dev, order[:450])
    assert BagOfWords.encoded < 0.4 * brute_cost
    assert ranked[0]["word"] == brute[0]["word"] == "0.0"
    assert ranked[0]["spearman"] == brute[0]["spearman"]
    assert [r["candidates"] for r in rounds] == [27, 9, 3]
    assert [r["pairs"] for r in rounds] == [50, 150, 450]
    assert [c["pairs"] for c in ranked] == [450] * 3 + [150] * 6 + [50] * 18
    one_round = icl.successive_halving(cands, score, order, [(27, 450)])[0]
    assert one_round[0]["spearman"] == brute[0]["spearman"]


def test_search_reports_baseline_k_and_reuses_the_disk_cache(dev_data, tmp_path):
    cands = fake_candidates(9, step=2.0)
    setting = dict(start_pairs=40, eta=3, dev_pairs=120, cache_dir=tmp_path)
    first = icl.search(BagOfWords(), cands, dev_data, **setting)
    assert first["winner"]["word"] == "0.0"
    assert first["winner"]["spearman"] > first["no_demonstration"]
    assert [m["k"] for m in first["k_greater_than_1"]] == [2, 3]
    best = next(c for c in cands if c["word"] == "0.0")
    two = first["k_greater_than_1"][0]["demonstrations"]
    assert two[-1] == [best["sentence"], "0.0"]   # the best sits last, next to the input
    e = first["encodings"]
    assert e["spent_this_run"] == e["needed"] + 3 * first["dev_sentences"]
    assert e["needed"] < e["brute_force"]
    again = icl.search(BagOfWords(), cands, dev_data, **setting)
    assert again["encodings"]["spent_this_run"] == 0 and again["ranked"] == first["ranked"]


def test_search_cli_on_a_tiny_model(tiny_llama, tmp_path, capsys):
    args = ["search", "--model", tiny_llama, "--data-dir", str(MINI), "--dev-pairs", "12",
            "--start-pairs", "6", "--eta", "2", "--max-k", "2", "--cache-dir", str(tmp_path),
            "--device", "cpu", "--dtype", "float32"]
    rc, err = run(args + ["--output", str(tmp_path / "r.json")], capsys)
    assert rc == 0 and "11 candidates; rounds (candidates x pairs): 11 x 6, 6 x 12" in err
    r = json.loads((tmp_path / "r.json").read_text())
    assert len(r["ranked"]) == 11 and r["encoder"]["demonstrations"] == []
    assert r["encoder"]["max_tokens"] is None and r["encoder"]["dtype"] == "torch.float32"
    # The paper's candidates, from the data folder:
    assert r["candidates"] == [str(MINI / "icl" / "icl_examples.txt")]
    rc, err = run(args + ["--write-default"], capsys)   # a smoke run never becomes a default
    assert rc == 1
    assert err == "sentemb: error: --write-default needs the full dev set: drop --dev-pairs\n"


def test_shared_flags_reach_the_embedder(monkeypatch, capsys, tmp_path):
    seen = {}

    def embedder(model, **kwargs):
        seen.update(kwargs, model=model)
        return BagOfWords()

    def search(*args, **kwargs):   # the flags are all this test is about
        winner = {"sentence": "A b.", "word": "C", "source": "paper", "spearman": 0.5}
        return {"winner": winner, "no_demonstration": 0.4, "k_greater_than_1": []}

    monkeypatch.setattr(E, "Embedder", embedder)
    monkeypatch.setattr(icl, "search", search)
    argv = ["search", "--data-dir", str(MINI), "--model", "m", "--adapter", "runs/cse/final",
            "--bits", "4", "--dtype", "float32", "--max-tokens", "9", "--batch-size", "3",
            "--device", "cpu"]
    rc, err = run(argv + ["--output", str(tmp_path / "r.json")], capsys)
    assert rc == 0, err
    assert seen["model"] == "m" and seen["adapter"] == "runs/cse/final" and seen["bits"] == 4
    assert seen["dtype"] == "float32" and seen["max_tokens"] == 9 and seen["batch_size"] == 3
    assert seen["template"] == "eol" and seen["pooling"] == "last"
    assert json.loads((tmp_path / "r.json").read_text())["model"] == "m + runs/cse/final"
    rc, err = run(argv + ["--write-default"], capsys)
    assert rc == 1 and err.startswith("sentemb: error: --write-default stores the model's default")


@pytest.mark.parametrize("flag, value", [("--batch-size", 0), ("--max-tokens", 0),
                                         ("--dev-pairs", 0), ("--max-k", 0)])
def test_counts_below_one_are_named_by_their_flag(flag, value, capsys, monkeypatch):
    monkeypatch.setattr(icl, "load_embedder", None)
    rc, err = run(["search", "--data-dir", str(MINI), "--dry-run", flag, str(value)], capsys)
    assert rc == 1 and err == f"sentemb: error: {flag} {value}: must be at least 1\n"


def test_dry_run_prints_the_default_plan_and_loads_no_model(capsys, monkeypatch):
    monkeypatch.setattr(icl, "load_embedder", None)
    rc, err = run(["search", "--data-dir", str(MINI), "--dry-run"], capsys)
    assert rc == 0 and err.startswith("11 candidates; rounds (candidates x pairs): 11 x 24;")


def test_ctrl_c_is_one_line_saying_what_was_kept_and_exits_130(capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(icl, "search", interrupted)
    rc, err = run(["search", "--data-dir", str(MINI), "--dry-run"], capsys)
    assert rc == 130 and err == f"sentemb: interrupted; {icl.KEPT}\n"


@pytest.mark.parametrize("command", [["search"], ["candidates", "--source", "self"]])
def test_output_is_checked_before_any_work(command, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(icl, "load_embedder", None)   # no model is loaded, no search runs
    monkeypatch.setattr(icl, "search", None)
    missing = tmp_path / "no" / "r.json"
    rc, err = run(command + ["--data-dir", str(MINI), "--output", str(missing)], capsys)
    assert rc == 1 and err == f"sentemb: error: --output {missing}: its folder does not exist\n"
    assert not (tmp_path / "no").exists()


def test_bad_device_and_missing_data_are_one_line(tmp_path, capsys):
    rc, err = run(["search", "--data-dir", str(MINI), "--device", "tpu"], capsys)
    assert rc == 1 and err.startswith("sentemb: error: --device 'tpu'") and err.count("\n") == 1
    argv = ["candidates", "--source", "wordnet", "--data-dir", str(tmp_path), "--output", "x.jsonl"]
    rc, err = run(argv, capsys)
    assert rc == 1 and err.count("\n") == 1
    assert err.startswith(f"sentemb: error: no data in {tmp_path} (no dict/ folder there): ")


@pytest.mark.parametrize("command", ["candidates", "search"])
def test_every_help_has_a_description_and_the_shared_flags(command, capsys):
    with pytest.raises(SystemExit):
        icl.main([command, "--help"])
    out = capsys.readouterr().out
    assert out.split("\n\n")[1].strip() and "--output" in out and "--batch-size BATCH_SIZE" in out
    assert "sentences per forward pass" in out
    for flag in ["--data-dir", "--adapter", "--bits", "--dtype", "--max-tokens", "--device"]:
        assert f"\n  {flag} " in out


# ---------------------------------------------------------------- self-labelling
def fp32(path, demonstrations=()):
    return E.Embedder(path, demonstrations=list(demonstrations), dtype=torch.float32)


def scripted(e, monkeypatch, text, *more):
    """Make the model 'say' text token by token (row r of a batch: the r-th text, if more are
    given); returns the first script and the list of decoding steps taken."""
    scripts = [t if isinstance(t, list) else e.tok.encode(t, bos=False) for t in (text, *more)]
    steps = []

    def lm_logits(h):
        logits = torch.full((h.shape[0], e.model.config.vocab_size), -1e9)
        for r in range(h.shape[0]):
            script = scripts[r % len(scripts)]
            logits[r, script[min(len(steps), len(script) - 1)]] = 0
        steps.append(1)
        return logits
    monkeypatch.setattr(e.model, "lm_logits", lm_logits)
    return scripts[0], steps


@pytest.mark.parametrize("text, word", [('Sunny" and then many more words follow', "Sunny"),
                                        ('Sunny day" and more', None), ('Sunny\n" and more', None),
                                        ("no quote at all in this long reply", None)])
def test_self_labelling_stops_at_the_closing_quote(tiny_llama, monkeypatch, text, word):
    e = fp32(tiny_llama)
    script, steps = scripted(e, monkeypatch, text)
    assert icl.label_words(e, ["A man plays a guitar."], max_new_tokens=6) == [word]
    ends = [i + 1 for i in range(len(script)) if re.search('["\n]', e.tok.decode(script[:i + 1]))]
    end = ends[0] if ends else None
    assert len(steps) == (end if end and end <= 6 else 6)


def test_a_reply_over_before_its_quote_has_no_word_while_the_batch_runs_on(tiny_llama, monkeypatch):
    e = fp32(tiny_llama)
    eos = e.tok.encode("Su", bos=False) + [e.tok.eos_id] + e.tok.encode('" x', bos=False)
    scripted(e, monkeypatch, 'Sun\n" x', 'Sunny" x', eos)
    assert icl.label_words(e, ["A b.", "C d.", "E f."]) == [None, "Sunny", None]


def test_batched_greedy_decoding_equals_one_sentence_at_a_time(tiny_llama, monkeypatch):
    e = fp32(tiny_llama, [("A jockey riding a horse.", "Equestrian")])
    real = e.model.lm_logits
    seen = []

    def lm_logits(h):
        logits = real(h)
        seen.append(logits.argmax(-1))
        return logits

    monkeypatch.setattr(e.model, "lm_logits", lm_logits)
    sentences = ["Two dogs run.", "A man is playing a large flute on the stage tonight.", "Rain."]
    icl.label_words(e, sentences, max_new_tokens=4)
    batched = torch.stack(seen, 1)                                   # (B, steps): left padded
    for row, s in zip(batched, sentences, strict=True):
        seen.clear()
        icl.label_words(e, [s], max_new_tokens=4)
        assert row[:len(seen)].tolist() == torch.cat(seen).tolist()


def test_self_candidates_label_cased_train_sentences(tiny_llama, monkeypatch):
    e = fp32(tiny_llama)
    got = []
    for seed in (0, 0, 1):
        scripted(e, monkeypatch, 'Sunny" more')
        got.append(icl.self_candidates(e, MINI, n=5, seed=seed))
    train = (MINI / "sts_raw" / "stsb" / "sts-train.csv").read_text()
    assert len(got[0]) == 5
    assert all(d["word"] == "Sunny" and d["source"] == "self" and d["sentence"] in train
               for d in got[0])
    assert got[0] == got[1] != got[2]


# ---------------------------------------------------------------- defaults
def test_written_default_is_what_embed_uses(tmp_path, monkeypatch):
    f = tmp_path / "demonstrations.json"
    f.write_text(E.DEFAULTS_FILE.read_text())
    before = {k: v for k, v in json.loads(f.read_text()).items() if k != "smollm2-135m"}
    icl.write_default("smollm2-135m", {"sentence": "A.", "word": "B"}, f)
    entry = {"sentence": "A cat naps.", "word": "Sleep", "dev_spearman": 0.5}
    icl.write_default("smollm2-135m", entry, f)
    table = json.loads(f.read_text())
    assert list(table) == list(before) + ["smollm2-135m"]
    assert {k: table[k] for k in before} == before
    assert len(f.read_text().splitlines()) == len(table) + 2   # one line per alias
    monkeypatch.setattr(E, "DEFAULTS_FILE", f)
    assert E.default_demonstrations("smollm2-135m") == [("A cat naps.", "Sleep")]


def test_search_write_default_stores_the_full_dev_winner(dev_data, tmp_path, monkeypatch, capsys):
    f = tmp_path / "demonstrations.json"
    f.write_text(E.DEFAULTS_FILE.read_text())
    monkeypatch.setattr(icl, "DEFAULTS_FILE", f)
    monkeypatch.setattr(E, "DEFAULTS_FILE", f)
    monkeypatch.setattr(E, "Embedder", lambda *a, **k: BagOfWords())
    cands = write_jsonl(tmp_path / "c.jsonl", fake_candidates(3, step=2.0))
    argv = ["search", "--model", "smollm2-135m", "--candidates", str(cands),
            "--data-dir", str(dev_data), "--start-pairs", "200", "--max-k", "1",
            "--cache-dir", str(tmp_path), "--output", str(tmp_path / "r.json"), "--write-default"]
    rc, err = run(argv, capsys)
    assert rc == 0, err
    entry = json.loads(f.read_text())["smollm2-135m"]
    r = json.loads((tmp_path / "r.json").read_text())
    assert (entry["word"], entry["source"]) == ("0.0", "fake")
    assert entry["dev_spearman"] == round(r["winner"]["spearman"], 4)
    assert r["winner"]["pairs"] == r["dev_pairs"] == 600
    assert entry["candidates"] == {"fake": 3} and entry["date"]
    assert E.default_demonstrations("smollm2-135m") == [(r["winner"]["sentence"], "0.0")]
