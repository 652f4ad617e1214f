"""The figures of docs/ and the README, drawn from the JSON records in results/.

    python docs/figures.py [--results results] [--out docs]

Each function takes parsed records, writes one PNG and returns its figure. matplotlib is imported
inside the functions, so importing this module costs nothing.
"""
import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from support.cli import UserError, cli  # noqa: E402

STS = ["STS12", "STS13", "STS14", "STS15", "STS16", "STS-B", "SICK-R"]
TEMPLATE = {"eol": "PromptEOL", "prompt": "PromptBERT-style"}
# A record's encoder names its template and pooling; older records name both in one "method".
METHOD = {"eol": ("eol", "last"), "prompt": ("prompt", "last"), "mean": ("none", "mean"),
          "last": ("none", "last")}
SOURCE_COLOR = {"paper": "tab:blue", "wordnet": "tab:green", "self": "tab:orange"}

# Nominal parameter counts (the models' names).
PARAMS = {"smollm2-135m": 135_000_000, "opt-125m": 125_000_000, "opt-350m": 350_000_000,
          "opt-1.3b": 1_300_000_000, "opt-2.7b": 2_700_000_000, "opt-6.7b": 6_700_000_000,
          "opt-13b": 13_000_000_000, "opt-30b": 30_000_000_000, "opt-66b": 66_000_000_000}

# Average STS (STS12-16, STS-B, SICK-R; Spearman x 100) of OPT with PromptEOL + one in-context
# demonstration, no fine-tuning: Table 1 of Jiang et al. 2023, "Scaling Sentence Embeddings with
# Large Language Models" (arXiv:2307.16645), as listed per size in the authors' README
# (github.com/kongds/scaling_sentemb, "Results on STS Tasks with in-context learning").
PAPER_POINTS = [{"model": m, "params": PARAMS[m], "avg": avg} for m, avg in [
    ("opt-125m", 67.46), ("opt-350m", 69.02), ("opt-1.3b", 77.52), ("opt-2.7b", 78.18),
    ("opt-6.7b", 79.08), ("opt-13b", 79.04), ("opt-30b", 78.94), ("opt-66b", 78.19)]]


def _figure(width, height):
    from matplotlib.figure import Figure   # no pyplot: no global state, no display needed
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots()


def sts_avg(record):
    """Mean of the seven STS tasks in a results/*.json record (Spearman x 100)."""
    return sum(record["summary_x100"][t] for t in STS) / len(STS)


def _template_name(text):
    """A record's template as text -> its name: PromptEOL ends "in one word", PromptBERT-style
    "means"."""
    if "in one word" in text:
        return "eol"
    if "means" in text:
        return "prompt"
    return "none"


def label(name, record):
    """A readable name for the encoder of a record: template, pooling, demonstration, adapter,
    precision."""
    enc = record.get("encoder", {})
    if "method" in enc:
        template, pooling = METHOD[enc["method"]]
    elif "pooling" in enc:
        template = _template_name(enc["template"])
        pooling = enc["pooling"]
    else:   # an outside encoder (sentence-transformers): its file name says what it is
        return name
    demos = enc.get("demonstrations") or []
    parts = [enc.get("model", "?")]
    if template in TEMPLATE:
        parts.append(TEMPLATE[template])
        parts.append(" + ".join(f'"{w}" demo' for _, w in demos) if demos else "no demo")
    if pooling == "mean" or template == "none":
        parts.append("mean pooling" if pooling == "mean" else "last token")
    if enc.get("adapter"):
        parts.append(f"adapter {enc['adapter']}")
    if enc.get("bits"):
        parts.append(f"{enc['bits']}-bit")
    if "bfloat16" in str(enc.get("dtype")):
        parts.append("bf16")
    return ", ".join(parts)


