"""Embed a text corpus of any size into one file, in constant memory, resumably, sharded over processes or GPUs.
Chunk i of `chunk` lines (a row per line; .gz is read directly) belongs to process i % world. Its rows go straight
into `<output>.<key>.partial` (a .npy file), then `<output>.<key>.progress.<rank>.json` counts the chunks done: the
key hashes the input file, embedder and layout, so the same command run again continues there. At the end the partial
file becomes the output (.npy renamed; .jsonl and .safetensors written from it).
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

from support.cli import UserError, device
import torch  # after support.cli: it sets OpenMP's waiting policy before torch loads
import torch.distributed as dist
from support.cache import fingerprint_key
from support.files import atomic, write_atomic
from safetensors.numpy import save_file
from tqdm import tqdm

CHUNK = 8192    # lines read, tokenized and embedded at a time
kept = ""       # what an interrupted run keeps, for common.cli's last line


def setup(args) -> torch.device:
    """This process's device: under torchrun cuda:LOCAL_RANK or a share of the CPU cores (gloo for barriers)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        args.dtype = args.dtype or ("bfloat16" if args.device == "auto" else None)   # auto: loaded on the CPU
        return torch.device("cpu") if args.device == "auto" else device(args.device)
    if args.device not in (None, "cpu", "cuda"):
        raise UserError(f"--device {args.device}: under torchrun use cpu or cuda (rank r takes cuda:LOCAL_RANK)")
    dist.init_process_group("gloo", timeout=datetime.timedelta(days=30))   # a rank done early waits for the rest
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
        plan, used = plan + [dev], used + b
    return plan


def place(model, devices):
    """Block i on devices[i], the rest on devices[0]; hooks move a block's inputs to it and the last one's back."""
    def to(x, dev):  # a tensor, or a tuple of them (a block's key/value cache), to dev
        return tuple(to(y, dev) for y in x) if isinstance(x, tuple) else x.to(dev) if torch.is_tensor(x) else x
    blocks = next(m for name, m in model.named_modules() if name.endswith("layers"))
    for name, p in model.named_parameters():
        if ".layers." not in name:
            p.data = p.data.to(devices[0])
    for block, dev in zip(blocks, devices):
        block.to(dev).register_forward_pre_hook(lambda _, args, dev=dev: to(args, dev))
    blocks[-1].register_forward_hook(lambda _, args, out: to(out, devices[0]))


