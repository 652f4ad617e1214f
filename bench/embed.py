"""Throughput of embed.py against transformers on the same checkpoint and prompts, eager, compiled.

    python bench/embed.py [--n 2000] [--batch-size 64] [--cold]

Everything runs in one process, on the same STS-B dev sentences and device (--device), alternating,
so that other jobs on a shared machine slow each side alike:
- embed.py at its default settings (bf16 on GPUs and CPUs with native bf16, else fp32;
  $SENTEMB_DTYPE or --dtype overrides), eager and compiled (support/compile.py); the compile time
  is printed apart and not counted in the throughput;
- the best peer: transformers' LlamaModel in the same dtype, given the prompts sorted by length in
  batches of --batch-size, each padded to its longest (what sentence-transformers' encode does);
- the plain peer: transformers in fp32, prompts in input order (--no-plain skips it).
transformers runs every full prompt; embed.py runs the shared prefix once and reuses its key/value
cache. Printed: sentences/s, the ratios to the best peer, the least cosine between embed.py's eager
vectors and the peer's and between the compiled and the eager ones (cos c/e), the fraction of this
device's matmul peak (in embed.py's dtype, measured in the same run) that embed.py's linear layers
reach, the compile time (cold: an empty compile cache, --cold; warm: the cache of an earlier run),
the break-even input (the sentences after which compiling has paid for itself), and the peak RSS.
"""
import argparse
import os
import pathlib
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# support.cli first: it sets OpenMP's waiting policy before torch loads.
from support.cli import cli, data_dir, default_dtype, device  # noqa: E402
import torch  # noqa: E402
import embed as E  # noqa: E402
from support import hub  # noqa: E402


def stsb_sentences(n, data_arg=None):
    data = data_dir(data_arg)
    out = []
    for line in (data / "sts" / "stsb" / "sts-dev.csv").read_text(encoding="utf-8").splitlines():
        c = line.split("\t")
        out += [c[5], c[6]]
    return out[:n]


