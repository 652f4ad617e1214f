"""Corpus embedding (support/corpus.py): peak memory at 10k vs 100k lines, sentences/s with 1 and
2 processes, and the time a kill -9 in mid-run costs. Each run is `python embed.py --input ...
--output x.npy` in a child process, on a tiny random LLaMA (2 blocks, 64 wide) with the default
model's real tokenizer, so reading and tokenizing dominate.

    python bench/corpus.py [--small 10000] [--large 100000] [--speed 40000]
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from support import corpus, gguf  # noqa: E402
import model as M  # noqa: E402

WORDS = ("a man woman child dog cat plays reads eats runs under over the park guitar street house "
         "quickly slowly red green small large old new music river market morning evening bright "
         "quiet").split()


def tiny_model(d: Path) -> str:
    """A 2-block LLaMA with random weights and SmolLM2's tokenizer."""
    import torch
    from safetensors.torch import save_file
    src = gguf.smollm2_dir()
    cfg = dict(json.loads((src / "config.json").read_text()), hidden_size=64,
               intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16)
    (d / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, d / f)
    with torch.device("meta"):
        state = M.Decoder(M.Config.from_hf(cfg)).state_dict()
    shapes = {k: v.shape for k, v in state.items() if k != "lm_head.weight"}
    torch.manual_seed(0)
    save_file({k: torch.randn(s) * 0.02 for k, s in shapes.items()}, str(d / "model.safetensors"))
    return str(d)


def write_corpus(path: Path, n: int):
    rng = random.Random(0)
    lines = [" ".join(rng.choices(WORDS, k=rng.randint(4, 24))) + ".\n" for _ in range(n)]
    path.write_text("".join(lines))


def embed(model, src, out, procs=1, kill_at=None):
    """-> (seconds, peak RSS in MB of the largest process, the sentences/s it reports) of one run;
    with kill_at, a SIGKILL once its progress record counts kill_at chunks done."""
    cmd = ["--model", model, "--demonstration", "none", "--input", str(src), "--output", str(out)]
    torchrun = []
    if procs > 1:
        torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
    run = [sys.executable, *torchrun, str(ROOT / "embed.py")]
    t0 = time.perf_counter()
    # Spinning OpenMP threads on a shared CPU make timings swing.
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    p = subprocess.Popen(run + cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         start_new_session=True)
    if kill_at is not None:
        while chunks_done(out) < kill_at:
            time.sleep(0.05)
        os.killpg(p.pid, signal.SIGKILL)
    _, status, usage = os.wait4(p.pid, 0)
    err = p.stderr.read().decode()
    if kill_at is None and status != 0:
        sys.exit(f"embed.py failed:\n{err[-2000:]}")
    rate = re.search(r"([\d.]+) sentences/s", err)
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, float(rate.group(1)) if rate else None


def chunks_done(out: Path) -> int:
    """The chunks rank 0's progress record counts as done (0 before it exists)."""
    done = 0
    for record in out.parent.glob(out.name + ".*.progress.0.json"):
        done = max(done, json.loads(record.read_text() or "{}").get("done", 0))
    return done


def main():
    ap = argparse.ArgumentParser(
        description="Peak memory, processes and kill/resume of corpus embedding.")
    ap.add_argument("--small", type=int, default=10_000,
                    help="lines of the small corpus (default 10000)")
    ap.add_argument("--large", type=int, default=100_000,
                    help="lines of the large corpus (default 100000)")
    ap.add_argument("--speed", type=int, default=40_000,
                    help="lines for the speed and kill runs (default 40000)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="corpus-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "model").mkdir()
        model = tiny_model(tmp / "model")
        for n in (args.small, args.large, args.speed):
            write_corpus(tmp / f"{n}.txt", n)
        rss = {}
        for n in (args.small, args.large):
            rss[n] = embed(model, tmp / f"{n}.txt", tmp / f"{n}.npy")[1]
        print(f"peak RSS: {rss[args.small]:.0f} MB at {args.small} lines, "
              f"{rss[args.large]:.0f} MB at {args.large} lines: "
              f"ratio {rss[args.large] / rss[args.small]:.3f}")
        src = tmp / f"{args.speed}.txt"
        t1, _, r1 = embed(model, src, tmp / "one.npy")
        t2, _, r2 = embed(model, src, tmp / "two.npy", procs=2)
        print(f"{args.speed} lines: 1 process {t1:.1f} s with start-up, {r1:.0f} sentences/s after "
              f"it; 2 processes {t2:.1f} s, {r2:.0f} sentences/s: speed-up {t1 / t2:.2f} "
              f"({r2 / r1:.2f} after start-up)")
        chunks = -(-args.speed // corpus.CHUNK)
        killed, *_ = embed(model, src, tmp / "killed.npy", kill_at=chunks // 2)
        resumed, *_ = embed(model, src, tmp / "killed.npy")
        diff = np.abs(np.load(tmp / "killed.npy") - np.load(tmp / "one.npy")).max()
        cost = killed + resumed - t1
        print(f"kill -9 after {chunks // 2} of {chunks} chunks ({killed:.1f} s), resumed in "
              f"{resumed:.1f} s: {cost:+.1f} s ({cost / t1:+.0%}) against one uninterrupted run; "
              f"max abs diff {diff:.1e}")


if __name__ == "__main__":
    main()