def read_chunks(path: Path, chunk: int):
    """-> (i, lines) for each chunk i of `chunk` lines, without their line ends."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            for i, data in enumerate(iter(lambda: b"".join(itertools.islice(f, chunk)), b"")):
                text = data.decode("utf-8-sig" if i == 0 else "utf-8")
                yield i, [line.removesuffix("\r") for line in text.removesuffix("\n").split("\n")]
    except (OSError, EOFError) as e:  # EOFError: a cut-off .gz
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    except UnicodeDecodeError as e:
        k = i * chunk + data[:e.start].count(b"\n") + 1
        raise UserError(f"{path} line {k} is not UTF-8: convert it, e.g. iconv -f latin1 -t utf-8") from None


def leftovers(out: Path) -> list[Path]:  # the partial files and progress records of any command writing `out`
    return [p for pattern in (".*.partial", ".*.progress.*") for p in out.parent.glob(glob.escape(out.name) + pattern)]


def finish(partial: Path, out: Path, src: Path, chunk: int):
    """Every chunk done: the partial file becomes the output (safetensors writes straight from the mapping)."""
    if out.suffix == ".npy":
        return os.replace(partial, out)
    with atomic(out) as tmp:
        if out.suffix == ".safetensors":
            save_file({"embeddings": np.load(partial, mmap_mode="r")}, str(tmp))
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for i, lines in read_chunks(src, chunk):
                    rows = np.load(partial, mmap_mode="r")[i * chunk: i * chunk + len(lines)]
                    for s, e in zip(lines, rows):
                        row = {"sentence": s, "embedding": [round(float(x), 6) for x in e]}
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")


def embed_file(emb, input_path, output_path, normalize=False, progress=False, chunk=CHUNK) -> dict:
    """Each line of a text file -> a row of a .npy, .jsonl or .safetensors file (under torchrun: this rank's share)."""
    global kept
    t0, src, out = time.perf_counter(), Path(input_path), Path(output_path)
    if out.suffix not in (".npy", ".jsonl", ".safetensors") or not out.parent.is_dir():
        raise UserError(f"--output {out}: name a .npy, .jsonl or .safetensors file in an existing folder")
    n = sum(len(lines) for _, lines in read_chunks(src, chunk))   # a first pass counts the lines and checks them
    if n == 0:
        raise UserError(f"{src} is empty: nothing to embed")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    state = {"input": [str(src.resolve()), src.stat().st_size, src.stat().st_mtime_ns], "rows": n,
             "embedder": emb.fingerprint, "normalize": normalize, "chunk": chunk, "world": world}
    key = fingerprint_key(state)[:16]   # names this command's partial file and records
    partial = out.with_name(f"{out.name}.{key}.partial")
    record = out.with_name(f"{out.name}.{key}.progress.{rank}.json")
    if rank == 0 and not partial.exists():
        if leftovers(out):
            print(f"{out}: the partial run there is another command's (input, model, settings or processes "
                  "differ): starting afresh", file=sys.stderr)
        for p in leftovers(out):
            p.unlink()
        np.lib.format.open_memmap(partial, "w+", np.float32, (n, emb.model.embeddings().embedding_dim))
    if world > 1:
        dist.barrier()
    done = first = json.loads(record.read_text())["done"] if record.exists() else 0
    mine = range(rank, -(-n // chunk), world)
    sizes = [min(chunk, n - i * chunk) for i in mine]
    with tqdm(total=sum(sizes), initial=sum(sizes[:done]), unit="sent", delay=1,
              disable=not progress or rank > 0) as bar:
        for i, lines in read_chunks(src, chunk):
            if i not in mine[first:]:
                continue
            kept = (f"{sum(sizes[:done])} of {sum(sizes)} rows{' of rank %d' % rank if world > 1 else ''} done; "
                    "re-run the command to resume")
            rows = np.load(partial, mmap_mode="r+")   # mapped anew per chunk: written pages leave this process's memory
            rows[i * chunk: i * chunk + len(lines)] = emb.encode(lines, normalize=normalize, first=i * chunk + 1)
            rows.flush()
            write_atomic(record, json.dumps(dict(state, done=done + 1), default=str))
            done += 1
            bar.update(len(lines))
    embedded = torch.tensor([sum(sizes[first:done])])
    if world > 1:
        dist.all_reduce(embedded)   # which also waits for every shard
    if rank == 0:
        finish(partial, out, src, chunk)
        for p in leftovers(out):
            p.unlink()
    if world > 1:
        dist.barrier()
    return {"rows": n, "embedded": int(embedded), "seconds": time.perf_counter() - t0}


def run(emb, args):
    """embed.py --input FILE --output FILE: place the model over the GPUs for --device auto, embed, say so."""
    if args.device == "auto":
        nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
        blocks = next(m for name, m in emb.model.named_modules() if name.endswith("layers"))
        free = [int(torch.cuda.mem_get_info(i)[0] * 0.9) for i in range(torch.cuda.device_count())]  # 10%: activations
        free[0] -= nbytes(emb.model) - nbytes(blocks)                  # the embeddings and norms go on GPU 0
        place(emb.model, [torch.device("cuda", i) for i in plan_placement([nbytes(b) for b in blocks], free)])
        emb.device = emb.model.embeddings().weight.device
    st = embed_file(emb, args.input, args.output, normalize=args.normalize, progress=True)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"{st['rows']} sentences, {st['embedded']} embedded by this run in {st['seconds']:.1f} s, "
              f"{st['embedded'] / st['seconds']:.1f} sentences/s in {str(emb.dtype).removeprefix('torch.')} "
              f"-> {args.output}", file=sys.stderr)
