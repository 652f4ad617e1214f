"""Where one training step's time goes: train_cse.py's default recipe, profiled, as a table.

    python bench/profile_step.py                          # batch 32, float32 and bfloat16
    python bench/profile_step.py --batch-size 256 --dtype bfloat16 --per-call

Each configuration builds what train_cse.py builds (train_cse.prepare: the default model with a
frozen 4-bit base, dequantized once on a CPU, LoRA r=64 on all linears, AdamW), times one
unprofiled warm-up step (train_cse.train_step), then runs the same batch again under
torch.profiler. Every chunk is replayed (--graph-memory 0), as most chunks of a 256-triplet batch
are, so a smaller batch profiles the default recipe's step, scaled. --per-call adds the QLoRA path
(bitsandbytes dequantizes on every call, as on GPUs) in the last --dtype.

Attribution: forward hooks registered here (model.py and lora.py stay as they are) push a
torch.profiler.record_function range around each module's forward: a LoRA layer, its frozen
base layer, its dropout, attention, norms, MLP and decoder layers, and the whole model, whose
range also names the pass (no graph: gradient caching's first pass; graph: its replay). Each
op's self time goes to the innermost range around it; within a LoRA layer, matmuls by op name;
ops named *dequantize* to dequantization wherever they run. A backward op goes to the row of
the forward op whose autograd node it runs (their sequence numbers match). Rows sum to the
profiled step; the profiler's own cost makes it slower than the unprofiled one.
"""
import argparse
import os
import pathlib
import platform
import resource
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# support.cli first: it sets OpenMP's waiting policy before torch loads.
from support.cli import cli  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import lora  # noqa: E402
import model as M  # noqa: E402
import train_cse as T  # noqa: E402

ROWS = {   # row -> what it holds
    "dequantize": "4-bit NF4 -> compute dtype (bitsandbytes)",
    "base matmul": "frozen W0 x (+ b) of the 210 block linears",
    "LoRA matmul": "A x, B (A x)",
    "LoRA dropout": "dropout masks on LoRA inputs",
    "LoRA other": "casts, scaling, add; weight-grad accumulation",
    "attention": "SDPA, RoPE, head reshapes",
    "norms": "RMSNorm / LayerNorm",
    "elementwise": "SwiGLU / ReLU, residual adds",
    "embed, mask": "token embeddings, positions, masks",
    "loss, cache": "outside the model: loss, cat, clipping",
    "optimizer": "AdamW step, zero_grad",
}
PASSES = ("no graph", "graph", "backward", "other")
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}
CASTS = {"aten::to", "aten::_to_copy", "aten::copy_"}
BACKWARD = "autograd::engine::evaluate_function: "


def module_row(m) -> str | None:
    """The row a module's own ops go to (ops of its children go to theirs)."""
    if isinstance(m, lora.LoRALinear):
        return "LoRA other"
    if isinstance(m, M.Attention):
        return "attention"
    if isinstance(m, (M.RMSNorm, nn.LayerNorm)):
        return "norms"
    if isinstance(m, (M.LlamaMLP, M.LlamaLayer, M.OPTLayer)):
        return "elementwise"
    if isinstance(m, (M.LlamaModel, M.OPTDecoder)):
        return "embed, mask"
    return None


def add_ranges(model) -> list:
    """Forward hooks that open a record_function range per module -> their handles."""
    handles = []

    def wrap(m, name):
        stack = []

        def enter(mod, args):
            stack.append(record_function(name() if callable(name) else name))
            stack[-1].__enter__()

        def leave(mod, args, out):
            stack.pop().__exit__(None, None, None)
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave))

    # The whole model: its pass, and its own ops' row (one range: hooks leave in entry order)
    wrap(model, lambda: "pass: graph" if torch.is_grad_enabled() else "pass: no graph")
    for m in model.modules():
        if isinstance(m, lora.LoRALinear):
            wrap(m.base_layer, "row: base matmul")
            wrap(m.lora_dropout, "row: LoRA dropout")
        row = module_row(m)
        if row:
            wrap(m, "row: " + row)
    return handles


def op_row(name, row) -> str:
    """Refine a range's row by the op: dequantization anywhere, matmuls and casts in LoRA."""
    if "dequantize" in name:
        return "dequantize"
    if row == "LoRA other" and name in MATMULS:
        return "LoRA matmul"
    return row


def attribute(events) -> dict:
    """{(row, pass): seconds} from the profiler's events (self CPU time, this thread's tree)."""
    forward = {}        # autograd sequence number -> the row of the forward op that made the node
    where = {}
    for e in events:    # parents come before children: the forward rows first
        parent = where.get(id(e.cpu_parent), ("loss, cache", "other"))
        row, phase = parent
        if e.name.startswith("pass: "):
            phase = e.name.removeprefix("pass: ")
            row = "embed, mask"
        elif e.name.startswith("row: "):
            row = e.name.removeprefix("row: ")
        elif e.name.startswith("Optimizer."):
            row = "optimizer"
        elif e.name.startswith(BACKWARD):
            phase = "backward"
            row = forward.get(e.sequence_nr, "LoRA other")   # AccumulateGrad: LoRA weights
        row = op_row(e.name, row)
        where[id(e)] = (row, phase)
        if phase != "backward" and e.sequence_nr >= 0 and e.sequence_nr not in forward:
            forward[e.sequence_nr] = row
    seconds = {}
    for e in events:
        key = where[id(e)]
        seconds[key] = seconds.get(key, 0.0) + e.self_cpu_time_total / 1e6
    return seconds


