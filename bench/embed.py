"""Throughput of embed.py vs transformers' LlamaModel on the same checkpoint, prompts and batch size.

    python bench/embed.py [--n 1000] [--batch-size 64]

Both run on the same 1,000 STS-B sentences and device (--device), in one process,
alternating: transformers in fp32, embed.py at its default settings (bf16 where the CPU has
native bf16 and on GPUs, fp32 elsewhere; --dtype overrides). transformers gets the full prompt
of every sentence, batched in input order with left padding (what a straightforward
implementation does); embed.py sorts by length and reuses the key/value cache of
the shared prefix. Printed: sentences/s of each, their ratio, the fraction of this
machine's matmul peak (in embed.py's dtype, measured in the same run) that
embed.py's linear layers reach, and the peak RSS of the process.
"""
import argparse
import pathlib
import resource
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from support.cli import cli, data_dir, device  # noqa: E402  (before torch: it sets OpenMP's waiting policy)
import torch  # noqa: E402
import embed as E  # noqa: E402
import model as M  # noqa: E402
from support import hub  # noqa: E402


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
        ids, mask = emb.tok.pad([emb.tok.encode(emb.prompt(s)[0]) for s in sentences[i:i + bs]], device=ref.device)
        h = ref(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
        out.append(h[:, -1].float().cpu().numpy())
    return np.concatenate(out)


def matmul_peak(dtype, dev, repeats=10) -> float:
    """This device's dense matmul rate in FLOP/s (the best of a few n x n products), in this process."""
    n = 8192 if dev.type == "cuda" else 2048
    a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)   # CUDA runs asynchronously
    best = float("inf")
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def linear_flops(emb, sentences) -> float:
    """FLOPs of the decoder blocks' linear layers for the tokens embed.py runs (the cached prefix runs once)."""
    params = sum(p.numel() for n, p in emb.model.named_parameters() if ".layers." in n and p.dim() == 2)
    return 2.0 * params * sum(len(ids) for ids, _ in emb.tokenize(sentences))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="number of STS-B dev sentences")
    ap.add_argument("--batch-size", type=int, default=64, help="sentences per forward pass, for both (default 64)")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats (best is reported)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="embed.py's dtype (default: bf16 on GPUs and CPUs with native bf16, else fp32)")
    ap.add_argument("--device", help="both models run here: cpu, cuda or cuda:N (default: cuda if available)")
    ap.add_argument("--data-dir", help="evaluation data (default: $SENTEMB_DATA, else data/)")
    args = ap.parse_args(argv)
    import transformers
    sents = stsb_sentences(args.n, args.data_dir)
    dev = device(args.device)
    ref = transformers.LlamaModel.from_pretrained(str(hub.resolve(hub.DEFAULT_MODEL)), dtype=torch.float32).to(dev).eval()
    dtype = getattr(torch, args.dtype) if args.dtype else M.default_dtype(dev)
    dname = str(dtype).removeprefix("torch.")
    print(f"{len(sents)} STS-B dev sentences, batch {args.batch_size}, embed.py in {dname}, "
          f"transformers in float32, on {dev}{'' if dev.type == 'cuda' else f', {torch.get_num_threads()} threads'}")
    print(f"{'setting':<22} {'embed.py sent/s':>16} {'transformers sent/s':>20} {'ratio':>7} {'max |diff|':>11}")
    for name, demos in (("no demonstration", []), ("one demonstration", "default")):   # the model's chosen one
        emb = E.Embedder(hub.DEFAULT_MODEL, demonstrations=demos, batch_size=args.batch_size, dtype=dtype,
                         device=dev)
        ours = theirs = 0.0
        for _ in range(args.repeats):
            t = time.perf_counter(); a = emb.encode(sents); ours = max(ours, len(sents) / (time.perf_counter() - t))
            t = time.perf_counter(); b = transformers_encode(ref, emb, sents, args.batch_size)
            theirs = max(theirs, len(sents) / (time.perf_counter() - t))
        print(f"{name:<22} {ours:>16.1f} {theirs:>20.1f} {ours / theirs:>6.2f}x {np.abs(a - b).max():>11.2e}")
        peak = max(matmul_peak(dtype, dev), matmul_peak(dtype, dev))
        used = linear_flops(emb, sents) * ours / len(sents)
        print(f"{'':<22} embed.py runs its linear layers at {used / 1e9:.1f} GFLOP/s, "
              f"{used / peak:.0%} of this device's {dname} matmul peak ({peak / 1e9:.1f} GFLOP/s, measured now)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (process, both models loaded)")


if __name__ == "__main__":
    sys.exit(cli(main))
