"""evaluate.py: loaders on the fixtures and against the official counts, STS scoring with known answers, the
aggregation against scipy, the embedding cache, the transfer protocol, bad input, several models and the plot;
data/download.py's plan and its offline failure."""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
from conftest import FIXTURES
from scipy.stats import pearsonr, spearmanr

from support import cli as common
from support import provenance
from support.cache import CachedEncoder, fingerprint_key
import evaluate as ev

FIX = FIXTURES / "data"  # a few pairs of every STS file, in the real layout (tests/fixtures/data)


class GoldEncoder:
    """Encodes sentence "a<i>" as [1, 0] and "b<i>" at an angle that shrinks as gold[i]
    grows, so cosine(a_i, b_i) is a monotone function of the gold score."""

    def __init__(self, gold, fingerprint=None):
        self.gold, self.calls, self.seen = np.asarray(gold, float), 0, []
        if fingerprint is not None:
            self.fingerprint = fingerprint

    def encode(self, sentences):
        self.calls += 1
        self.seen += list(sentences)
        out = []
        for s in sentences:
            angle = (1 - self.gold[int(s[1:])] / 5) * np.pi / 2
            out.append([1.0, 0.0] if s[0] == "a" else [np.cos(angle), np.sin(angle)])
        return np.array(out, np.float32)


def toy_pairs(gold):
    return ev.Pairs([f"a{i}" for i in range(len(gold))], [f"b{i}" for i in range(len(gold))], np.asarray(gold))


# ---------------------------------------------------------------- STS scoring
def test_gold_encoder_gives_spearman_one_and_shuffled_about_zero():
    gold = np.random.default_rng(0).uniform(0, 5, 2000)
    pairs = toy_pairs(gold)
    emb = ev.embed_all(GoldEncoder(gold), pairs.a + pairs.b, progress=False)
    assert ev.score_sts({"x": pairs}, emb)["score"] == pytest.approx(1.0)
    shuffled = np.random.default_rng(1).permutation(gold)
    emb = ev.embed_all(GoldEncoder(shuffled), pairs.a + pairs.b, progress=False)
    assert abs(ev.score_sts({"x": pairs}, emb)["score"]) < 0.08


def test_aggregation_matches_scipy():
    rng = np.random.default_rng(0)
    parts = {}
    for k, n in (("s1", 50), ("s2", 120), ("s3", 7)):
        gold = rng.uniform(0, 5, n)
        parts[k] = (gold + rng.normal(0, 1 + n / 50, n), gold)  # different noise per subset
    out = ev.aggregate(parts)
    sys_all = np.concatenate([s for s, _ in parts.values()])
    gold_all = np.concatenate([g for _, g in parts.values()])
    for name, corr in (("spearman", spearmanr), ("pearson", pearsonr)):
        per = [corr(s, g)[0] for s, g in parts.values()]
        assert out[name]["all"] == pytest.approx(corr(sys_all, gold_all)[0])
        assert out[name]["mean"] == pytest.approx(np.mean(per))
        assert out[name]["wmean"] == pytest.approx(np.average(per, weights=[50, 120, 7]))
        assert [out["subsets"][k][name] for k in parts] == pytest.approx(per)
    assert out["n"] == 177 and out["spearman"]["all"] != pytest.approx(out["spearman"]["mean"])


def test_cosine_of_zero_vector_is_zero_like_senteval():
    assert ev.cosine([[0, 0], [1, 0]], [[1, 1], [2, 0]]).tolist() == [0.0, 1.0]


