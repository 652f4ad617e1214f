#!/usr/bin/env python
"""mteb's STSBenchmark score of a sentemb encoder next to evaluate.py's, on the same local STS-B
test pairs ($SENTEMB_DATA/sts/stsb/sts-test.csv): mteb's task, evaluator and main score (cosine
Spearman) with the data read here instead of from the hub. Both score one set of vectors.

    python bench/mteb_stsb.py                       # the default configuration (README's numbers)
    python bench/mteb_stsb.py --limit 50            # a smoke run on the first 50 pairs
    python bench/mteb_stsb.py --model opt-125m --output results/mteb-stsb-opt-125m.json
"""
import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# support.cli first: it sets OpenMP's waiting policy before torch loads.
from support.cli import UserError, cli, data_dir, embedder_flags, writable  # noqa: E402
from support.files import write_atomic  # noqa: E402
from support.hub import DEFAULT_MODEL  # noqa: E402
from support.provenance import provenance  # noqa: E402
import evaluate as ev  # noqa: E402


def compare(embedder, pairs, cache=True) -> dict:
    """{"evaluate.py": Spearman, "mteb": its STSBenchmark main score, "mteb_scores": mteb's all}."""
    from support import mteb as sm
    encoder = sm.MtebEncoder(embedder, cache=cache)
    task = sm.local_sts_task("STSBenchmark", pairs.a, pairs.b, pairs.gold)
    result = sm.run(encoder, [task])["STSBenchmark"]
    vectors = encoder.encoder_for(embedder.demonstrations)   # the vectors mteb scored
    ours = ev.score_sts({"test": pairs}, ev.embed_all(vectors, pairs.a + pairs.b, progress=False))
    return {"evaluate.py": ours["score"], "mteb": result["score"], "mteb_scores": result["scores"],
            "sentences_encoded": encoder.n_encoded}


def table(title, scores) -> str:
    rows = [("evaluate.py (STS-B test)", scores["evaluate.py"]),
            ("mteb STSBenchmark", scores["mteb"]),
            ("difference", scores["mteb"] - scores["evaluate.py"])]
    lines = [title, f"{'':26}Spearman x100"]
    lines += [f"{name:<26}{round(100 * x, 2) + 0.0:13.2f}" for name, x in rows]   # no -0.00
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="alias, local folder or hub id "
                                                          "(default: %(default)s)")
    embedder_flags(p)
    p.add_argument("--limit", type=int, help="score only the first N pairs (a smoke run)")
    p.add_argument("--output", help="also write the numbers to this JSON file")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the on-disk cache")
    args, started = p.parse_args(argv), time.time()
    if args.limit is not None and args.limit < 3:
        raise UserError("--limit must be at least 3 (a Spearman correlation needs pairs)")
    out = args.output and writable("--output", args.output)
    pairs = ev.load_stsb(data_dir(args.data_dir), "test")
    if args.limit:
        n = args.limit
        pairs = ev.Pairs(pairs.a[:n], pairs.b[:n], pairs.gold[:n], pairs.files)
    from support import mteb as sm
    sm.require()   # before the model loads
    embedder, params = ev.build_encoder(args, args.model)
    scores = compare(embedder, pairs, cache=not args.no_cache)
    fp = embedder.fingerprint
    demos = len(embedder.demonstrations)
    title = (f"STS-B test, {len(pairs.gold)} pairs; {args.model} ({embedder.template}, "
             f"{embedder.pooling} pooling, {demos} demonstration{'s' * (demos != 1)}, "
             f"{fp['dtype'].removeprefix('torch.')})")
    print(table(title, scores))
    if out:
        record = {"model": args.model, "params": params, "pairs": len(pairs.gold), **scores,
                  "encoder": fp, **provenance("bench/mteb_stsb.py", argv, started)}
        write_atomic(out, json.dumps(record, indent=1, default=str) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
