#!/usr/bin/env python
"""Evaluate sentence embeddings the way the PromptEOL paper does (Jiang et al. 2023).

* STS (STS12-16, STS-B, SICK-R): Spearman correlation of the embeddings' cosine similarity with the
  gold score, no regressor. STS12-16: SimCSE's SentEval "all", ONE Spearman over a year's subsets
  concatenated; STS-B, SICK-R: test.
* Transfer (MR, CR, SUBJ, MPQA, SST-2, TREC, MRPC): accuracy of a logistic-regression probe on the
  frozen embeddings, with SentEval's protocol (see `inner_kfold`). Avg.: the mean of a group.

    python evaluate.py --tasks sts --model opt-125m opt-350m opt-1.3b --output runs/scaling.json
"""
import argparse
import hashlib
import json
import pathlib
import sys
import time
import warnings
from collections import namedtuple

import numpy as np

from support.cache import CachedEncoder
from support.cli import (DOWNLOAD_HINT, REPO, UserError, cli, data_dir, device, embedder_flags,
                         parse_demonstrations, positive, writable)
from support.files import write_atomic
from support.hub import DEFAULT_MODEL
from support.provenance import provenance


# ---------------------------------------------------------------------- loading
# Sentence pairs with one gold value each (a 0-5 similarity, or MRPC's 0/1 label), and single
# sentences with integer class labels (an np.ndarray each); `files` are the data files read.
Pairs = namedtuple("Pairs", "a b gold files", defaults=[()])
Labeled = namedtuple("Labeled", "x y files", defaults=[()])


def _lines(path, encoding="utf-8"):
    # str.splitlines(): no "\r" of the CRLF files (SICK test); blank lines stay (CR, MPQA).
    try:
        return pathlib.Path(path).read_text(encoding=encoding).splitlines()
    except FileNotFoundError:
        raise UserError(f"missing data file {path}: {DOWNLOAD_HINT}") from None


def _rows(path, ncols, encoding="utf-8", header=False):
    # Split on TAB only: a quote-aware csv reader would swallow STS-B's unbalanced quotes.
    rows = [line.split("\t") for line in _lines(path, encoding)[int(header):]]
    for i, row in enumerate(rows):
        if len(row) < ncols:
            raise UserError(f"{path}:{i + 1 + header}: expected {ncols} tab-separated fields")
    return rows


def _tok(s):
    # SentEval splits a sentence on whitespace and joins the tokens with single spaces.
    return " ".join(s.split())


def _pair_loader(files, ncols, a, b, gold, cast=float, encoding="utf-8", header=False):
    """-> load(root, split): Pairs of root / files[split]; sentences: columns a, b; gold: gold."""
    def load(root, split) -> Pairs:
        path = root / files[split]
        rows = _rows(path, ncols, encoding, header)
        first = [_tok(r[a]) for r in rows]
        second = [_tok(r[b]) for r in rows]
        return Pairs(first, second, np.array([cast(r[gold]) for r in rows]), (path,))
    return load


STS_SUBSETS = {  # SentEval's subset lists (STS13 without SMT, which is not public)
    "sts12": ["MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"],
    "sts13": ["FNWN", "headlines", "OnWN"],
    "sts14": ["deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"],
    "sts15": ["answers-forums", "answers-students", "belief", "headlines", "images"],
    "sts16": ["answer-answer", "headlines", "plagiarism", "postediting", "question-question"],
}
BINARY = {"mr": ("rt-polarity.pos", "rt-polarity.neg"), "cr": ("custrev.pos", "custrev.neg"),
          "subj": ("subj.objective", "subj.subjective"), "mpqa": ("mpqa.pos", "mpqa.neg")}  # 1, 0
TREC_CLASSES = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]  # coarse classes, SentEval's order