def test_stsb_dev_reads_tab_separated_rows_with_quotes(tmp_path):
    (tmp_path / "sts" / "stsb").mkdir(parents=True)
    gold = [0.5, 4.0, 2.5, 1.0]
    rows = [f'main-news\tfile\t2012\t{i}\t{g}\ta{i}\tb{i}' for i, g in enumerate(gold)]
    rows.append('main-news\tfile\t2012\t9\t3.0\ta"4\tb" 4')  # unbalanced quotes: TAB split only
    (tmp_path / "sts" / "stsb" / "sts-dev.csv").write_text("\n".join(rows) + "\n")
    pairs = ev.load_stsb(tmp_path, "dev")
    assert pairs.a[-1] == 'a"4' and pairs.b[-1] == 'b" 4' and len(pairs.gold) == 5
    enc = GoldEncoder(gold + [3.0])
    enc.encode = lambda s, f=enc.encode: f([x.replace('"', "").replace(" ", "") for x in s])
    assert ev.stsb_dev(enc, tmp_path) == pytest.approx(1.0)
    assert ev.stsb_dev(enc, tmp_path, indices=[0, 2, 4]) == pytest.approx(1.0)


# ---------------------------------------------------------------- real data
COUNTS = {"sts12": 3108, "sts13": 1500, "sts14": 3750, "sts15": 3000, "sts16": 1186}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_sts_years_parse_to_official_counts(name, data_root):
    subsets = ev.load_sts_year(data_root, name)
    assert list(subsets) == ev.STS_SUBSETS[name]
    assert sum(len(p.gold) for p in subsets.values()) == COUNTS[name]
    for p in subsets.values():
        assert len(p.a) == len(p.b) == len(p.gold) and ((p.gold >= 0) & (p.gold <= 5)).all()


def test_sts15_16_unscored_pairs_are_skipped(data_root):
    assert len(ev.load_sts_year(data_root, "sts15")["answers-forums"].gold) == 375  # of 2000 lines


def test_fixture_data_loads_like_the_real_layout():
    loaded = {n: ev.load_task(n, FIX) for n in ev.STS + ["stsb-dev"]}
    assert len(loaded["sts15"]["answers-forums"].gold) == 3  # 4 lines, one unscored
    assert sum(len(p.gold) for p in loaded["sts12"].values()) == 15 and len(loaded["sickr"]["test"].gold) == 8
    sick = loaded["sickr"]["test"]  # CRLF line ends, header skipped
    assert not any("\r" in s for s in sick.a + sick.b) and ((sick.gold >= 1) & (sick.gold <= 5)).all()


@pytest.mark.parametrize("loader,splits", [
    (ev.load_stsb, {"train": 5749, "dev": 1500, "test": 1379}),
    (ev.load_sick, {"train": 4500, "trial": 500, "test": 4927}),
    (ev.load_sst2, {"train": 67349, "dev": 872, "test": 1821}),
    (ev.load_trec, {"train": 5452, "test": 500}),
    (ev.load_mrpc, {"train": 4076, "test": 1725}),
])
def test_split_files_parse_to_official_counts(loader, splits, data_root):
    for split, n in splits.items():
        d = loader(data_root, split)
        labels = d.gold if isinstance(d, ev.Pairs) else d.y
        assert len(labels) == n
        texts = (d.a + d.b) if isinstance(d, ev.Pairs) else d.x
        assert not any("\r" in s or "\ufeff" in s or s != s.strip() for s in texts)


@pytest.mark.parametrize("name,n,blank", [("mr", 10662, 0), ("cr", 3775, 4), ("subj", 10000, 0), ("mpqa", 10606, 3)])
def test_binary_tasks_parse_to_official_counts_keeping_blank_lines(name, n, blank, data_root):
    d = ev.load_binary(data_root, name)
    assert len(d.x) == len(d.y) == n and d.x.count("") == blank and set(d.y.tolist()) == {0, 1}


def test_quirks_trec_latin1_mrpc_bom(data_root):
    trec = ev.load_trec(data_root, "train")
    assert any("\u00f0" in s for s in trec.x) and sorted(set(trec.y.tolist())) == list(range(6))
    assert set(ev.load_mrpc(data_root, "train").gold.tolist()) == {0, 1}


