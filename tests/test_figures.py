"""docs/figures.py: every figure draws from small records and plots what they hold; importing it
leaves matplotlib unloaded."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
import figures  # noqa: E402
from support.cli import UserError  # noqa: E402

STS = {t: 50.0 + i for i, t in enumerate(figures.STS)}
ENCODER = {"model": "tiny", "method": "eol", "adapter": None, "bits": None,
           "dtype": "torch.float32",
           "demonstrations": [["the air passage to the lungs.", "Windpipe"]]}
RECORDS = {
    "sts-tiny": {"encoder": ENCODER, "summary_x100": STS},
    "sts-tiny-mean": {"encoder": {**ENCODER, "method": "mean", "demonstrations": []},
                      "summary_x100": {t: s - 20 for t, s in STS.items()}},
    "outside-encoder": {"encoder": {"sentence_transformers": "/somewhere"}, "summary_x100": STS},
    "transfer-tiny": {"encoder": ENCODER, "summary_x100": {"MR": 80.0}},
}
# (source, spearman, pairs, round) of each candidate; the last could not be scored
SCORED = [("paper", 0.77, 40, 2), ("wordnet", 0.75, 40, 2), ("paper", 0.6, 10, 1),
          ("self", 0.5, 10, 1), ("wordnet", float("-inf"), 10, 1)]
CAND = [{"sentence": f"s{i}", "word": f"W{i}", "source": src, "spearman": sp, "pairs": p,
         "round": r} for i, (src, sp, p, r) in enumerate(SCORED)]
ICL = {"model": "tiny", "ranked": CAND, "winner": CAND[0], "no_demonstration": 0.66,
       "rounds": [{"round": 1, "pairs": 10, "candidates": 5, "best": 0.7},
                  {"round": 2, "pairs": 40, "candidates": 2, "best": 0.77}]}
LOG = [{"event": "start", "step": 0, "args": {"model": "tiny", "batch_size": 4, "lr": 5e-4}},
       *({"step": s, "loss": 3.0 / s} for s in range(1, 6)),
       {"step": 5, "stsb_dev": 0.7, "best": True}, {"event": "done", "steps": 5}]


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 1000 < len(data) < 150_000


def test_importing_figures_does_not_load_matplotlib():
    code = ("import sys; sys.path.insert(0, 'docs'); import figures; "
            "print('matplotlib' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert run.stdout.strip() == "False"


def test_labels_name_method_demonstration_adapter_and_precision():
    assert figures.label("sts-tiny", RECORDS["sts-tiny"]) == 'tiny, PromptEOL, "Windpipe" demo'
    enc = {**ENCODER, "demonstrations": [], "adapter": "runs/cse/final", "bits": 4,
           "dtype": "torch.bfloat16"}
    want = "tiny, PromptEOL, no demo, adapter runs/cse/final, 4-bit, bf16"
    assert figures.label("x", {"encoder": enc}) == want
    assert figures.label("sts-tiny-mean", RECORDS["sts-tiny-mean"]) == "tiny, mean pooling"
    assert figures.label("outside-encoder", RECORDS["outside-encoder"]) == "outside-encoder"


def test_labels_read_embed_py_s_template_and_pooling_as_well_as_the_older_method():
    from embed import TEMPLATES
    enc = {k: v for k, v in ENCODER.items() if k != "method"}

    def label(template, pooling, **kw):
        encoder = {**enc, "template": TEMPLATES[template], "pooling": pooling, **kw}
        return figures.label("x", {"encoder": encoder})

    older = figures.label("sts-tiny", RECORDS["sts-tiny"])
    assert label("eol", "last") == older == 'tiny, PromptEOL, "Windpipe" demo'
    assert label("none", "mean", demonstrations=[]) == "tiny, mean pooling"
    assert label("none", "last", demonstrations=[]) == "tiny, last token"
    want = "tiny, PromptBERT-style, no demo, mean pooling"
    assert label("prompt", "mean", demonstrations=[]) == want


def test_sts_per_task(tmp_path):
    figures.sts_per_task(RECORDS, tmp_path / "sts.png")
    assert_png(tmp_path / "sts.png")
    with pytest.raises(UserError, match="no record with all seven STS tasks"):
        figures.sts_per_task({"transfer-tiny": RECORDS["transfer-tiny"]}, tmp_path / "none.png")


def test_icl_rounds_skips_unscorable_candidates(tmp_path):
    unscorable = {**CAND[3], "sentence": "s5", "spearman": float("nan")}
    record = {**ICL, "ranked": CAND + [unscorable]}     # CAND[4] scored -inf, this one NaN
    ax = figures.icl_rounds(record, tmp_path / "icl.png").axes[0]
    assert_png(tmp_path / "icl.png")
    points = [float(y) for c in ax.collections for _, y in c.get_offsets()]
    scored = [100 * c["spearman"] for c in CAND[:4]]
    assert sorted(points) == pytest.approx(sorted(scored + [77.0]))   # and the winner's star
    labels = ax.get_legend_handles_labels()[1]
    assert {"paper (2 candidates)", "wordnet (1 candidates)", "self (1 candidates)"} <= set(labels)


@pytest.mark.parametrize("with_evals", [True, False])
def test_training(tmp_path, with_evals):
    log = LOG if with_evals else [r for r in LOG if "stsb_dev" not in r]
    figures.training(log, tmp_path / "training.png")
    assert_png(tmp_path / "training.png")


def test_scaling_with_tiny_models_and_the_paper_points(tmp_path):
    assert [p["avg"] for p in figures.PAPER_POINTS][:4] == [67.46, 69.02, 77.52, 78.18]
    rows = [{"model": "tiny-a", "params": 12_000, "avg": 20.5},
            {"model": "tiny-b", "params": 30_000, "avg": 25.0}]
    figures.scaling(rows, tmp_path / "scaling.png")
    assert_png(tmp_path / "scaling.png")
    assert figures._count(1.3e9) == "1.3B" and figures._count(125e6) == "125M"


def test_cli_redraws_all_four_from_a_results_folder(tmp_path, capsys):
    res, out = tmp_path / "results", tmp_path / "docs"
    (res / "cse-epoch").mkdir(parents=True)
    named = {"sts-smollm2-eol-icl": RECORDS["sts-tiny"], "icl-smollm2-135m": ICL}
    for name, rec in {**RECORDS, **named}.items():
        (res / f"{name}.json").write_text(json.dumps(rec))
    (res / "cse-epoch" / "log.jsonl").write_text("\n".join(json.dumps(r) for r in LOG) + "\n")
    assert figures.cli(figures.main, ["--results", str(res), "--out", str(out)]) == 0
    for name in ["sts_per_task", "icl_rounds", "training", "scaling"]:
        assert_png(out / f"{name}.png")
    (res / "cse-epoch" / "log.jsonl").unlink()
    assert figures.cli(figures.main, ["--results", str(res), "--out", str(out)]) == 1
    assert f"error: no {res / 'cse-epoch' / 'log.jsonl'}: run the step" in capsys.readouterr().err
    assert figures.cli(figures.main, ["--results", str(tmp_path / "none"), "--out", str(out)]) == 1
    assert f"error: no folder {tmp_path / 'none'}: pass --results" in capsys.readouterr().err