def load_sts_year(root, name) -> dict:
    """{subset: Pairs} for sts12 ... sts16, unscored pairs removed."""
    out = {}
    for sub in STS_SUBSETS[name]:
        fin = root / "sts" / name / f"STS.input.{sub}.txt"
        fgs = root / "sts" / name / f"STS.gs.{sub}.txt"
        pairs = _rows(fin, 2)
        gold = _lines(fgs)
        if len(pairs) != len(gold):
            raise UserError(f"{fin} has {len(pairs)} lines but {fgs} has {len(gold)}")
        keep = [i for i, g in enumerate(gold) if g.strip()]  # STS15/16: empty gold = not scored
        first = [_tok(pairs[i][0]) for i in keep]
        second = [_tok(pairs[i][1]) for i in keep]
        out[sub] = Pairs(first, second, np.array([float(gold[i]) for i in keep]), (fin, fgs))
    return out


# STS-B: genre, file, year, id, score, s1, s2. SICK: id, s1, s2, relatedness (1-5).
# MRPC: BOM, label, id1, id2, s1, s2.
load_stsb = _pair_loader({s: f"sts/stsb/sts-{s}.csv" for s in ("train", "dev", "test")},
                         7, a=5, b=6, gold=4)
load_sick = _pair_loader({"train": "sts/sick/SICK_train.txt", "trial": "sts/sick/SICK_trial.txt",
                          "test": "sts/sick/SICK_test_annotated.txt"},
                         4, a=1, b=2, gold=3, header=True)
load_mrpc = _pair_loader({s: f"transfer/mrpc/msr_paraphrase_{s}.txt" for s in ("train", "test")},
                         5, a=3, b=4, gold=0, cast=int, encoding="utf-8-sig", header=True)


def load_binary(root, name) -> Labeled:
    """MR, CR, SUBJ, MPQA: one sentence per line, the file gives the label."""
    files = [root / "transfer" / name / f for f in BINARY[name]]
    pos, neg = ([_tok(line) for line in _lines(f)] for f in files)
    return Labeled(pos + neg, np.array([1] * len(pos) + [0] * len(neg)), tuple(files))


def load_sst2(root, split) -> Labeled:
    f = root / "transfer" / "sst2" / f"sentiment-{split}"
    rows = _rows(f, 2)
    return Labeled([_tok(r[0]) for r in rows], np.array([int(r[1]) for r in rows]), (f,))


def load_trec(root, split) -> Labeled:
    f = root / "transfer" / "trec" / {"train": "train_5500.label", "test": "TREC_10.label"}[split]
    x, y = [], []
    for line in _lines(f, encoding="latin-1"):  # as SentEval: train has one ISO-8859-1 byte
        label, question = line.split(":", 1)  # "NUM:dist How far is ..." -> class NUM
        x.append(_tok(question.split(" ", 1)[1]))
        y.append(TREC_CLASSES.index(label))
    return Labeled(x, np.array(y), (f,))


STS = ["sts12", "sts13", "sts14", "sts15", "sts16", "stsb", "sickr"]
TRANSFER = ["mr", "cr", "subj", "mpqa", "sst2", "trec", "mrpc"]
TITLES = {"sts12": "STS12", "sts13": "STS13", "sts14": "STS14", "sts15": "STS15",
          "sts16": "STS16", "stsb": "STS-B", "sickr": "SICK-R", "mr": "MR", "cr": "CR",
          "subj": "SUBJ", "mpqa": "MPQA", "sst2": "SST-2", "trec": "TREC", "mrpc": "MRPC",
          "stsb-dev": "STS-B dev"}
GROUPS = {"sts": STS, "transfer": TRANSFER, "all": STS + TRANSFER}
SPLITS = {"stsb": (load_stsb, ["test"]), "stsb-dev": (load_stsb, ["dev"]),
          "sickr": (load_sick, ["test"]), "sst2": (load_sst2, ["train", "dev", "test"]),
          "trec": (load_trec, ["train", "test"]), "mrpc": (load_mrpc, ["train", "test"])}