def test_every_task_loads_and_the_sts_suite_has_about_37k_sentences(data_root):
    loaded = {n: ev.load_task(n, data_root) for n in ev.parse_tasks("all,stsb-dev")}
    sts = [s for n in ev.STS for d in loaded[n].values() for s in d.a + d.b]
    assert len(sts) == 2 * (3108 + 1500 + 3750 + 3000 + 1186 + 1379 + 4927)


# ---------------------------------------------------------------- cache
def test_cache_returns_identical_vectors_and_skips_encoded_sentences(tmp_path):
    gold = np.random.default_rng(0).uniform(0, 5, 10)
    enc = GoldEncoder(gold, fingerprint={"model": "toy", "demonstrations": [["s", "w"]]})
    first = CachedEncoder(enc, cache_dir=tmp_path, chunk_size=3)
    v1 = first.encode(["a1", "b2", "a1", "b3"])
    assert first.n_encoded == 3 and sorted(enc.seen) == ["a1", "b2", "b3"]
    again = CachedEncoder(enc, cache_dir=tmp_path)  # a new run reads the store
    enc.seen = []
    v2 = again.encode(["b3", "a1", "b2", "b4"])
    assert enc.seen == ["b4"] and again.n_encoded == 1
    assert np.array_equal(v2[:3], v1[[3, 0, 1]]) and v2.dtype == np.float32
    folder = tmp_path / "embeddings" / fingerprint_key(enc.fingerprint)
    assert json.loads((folder / "fingerprint.json").read_text())["fingerprint"] == enc.fingerprint
    other = GoldEncoder(gold, fingerprint={"model": "toy", "demonstrations": []})
    assert CachedEncoder(other, cache_dir=tmp_path).vectors == {}


def test_cache_survives_a_record_cut_short(tmp_path):
    enc = GoldEncoder([1.0, 2.0, 3.0], fingerprint={"model": "toy"})
    CachedEncoder(enc, cache_dir=tmp_path).encode(["a0", "b1"])
    store = next((tmp_path / "embeddings").iterdir()) / "vectors.bin"
    with open(store, "ab") as f:
        f.write(b"\x01" * 17)  # an interrupted append
    cached = CachedEncoder(enc, cache_dir=tmp_path)
    assert len(cached.vectors) == 2
    cached.encode(["b2"])
    assert store.stat().st_size == 3 * (32 + 4 * 2)
    assert np.array_equal(CachedEncoder(enc, cache_dir=tmp_path).encode(["b2", "a0"]), enc.encode(["b2", "a0"]))


def test_encoder_without_fingerprint_is_not_cached_on_disk(tmp_path):
    enc = GoldEncoder([1.0, 2.0])
    cached = CachedEncoder(enc, cache_dir=tmp_path)
    cached.encode(["a0", "b1"])
    cached.encode(["a0"])  # remembered in memory
    assert cached.dir is None and enc.calls == 1 and not any(tmp_path.iterdir())


# ---------------------------------------------------------------- transfer
def blobs(n, d=8, seed=0, margin=4.0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(n, d)).astype(np.float32) * 10 + 100  # badly scaled, like LLM states
    x[:, 0] += margin * 10 * (2 * y - 1)
    return x, y


def test_transfer_protocols_are_deterministic_and_learn_a_separable_task():
    x, y = blobs(80)
    r1 = ev.inner_kfold(x, y, k=2)
    assert r1 == ev.inner_kfold(x, y, k=2) and r1["acc"] == 1.0 and r1["n"] == 80
    assert len(r1["C"]) == 2 and set(r1["C"]) <= set(ev.REGS)   # the C each outer fold chose
    xt, yt = blobs(40, seed=1)
    k1 = ev.probe(x, y, xt, yt, k=2)
    assert k1["acc"] == 1.0 and k1["f1"] == 1.0 and k1["C"] in ev.REGS
    s = ev.probe(x, y, xt, yt, dev=blobs(40, seed=2))
    assert s["acc"] == 1.0 and s["C"] in ev.REGS and "f1" not in s


def test_transfer_on_noise_is_near_chance():
    x, y = blobs(200, margin=0.0)
    assert 0.3 < ev.inner_kfold(x, y, k=2)["acc"] < 0.7


