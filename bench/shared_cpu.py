"""Throughput of embed.py on a shared CPU: alone, and beside a competing CPU-bound process, with
OpenMP threads that wait passively (sentemb's default, set in support/cli.py) or spin
(OMP_WAIT_POLICY=ACTIVE).

    python bench/shared_cpu.py [--n 192] [--competitors 1]

Each measurement runs in a fresh process (the policy is read when torch loads), embedding the same
STS-B dev sentences with the default model in fp32 on all cores. A competitor is a busy loop in
another process. Target: under load, throughput drops at most in proportion to the cores taken,
i.e. loaded / alone >= (cores - competitors) / cores.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

CHILD = """
import json, os, sys, time
sys.path.insert(0, {root!r})
from support.cli import data_dir
import embed as E
rows = (data_dir() / "sts" / "stsb" / "sts-dev.csv").read_text(encoding="utf-8").splitlines()
sents = [r.split("\t")[5] for r in rows][:{n}]
e = E.Embedder(demonstrations=[], batch_size=32, dtype="float32")
e.encode(sents[:32])                                  # warm-up
t = time.perf_counter(); e.encode(sents); dt = time.perf_counter() - t
print(json.dumps({{"policy": os.environ.get("OMP_WAIT_POLICY"), "rate": len(sents) / dt}}))
"""


def measure(policy, n, competitors):
    env = dict(os.environ)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    else:
        env.pop("OMP_WAIT_POLICY", None)             # support/cli.py's default applies
    spin = [sys.executable, "-c", "while True: pass"]
    busy = [subprocess.Popen(spin) for _ in range(competitors)]
    try:
        code = CHILD.format(root=str(ROOT), n=n)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)
    finally:
        for p in busy:
            p.kill()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=192, help="sentences per measurement")
    ap.add_argument("--competitors", type=int, default=1,
                    help="busy-loop processes beside the embedder")
    args = ap.parse_args()
    cores = os.cpu_count()
    print(f"{cores} cores, {args.competitors} competitor(s); sentences/s (fresh process each)")
    rows = {}
    for policy in (None, "ACTIVE"):
        alone = measure(policy, args.n, 0)
        loaded = measure(policy, args.n, args.competitors)
        name = f"{alone['policy']} ({'default' if policy is None else 'set by the user'})"
        rows[name] = (alone["rate"], loaded["rate"])
        print(f"{name:32s} alone {alone['rate']:6.1f}   loaded {loaded['rate']:6.1f}   "
              f"loaded/alone {loaded['rate'] / alone['rate']:.2f}")
    print(f"proportional share of the cores left: {(cores - args.competitors) / cores:.2f}")
    rates = {k: {"alone": a, "loaded": b} for k, (a, b) in rows.items()}
    print(json.dumps({"cores": cores, "competitors": args.competitors, "n": args.n,
                      "when": time.ctime(), "rates": rates}))


if __name__ == "__main__":
    main()
