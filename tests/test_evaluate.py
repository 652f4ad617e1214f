"""evaluate.py: loaders on the fixtures and against the official counts, STS scoring with known
answers, the aggregation against scipy, the transfer protocol, bad input, several models, labels."""
import json
import os
import sys

import numpy as np
import pytest
from conftest import FIXTURES
from scipy.stats import pearsonr, spearmanr

from support import cli as common
from support import provenance
import evaluate as ev

FIX = FIXTURES / "data"  # a few pairs of every STS file, in the real layout (tests/fixtures/data)


class GoldEncoder:
    """Encodes sentence "a<i>" as [1, 0] and "b<i>" at an angle that shrinks as gold[i]
    grows, so cosine(a_i, b_i) is a monotone function of the gold score."""

    def __init__(self, gold, fingerprint=None):
        self.gold = np.asarray(gold, float)
        self.calls = 0
        self.seen = []
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
    n = len(gold)
    return ev.Pairs([f"a{i}" for i in range(n)], [f"b{i}" for i in range(n)], np.asarray(gold))


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

    class Unquoted(GoldEncoder):   # 'a"4' is a4
        def encode(self, sentences):
            return super().encode([x.replace('"', "").replace(" ", "") for x in sentences])

    enc = Unquoted(gold + [3.0])
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
    assert sum(len(p.gold) for p in loaded["sts12"].values()) == 15
    sick = loaded["sickr"]["test"]  # CRLF line ends, header skipped
    assert len(sick.gold) == 8 and not any("\r" in s for s in sick.a + sick.b)
    assert ((sick.gold >= 1) & (sick.gold <= 5)).all()


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


@pytest.mark.parametrize("name,n,blank", [("mr", 10662, 0), ("cr", 3775, 4), ("subj", 10000, 0),
                                          ("mpqa", 10606, 3)])
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
    # Dev accuracies 0.5, 0.50001 (equal at 0.01 %), 0.4, then 0.
    hits = [50_000, 50_001, 40_000] + [0] * (len(ev.REGS) - 3)

    def predictions(*args):
        return [np.where(np.arange(len(y)) < h, 0, 1) for h in hits]

    monkeypatch.setattr(ev, "_predict_path", predictions)
    assert ev._choose_c(None, None, (None, y), k=2, seed=0) == (ev.REGS[0], 0.5)


def test_mrpc_features_are_u_v_absdiff_product_in_senteval_order():
    u, v = np.array([[1.0, -2.0]]), np.array([[3.0, 0.5]])
    assert ev.pair_features(u, v).tolist() == [[1.0, -2.0, 3.0, 0.5, 2.0, 2.5, 3.0, -1.0]]
    # A paraphrase is a pair with equal vectors: learnable from |u - v|.
    pairs = {"train": ev.Pairs(["x y", "x y", "z", "q"] * 10, ["x y", "z", "z", "x y"] * 10,
                               np.array([1, 0, 1, 0] * 10)),
             "test": ev.Pairs(["z", "x y"], ["z", "q"], np.array([1, 0]))}
    table = {"x y": [1.0, 0.0], "z": [0.0, 1.0], "q": [0.5, 0.5]}

    def emb(sentences):
        return np.array([table[t] for t in sentences], np.float32)

    out = ev.score_transfer("mrpc", pairs, emb, kfold=2)
    assert out["acc"] == 1.0 and out["score"] == 1.0 and out["ntrain"] == 40
    assert ev._senteval_order(["a b", "a", "b"], label=[0, 1, 0]) == [2, 1, 0]


