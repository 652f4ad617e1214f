"""Peak memory of one training step of train_cse.py: gradient caching vs batch size, and vs plain
backprop.

    python bench/train_cse.py          # cached 256, 64, 32; plain 32, 64; default model, 4-bit
    python bench/train_cse.py --runs cached:32,plain:32 --output runs/bench-small.json

Each run is a fresh subprocess that builds exactly what train_cse.py builds (train_cse.prepare:
the model with a frozen --bits base, LoRA r=64 on all linears, AdamW), resets the kernel's
peak-RSS counter (/proc/self/clear_refs), runs ONE real training step (train_cse.train_step: the
first batch of the shuffled NLI triplets, tokenization, forward/backward, optimizer step) and
reads VmHWM. "cached" is gradient caching with --chunk-size sentences per forward pass; "plain"
keeps every chunk's graph until one backward (what a plain transformers + LoRA step does). Both
see the same triplets: batch 32 is the first 32 of batch 256's. Printed: peak RSS, its rise over
the RSS before the step, seconds, and the ratios cached-256 / cached-32 (target <= 1.2) and
plain / cached at equal batch size.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def status_kb(field):
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def plain_step(model, chunks, temp):
    """What a plain transformers + LoRA step does: every chunk's graph lives until one
    backward."""
    import torch
    import train_cse as T
    local = torch.cat([T.embed_chunk(model, ids, mask) for _, ids, mask in chunks])   # (N, H)
    order = torch.argsort(torch.cat([rows for rows, _, _ in chunks]))   # back to triplet order
    loss = T.batch_loss(local[order], temp)
    loss.backward()
    return loss.detach()


def worker(spec, a):
    """One step in this process; prints one JSON line."""
    import torch
    import train_cse as T
    mode, batch = spec.split(":")
    if mode == "plain":
        T.cached_step = plain_step
    with tempfile.TemporaryDirectory() as out:
        flags = ["--model", a.model, "--bits", a.bits, "--batch-size", batch,
                 "--chunk-size", str(a.chunk_size), "--max-steps", "1", "--eval-every", "0",
                 "--save-every", "0", "--save-minutes", "0", "--output", out + "/run"]
        if a.data:
            flags += ["--data", a.data]
        if a.data_dir:
            flags += ["--data-dir", a.data_dir]
        if a.dtype:
            flags += ["--dtype", a.dtype]
        args, _, _ = T.parse_args(flags)
        run = T.prepare(args)
        import gc
        gc.collect()
        try:   # forget the peak of model loading: from here VmHWM is the step's own peak
            pathlib.Path("/proc/self/clear_refs").write_text("5")
            reset = True
        except OSError:
            reset = False
        before = status_kb("VmRSS")
        run.model.train()
        t0 = time.perf_counter()
        rec = T.train_step(run)
        seconds = time.perf_counter() - t0
        peak = status_kb("VmHWM")
    print(json.dumps({
        "run": spec,
        "mode": mode,
        "batch": int(batch),
        "chunk_size": a.chunk_size,
        "peak_rss_mb": round(peak / 1024),
        "rss_before_step_mb": round(before / 1024),
        "step_rise_mb": round((peak - before) / 1024),
        "seconds": round(seconds, 1),
        "loss": rec["loss"],
        "peak_reset": reset,
        "threads": torch.get_num_threads(),
    }))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="cached:256,cached:64,cached:32,plain:32,plain:64",
                   help="comma-separated MODE:BATCH, MODE = cached (gradient caching) or plain "
                        "(default: %(default)s)")
    p.add_argument("--model", default="smollm2-135m",
                   help="model alias or directory (default: %(default)s)")
    p.add_argument("--bits", default="4", choices=["4", "8", "none"],
                   help="quantize the frozen base (default 4, QLoRA)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="precision (default: train_cse.py's)")
    p.add_argument("--chunk-size", type=int, default=32,
                   help="sentences per forward pass (default 32, as train_cse.py)")
    p.add_argument("--data", help="NLI csv (default: train_cse.py's)")
    p.add_argument("--data-dir", help="data folder (default: $SENTEMB_DATA, else ./data)")
    p.add_argument("--output", default=str(ROOT / "runs" / "bench-train-cse.json"),
                   help="JSON results (default: %(default)s)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a)
    specs = [s.strip() for s in a.runs.split(",") if s.strip()]
    for s in specs:
        mode, _, batch = s.partition(":")
        if mode not in ("cached", "plain") or not batch.isdigit():
            p.error(f"--runs: {s!r} is not MODE:BATCH with MODE cached or plain")
    results = []
    passed = ("model", "bits", "dtype", "chunk_size", "data", "data_dir")
    for s in specs:   # a fresh process each: no run inherits another's allocator state or peak
        cmd = [sys.executable, __file__, "--worker", s]
        for k in passed:
            if getattr(a, k) is not None:
                cmd += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            print(r.stderr[-3000:], file=sys.stderr)
            sys.exit(f"run {s} failed")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        results.append(res)
        print(f"{s:>12}: peak RSS {res['peak_rss_mb']:6d} MB "
              f"(step rise {res['step_rise_mb']:6d} MB), {res['seconds']:7.1f} s/step  "
              f"[{time.time() - t0:.0f} s with model load]", flush=True)
    # Ratios to the smallest cached batch (the target: the largest cached one <= 1.2x), and
    # plain / cached at equal batch size.
    by = {r["run"]: r for r in results}
    ratios = {}
    cached = sorted((r for r in results if r["mode"] == "cached"), key=lambda r: r["batch"])
    pairs = [(r["run"], cached[0]["run"]) for r in results if cached and r is not cached[0]]
    for r in results:
        same = f"cached:{r['batch']}"
        if r["mode"] == "plain" and same in by:
            pairs.append((r["run"], same))
    for x, y in dict.fromkeys(pairs):
        ratios[f"{x} / {y}"] = round(by[x]["peak_rss_mb"] / by[y]["peak_rss_mb"], 3)
        print(f"peak RSS {x} / {y} = {ratios[f'{x} / {y}']:.2f}")
    out = pathlib.Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"results": results, "ratios": ratios, "cpu_count": os.cpu_count(),
              "command": sys.argv}
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