def parse_tasks(spec: str) -> list:
    """'sts' | 'transfer' | 'all' | 'stsb-dev' | comma-separated names -> task names, each once."""
    items = [item.strip().lower() for item in spec.split(",") if item.strip()]
    for item in items:
        if item not in GROUPS and item not in TITLES:
            raise UserError(f"unknown task {item!r}: choose sts, transfer, all, stsb-dev "
                            f"or names from {','.join(STS + TRANSFER)}")
    if not items:
        raise UserError("no task given")
    return list(dict.fromkeys(name for item in items for name in GROUPS.get(item, [item])))


def load_task(name, root) -> dict:
    """The splits a task is scored on -- nothing else is read or encoded."""
    try:
        if name in STS_SUBSETS:
            return load_sts_year(root, name)
        if name in BINARY:
            return {"all": load_binary(root, name)}
        load, splits = SPLITS[name]
        return {s: load(root, s) for s in splits}
    except UserError:
        raise
    except (ValueError, IndexError) as e:  # a bad number or label: a damaged file
        raise UserError(f"malformed {TITLES[name]} data under {root}: {e}") from None


def embed_all(encoder, sentences, progress=True):
    """Encode the unique sentences once; return lookup(list[str]) -> (n, d) array."""
    enc = encoder if isinstance(encoder, CachedEncoder) else CachedEncoder(encoder, disk=False)
    unique = list(dict.fromkeys(sentences))
    matrix = enc.encode(unique, progress=progress)                      # (unique, d)
    index = {s: i for i, s in enumerate(unique)}
    return lambda sents: matrix[[index[s] for s in sents]]


# ---------------------------------------------------------------------- STS
def cosine(u, v):
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)          # (n, d) each
    num = (u * v).sum(1)
    den = np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)  # SentEval: NaN -> 0


def correlations(x, gold) -> dict:
    from scipy.stats import pearsonr, spearmanr
    with warnings.catch_warnings():  # a constant input gives NaN, which is then reported as such
        warnings.simplefilter("ignore")
        return {"spearman": float(spearmanr(x, gold)[0]), "pearson": float(pearsonr(x, gold)[0]),
                "n": len(gold)}


def aggregate(parts) -> dict:
    """SentEval/SimCSE summaries of {subset: (system scores, gold)}: "all" = one correlation over
    the subsets concatenated (the paper's number); "mean", size-weighted "wmean" of the subsets'."""
    subsets = {k: correlations(s, g) for k, (s, g) in parts.items()}
    scores = np.concatenate([s for s, _ in parts.values()])
    gold = np.concatenate([g for _, g in parts.values()])
    pooled = correlations(scores, gold)
    sizes = [r["n"] for r in subsets.values()]
    out = {"n": pooled["n"], "subsets": subsets}
    for m in ("spearman", "pearson"):
        vals = [r[m] for r in subsets.values()]
        out[m] = {"all": pooled[m], "mean": float(np.mean(vals)),
                  "wmean": float(np.average(vals, weights=sizes))}
    return out


def score_sts(splits, emb) -> dict:
    out = aggregate({k: (cosine(emb(p.a), emb(p.b)), p.gold) for k, p in splits.items()})
    return {"score": out["spearman"]["all"], **out}


def stsb_dev(encoder, data=None, indices=None) -> float:
    """Spearman (a fraction, not x100) on STS-B dev, or on its pairs at `indices`: the paper's
    model selection (demonstrations, checkpoints). A CachedEncoder reuses vectors across calls."""
    dev = load_stsb(data_dir(data), "dev")
    if indices is not None:
        indices = list(indices)
        dev = Pairs([dev.a[i] for i in indices], [dev.b[i] for i in indices], dev.gold[indices])
    emb = embed_all(encoder, dev.a + dev.b, progress=False)
    return score_sts({"dev": dev}, emb)["score"]