def sts_per_task(records, out):
    """Grouped bars of Spearman x 100 per STS task and their average, one bar per encoder record
    ({name: record}) that has all seven STS tasks; best average first."""
    rows = []
    for name, record in records.items():
        if all(t in record.get("summary_x100", {}) for t in STS):
            scores = [record["summary_x100"][t] for t in STS] + [sts_avg(record)]
            rows.append((label(name, record), scores))
    rows.sort(key=lambda row: -row[1][-1])
    if not rows:
        raise UserError("no record with all seven STS tasks: "
                        "run `python evaluate.py --tasks sts` first")
    fig, ax = _figure(12, 5.5)
    width = 0.8 / len(rows)
    for i, (name, scores) in enumerate(rows):
        offset = (i - (len(rows) - 1) / 2) * width
        xs = [g + offset for g in range(len(STS) + 1)]
        ax.bar(xs, scores, width, label=f"{name} (avg {scores[-1]:.2f})")
    ax.set_xticks(range(len(STS) + 1), STS + ["Avg."])
    ax.set_ylabel("Spearman correlation × 100")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("STS test sets per encoder (SentEval 'all' setting)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, fontsize=8, frameon=False)
    fig.savefig(out, dpi=100)
    return fig


def icl_rounds(record, out):
    """The demonstration search of icl.py (successive halving): every candidate's STS-B dev score
    at the last round it reached, colored by source, the winner starred, the baseline dashed."""
    fig, ax = _figure(10, 5.5)
    rounds = record["rounds"]
    ranked = [c for c in record["ranked"] if math.isfinite(c["spearman"])]
    # Spread each round's column sideways (golden-ratio sequence: even and deterministic).
    xs = [c["round"] + 0.5 * ((k * 0.618034) % 1 - 0.5) for k, c in enumerate(ranked)]
    for src in sorted({c["source"] for c in ranked}):
        ks = [k for k, c in enumerate(ranked) if c["source"] == src]
        ax.scatter([xs[k] for k in ks], [100 * ranked[k]["spearman"] for k in ks], s=12, alpha=0.6,
                   color=SOURCE_COLOR.get(src), label=f"{src} ({len(ks)} candidates)")
    w = record["winner"]
    winner = (w["sentence"], w["word"])
    k = next(k for k, c in enumerate(ranked) if (c["sentence"], c["word"]) == winner)
    ax.scatter([xs[k]], [100 * w["spearman"]], marker="*", s=300, color="gold", edgecolor="black",
               zorder=3, label=f'winner: "{w["word"]}" ({100 * w["spearman"]:.2f})')
    ax.plot([r["round"] for r in rounds], [100 * r["best"] for r in rounds], "k-", lw=1,
            label="best score of the round")
    if record.get("no_demonstration") is not None:
        ax.axhline(100 * record["no_demonstration"], color="gray", ls="--",
                   label=f"no demonstration ({100 * record['no_demonstration']:.2f})")
    ticks = [f"round {r['round']}\n{r['candidates']} candidates\n{r['pairs']} pairs"
             for r in rounds]
    ax.set_xticks([r["round"] for r in rounds], ticks)
    ax.set_xlabel("each candidate appears once, with its score in the last round it reached")
    ax.set_ylabel("STS-B dev Spearman × 100")
    ax.set_title(f"Demonstration search (successive halving) for {record.get('model', '?')}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(out, dpi=100)
    return fig


def training(log, out):
    """Training loss over steps from train_cse.py's log.jsonl records, with STS-B dev Spearman on
    a second axis when the log holds evaluations."""
    steps = [r for r in log if "loss" in r]
    evals = [r for r in log if "stsb_dev" in r]
    if not steps:
        raise UserError("no training steps in the log")
    fig, ax = _figure(8, 4.5)
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], "o-", ms=3)
    ax.set_xlabel("optimizer step")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("InfoNCE loss (nats)")
    ax.grid(alpha=0.3)
    title = "Contrastive QLoRA training"
    if evals:
        ax2 = ax.twinx()
        dev = [100 * r["stsb_dev"] for r in evals]
        ax2.plot([r["step"] for r in evals], dev, "s-", color="tab:red")
        ax2.set_ylabel("STS-B dev Spearman × 100", color="tab:red")
    else:
        title += " (no STS-B dev evaluations in this run's log)"
    rec = next((r["args"] for r in log if r.get("event") == "start" and "args" in r), None)
    if rec:
        title += f"\n{rec.get('model')}, {rec.get('batch_size')} triplets/step, lr {rec.get('lr')}"
    ax.set_title(title)
    fig.savefig(out, dpi=100)
    return fig


