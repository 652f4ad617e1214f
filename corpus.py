"""Embed a text corpus of any size into one file, in constant memory, resumably, sharded over processes or GPUs.
Chunk i of `chunk` lines (a row per line, .gz read directly) belongs to process i % world; its rows go straight to
their place in `<output>.partial` (a .npy file), then `<output>.progress.<rank>.json` counts the process's chunks
done, tied to the input file, the embedder's fingerprint and the layout: the same command run again continues there.
At the end the partial file becomes the output (.npy renamed; .jsonl and .safetensors written from it).
"""
from __future__ import annotations

import datetime
import glob
import gzip
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

import common  # before torch: it sets OpenMP's waiting policy
import torch
import torch.distributed as dist
from common import UserError, atomic
from tqdm import tqdm

CHUNK = 8192    # lines read, tokenized and embedded at a time
kept = ""       # what an interrupted run keeps, for common.cli's last line


def setup(args) -> torch.device:
    """This process's device: under torchrun cuda:LOCAL_RANK or a share of the CPU cores (gloo for barriers)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        args.dtype = args.dtype or ("bfloat16" if args.device == "auto" else None)   # auto: loaded on the CPU
        return torch.device("cpu") if args.device == "auto" else common.device(args.device)
    if args.device not in (None, "cpu", "cuda"):
        raise UserError(f"--device {args.device}: under torchrun use cpu or cuda (rank r takes cuda:LOCAL_RANK)")
    if not dist.is_initialized():  # a rank whose shard is done waits at the end for as long as the others take
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=30))
    if args.device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.set_num_threads(max(1, os.cpu_count() // int(os.environ["LOCAL_WORLD_SIZE"])))
    return torch.device("cpu")


def plan_placement(block_bytes: list[int], free_bytes: list[int]) -> list[int]:
    """-> each block's device: consecutive blocks fill device 0, then 1, ... (accelerate's sequential map)."""
    plan, dev, used = [], 0, 0
    for b in block_bytes:
        while dev < len(free_bytes) and used + b > free_bytes[dev]:
            dev, used = dev + 1, 0
        if dev == len(free_bytes):
            raise UserError(f"the model's blocks need {sum(block_bytes) / 2**30:.1f} GiB and the {len(free_bytes)} "
                            f"GPUs have {sum(free_bytes) / 2**30:.1f} GiB free: pass --bits 4 or 8, or use more GPUs")
        plan.append(dev)
        used += b
    return plan


def to(x, dev):  # a tensor, or a tuple of them (a block's key/value cache), to dev
    if isinstance(x, (tuple, list)):
        return type(x)(to(y, dev) for y in x)
    return x.to(dev) if isinstance(x, torch.Tensor) else x


def place(model, devices):
    """Block i on devices[i], the rest on devices[0]; hooks move a block's inputs to it and the last one's back."""
    blocks = next(m for name, m in model.named_modules() if name.endswith("layers"))
    for name, p in model.named_parameters():
        if ".layers." not in name:
            p.data = p.data.to(devices[0])
    for block, dev in zip(blocks, devices):
        block.to(dev).register_forward_pre_hook(lambda _, args, dev=dev: to(args, dev))
    blocks[-1].register_forward_hook(lambda _, args, out: to(out, devices[0]))


def read_chunks(path: Path, chunk: int):
    """-> (i, lines) for each chunk i of `chunk` lines, without their line ends."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        for i in itertools.count():
            data = b"".join(itertools.islice(f, chunk))
            if not data:
                return
            try:
                text = data.decode("utf-8-sig" if i == 0 else "utf-8")
            except UnicodeDecodeError as e:
                k = i * chunk + data[:e.start].count(b"\n") + 1
                raise UserError(f"{path} line {k} is not UTF-8: convert it, e.g. iconv -f latin1 -t utf-8") from None
            yield i, [line.removesuffix("\r") for line in text.removesuffix("\n").split("\n")]


def done_chunks(path: Path, state: dict) -> int | None:
    """The chunks done, from the record at `path` if this very command wrote it, else None."""
    old = json.loads(path.read_text()) if path.exists() else {}
    return old["done"] if old.get("state") == state else None


def finish(partial: Path, out: Path, src: Path, chunk: int):
    """Every chunk done: the partial file becomes the output (safetensors writes straight from the mapping)."""
    if out.suffix == ".npy":
        return os.replace(partial, out)
    with atomic(out) as tmp:
        if out.suffix == ".safetensors":
            from safetensors.numpy import save_file
            save_file({"embeddings": np.load(partial, mmap_mode="r")}, str(tmp))
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for i, lines in read_chunks(src, chunk):
                    rows = np.load(partial, mmap_mode="r")[i * chunk: i * chunk + len(lines)]
                    for s, e in zip(lines, rows):
                        row = {"sentence": s, "embedding": [round(float(x), 6) for x in e]}
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    partial.unlink()