# ---------------------------------------------------------------------- transfer
# SentEval's protocols (folds, seed, selection rules) with its `usepytorch=False` classifier,
# scikit-learn's lbfgs LogisticRegression, on features standardized with training-part statistics
# (LLM states have a few huge dimensions that make lbfgs crawl). Standardized features need weaker
# regularization than SentEval's C grids allow: one wider grid, warm-started, deterministic.
SEED = 1111                               # SentEval's default seed
REGS = [4.0 ** t for t in range(-7, 2)]   # C (inverse L2 strength) from 6e-5 to 4


def _predict_path(xtr, ytr, xev, regs, seed=SEED):
    """Predictions on xev of a logistic regression fit on (xtr, ytr), one per C in regs."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits  # installed with scikit-learn
    mu, sd = xtr.mean(0), xtr.std(0)
    sd[sd < 1e-8] = 1.0
    xtr, xev = (xtr - mu) / sd, (xev - mu) / sd
    clf = LogisticRegression(max_iter=1000, warm_start=True, random_state=seed)
    # One thread: at these sizes threads are overhead, and they spin-wait on a busy machine.
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        return [clf.set_params(C=c).fit(xtr, ytr).predict(xev) for c in regs]


def _choose_c(x, y, dev, k, seed):
    """(C, its accuracy) on dev=(x, y) if given, else in a stratified k-fold CV on (x, y). SentEval
    rounds accuracies to 0.01 %; np.argmax keeps the first (smallest) C on ties."""
    from sklearn.model_selection import StratifiedKFold
    if dev is None:
        folds = StratifiedKFold(k, shuffle=True, random_state=seed).split(x, y)
        accs = [[np.mean(p == y[te]) for p in _predict_path(x[tr], y[tr], x[te], REGS, seed)]
                for tr, te in folds]
    else:
        accs = [[np.mean(p == dev[1]) for p in _predict_path(x, y, dev[0], REGS, seed)]]
    accs = np.round(100 * np.mean(accs, axis=0), 2)
    i = int(np.argmax(accs))
    return REGS[i], float(accs[i]) / 100


def probe(xtr, ytr, xte, yte, dev=None, k=10, seed=SEED) -> dict:
    """Test accuracy of a logistic regression fit on train, with the C best on dev=(x, y) (SST-2:
    SentEval's SplitClassifier), else in a k-fold CV on train (TREC, MRPC: KFoldClassifier)."""
    from sklearn.metrics import f1_score
    c, devacc = _choose_c(xtr, ytr, dev, k, seed)
    pred = _predict_path(xtr, ytr, xte, [c], seed)[0]
    out = {"acc": float(np.mean(pred == yte)), "devacc": devacc, "C": c,
           "ntrain": len(ytr), "ntest": len(yte)}
    if dev is None and len(np.unique(ytr)) == 2:
        out["f1"] = float(f1_score(yte, pred))
    return out


def inner_kfold(x, y, k=10, seed=SEED) -> dict:
    """MR, CR, SUBJ, MPQA (SentEval's InnerKFoldClassifier): the mean test accuracy of `probe` over
    k stratified outer folds, C chosen by an inner k-fold CV on each fold's training part."""
    from sklearn.model_selection import StratifiedKFold
    outer = StratifiedKFold(k, shuffle=True, random_state=seed).split(x, y)
    folds = [probe(x[tr], y[tr], x[te], y[te], k=k, seed=seed) for tr, te in outer]
    return {"acc": float(np.mean([f["acc"] for f in folds])),
            "devacc": float(np.mean([f["devacc"] for f in folds])),
            "C": [f["C"] for f in folds], "n": len(y)}


def _senteval_order(*texts, label):
    # SentEval sorts samples by token count, then label: in its order, our folds hold its samples.
    keys = [[len(s.split()) for s in t] for t in texts] + [label]
    return sorted(range(len(label)), key=lambda i: tuple(k[i] for k in keys))


def pair_features(u, v):
    """MRPC's probe input [u, v, |u - v|, u * v] (n, 4d), as in SentEval's SICK-E (its mrpc.py
    drops u and v)."""
    return np.concatenate([u, v, np.abs(u - v), u * v], axis=1)


def score_transfer(name, splits, emb, kfold=10) -> dict:
    tr, te = splits.get("train"), splits.get("test")
    if name in BINARY:
        d = splits["all"]
        order = _senteval_order(d.x, label=d.y)
        out = inner_kfold(emb([d.x[i] for i in order]), d.y[order], kfold)
    elif name == "sst2":
        dev = (emb(splits["dev"].x), splits["dev"].y)
        out = probe(emb(tr.x), tr.y, emb(te.x), te.y, dev=dev)
    elif name == "trec":
        order = _senteval_order(tr.x, label=tr.y)
        out = probe(emb([tr.x[i] for i in order]), tr.y[order], emb(te.x), te.y, k=kfold)
    else:  # MRPC
        order = _senteval_order(tr.a, tr.b, label=tr.gold)
        xtr = pair_features(emb([tr.a[i] for i in order]), emb([tr.b[i] for i in order]))
        xte = pair_features(emb(te.a), emb(te.b))
        out = probe(xtr, tr.gold[order], xte, te.gold, k=kfold)
    return {"score": out["acc"], **out}


# ---------------------------------------------------------------------- driver
def evaluate(model, params, encoder, loaded, kfold=10) -> dict:
    """One record row: `model`'s {task: result with "score", a fraction} on {task: splits} from
    load_task, their x100 summary, the CachedEncoder's fingerprint and counts."""
    data = [d for splits in loaded.values() for d in splits.values()]
    sentences = [s for d in data for s in (d.x if isinstance(d, Labeled) else d.a + d.b)]
    emb = embed_all(encoder, sentences)
    results = {n: score_transfer(n, s, emb, kfold) if n in TRANSFER else score_sts(s, emb)
               for n, s in loaded.items()}
    return {"model": model, "params": params, "encoder": encoder.fingerprint, "tasks": results,
            "summary_x100": {TITLES[n]: round(100 * r["score"], 2) for n, r in results.items()},
            "cache": encoder.dir and str(encoder.dir), "sentences_encoded": encoder.n_encoded}


def tables(rows) -> str:
    """The paper's layout: per group of tasks, a row of x100 numbers per (name, {task: result}),
    Avg. over a complete group. SentEval's other STS12-16 summaries are in the JSON record."""
    width = max(len(name) for name, _ in rows)
    lines = []
    groups = {"STS, Spearman x100": STS, "Transfer, accuracy": TRANSFER, "STS-B dev": ["stsb-dev"]}
    for title, group in groups.items():
        names = [n for n in group if n in rows[0][1]]
        if not names:
            continue
        avg = len(names) == len(group) > 1
        titles = [TITLES[n] for n in names] + ["Avg."] * avg
        widths = [max(7, len(t)) for t in titles]  # a column is as wide as its title
        header = "".join(f" {t:>{w}}" for t, w in zip(titles, widths, strict=True))
        lines += ["", title, " " * width + header]
        for model, results in rows:
            xs = [100 * results[n]["score"] for n in names]
            xs += [np.mean(xs)] * avg
            cells = "".join(f" {x:{w}.2f}" for x, w in zip(xs, widths, strict=True))
            lines.append(f"{model:<{width}}" + cells)
    return "\n".join(lines).strip()


def write_record(out, rows, loaded, root, kfold, provenance) -> dict:
    """Print the tables of rows and write their JSON record to out: one model, one flat record."""
    print(tables([(r["model"], r["tasks"]) for r in rows]))
    files = sorted({f for splits in loaded.values() for d in splits.values() for f in d.files})
    record = {
        "protocol": f"evaluate.py's docstring; transfer kfold={kfold}, seed={SEED}, C in 4^-7..4^1",
        "data_dir": str(root),
        "data_files": {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
                       for f in files},
        **provenance,
    }
    record = {**rows[0], **record} if len(rows) == 1 else {"rows": rows, **record}
    write_atomic(out, json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {out} ({record['wall_seconds']} s)")
    return record


# ---------------------------------------------------------------------- command line
def build_encoder(args, model):
    """-> (embed.Embedder for `model` configured by the flags, its parameter count)."""
    from embed import Embedder  # torch and the model code load only when needed
    kwargs = dict(model=model, template=args.template, pooling=args.pooling,
                  max_tokens=args.max_tokens, batch_size=args.batch_size, compile=args.compile,
                  device=device(args.device), dtype=args.dtype, bits=args.bits,
                  adapter=args.adapter, demonstrations=parse_demonstrations(args.demonstration))
    emb = Embedder(**{k: v for k, v in kwargs.items() if v is not None})  # None: Embedder's default
    # A 4-bit weight (bitsandbytes Params4bit) packs two values a byte; quant_state has the shape.
    shapes = [getattr(getattr(p, "quant_state", None), "shape", p.shape)
              for p in emb.model.parameters()]
    return emb, sum(shape.numel() for shape in shapes)


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--model", nargs="+",
      help=f"model aliases or paths, evaluated in turn (default: {DEFAULT_MODEL})")
    embedder_flags(p)
    a("--tasks", default="sts", help="sts (default), transfer, all, or names: " + ",".join(TITLES)
      + "; or mteb:NAME,... (mteb's tasks and data, e.g. mteb:STSBenchmark,SICK-R)")
    a("--kfold", type=int, default=10,
      help="transfer CV folds (default 10, the paper's; SentEval's is 5)")
    a("--output",
      help="JSON results file (default: runs/eval-<time>.json; creates runs/ if missing)")
    a("--no-cache", action="store_true", help="do not read or write the on-disk embedding cache")
    return p


def main(argv=None, kept=None) -> int:
    """The command; raises UserError. `kept` receives what an interrupted run leaves behind."""
    args = parser().parse_args(argv)
    started = time.time()
    if args.tasks.startswith("mteb:"):   # mteb's own tasks and data: support/mteb.py
        from support import mteb
        return mteb.evaluate_command(args, lambda model: build_encoder(args, model), argv, started)
    names = parse_tasks(args.tasks)                 # the cheap checks first
    parse_demonstrations(args.demonstration)
    positive(batch_size=args.batch_size, max_tokens=args.max_tokens)
    if args.kfold < 2:
        raise UserError(f"--kfold {args.kfold}: must be at least 2")
    if args.output is None:
        (REPO / "runs").mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = writable("--output", args.output or REPO / "runs" / f"eval-{stamp}.json")
    device(args.device)
    root = data_dir(args.data_dir)
    loaded = {n: load_task(n, root) for n in names}  # data errors surface before a model loads
    rows = []
    for model in args.model or [DEFAULT_MODEL]:
        encoder, params = build_encoder(args, model)
        cached = CachedEncoder(encoder, disk=not args.no_cache)
        if cached.dir is not None and kept is not None:
            kept.append(f"the embeddings computed so far are cached in {cached.dir.parent}; "
                        "a rerun reuses them")
        label = f"{model} + {args.adapter}" if args.adapter else model
        rows.append(evaluate(label, params, cached, loaded, args.kfold))
        del encoder, cached  # this model's memory is free before the next one loads
    write_record(out, rows, loaded, root, args.kfold, provenance("evaluate.py", argv, started))
    return 0


if __name__ == "__main__":
    kept = []
    sys.exit(cli(lambda argv: main(argv, kept),
                 interrupted=lambda: kept[-1] if kept else "nothing was written"))