def ordered(events):
    """Events with every parent before its children (by start time, longest first)."""
    return sorted(events, key=lambda e: (e.time_range.start, -e.time_range.end))


WIDTHS = (9, 8, 9, 7)    # the PASSES columns


def cells(values) -> str:
    return "".join(f"{v:{w}.2f}" for v, w in zip(values, WIDTHS, strict=True))


def table(seconds, batch) -> list[str]:
    total = sum(seconds.values())
    scale = 256 / batch
    head = (f"{'row':<14}{'no graph':>9}{'graph':>8}{'backward':>9}{'other':>7}{'total s':>9}"
            f"{'share':>7}{'at 256':>8}  what")
    lines = [head, "-" * len(head)]
    at256 = 0.0
    for row, what in ROWS.items():
        values = [seconds.get((row, p), 0.0) for p in PASSES]
        s = sum(values)
        est = s if row == "optimizer" else s * scale   # the optimizer's work is per step
        at256 += est
        lines.append(f"{row:<14}{cells(values)}{s:9.2f}{100 * s / total:6.1f}%{est:8.1f}  {what}")
    sums = [sum(v for (_, p), v in seconds.items() if p == phase) for phase in PASSES]
    lines.append("-" * len(head))
    lines.append(f"{'step':<14}{cells(sums)}{total:9.2f}{100.0:6.1f}%{at256:8.1f}")
    return lines


def cpu_name() -> str:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_features() -> str:
    flags = set()
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return " ".join(have) or "none of avx2, avx512, amx"


def keep_4bit(model) -> int:      # lora.dequantize_base, doing nothing
    return 0


def profile_one(a, dtype, per_call, out) -> list[str]:
    flags = ["--batch-size", str(a.batch_size), "--chunk-size", str(a.chunk_size),
             "--graph-memory", str(a.graph_memory), "--dtype", dtype, "--max-steps", "1",
             "--eval-every", "0", "--save-every", "0", "--save-minutes", "0", "--output", out]
    if a.data:
        flags += ["--data", *a.data]
    args, _, _ = T.parse_args(flags)
    once = lora.dequantize_base
    if per_call:              # as on a GPU: bitsandbytes dequantizes on every call
        lora.dequantize_base = keep_4bit
    try:
        t0 = time.perf_counter()
        run = T.prepare(args)
        loaded = time.perf_counter() - t0
    finally:
        lora.dequantize_base = once
    add_ranges(run.model)
    rec = T.train_step(run)                   # warm-up: oneDNN builds its kernels here
    run.pos.step = 0                          # the same batch again
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        T.train_step(run)
        profiled = time.perf_counter() - t0
    seconds = attribute(ordered(prof.events()))
    path = "4-bit base dequantized on every call (QLoRA)" if per_call else \
        "4-bit base dequantized once (train_cse.py's CPU path)"
    lines = [f"== {dtype}, {path}",
             f"batch {a.batch_size} triplets ({3 * a.batch_size} prompts), chunks of "
             f"{a.chunk_size}; warm-up step {rec['seconds']:.2f} s unprofiled, "
             f"{profiled:.2f} s profiled; prepare (load, LoRA) {loaded:.1f} s; "
             f"loss {rec['loss']:.4f}"]
    lines += table(seconds, a.batch_size)
    del run
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=32,
                   help="triplets a step (default %(default)s; train_cse.py's: 256)")
    p.add_argument("--chunk-size", type=int, default=T.parser().get_default("chunk_size"),
                   help="sentences a forward (default: train_cse.py's, %(default)s)")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"],
                   choices=["float32", "bfloat16"], help="compute dtypes (default: both)")
    p.add_argument("--graph-memory", type=float, default=0, metavar="GIB",
                   help="first-pass graphs kept (default 0: every chunk replayed, as most of a "
                        "256-triplet batch is)")
    p.add_argument("--per-call", action="store_true",
                   help="also profile the per-call dequantization path in the last --dtype")
    p.add_argument("--data", nargs="+", help="NLI csv file(s) (default: train_cse.py's)")
    p.add_argument("--output", default=str(ROOT / "results" / "bench-profile-step.txt"),
                   help="write the tables here too (default: %(default)s)")
    a = p.parse_args(argv)
    head = [f"python bench/profile_step.py {' '.join(argv or sys.argv[1:])}".rstrip(),
            f"CPU: {cpu_name()} ({os.cpu_count()} cores; {cpu_features()}); torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads; load average "
            f"{os.getloadavg()[0]:.2f} at the start",
            "rows: self CPU time by forward-hook ranges (see the docstring); columns: the pass "
            "it ran in; 'at 256': the row scaled to a 256-triplet step (the optimizer's as is)"]
    print("\n".join(head), flush=True)
    lines = list(head)
    configs = [(d, False) for d in a.dtype] + [(a.dtype[-1], True)] * a.per_call
    with tempfile.TemporaryDirectory() as tmp:
        for i, (dtype, per_call) in enumerate(configs):
            part = profile_one(a, dtype, per_call, f"{tmp}/run{i}")
            print("\n".join(["", *part]), flush=True)
            lines += ["", *part]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tail = f"\npeak RSS of the process {peak:.0f} MB; load average {os.getloadavg()[0]:.2f} " \
           f"at the end"
    print(tail)
    out = pathlib.Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + tail + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(cli(main))
