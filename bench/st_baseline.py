#!/usr/bin/env python
"""Evaluate a sentence-transformers model directory with evaluate.py's loaders, scorers and record
layout: the README's reference row of a trained sentence encoder (all-MiniLM-L6-v2), for scale.

    python bench/st_baseline.py DIR --tasks sts --output results/all-minilm-l6-v2.json
"""
import argparse
import importlib.util
import pathlib
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from support.cache import CachedEncoder  # noqa: E402
from support.cli import UserError, cli, data_dir, device, positive, writable  # noqa: E402
from support.provenance import provenance  # noqa: E402
import evaluate as ev  # noqa: E402


def baseline(encoder, name, params, loaded, root, out, kfold=10, argv=None, started=None):
    """Score encoder (encode(list[str]) -> (n, d) array) on {task: splits} from
    evaluate.load_task, print the tables and write the record to out. A peer baseline has no
    fingerprint, so its vectors stay in memory."""
    row = ev.evaluate(name, params, CachedEncoder(encoder, disk=False), loaded, kfold)
    row["encoder"] = {"sentence_transformers": name}
    prov = provenance("bench/st_baseline.py", argv, started or time.time())
    return ev.write_record(out, [row], loaded, root, kfold, prov)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("encoder", metavar="DIR",
                   help="a sentence-transformers model directory (with modules.json)")
    p.add_argument("--tasks", default="sts",
                   help="as evaluate.py's: sts (default), transfer, all, or names")
    p.add_argument("--kfold", type=int, default=10,
                   help="transfer CV folds (default 10, the paper's)")
    p.add_argument("--data-dir",
                   help="data folder with sts/ and transfer/ (default: $SENTEMB_DATA, else ./data)")
    p.add_argument("--output", required=True, help="JSON results file")
    p.add_argument("--batch-size", type=int, default=64,
                   help="sentences per forward pass (default 64)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    started = time.time()
    args = p.parse_args(argv)
    names = ev.parse_tasks(args.tasks)
    if args.kfold < 2:
        raise UserError(f"--kfold {args.kfold}: must be at least 2")
    positive(batch_size=args.batch_size)
    if not (pathlib.Path(args.encoder) / "modules.json").is_file():
        raise UserError(f"{args.encoder} is not a sentence-transformers model directory "
                        f"(no modules.json)")
    if importlib.util.find_spec("sentence_transformers") is None:
        raise UserError("this needs sentence-transformers: pip install sentence-transformers")
    out = writable("--output", args.output)
    dev = device(args.device)
    root = data_dir(args.data_dir)
    loaded = {n: ev.load_task(n, root) for n in names}  # data errors surface before the model loads
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(args.encoder, device=str(dev))
    def encode(sentences):
        return st.encode(list(sentences), batch_size=args.batch_size)

    encoder = SimpleNamespace(encode=encode)
    params = sum(p.numel() for p in st.parameters())
    baseline(encoder, args.encoder, params, loaded, root, out, args.kfold, argv, started)
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
