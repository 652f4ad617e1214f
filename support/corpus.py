"""Used by embed.py: a text file of any size embedded into one file, resumably; --device auto.

`embed_file` reads chunk i of `chunk` lines (a row per line; .gz is read directly) in process
i % world. Each finished batch of a chunk goes straight into `<output>.<key>.partial` (a .npy file),
then `<output>.<key>.progress.<rank>.json` counts the chunks and the batches of the next chunk that
are done. The key hashes the input file, embedder, batch size and layout, so the same command run
again continues at the next batch. At the end the partial file becomes the output (.npy renamed;
.jsonl and .safetensors written from it).
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

CHUNK = 8192    # lines read, tokenized and sorted by length at a time


def setup(name):
    """This process's --device for embed_file: under torchrun cuda:LOCAL_RANK or a share of the
    CPU cores (gloo for barriers); in one process "auto" stays "auto" (the Embedder places the
    model)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return name if name == "auto" else device(name)
    if name not in (None, "cpu", "cuda"):
        raise UserError(f"--device {name}: under torchrun use cpu or cuda "
                        "(rank r takes cuda:LOCAL_RANK)")
    # A rank done early waits for the rest.
    dist.init_process_group("gloo", timeout=datetime.timedelta(days=30))
    local_rank = int(os.environ["LOCAL_RANK"])
    if name != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    torch.set_num_threads(max(1, os.cpu_count() // int(os.environ["LOCAL_WORLD_SIZE"])))
    return torch.device("cpu")


# ---------------------------------------------------------------------- --device auto
def plan_placement(block_bytes: list[int], free_bytes: list[int]) -> list[int]:
    """-> each block's device: consecutive blocks fill device 0, then 1, ... (accelerate's
    sequential map)."""
    plan = []
    dev = 0
    used = 0
    for b in block_bytes:
        while dev < len(free_bytes) and used + b > free_bytes[dev]:
            dev += 1
            used = 0
        if dev == len(free_bytes):
            raise UserError(f"the model's blocks need {sum(block_bytes) / 2**30:.1f} GiB and the "
                            f"{len(free_bytes)} GPUs have {sum(free_bytes) / 2**30:.1f} GiB free: "
                            "pass --bits 4 or 8, or use more GPUs")
        plan.append(dev)
        used += b
    return plan


def to(x, dev):
    """A tensor, or a tuple of them (a block's key/value cache), moved to dev; else x as is."""
    if isinstance(x, tuple):
        return tuple(to(y, dev) for y in x)
    return x.to(dev) if torch.is_tensor(x) else x


def blocks_of(model) -> torch.nn.ModuleList:
    return next(m for name, m in model.named_modules() if name.endswith("layers"))


def place(model, devices):
    """Block i on devices[i], the rest on devices[0]; hooks move a block's inputs to it and the last
    one's outputs back."""
    blocks = blocks_of(model)
    for name, p in model.named_parameters():
        if ".layers." not in name:
            p.data = p.data.to(devices[0])
    for block, dev in zip(blocks, devices, strict=True):
        block.to(dev).register_forward_pre_hook(lambda _, args, dev=dev: to(args, dev))
    blocks[-1].register_forward_hook(lambda _, args, out: to(out, devices[0]))


def nbytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def spread(model) -> None:
    """--device auto, the model loaded on the CPU: its blocks over the GPUs, as many as fit on each
    in turn; with no GPU it stays on the CPU, and one line on stderr says so."""
    gpus = torch.cuda.device_count()
    if gpus == 0:
        dtype = str(model.embeddings().weight.dtype).removeprefix("torch.")
        print(f"--device auto: no GPU found; running on the CPU in {dtype}", file=sys.stderr)
        return
    blocks = blocks_of(model)
    free = [int(torch.cuda.mem_get_info(i)[0] * 0.9) for i in range(gpus)]  # 10%: activations
    free[0] -= nbytes(model) - nbytes(blocks)          # the embeddings and norms go on GPU 0
    plan = plan_placement([nbytes(b) for b in blocks], free)
    place(model, [torch.device("cuda", i) for i in plan])


# ---------------------------------------------------------------------- a file, streamed
def read_chunks(path: Path, chunk: int):
    """-> (i, lines) for each chunk i of `chunk` lines, without their line ends."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            for i in itertools.count():
                data = b"".join(itertools.islice(f, chunk))
                if not data:
                    return
                text = data.decode("utf-8-sig" if i == 0 else "utf-8")
                lines = text.removesuffix("\n").split("\n")
                yield i, [line.removesuffix("\r") for line in lines]
    except (OSError, EOFError) as e:  # EOFError: a cut-off .gz
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    except UnicodeDecodeError as e:
        k = i * chunk + data[:e.start].count(b"\n") + 1
        raise UserError(f"{path} line {k} is not UTF-8: convert it, "
                        "e.g. iconv -f latin1 -t utf-8") from None


def leftovers(out: Path) -> list[Path]:
    """The partial files and progress records of any command writing `out`."""
    name = glob.escape(out.name)
    patterns = (".*.partial", ".*.progress.*")
    return [p for pattern in patterns for p in out.parent.glob(name + pattern)]


def kept(output) -> str | None:
    """After Ctrl-C: what this process's run of embed_file kept, read from the progress record it
    wrote; None if it wrote none (it stopped before embed_file began)."""
    out = Path(output)
    for record in out.parent.glob(glob.escape(out.name) + ".*.progress.*.json"):
        try:
            r = json.loads(record.read_text())
        except (OSError, ValueError):   # another process's record, being replaced or removed
            continue
        if r.get("pid") == os.getpid():
            of_rank = f" of rank {r['rank']}" if r["world"] > 1 else ""
            return f"{r['kept']} of {r['share']} rows{of_rank} done; re-run the command to resume"
    return None


def finish(partial: Path, out: Path, src: Path, chunk: int):
    """Every chunk done: the partial file becomes the output (safetensors writes straight from the
    mapping)."""
    if out.suffix == ".npy":
        return os.replace(partial, out)
    with atomic(out) as tmp:
        if out.suffix == ".safetensors":
            save_file({"embeddings": np.load(partial, mmap_mode="r")}, str(tmp))
            return
        rows = np.load(partial, mmap_mode="r")
        with open(tmp, "w", encoding="utf-8") as f:
            for i, lines in read_chunks(src, chunk):
                for s, e in zip(lines, rows[i * chunk: i * chunk + len(lines)], strict=True):
                    row = {"sentence": s, "embedding": [round(float(x), 6) for x in e]}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")


def chunk_rows(partial: Path, start: int, n: int) -> np.memmap:
    """Rows start..start+n of the partial .npy file, mapped alone: flushing them syncs only them,
    and their pages leave this process's memory when the mapping goes."""
    whole = np.load(partial, mmap_mode="r")
    dim = whole.shape[1]
    offset = whole.offset + start * dim * whole.itemsize
    return np.memmap(partial, np.float32, "r+", offset=offset, shape=(n, dim))


def embed_file(emb, input_path, output_path, normalize=False, progress=False, chunk=CHUNK) -> dict:
    """Each line of a text file -> a row of a .npy, .jsonl or .safetensors file (under torchrun:
    this rank's share). -> {"rows", "embedded" (by this run, all ranks), "seconds", "rank"}."""
    t0 = time.perf_counter()
    src = Path(input_path)
    out = Path(output_path)
    if out.suffix not in (".npy", ".jsonl", ".safetensors") or not out.parent.is_dir():
        raise UserError(f"--output {out}: name a .npy, .jsonl or .safetensors file "
                        "in an existing folder")
    n = sum(len(lines) for _, lines in read_chunks(src, chunk))   # a first pass: count and check
    if n == 0:
        raise UserError(f"{src} is empty: nothing to embed")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    state = {"input": [str(src.resolve()), src.stat().st_size, src.stat().st_mtime_ns],
             "rows": n, "embedder": emb.fingerprint, "normalize": normalize, "chunk": chunk,
             "batch_size": emb.batch_size, "world": world}
    key = fingerprint_key(state)[:16]   # names this command's partial file and records
    partial = out.with_name(f"{out.name}.{key}.partial")
    record = out.with_name(f"{out.name}.{key}.progress.{rank}.json")
    if rank == 0 and not partial.exists():
        if leftovers(out):
            print(f"{out}: the partial run there is another command's (input, model, settings or "
                  "processes differ): starting afresh", file=sys.stderr)
        for p in leftovers(out):
            p.unlink()
        dim = emb.model.embeddings().embedding_dim
        np.lib.format.open_memmap(partial, "w+", np.float32, (n, dim))
    if world > 1:
        dist.barrier()
    mine = range(rank, -(-n // chunk), world)
    share = sum(min(chunk, n - i * chunk) for i in mine)
    at = {"done": 0, "batches": 0, "kept": 0}   # chunks done, batches of the next one, rows
    if record.exists():
        at = {k: json.loads(record.read_text())[k] for k in at}
    resumed = at["kept"]
    emb.expect(share - resumed)   # auto compiling weighs what this run embeds, not one chunk

    def save(done, batches, rows):   # after the rows are in the partial file
        at.update(done=done, batches=batches, kept=rows)
        text = json.dumps(dict(state, **at, share=share, rank=rank, pid=os.getpid()), default=str)
        write_atomic(record, text)

    save(at["done"], at["batches"], at["kept"])   # this process's record from the start: see kept()
    with tqdm(total=share, initial=resumed, unit="sent", delay=1, file=sys.stderr,
              disable=not progress or rank > 0) as bar:
        for i, lines in read_chunks(src, chunk):
            if i not in mine[at["done"]:]:
                continue
            items = emb.tokenize(lines, first=i * chunk + 1)
            plan = emb.batches(items)
            rows = chunk_rows(partial, i * chunk, len(lines))
            skip = at["batches"]
            batches = emb.run_batches(items, plan[skip:], normalize)
            for b, (idx, vecs) in enumerate(batches, skip + 1):
                rows[idx] = vecs
                rows.flush()
                if b == len(plan):
                    save(at["done"] + 1, 0, at["kept"] + len(idx))
                else:
                    save(at["done"], b, at["kept"] + len(idx))
                bar.update(len(idx))
            del rows
    embedded = torch.tensor([at["kept"] - resumed])
    if world > 1:
        dist.all_reduce(embedded)   # which also waits for every shard
    if rank == 0:
        finish(partial, out, src, chunk)
        for p in leftovers(out):
            p.unlink()
    if world > 1:
        dist.barrier()
    return {"rows": n, "embedded": int(embedded), "seconds": time.perf_counter() - t0, "rank": rank}