# ---------------------------------------------------------------- errors and the CLI
def test_bad_inputs_give_exact_errors(tmp_path, monkeypatch):
    unknown = r"^unknown task 'foo': choose sts, transfer, all, stsb-dev or names from sts12,"
    with pytest.raises(ValueError, match=unknown):
        ev.parse_tasks("sts,foo")
    with pytest.raises(ValueError, match=r"^no task given$"):
        ev.parse_tasks(" , ")
    no_data = (rf"^no data in {tmp_path} \(no sts/ folder there\): "
               r"run `python data/download.py` or pass --data-dir$")
    with pytest.raises(ValueError, match=no_data):
        common.data_dir(tmp_path)
    monkeypatch.setenv("SENTEMB_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="nowhere"):
        common.data_dir()
    (tmp_path / "sts").mkdir()
    missing = r"^missing data file .*sts-test.csv: run `python data/download.py`"
    with pytest.raises(ev.UserError, match=missing):
        ev.load_task("stsb", tmp_path)
    (tmp_path / "sts" / "stsb").mkdir()
    (tmp_path / "sts" / "stsb" / "sts-test.csv").write_text("g\tf\t2012\t0\tfive\ta\tb\n")
    malformed = r"^malformed STS-B data under .*: could not convert string to float: 'five'$"
    with pytest.raises(ev.UserError, match=malformed):
        ev.load_task("stsb", tmp_path)
    assert ev.parse_tasks("STS12,sts,stsb-dev") == ev.STS + ["stsb-dev"]


class HashEncoder:
    """Deterministic pseudo-random vectors per sentence, with a fingerprint (so disk-cached)."""
    fingerprint = {"model": "toy-hash", "demonstrations": []}

    def encode(self, sentences):
        seeds = [int.from_bytes(s.encode()[:8].ljust(8, b"\0"), "little") + len(s)
                 for s in sentences]
        return np.array([np.random.default_rng(k).normal(size=8) for k in seeds], np.float32)


def hash_encoder(args, model):
    """Stands in for evaluate.build_encoder: no model loads."""
    return HashEncoder(), 10


def run(argv, capsys):
    rc = common.cli(ev.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_user_errors_are_one_line_and_exit_1(tmp_path, capsys):
    out = ["--output", tmp_path / "r.json"]
    rc, _, err = run(["--tasks", "nope"], capsys)
    assert rc == 1 and err.count("\n") == 1
    assert err.startswith("sentemb: error: unknown task 'nope'")
    err = run(["--data-dir", tmp_path, *out], capsys)[2]
    assert err.startswith(f"sentemb: error: no data in {tmp_path} (no sts/ folder there): ")
    assert run(["--device", "bogus", *out], capsys)[2] == (
        "sentemb: error: --device 'bogus': not a device; use cpu, cuda or cuda:N\n")
    for flag, value, least in [("--batch-size", 0, 1), ("--max-tokens", -3, 1), ("--kfold", 1, 2)]:
        rc, _, err = run([flag, value, *out], capsys)
        assert rc == 1 and err == f"sentemb: error: {flag} {value}: must be at least {least}\n"


def test_data_dir_is_a_flag_once():
    assert ev.parser().format_help().count("\n  --data-dir DATA_DIR") == 1


def test_output_is_checked_before_any_work(tmp_path, capsys, monkeypatch):
    def read(*args):
        pytest.fail("data read before the output was checked")

    monkeypatch.setattr(ev, "load_task", read)
    base = ["--data-dir", FIX, "--tasks", "sts"]
    err = run([*base, "--output", tmp_path], capsys)[2]
    assert err == f"sentemb: error: --output {tmp_path}: is a directory\n"
    missing = tmp_path / "new" / "r.json"
    err = run([*base, "--output", missing], capsys)[2]
    assert err == f"sentemb: error: --output {missing}: its folder does not exist\n"
    assert not missing.parent.exists()  # never created silently
    if os.path.isdir("/proc/self"):  # unwritable even for root
        err = run([*base, "--output", "/proc/self/r.json"], capsys)[2]
        assert err.startswith("sentemb: error: --output /proc/self/r.json: cannot write there (")
        assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # the probe of a writable --output leaves nothing behind


def test_default_output_goes_to_runs_which_is_created(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ev, "REPO", tmp_path)
    monkeypatch.setattr(ev, "build_encoder", hash_encoder)
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
    cpu = torch.device("cpu")
    assert seen == {"model": "some-model", "max_tokens": 16, "batch_size": 8, "device": cpu}
    seen.clear()
    args = ev.parser().parse_args(["--demonstration", "none", "--adapter", "runs/a", "--bits", "4"])
    ev.build_encoder(args, None)
    assert seen["demonstrations"] == [] and seen["adapter"] == "runs/a" and seen["bits"] == 4
    assert "max_tokens" not in seen  # no cut unless asked, as the paper
    assert "sentences per forward pass" in ev.parser().format_help()


def test_ctrl_c_says_what_was_cached_and_exits_130(tmp_path, capsys, monkeypatch):
    class Interrupted(HashEncoder):
        def encode(self, sentences):
            raise KeyboardInterrupt

    monkeypatch.setattr(ev, "build_encoder", lambda args, model: (Interrupted(), 10))
    monkeypatch.setenv("SENTEMB_CACHE", str(tmp_path / "cache"))
    kept = []
    argv = ["--data-dir", str(FIX), "--tasks", "stsb-dev", "--output", str(tmp_path / "r.json")]
    with pytest.raises(KeyboardInterrupt):
        ev.main(argv, kept)
    cache = tmp_path / "cache" / "embeddings"
    said = f"the embeddings computed so far are cached in {cache}; a rerun reuses them"
    assert kept == [said] and not (tmp_path / "r.json").exists()
    # As `python evaluate.py` ends it: one line, exit 130.
    rc = common.cli(lambda a: ev.main(a, kept), argv, interrupted=lambda: kept[-1])
    err = capsys.readouterr().err   # the progress bar's lines, then one line
    assert rc == 130 and err.endswith(f"\nsentemb: interrupted; {said}\n")
    assert err.count("sentemb:") == 1


def test_cli_end_to_end_on_the_fixtures_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importing it would fail
    monkeypatch.setattr(ev, "build_encoder", hash_encoder)
    monkeypatch.setattr(provenance, "git_commit", lambda: "0" * 40)
    monkeypatch.setenv("SENTEMB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "r.json"
    argv = ["--data-dir", FIX, "--tasks", "sts,stsb-dev", "--output", out]
    rc, text, _ = run(argv, capsys)
    assert rc == 0 and "   STS12   STS13" in text and "STS-B dev" in text
    assert "\nsmollm2-135m " in text   # the row of the default model
    rec = json.loads(out.read_text())
    assert rec["model"] == "smollm2-135m" and rec["encoder"] == HashEncoder.fingerprint
    assert rec["git_commit"] == "0" * 40 and rec["params"] == 10
    sts = ["STS12", "STS13", "STS14", "STS15", "STS16", "STS-B", "SICK-R", "STS-B dev"]
    assert list(rec["summary_x100"]) == sts and rec["sentences_encoded"] > 100
    assert os.path.join("sts", "stsb", "sts-dev.csv") in rec["data_files"]
    assert run(argv, capsys)[0] == 0
    assert json.loads(out.read_text())["sentences_encoded"] == 0  # all from the cache


def test_an_adapter_run_is_labelled_with_its_adapter(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ev, "build_encoder", hash_encoder)
    monkeypatch.setenv("SENTEMB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "r.json"
    argv = ["--data-dir", FIX, "--tasks", "stsb-dev", "--output", out,
            "--adapter", "runs/cse/final"]
    rc, text, err = run(argv, capsys)
    assert rc == 0, err
    assert "\nsmollm2-135m + runs/cse/final   " in text
    assert json.loads(out.read_text())["model"] == "smollm2-135m + runs/cse/final"


def test_two_tiny_models_one_json_two_rows(tmp_path, capsys, monkeypatch):
    from helpers import OPT_PRE, hf_model, save
    models = []
    for i, layers in enumerate((1, 2)):
        d = tmp_path / f"tiny{i}"
        save(hf_model(dict(OPT_PRE, num_hidden_layers=layers)), d)
        models.append(d)
    monkeypatch.setenv("SENTEMB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "r.json"
    argv = ["--data-dir", FIX, "--tasks", "sts", "--model", *models, "--output", out,
            "--device", "cpu", "--dtype", "float32"]
    rc, text, err = run(argv, capsys)
    assert rc == 0, err
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == [str(m) for m in models]
    assert rows[0]["params"] < rows[1]["params"]
    assert all(len(r["summary_x100"]) == 7 for r in rows)
    assert all(r["encoder"]["dtype"] == "torch.float32" for r in rows)
    table = text.split("STS, Spearman x100\n")[1].splitlines()
    assert table[0].endswith("SICK-R    Avg.")
    assert [line.split()[0] for line in table[1:3]] == [str(m) for m in models]


def test_tables_use_the_paper_layout():
    results = {n: {"score": 0.5} for n in ev.STS} | {n: {"score": 0.8} for n in ev.TRANSFER[:2]}
    text = ev.tables([("a", results), ("bb", results)])
    assert "     STS12   STS13   STS14   STS15   STS16   STS-B  SICK-R    Avg.\na    " in text
    assert "Transfer, accuracy\n        MR      CR\na    80.00   80.00\nbb   80.00   80.00" in text
    assert text.count("Avg.") == 1
    dev = ev.tables([("a", {"stsb-dev": {"score": 0.7767}})])
    assert dev == "STS-B dev\n  STS-B dev\na     77.67"  # a column fits its title
