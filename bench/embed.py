"""Throughput of embed.py vs transformers' LlamaModel on the same checkpoint, prompts and batch size.

    python bench/embed.py [--n 1000] [--batch-size 64]

Both run fp32 on the same 1,000 STS-B sentences, in one process, alternating.
transformers gets the full prompt of every sentence, batched in input order with
left padding (what a straightforward implementation does); embed.py sorts by
length and reuses the key/value cache of the shared prefix. Printed: sentences/s
of each, their ratio, and the peak RSS of the process.
"""
import argparse
import pathlib
import resource
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from common import cli, data_dir  # noqa: E402  (before torch: it sets OpenMP's waiting policy)
import torch  # noqa: E402
import embed as E  # noqa: E402
import model as M  # noqa: E402


def stsb_sentences(n, data_arg=None):
    data = data_dir(data_arg)
    out = []
    for line in (data / "sts" / "stsb" / "sts-dev.csv").read_text(encoding="utf-8").splitlines():
        c = line.split("\t")
        out += [c[5], c[6]]
    return out[:n]


@torch.inference_mode()
def transformers_encode(ref, emb, sentences, bs):
    out = []
    for i in range(0, len(sentences), bs):
        ids, mask = emb.tok.pad([emb.tok.encode(emb.prompt(s)[0]) for s in sentences[i:i + bs]])
        h = ref(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
        out.append(h[:, -1].numpy())
    return np.concatenate(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="number of STS-B dev sentences")
    ap.add_argument("--batch-size", type=int, default=64, help="sentences per forward pass, for both (default 64)")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats (best is reported)")
    ap.add_argument("--data-dir", help="evaluation data (default: $SENTEMB_DATA, else data/)")
    args = ap.parse_args(argv)
    import transformers
    sents = stsb_sentences(args.n, args.data_dir)
    ref = transformers.LlamaModel.from_pretrained(str(M.resolve(M.DEFAULT_MODEL)), dtype=torch.float32).eval()
    print(f"{len(sents)} STS-B dev sentences, batch {args.batch_size}, fp32, {torch.get_num_threads()} threads")
    print(f"{'setting':<22} {'embed.py sent/s':>16} {'transformers sent/s':>20} {'ratio':>7} {'max |diff|':>11}")
    for name, demos in (("no demonstration", []), ("one demonstration", [("A jockey riding a horse.", "Equestrian")])):
        emb = E.Embedder(M.DEFAULT_MODEL, demonstrations=demos, batch_size=args.batch_size, dtype="float32")
        ours = theirs = 0.0
        for _ in range(args.repeats):
            t = time.perf_counter(); a = emb.encode(sents); ours = max(ours, len(sents) / (time.perf_counter() - t))
            t = time.perf_counter(); b = transformers_encode(ref, emb, sents, args.batch_size)
            theirs = max(theirs, len(sents) / (time.perf_counter() - t))
        print(f"{name:<22} {ours:>16.1f} {theirs:>20.1f} {ours / theirs:>6.2f}x {np.abs(a - b).max():>11.2e}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (process, both models loaded)")


if __name__ == "__main__":
    sys.exit(cli(main))