@torch.inference_mode()
def transformers_encode(ref, emb, sentences, bs, by_length: bool):
    """The last token's final state of every full prompt through transformers, batches of bs left
    padded: in input order, or sorted by length as sentence-transformers' encode does."""
    prompts = [emb.tok.encode(emb.prompt(s)[0]) for s in sentences]
    order = list(range(len(prompts)))
    if by_length:
        order.sort(key=lambda i: -len(prompts[i]))
    out = np.zeros((len(prompts), ref.config.hidden_size), dtype=np.float32)
    for j in range(0, len(order), bs):
        idx = order[j:j + bs]
        ids, mask = emb.tok.pad([prompts[i] for i in idx], device=ref.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)   # left padding: count real tokens only
        h = ref(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        out[idx] = h[:, -1].float().cpu().numpy()   # (B, H)
    return out


def sync(dev):
    """Wait for the device: CUDA runs asynchronously."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def matmul_peak(dtype, dev, repeats=10) -> float:
    """This device's dense matmul rate in FLOP/s (the best of a few n x n products), in this
    process."""
    n = 8192 if dev.type == "cuda" else 2048
    a = torch.randn(n, n, dtype=dtype, device=dev)
    b = torch.randn(n, n, dtype=dtype, device=dev)
    best = float("inf")
    for _ in range(repeats):
        sync(dev)
        t = time.perf_counter()
        torch.mm(a, b)
        sync(dev)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def linear_flops(emb, sentences) -> float:
    """FLOPs of the decoder blocks' linear layers for the tokens embed.py runs (the cached prefix
    runs once)."""
    params = sum(p.numel() for n, p in emb.model.named_parameters()
                 if ".layers." in n and p.dim() == 2)
    tokens = sum(len(ids) for ids, _ in emb.tokenize(sentences))
    return 2.0 * params * tokens


def min_cosine(a, b) -> float:
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(cos.min())


def measure(emb, sents, bs, repeats, best_peer, plain_peer):
    """-> ({side: best sentences/s}, least cosine of eager to the best peer, least cosine of
    compiled to eager), the sides run in turn `repeats` times."""
    sides = {
        "eager": lambda: emb.encode(sents),
        "compiled": lambda: emb.encode(sents),
        "best": lambda: transformers_encode(best_peer, emb, sents, bs, by_length=True),
        "plain": lambda: transformers_encode(plain_peer, emb, sents, bs, by_length=False),
    }
    if plain_peer is None:
        del sides["plain"]
    rates = dict.fromkeys(sides, 0.0)
    vecs = {}
    for _ in range(repeats):
        for side, run in sides.items():
            emb.compile = side == "compiled"
            t = time.perf_counter()
            vecs[side] = run()
            rates[side] = max(rates[side], len(sents) / (time.perf_counter() - t))
    rates.setdefault("plain", float("nan"))
    peer = min_cosine(vecs["eager"], vecs["best"])
    same = min_cosine(vecs["compiled"], vecs["eager"])
    return rates, peer, same


def parser():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = ap.add_argument
    a("--n", type=int, default=2000, help="number of STS-B dev sentences (default 2000)")
    a("--batch-size", type=int, default=64, help="sentences per forward pass, for all (default 64)")
    a("--repeats", type=int, default=3, help="timed repeats (the best is reported)")
    a("--dtype", choices=["float32", "bfloat16", "float16"],
      help="embed.py's and the best peer's dtype (default: $SENTEMB_DTYPE, else bf16 on GPUs and "
           "CPUs with native bf16, else fp32)")
    a("--device", help="all run here: cpu, cuda or cuda:N (default: cuda if available)")
    a("--cold", action="store_true",
      help="compile into an empty cache (a first run's compile time), not the persistent one")
    a("--no-plain", action="store_true", help="skip the plain peer (fp32, input order)")
    a("--data-dir", help="evaluation data (default: $SENTEMB_DATA, else data/)")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    if args.cold:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="sentemb-compile-")
    import transformers
    sents = stsb_sentences(args.n, args.data_dir)
    dev = device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(dev)
    dname = str(dtype).removeprefix("torch.")
    path = str(hub.resolve(hub.DEFAULT_MODEL))
    best_peer = transformers.LlamaModel.from_pretrained(path, dtype=dtype).to(dev).eval()
    plain_peer = None
    if not args.no_plain:
        plain_peer = transformers.LlamaModel.from_pretrained(path, dtype=torch.float32)
        plain_peer = plain_peer.to(dev).eval()
    threads = "" if dev.type == "cuda" else f", {torch.get_num_threads()} threads"
    print(f"{len(sents)} STS-B dev sentences, batch {args.batch_size}, {dname} (embed.py and "
          f"the best peer), on {dev}{threads}; best of {args.repeats}")
    print("sentences/s: embed.py eager and compiled; transformers sorted by length in "
          f"{dname} (the best peer) and in input order in float32 (the plain peer)")
    head = ("setting", "eager", "compiled", "best peer", "eager/peer", "compiled/peer",
            "plain peer", "cos to peer", "cos c/e")
    print(f"{head[0]:<18}" + "".join(f"{h:>14}" for h in head[1:]))
    base = E.Embedder(hub.DEFAULT_MODEL, demonstrations=[], batch_size=args.batch_size,
                      dtype=dtype, device=dev, compile=True)
    peak = max(matmul_peak(dtype, dev), matmul_peak(dtype, dev))
    notes = []
    with_demo = base.with_demonstrations(E.default_demonstrations(hub.DEFAULT_MODEL))
    for name, emb in (("no demonstration", base), ("one demonstration", with_demo)):
        emb.compile = True
        emb.encode(sents[:2 * args.batch_size])   # compiles; the second setting reuses the graph
        compile_s = base.stats["compile_seconds"]
        r, peer, same = measure(emb, sents, args.batch_size, args.repeats, best_peer, plain_peer)
        cells = [f"{r['eager']:.1f}", f"{r['compiled']:.1f}", f"{r['best']:.1f}",
                 f"{r['eager'] / r['best']:.2f}x", f"{r['compiled'] / r['best']:.2f}x",
                 f"{r['plain']:.1f}", f"{peer:.5f}", f"{same:.5f}"]
        print(f"{name:<18}" + "".join(f"{c:>14}" for c in cells))
        flops = linear_flops(emb, sents) / len(sents)
        fractions = [f"{flops * r[k] / peak:.0%} {k}" for k in ("eager", "compiled")]
        saved = 1 / r["eager"] - 1 / r["compiled"]      # seconds per sentence
        even = f"{compile_s / saved:,.0f} sentences" if saved > 0 else "never"
        notes.append(f"{name}: linear layers at {', '.join(fractions)} of the {dname} matmul "
                     f"peak; compiling pays after {even}")
    from torch._dynamo.utils import counters
    cache = "warm: kernels from the compile cache"
    if not counters["inductor"]["fxgraph_cache_hit"]:
        cache = "cold: an empty cache"
    graphs = counters["stats"]["unique_graphs"]
    notes.insert(0, f"compile: {compile_s:.1f} s ({cache}); graphs built: {graphs}")
    print(f"matmul peak {peak / 1e9:.0f} GFLOP/s ({dname}, measured now)")
    print("\n".join(notes))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MiB (process, all models loaded)")


if __name__ == "__main__":
    sys.exit(cli(main))