def _count(n, _pos=None):
    """A tick label for a parameter count: 1.3e9 -> '1.3B'."""
    for scale, unit in [(1e9, "B"), (1e6, "M"), (1e3, "K")]:
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return f"{n:g}"


def scaling(rows, out, paper=PAPER_POINTS):
    """Average STS against parameter count (log x) for rows [{"model", "params", "avg"}], with the
    paper's published OPT points beside them."""
    fig, ax = _figure(8, 5)
    series = [(paper, dict(marker="s", color="gray", ls="--"), "paper (Jiang et al. 2023)"),
              (rows, dict(marker="o", color="tab:red", ls="-", ms=9), "measured here")]
    for j, (points, style, name) in enumerate(series):
        points = sorted(points, key=lambda p: p["params"])
        ax.plot([p["params"] for p in points], [p["avg"] for p in points], label=name, **style)
        # Labels alternately above and below, the two series out of step.
        for i, p in enumerate(points):
            above = (i + j) % 2 == 0
            ax.annotate(p["model"], (p["params"], p["avg"]), textcoords="offset points",
                        xytext=(0, 8 if above else -15), ha="center", fontsize=8,
                        color=style["color"])
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(_count)
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel("average STS (7 tasks), Spearman × 100")
    ax.set_title("Average STS against model size\n"
                 "PromptEOL + one in-context demonstration, no fine-tuning")
    ax.margins(y=0.1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.savefig(out, dpi=100)
    return fig


def _read(path):
    if not path.is_file():
        raise UserError(f"no {path}: run the step that writes it, or pass --results")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Redraw the PNG figures from the JSON records in results/.")
    p.add_argument("--results", type=Path, default=ROOT / "results",
                   help="folder of the records (default results/)")
    p.add_argument("--out", type=Path, default=ROOT / "docs",
                   help="folder for the PNG files (default docs/)")
    p.add_argument("--scaling", type=Path, metavar="RECORD",
                   help="only draw scaling.png from an evaluate.py --tasks sts record of models")
    a = p.parse_args(argv)
    if a.scaling:                    # python evaluate.py --tasks sts --model A B C --output RECORD
        record = _read(a.scaling)
        rows = []
        for r in record.get("rows", [record]):
            name = r.get("model") or r["encoder"]["model"]     # older records: the encoder's
            params = r.get("params") or PARAMS.get(name)
            if params is None:
                raise UserError(f"{a.scaling}: no parameter count for {name}")
            rows.append({"model": name, "params": params, "avg": sts_avg(r)})
        a.out.mkdir(parents=True, exist_ok=True)
        scaling(rows, a.out / "scaling.png")
        print(f"wrote {a.out / 'scaling.png'}")
        return
    if not a.results.is_dir():
        raise UserError(f"no folder {a.results}: pass --results with the folder of the JSON "
                        f"records")
    a.out.mkdir(parents=True, exist_ok=True)
    records = {f.stem: _read(f) for f in sorted(a.results.glob("*.json"))}
    sts_per_task(records, a.out / "sts_per_task.png")
    icl_rounds(_read(a.results / "icl-smollm2-135m.json"), a.out / "icl_rounds.png")
    # the one-epoch run
    training(_read(a.results / "cse-epoch" / "log.jsonl"), a.out / "training.png")
    default = _read(a.results / "sts-smollm2-eol-icl.json")   # the default configuration
    measured = {"model": "smollm2-135m", "params": PARAMS["smollm2-135m"], "avg": sts_avg(default)}
    scaling([measured], a.out / "scaling.png")
    print(f"wrote sts_per_task.png, icl_rounds.png, training.png and scaling.png to {a.out}")


if __name__ == "__main__":
    sys.exit(cli(main))