def test_c_selection_breaks_ties_towards_the_smallest_c_like_senteval(monkeypatch):
    y = np.zeros(100_000, int)
    hits = [50_000, 50_001, 40_000] + [0] * (len(ev.REGS) - 3)  # dev accuracies 0.5, 0.50001 (equal at 0.01 %), 0.4
    monkeypatch.setattr(ev, "_predict_path", lambda *a: [np.where(np.arange(len(y)) < h, 0, 1) for h in hits])
    assert ev._choose_c(None, None, (None, y), k=2, seed=0) == (ev.REGS[0], 0.5)


def test_mrpc_features_are_u_v_absdiff_product_in_senteval_order():
    u, v = np.array([[1.0, -2.0]]), np.array([[3.0, 0.5]])
    assert ev.pair_features(u, v).tolist() == [[1.0, -2.0, 3.0, 0.5, 2.0, 2.5, 3.0, -1.0]]
    # A paraphrase is a pair with equal vectors: learnable from |u - v|.
    pairs = {"train": ev.Pairs(["x y", "x y", "z", "q"] * 10, ["x y", "z", "z", "x y"] * 10,
                               np.array([1, 0, 1, 0] * 10)),
             "test": ev.Pairs(["z", "x y"], ["z", "q"], np.array([1, 0]))}
    table = {"x y": [1.0, 0.0], "z": [0.0, 1.0], "q": [0.5, 0.5]}
    out = ev.score_transfer("mrpc", pairs, lambda s: np.array([table[t] for t in s], np.float32), kfold=2)
    assert out["acc"] == 1.0 and out["score"] == 1.0 and out["ntrain"] == 40
    assert ev._senteval_order(["a b", "a", "b"], label=[0, 1, 0]) == [2, 1, 0]


