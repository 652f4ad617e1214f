"""Int8 inference on CPU: does a path through int8 matmuls keep the default model's STS-B dev score?

    python bench/int8.py [--n 128] [--threads 2] [--no-dev] [--output results/bench-int8.json]

Each variant replaces the linear layers of the decoder blocks; everything else stays fp32.
Against fp32 in the same process:
  dynamic        torch's dynamic int8 linear (fbgemm): int8 weights per output channel,
                 activations quantized per tensor on the fly
  dynamic-down   the same, with the MLP's down_proj left in fp32 (its inputs carry the largest
                 outliers)
  smooth-down    dynamic-down after SmoothQuant (alpha 0.5) moves activation outliers into the
                 weights, calibrated on 64 STS-B train sentences
  per-token      W8A8 with per-token activation and per-channel weight scales on every linear,
                 simulated in fp32: accuracy only (torch has no CPU kernel for it, so no time)
Prints the time of --n STS-B dev sentences as a ratio to fp32, the cosine of the PromptEOL
embeddings to fp32's (mean, min), and STS-B dev Spearman with the default demonstration. The
target: at most 0.5 points below fp32, and faster than bf16.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support.cli import data_dir  # noqa: E402  (before torch: it sets OpenMP's waiting policy)
from support.files import write_atomic  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
import embed as E  # noqa: E402
import evaluate as EV  # noqa: E402


class Dynamic(nn.Module):
    """fbgemm's dynamic int8 linear; x / smooth first when SmoothQuant scales are given."""

    def __init__(self, lin: nn.Linear, smooth=None):
        super().__init__()
        f = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
        f.load_state_dict(lin.state_dict())
        if smooth is not None:
            f.weight.data *= smooth                               # W diag(s) (x / s) = W x
        qconfig = {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}
        quantized = torch.ao.quantization.quantize_dynamic(nn.Sequential(f), qconfig,
                                                           dtype=torch.qint8)
        self.q = quantized[0]
        self.smooth = smooth

    def forward(self, x):
        return self.q(x if self.smooth is None else x / self.smooth)


class PerToken(nn.Module):
    """W8A8, per-token activation scales and per-channel weight scales, rounded in fp32."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.weight = fake_int8(lin.weight.data)
        self.bias = lin.bias

    def forward(self, x):
        return nn.functional.linear(fake_int8(x), self.weight, self.bias)


def fake_int8(t):
    """Symmetric int8 along the last dim, back in fp32."""
    s = t.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
    return (t / s).round().clamp(-127, 127) * s


def input_absmax(emb, names, sentences) -> dict:
    """Per-input-channel max |x| of each named linear, over the prompts of `sentences`."""
    amax = {}

    def hook(name):
        def f(mod, inp, out):
            x = inp[0].reshape(-1, inp[0].shape[-1]).abs().amax(0)
            amax[name] = torch.maximum(amax[name], x) if name in amax else x
        return f
    hooks = [emb.model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    emb.with_demonstrations(emb.demonstrations).encode(sentences)
    for h in hooks:
        h.remove()
    return amax


def is_down(name) -> bool:
    """The MLP's down_proj: its inputs carry the largest activation outliers."""
    return name.endswith("down_proj")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=128,
                    help="STS-B dev sentences timed and compared (default 128)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-dev", action="store_true",
                    help="skip the STS-B dev scores (minutes each)")
    ap.add_argument("--output", help="also write the rows to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = EV.load_stsb(data_dir(), "dev")
    train = EV.load_stsb(data_dir(), "train")
    sentences = (dev.a + dev.b)[:args.n]
    base = E.Embedder(batch_size=32, dtype="float32")   # the variants replace fp32 linears
    names = [n for n, m in base.model.named_modules()
             if isinstance(m, nn.Linear) and ".layers." in n]
    fp32 = {n: base.model.get_submodule(n) for n in names}
    w_amax = {n: fp32[n].weight.data.abs().amax(0) for n in names}
    x_amax = input_absmax(base, names, (train.a + train.b)[:64])
    smooth = {}
    for n in names:   # SmoothQuant, alpha 0.5: s = sqrt(max|x| / max|w|) per input channel
        ratio = x_amax[n].clamp(min=1e-5) / w_amax[n].clamp(min=1e-5)
        smooth[n] = ratio.sqrt().clamp(min=1e-2)
    variants = {"fp32": lambda n: fp32[n],
                "dynamic": lambda n: Dynamic(fp32[n]),
                "dynamic-down": lambda n: fp32[n] if is_down(n) else Dynamic(fp32[n]),
                "smooth-down": lambda n: fp32[n] if is_down(n) else Dynamic(fp32[n], smooth[n]),
                "per-token": lambda n: PerToken(fp32[n])}
    print(f"{args.n} STS-B dev sentences, default model and demonstration, batch 32, "
          f"{args.threads} threads")
    print(f"{'variant':14s} {'time/fp32':>10s} {'cos mean':>9s} {'cos min':>8s} {'STS-B dev':>10s}")
    rows = []
    ref = None
    t_ref = None
    for name, make in variants.items():
        for n in names:
            base.model.set_submodule(n, make(n))
        emb = base.with_demonstrations(base.demonstrations)   # a fresh prefix cache for them
        emb.encode(sentences[:32])                             # warm-up
        t = time.perf_counter()
        out = emb.encode(sentences)
        seconds = time.perf_counter() - t
        if ref is None:                                        # fp32 comes first
            ref = out
            t_ref = seconds
        cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
        score = None if args.no_dev else 100 * EV.stsb_dev(emb)
        ratio = None if name == "per-token" else seconds / t_ref
        rows.append(dict(variant=name, time_ratio=ratio, cos_mean=float(cos.mean()),
                         cos_min=float(cos.min()), stsb_dev=score))
        shown_ratio = "-" if ratio is None else f"{ratio:.2f}x"
        shown_score = "-" if score is None else f"{score:.2f}"
        print(f"{name:14s} {shown_ratio:>10s} {cos.mean():9.4f} {cos.min():8.4f} "
              f"{shown_score:>10s}", flush=True)
    if args.output:
        record = dict(n=args.n, threads=args.threads, rows=rows)
        write_atomic(Path(args.output), json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