def embed_file(emb, input_path, output_path, normalize=False, progress=False, chunk=CHUNK) -> dict:
    """Each line of a text file -> a row of a .npy, .jsonl or .safetensors file (under torchrun: this rank's share)."""
    global kept
    src, out = Path(input_path), Path(output_path)
    if out.suffix not in (".npy", ".jsonl", ".safetensors") or not out.parent.is_dir():
        raise UserError(f"--output {out}: name a .npy, .jsonl or .safetensors file in an existing folder")
    try:
        n = sum(len(lines) for _, lines in read_chunks(src, chunk))   # a first pass counts the lines and checks them
    except (OSError, EOFError) as e:  # EOFError: a cut-off .gz
        raise UserError(f"cannot read {src}: {e}") from None
    if n == 0:
        raise UserError(f"{src} is empty: nothing to embed")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    dim, partial = emb.model.embeddings().embedding_dim, out.with_name(out.name + ".partial")
    state = json.loads(json.dumps({"input": [str(src.resolve()), src.stat().st_size, src.stat().st_mtime_ns],
                                   "rows": n, "embedder": emb.fingerprint, "normalize": normalize,
                                   "chunk": chunk, "world": world}, default=str))
    records = lambda: out.parent.glob(glob.escape(out.name) + ".progress.*.json")  # noqa: E731
    record, mine = out.with_name(f"{out.name}.progress.{rank}.json"), range(rank, -(-n // chunk), world)
    if rank == 0 and not (partial.exists() and done_chunks(record, state) is not None):   # afresh, for every rank
        if partial.exists():
            print(f"{partial} is another command's (input, model, settings or processes differ): starting afresh",
                  file=sys.stderr)
        for p in records():
            p.unlink()
        np.lib.format.open_memmap(partial, "w+", np.float32, (n, dim))
        with atomic(record) as tmp:
            tmp.write_text(json.dumps({"state": state, "done": 0}))
    if world > 1:
        dist.barrier()
    done = done_chunks(record, state) or 0
    size = lambda i: min(chunk, n - i * chunk)  # noqa: E731
    total, before = sum(map(size, mine)), sum(map(size, mine[:done]))
    at = before
    bar, todo = tqdm(total=total, initial=before, desc="embed", unit="sent", disable=not progress or rank), mine[done:]
    for i, lines in read_chunks(src, chunk):
        if i not in todo:
            continue
        kept = f"{at} of {total} rows{' of rank %d' % rank if world > 1 else ''} done; re-run the command to resume"
        rows = np.load(partial, mmap_mode="r+")   # mapped anew per chunk: written pages leave this process's memory
        rows[i * chunk: i * chunk + len(lines)] = emb.encode(lines, normalize=normalize)
        rows.flush()
        done += 1
        with atomic(record) as tmp:
            tmp.write_text(json.dumps({"state": state, "done": done}))
        at += len(lines)
        bar.update(len(lines))
    bar.close()
    embedded = torch.tensor([at - before])
    if world > 1:
        dist.all_reduce(embedded)   # which also waits for every shard
    if rank == 0:
        finish(partial, out, src, chunk)
        for p in records():
            p.unlink()
    if world > 1:
        dist.barrier()
    return {"rows": n, "embedded": int(embedded)}


def run(emb, args):
    """embed.py --input FILE --output FILE: place the model over the GPUs for --device auto, embed, say so."""
    if args.device == "auto":
        nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
        blocks = next(m for name, m in emb.model.named_modules() if name.endswith("layers"))
        free = [int(torch.cuda.mem_get_info(i)[0] * 0.9) for i in range(torch.cuda.device_count())]  # 10%: activations
        free[0] -= nbytes(emb.model) - nbytes(blocks)                  # the embeddings and norms go on GPU 0
        place(emb.model, [torch.device("cuda", i) for i in plan_placement([nbytes(b) for b in blocks], free)])
        emb.device = emb.model.embeddings().weight.device
    t0 = time.perf_counter()
    st = embed_file(emb, args.input, args.output, normalize=args.normalize, progress=True)
    if not dist.is_initialized() or dist.get_rank() == 0:
        dt = time.perf_counter() - t0
        print(f"{st['rows']} rows in {args.output}: {st['embedded']} embedded in {dt:.1f} s, "
              f"{st['embedded'] / dt:.1f} sentences/s", file=sys.stderr)