# ---------------------------------------------------------------- errors and the CLI
def test_bad_inputs_give_exact_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"^unknown task 'foo': choose sts, transfer, all, stsb-dev or names from sts12,"):
        ev.parse_tasks("sts,foo")
    with pytest.raises(ValueError, match=r"^no task given$"):
        ev.parse_tasks(" , ")
    with pytest.raises(ValueError, match=rf"^no evaluation data in {tmp_path} \(no sts/ folder there\): "
                                         r"run `python data/download.py` or pass --data-dir$"):
        common.data_dir(tmp_path)
    monkeypatch.setenv("SENTEMB_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="nowhere"):
        common.data_dir()
    (tmp_path / "sts").mkdir()
    with pytest.raises(ev.UserError, match=r"^missing data file .*sts-test.csv: run `python data/download.py`"):
        ev.load_task("stsb", tmp_path)
    (tmp_path / "sts" / "stsb").mkdir()
    (tmp_path / "sts" / "stsb" / "sts-test.csv").write_text("g\tf\t2012\t0\tfive\ta\tb\n")
    with pytest.raises(ev.UserError, match=r"^malformed STS-B data under .*: could not convert string to float: 'five'$"):
        ev.load_task("stsb", tmp_path)
    assert ev.parse_tasks("STS12,sts,stsb-dev") == ev.STS + ["stsb-dev"]


class HashEncoder:
    """Deterministic pseudo-random vectors per sentence, with a fingerprint (so disk-cached)."""
    fingerprint = {"model": "toy-hash", "demonstrations": []}

    def encode(self, sentences):
        seeds = [int.from_bytes(s.encode()[:8].ljust(8, b"\0"), "little") + len(s) for s in sentences]
        return np.array([np.random.default_rng(k).normal(size=8) for k in seeds], np.float32)


def run(argv, capsys):
    rc = common.cli(ev.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_user_errors_are_one_line_and_exit_1(tmp_path, capsys):
    rc, _, err = run(["--tasks", "nope"], capsys)
    assert rc == 1 and err.count("\n") == 1 and err.startswith("sentemb: error: unknown task 'nope'")
    assert "no evaluation data in" in run(["--data-dir", tmp_path, "--output", tmp_path / "r.json"], capsys)[2]
    err = run(["--tasks", "stsb,sickr", "--plot", tmp_path / "p.png", "--output", tmp_path / "r.json"], capsys)[2]
    assert err == "sentemb: error: --plot draws the average of the seven STS tasks: run it with --tasks sts or all\n"
    assert run(["--device", "bogus", "--output", tmp_path / "r.json"], capsys)[2] == (
        "sentemb: error: --device 'bogus': not a device; use cpu, cuda or cuda:N\n")


def test_output_and_plot_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ev, "load_task", lambda *a: pytest.fail("data read before the output was checked"))
    base = ["--data-dir", FIX, "--tasks", "sts"]
    assert run([*base, "--output", tmp_path], capsys)[2] == f"sentemb: error: --output {tmp_path}: is a directory\n"
    missing = tmp_path / "new" / "r.json"
    err = run([*base, "--output", missing], capsys)[2]
    assert err == f"sentemb: error: --output {missing}: its folder does not exist\n"
    assert not missing.parent.exists()  # never created silently
    if os.path.isdir("/proc/self"):  # unwritable even for root
        err = run([*base, "--output", "/proc/self/r.json"], capsys)[2]
        assert err.startswith("sentemb: error: --output /proc/self/r.json: cannot write there (") and err.count("\n") == 1
    err = run([*base, "--output", tmp_path / "r.json", "--plot", missing], capsys)[2]
    assert err == f"sentemb: error: --plot {missing}: its folder does not exist\n"
    assert list(tmp_path.iterdir()) == []  # the probe of a writable --output leaves nothing behind


def test_default_output_goes_to_runs_which_is_created(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ev, "REPO", tmp_path)
    monkeypatch.setattr(ev, "build_encoder", lambda args, model: (HashEncoder(), 10))
    monkeypatch.setenv("SENTEMB_CACHE", str(tmp_path / "cache"))
    rc, out, _ = run(["--data-dir", FIX, "--tasks", "stsb-dev"], capsys)
    written = list((tmp_path / "runs").glob("eval-*.json"))
    assert rc == 0 and len(written) == 1 and f"wrote {written[0]}" in out
    assert "creates runs/ if missing" in ev.parser().format_help()


def test_device_max_tokens_and_batch_size_reach_the_embedder(monkeypatch):
    import torch

    import embed
    seen = {}

    class Recorder:
        def __init__(self, **kwargs):
            seen.update(kwargs)
            self.model = torch.nn.Linear(3, 2)  # 8 parameters

    monkeypatch.setattr(embed, "Embedder", Recorder)
    args = ev.parser().parse_args(["--device", "cpu", "--max-tokens", "16", "--batch-size", "8"])
    assert ev.build_encoder(args, "some-model")[1] == 8
    assert seen == {"model": "some-model", "max_tokens": 16, "batch_size": 8, "device": torch.device("cpu")}
    seen.clear()
    ev.build_encoder(ev.parser().parse_args(["--demonstration", "none"]), None)
    assert seen["demonstrations"] == [] and "max_tokens" not in seen  # no cut unless asked, as the paper
    assert "sentences per forward pass" in ev.parser().format_help()


def test_ctrl_c_says_what_was_cached(tmp_path, capsys, monkeypatch):
    class Interrupted(HashEncoder):
        def encode(self, sentences):
            raise KeyboardInterrupt

    monkeypatch.setattr(ev, "build_encoder", lambda args, model: (Interrupted(), 10))
    monkeypatch.setenv("SENTEMB_CACHE", str(tmp_path / "cache"))
    kept = []
    with pytest.raises(KeyboardInterrupt):  # __main__ prints kept[-1] as common.cli's "interrupted; ..." line
        ev.main(["--data-dir", str(FIX), "--tasks", "stsb-dev", "--output", str(tmp_path / "r.json")], kept)
    assert kept[-1] == (f"the embeddings computed so far are cached in {tmp_path / 'cache' / 'embeddings'}; "
                        "a rerun reuses them")
    assert not (tmp_path / "r.json").exists()


def test_cli_end_to_end_on_the_fixtures_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importing it would fail: only --plot may
    monkeypatch.setattr(ev, "build_encoder", lambda args, model: (HashEncoder(), 10))
    monkeypatch.setattr(provenance, "git_commit", lambda: "0" * 40)
    monkeypatch.setenv("SENTEMB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "r.json"
    rc, text, _ = run(["--data-dir", FIX, "--tasks", "sts,stsb-dev", "--output", out], capsys)
    assert rc == 0 and "toy-hash" in text and "   STS12   STS13" in text and "STS-B dev" in text
    rec = json.loads(out.read_text())
    assert rec["encoder"] == HashEncoder.fingerprint and rec["git_commit"] == "0" * 40 and rec["params"] == 10
    assert list(rec["summary_x100"]) == ["STS12", "STS13", "STS14", "STS15", "STS16", "STS-B", "SICK-R", "STS-B dev"]
    assert os.path.join("sts", "stsb", "sts-dev.csv") in rec["data_files"] and rec["sentences_encoded"] > 100
    assert run(["--data-dir", FIX, "--tasks", "sts,stsb-dev", "--output", out], capsys)[0] == 0
    assert json.loads(out.read_text())["sentences_encoded"] == 0  # all from the cache


def test_two_tiny_models_one_json_two_rows_and_the_scaling_plot(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from test_model import OPT_PRE, hf_model, save
    models = []
    for i, layers in enumerate((1, 2)):
        d = tmp_path / f"tiny{i}"
        save(hf_model(dict(OPT_PRE, num_hidden_layers=layers)), d)
        models.append(d)
    monkeypatch.setenv("SENTEMB_CACHE", str(tmp_path / "cache"))
    out, png = tmp_path / "r.json", tmp_path / "scaling.png"
    rc, text, err = run(["--data-dir", FIX, "--tasks", "sts", "--model", *models, "--output", out, "--plot", png,
                         "--device", "cpu"], capsys)
    assert rc == 0, err
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == [str(m) for m in models] and rows[0]["params"] < rows[1]["params"]
    assert all(len(r["summary_x100"]) == 7 for r in rows)
    table = text.split("STS, Spearman x100\n")[1].splitlines()
    assert table[0].endswith("SICK-R    Avg.") and [line.split()[0] for line in table[1:3]] == [str(m) for m in models]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tables_use_the_paper_layout():
    results = {**{n: {"score": 0.5} for n in ev.STS}, **{n: {"score": 0.8} for n in ev.TRANSFER[:2]}}
    text = ev.tables([("a", results), ("bb", results)])
    assert "     STS12   STS13   STS14   STS15   STS16   STS-B  SICK-R    Avg.\na    " in text
    assert "Transfer, accuracy\n        MR      CR\na    80.00   80.00\nbb   80.00   80.00" in text
    assert text.count("Avg.") == 1
    assert ev.tables([("a", {"stsb-dev": {"score": 0.7767}})]) == "STS-B dev\n  STS-B dev\na     77.67"  # fits its title


# ---------------------------------------------------------------- bench/st_baseline.py
@pytest.fixture
def st_baseline():
    spec = importlib.util.spec_from_file_location("st_baseline", ev.REPO / "bench" / "st_baseline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_st_baseline_writes_evaluates_record_layout_without_a_disk_cache(st_baseline, tmp_path, capsys, monkeypatch):
    class Plain(HashEncoder):
        fingerprint = None  # a peer baseline: nothing to key a disk cache on

    monkeypatch.setenv("SENTEMB_CACHE", str(tmp_path / "cache"))
    loaded = {n: ev.load_task(n, FIX) for n in ev.parse_tasks("sts,stsb-dev")}
    rec = st_baseline.baseline(Plain(), "st-dir", 22, loaded, FIX, tmp_path / "r.json", argv=["st-dir"])
    assert json.loads((tmp_path / "r.json").read_text()).keys() == rec.keys()
    assert rec["command"] == ["bench/st_baseline.py", "st-dir"]
    assert rec["encoder"] == {"sentence_transformers": "st-dir"} and rec["params"] == 22 and rec["cache"] is None
    assert list(rec["summary_x100"]) == ["STS12", "STS13", "STS14", "STS15", "STS16", "STS-B", "SICK-R", "STS-B dev"]
    assert "st-dir" in capsys.readouterr().out and not (tmp_path / "cache").exists()
    row = ev.evaluate("st-dir", 22, CachedEncoder(Plain(), disk=False), loaded)
    assert rec["summary_x100"] == row["summary_x100"]  # the same scorers as evaluate.py


def test_st_baseline_user_errors_are_one_line(st_baseline, tmp_path, capsys):
    assert common.cli(st_baseline.main, [str(tmp_path), "--output", str(tmp_path / "r.json")]) == 1
    err = capsys.readouterr().err
    assert err == f"sentemb: error: {tmp_path} is not a sentence-transformers model directory (no modules.json)\n"
    assert common.cli(st_baseline.main, [str(tmp_path), "--tasks", "nope", "--output", "r.json"]) == 1
    assert capsys.readouterr().err.startswith("sentemb: error: unknown task 'nope'")


# ---------------------------------------------------------------- data/download.py
@pytest.fixture
def dl():
    spec = importlib.util.spec_from_file_location("download", ev.REPO / "data" / "download.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_download_plans_only_missing_or_changed_files(dl, tmp_path, monkeypatch):
    import hashlib
    (tmp_path / "icl").mkdir()
    (tmp_path / "icl" / "good.txt").write_text("good")
    (tmp_path / "icl" / "bad.txt").write_text("changed")
    sha = {name: hashlib.sha256(name.encode()).hexdigest() for name in ("good", "bad", "new")}
    monkeypatch.setattr(dl, "SHA256", "\n".join(f"{sha[n]} icl/{n}.txt" for n in sha) + f"\n{sha['new']} sts/x.txt")
    assert dl.plan(tmp_path, ["icl"]) == [("icl/bad.txt", sha["bad"]), ("icl/new.txt", sha["new"])]


def test_download_offline_fails_in_one_line_and_writes_nothing(dl, tmp_path, capsys, monkeypatch):
    import urllib.error

    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(dl.urllib.request, "urlopen", offline)
    assert common.cli(dl.main, ["--dest", str(tmp_path / "d"), "--sets", "icl"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sentemb: error: cannot download https://raw.githubusercontent.com/kongds/scaling_sentemb/")
    assert err.count("\n") == 1 and "(no network): this needs internet access" in err
    assert not (tmp_path / "d").exists()


def test_download_list_says_where_everything_comes_from(dl, tmp_path, capsys):
    assert dl.main(["--dest", str(tmp_path), "--list"]) == 0
    out = capsys.readouterr().out
    assert "icl/icl_examples.txt  <-  https://raw.githubusercontent.com/kongds/scaling_sentemb/" in out
    assert "nli/nli_for_simcse.csv  <-  https://huggingface.co/" in out
    assert "dict/wordnet30_word_definitions.tsv.gz  not downloaded: icl.py candidates --source wordnet" in out
    assert len(out.splitlines()) == 162 + 1 + len(dl.NOT_DOWNLOADED)


def test_download_script_checksums_match_the_shared_data(dl, data_root):
    import hashlib
    rows = [line.split() for line in dl.SHA256.strip().splitlines()]
    assert len(rows) == 162 and {p.split("/")[0] for _, p in rows} == set(dl.SETS)
    for sha, path in rows:
        assert hashlib.sha256((data_root / path).read_bytes()).hexdigest() == sha, path
        url, member = dl.source(path)
        assert url.startswith("https://raw.githubusercontent.com/") and (member is None) == ("attribution" not in path)
    assert dl.plan(data_root, dl.SETS) == []
