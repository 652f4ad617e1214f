#!/usr/bin/env python
"""Supervised contrastive QLoRA fine-tuning: a decoder LLM becomes a sentence embedder (Jiang et al. 2023).

NLI triplets (premise x, entailment x+, contradiction x-) are embedded with PromptEOL as at inference and trained
with SimCSE's supervised InfoNCE. QLoRA: a frozen 4-bit base, LoRA r=64, alpha=16, dropout 0.05 on every linear of
the blocks; AdamW at lr 5e-4; one epoch of 256 triplets a step.

    python train_cse.py                                   # the paper's recipe on the default model
    python train_cse.py --batch-size 64 --max-steps 24    # a CPU-sized run
    torchrun --nproc_per_node 4 train_cse.py --model opt-6.7b --data nli_for_simcse.csv
    python train_cse.py --resume runs/cse                 # continue exactly where a run stopped
"""
import argparse
import csv
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from support.cli import UserError, cli, data_dir, device
import numpy as np
import torch  # after support.cli: it sets OpenMP's waiting policy before torch loads
import torch.distributed as dist
import torch.nn.functional as F

import lora
import model as M
from embed import prompteol, render
from support import hub
from support.files import atomic, write_atomic
from support.provenance import git_commit

COLUMNS = ("sent0", "sent1", "hard_neg")            # SimCSE's nli_for_simcse.csv header
RECIPE = ("model", "adapter", "bits", "dtype", "batch_size", "epochs", "max_steps", "lr", "warmup_steps",
          "weight_decay", "max_grad_norm", "temp", "lora_r", "lora_alpha", "lora_dropout", "targets", "max_tokens",
          "seed")                                                 # what a resumed run keeps
LOCAL = ("device", "data_dir", "output", "resume")          # the machine's: never taken from a checkpoint


# ----------------------------------------------------------------------------- the loss
def contrastive_loss(z, temp: float):
    """Supervised SimCSE (Gao et al. 2021, eq. 5) on z (N, 3, H) = rows (x, x+, x-): row i of the
    logits is [cos(x_i, x+_j) / temp for all j] + [cos(x_i, x-_j) / temp for all j], target j = i."""
    x, pos, neg = F.normalize(z.float(), dim=-1).unbind(1)           # 3 x (N, H)
    logits = torch.cat([x @ pos.T, x @ neg.T], dim=1) / temp          # (N, 2N)
    return F.cross_entropy(logits, torch.arange(len(x), device=z.device))


def batch_loss(local, temp):
    """local: this rank's (3b, H) embeddings (x_1, x+_1, x-_1, x_2, ...). Every rank computes the loss of the global
    batch; its own slice is `local` itself, which keeps its autograd graph (all_gather's copies have none)."""
    z = local
    if dist.is_initialized():                                         # under torchrun
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.detach().contiguous())
        parts[dist.get_rank()] = local
        z = torch.cat(parts)                                          # (3B, H)
    return contrastive_loss(z.view(-1, 3, local.shape[-1]), temp)


# ----------------------------------------------------------------------------- gradient caching
def embed_chunk(model, ids, mask):
    return model(ids, mask)[:, -1].float()      # (B, T, H) -> (B, H): the last token (left padding), fp32


def generator(device):                               # the one that draws dropout masks on `device`
    return torch.cuda.default_generators[device.index or 0] if device.type == "cuda" else torch.default_generator


def cached_step(model, chunks, temp):
    """Full-batch gradients with memory following the chunk size, not the batch size: gradient caching (Gao et al.
    2021). Returns the loss; a non-finite loss backpropagates nothing."""
    device, states, parts = chunks[0][1].device, [], []
    with torch.no_grad():                                         # 1. embed every chunk without a graph,
        for _, ids, mask in chunks:
            states.append(generator(device).get_state())          #    remembering its random state
            parts.append(embed_chunk(model, ids, mask))
    order = torch.argsort(torch.cat([rows for rows, _, _ in chunks]))     # chunk order -> input order
    local = torch.cat(parts)[order].requires_grad_()              # (3b, H)
    loss = batch_loss(local, temp)                                # 2. the loss and d loss / d embeddings
    if torch.isfinite(loss):
        loss.backward()                                           #    -> local.grad, nothing else
        for (rows, ids, mask), state in zip(chunks, states):
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                generator(device).set_state(state)                # 3. replay each chunk in its random state
                torch.autograd.backward(embed_chunk(model, ids, mask), local.grad[rows])   # (same dropout masks)
    return loss.detach()


def make_chunks(tok, ids, chunk_size, device) -> list:
    """-> [(rows in the input list, ids, mask)], `chunk_size` sentences each, longest first (little padding)."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    groups = [order[j:j + chunk_size] for j in range(0, len(order), chunk_size)]
    return [(torch.tensor(rows, device=device), *tok.pad([ids[i] for i in rows], device=device)) for rows in groups]


# ----------------------------------------------------------------------------- the step
def sum_gradients(params):
    """Every rank backpropagated the same global loss through its own embeddings: the gradient is the SUM."""
    for p in params if dist.is_initialized() else []:
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        dist.all_reduce(p.grad)


def warmup_then_decay(warmup: int, total: int):
    """Linear warmup to the peak lr, then linear decay; step s (from 0) runs at a factor in (0, 1]."""
    return lambda s: min((s + 1) / (warmup + 1), (total - s) / max(1, total - warmup))


def train_step(run) -> dict:
    """One optimizer step on the next global batch; a non-finite loss or gradient returns "stopped" before it."""
    a, pos, rank, world = run.args, run.pos, run.rank, run.world
    epoch, k = divmod(pos.step, run.steps_per_epoch)         # the data position follows from the step:
    order = np.random.default_rng([a.seed, epoch]).permutation(len(run.triplets))   # an epoch's order is fixed
    B, b = a.batch_size, a.batch_size // world
    mine = order[k * B:(k + 1) * B][rank * b:(rank + 1) * b]  # this rank's share of the global batch
    prompts = [render(run.tok, s, "eol", "", a.max_tokens, clean=False) for i in mine for s in run.triplets[i]]
    chunks = make_chunks(run.tok, [run.tok.encode(text) for text, _ in prompts], a.chunk_size, run.device)
    t0 = time.perf_counter()
    run.opt.zero_grad(set_to_none=True)
    loss = cached_step(run.model, chunks, a.temp)
    sum_gradients(run.params)
    norm = torch.nn.utils.clip_grad_norm_(run.params, a.max_grad_norm or math.inf)
    rec = {"step": pos.step + 1, "epoch": epoch + 1, "loss": round(loss.item(), 6), "grad_norm": round(norm.item(), 6)}
    if not (torch.isfinite(loss) and torch.isfinite(norm)):
        return {"event": "stopped", **rec}
    rec["lr"] = run.opt.param_groups[0]["lr"]
    run.opt.step()
    run.sched.step()
    pos.step += 1
    return {**rec, "seconds": round(time.perf_counter() - t0, 3), "truncated": sum(cut for _, cut in prompts)}


# ----------------------------------------------------------------------------- data
def read_triplets(path) -> tuple[list, list, str]:
    """SimCSE csv -> (triplets, line numbers of the rows skipped (a wrong field count, an empty sentence), sha256)."""
    try:
        raw = Path(path).read_bytes()
        text = raw.decode("utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"no such file: {path} (run `python data/download.py --sets nli`, or pass --data)") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}:{raw.count(10, 0, e.start) + 1}: not UTF-8 text") from None   # 10 = newline
    reader, triplets, bad = csv.reader(io.StringIO(text, newline="")), [], []
    try:
        header = [h.strip() for h in next(reader, [])]
        if not set(COLUMNS) <= set(header):
            raise UserError(f"{path}: the header is {','.join(header) or 'empty'}; expected {','.join(COLUMNS)}")
        cols = [header.index(c) for c in COLUMNS]
        for row in reader:
            if row and (len(row) != len(header) or not all(row[c].strip() for c in cols)):
                bad.append(reader.line_num)                    # (the row's last line)
            elif row:                                          # (blank lines are not rows)
                triplets.append(tuple(row[c] for c in cols))
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: malformed csv ({e})") from None
    if not triplets:
        raise UserError(f"{path}: no valid triplet ({len(bad)} malformed rows)")
    return triplets, bad, hashlib.sha256(raw).hexdigest()


# ----------------------------------------------------------------------------- the run and its checkpoints
def prepare(args, ckpt: Path | None = None, state: dict | None = None) -> SimpleNamespace:
    """-> the run: processes, data, the model with LoRA, optimizer, schedule, position; fresh or as `ckpt` left them."""
    dev, out = device(args.device), Path(args.output)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:                                     # under torchrun: gloo on CPUs, else NCCL with a GPU per rank
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if not state and ((out / "latest").exists() or (out / "final").exists()):
        raise UserError(f"{out} already holds a run: continue it with --resume {out}, or pick another --output")
    if args.eval_every:                                           # STS-B dev must be there before hours of training
        data_dir(args.data_dir)
    if not args.data:                                 # SimCSE's full file if it was downloaded, else the partial one
        full = data_dir(args.data_dir, need="nli") / "nli" / "nli_for_simcse.csv"
        args.data = str(full if full.exists() else full.with_name("nli_triplets_partial.csv"))
    triplets, bad, sha = read_triplets(args.data)
    if state and (state["data_sha256"], state["world_size"]) != (sha, world):
        raise UserError(f"--resume {ckpt}: the run had other data or {state['world_size']} processes")
    if args.batch_size % world or len(triplets) < args.batch_size:
        raise UserError(f"--batch-size {args.batch_size}: more than the {len(triplets)} triplets of {args.data}, "
                        f"or not divisible by the {world} processes")
    steps_per_epoch = len(triplets) // args.batch_size            # an epoch's last incomplete batch is dropped
    total = min(args.max_steps or math.inf, steps_per_epoch * args.epochs)
    args.warmup_steps = min(100, math.ceil(0.1 * total)) if args.warmup_steps is None else args.warmup_steps
    args.dtype = args.dtype or str(M.default_dtype(dev)).removeprefix("torch.")   # LoRA itself stays fp32
    if rank == 0 and bad:
        print(f"{args.data}: skipped {len(bad)} malformed row(s), line(s) {str(bad[:20])[1:-1]}", file=sys.stderr)
    model, tok = M.load(hub.resolve(args.model), getattr(torch, args.dtype), dev, None if args.bits == "none" else int(args.bits))
    torch.manual_seed(args.seed)                                  # the same LoRA init on every rank
    if ckpt or args.adapter:
        lora.load_adapter(model, ckpt / "adapter" if ckpt else args.adapter)
    else:
        lora.add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.targets)
    params = [p for p in lora.mark_only_lora_trainable(model).train().parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)   # betas, eps: Trainer's defaults
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_then_decay(args.warmup_steps, total))
    if state:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        generator(dev).set_state(state["rng"][rank])
    else:
        torch.manual_seed(args.seed + rank)                       # each rank its own dropout masks
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0 and not state:                        # a run interrupted before its first checkpoint starts over
        (out / "log.jsonl").unlink(missing_ok=True)
    pos = SimpleNamespace(**state["position"]) if state else SimpleNamespace(step=0, best_score=None, best_step=None)
    return SimpleNamespace(args=args, out=out, device=dev, rank=rank, world=world, model=model, tok=tok,
                           params=params, opt=opt, sched=sched, pos=pos, triplets=triplets, total=total,
                           steps_per_epoch=steps_per_epoch, data_sha256=sha, malformed_lines=bad)


def save_checkpoint(run):
    """checkpoint-<step>/{adapter/, trainer.pt}, then `latest` naming it, each atomically; then older ones go."""
    rngs = [generator(run.device).get_state()] * run.world
    if run.world > 1:                                             # every rank's random state
        dist.all_gather_object(rngs, rngs[0])
    if run.rank != 0:
        return
    path = run.out / f"checkpoint-{run.pos.step}"
    with atomic(path) as tmp:
        tmp.mkdir()
        lora.save_adapter(run.model, tmp / "adapter", hub.hub_id(run.args.model))
        torch.save({"args": vars(run.args), "position": vars(run.pos), "world_size": run.world, "rng": rngs,
                    "data_sha256": run.data_sha256, "optimizer": run.opt.state_dict(),
                    "scheduler": run.sched.state_dict()}, tmp / "trainer.pt")
    write_atomic(run.out / "latest", path.name + "\n")
    for old in set(run.out.glob("checkpoint-*")) - {path}:
        shutil.rmtree(old)


def kept(out: Path) -> str:                          # what a stopped run leaves to continue from, in words
    if (out / "latest").exists():
        return f"{(out / 'latest').read_text().strip()} in {out} is kept: continue with --resume {out}"
    return f"no checkpoint yet: the same command starts {out} over"


def evaluate_and_keep_best(run) -> dict:
    """STS-B dev Spearman as evaluate.py scores the adapter (the paper's checkpoint selection); the best -> best/."""
    import evaluate
    run.model.eval()                                              # no dropout
    encoder = SimpleNamespace(encode=lambda s: prompteol(run.model, run.tok, s).float().cpu().numpy())
    score = evaluate.stsb_dev(encoder, data=run.args.data_dir)
    run.model.train()
    if run.pos.best_score is None or score > run.pos.best_score:
        run.pos.best_score, run.pos.best_step = score, run.pos.step
        lora.save_adapter(run.model, run.out / "best", hub.hub_id(run.args.model))
    return {"step": run.pos.step, "stsb_dev": round(score, 6), "best": run.pos.best_step == run.pos.step}


def train(run):
    from tqdm import tqdm
    rank, world, a, out = run.rank, run.world, run.args, run.out

    def log(record):
        if rank == 0:
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
    log({"event": "resume" if run.pos.step else "start", "step": run.pos.step, "args": vars(a), "world_size": world,
         "data_sha256": run.data_sha256, "malformed_lines": run.malformed_lines, "triplets": len(run.triplets),
         "steps_per_epoch": run.steps_per_epoch, "total_steps": run.total, "commit": git_commit()})
    start, saved_at = run.pos.step, time.monotonic()
    with tqdm(total=run.total, initial=run.pos.step, unit="step", disable=rank != 0, smoothing=0) as bar:
        while run.pos.step < run.total:
            rec = train_step(run)
            log(rec)
            if rec.get("event") == "stopped":
                raise UserError(f"loss {rec['loss']}, gradient norm {rec['grad_norm']} at step {rec['step']}: "
                                f"stopped before updating the adapter; {kept(out)}")
            bar.update(1)
            bar.set_postfix_str(f"loss {rec['loss']:.4f}")
            step, left = run.pos.step, run.total - run.pos.step
            if step == start + 1 and rank == 0:
                bar.write(f"{len(run.triplets)} triplets from {a.data}, {a.batch_size} a step: step {step} took "
                          f"{rec['seconds']:.0f} s, the {left} steps left take about "
                          f"{left * rec['seconds'] / 3600:.1f} h -> {out}", file=sys.stderr)
            if a.eval_every and rank == 0 and (step % a.eval_every == 0 or step == run.total):
                log(ev := evaluate_and_keep_best(run))
                bar.write(f"step {step}: STS-B dev Spearman {100 * ev['stsb_dev']:.2f}{' (best)' * ev['best']}",
                          file=sys.stderr)
            due = [left > 0 and ((a.save_every and step % a.save_every == 0)
                                 or (a.save_minutes and time.monotonic() - saved_at > 60 * a.save_minutes))]
            if world > 1:
                dist.broadcast_object_list(due, 0)                # rank 0's clock decides for all
            if due[0]:
                save_checkpoint(run)
                saved_at = time.monotonic()
    if rank == 0:
        lora.save_adapter(run.model, out / "final", hub.hub_id(a.model))
        log({"event": "done", **vars(run.pos)})
        print(f"done: {run.pos.step} steps -> {out / 'final'}\nevaluate: python evaluate.py --model {a.model} "
              f"--demonstration none --adapter {out / 'final'}")   # the paper tests on the unquantized base


# ----------------------------------------------------------------------------- CLI
def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Defaults are the paper's recipe.")
    a = p.add_argument
    a("--model", default=hub.DEFAULT_MODEL, help="alias, local directory or hub id (default %(default)s)")
    a("--adapter", help="start from this LoRA adapter (PEFT format), with its own rank, alpha and dropout")
    a("--data", help="SimCSE csv, sent0,sent1,hard_neg (default: <data dir>/nli/, the full file or the partial one)")
    a("--data-dir", help="data folder with nli/ and sts/ (default: $SENTEMB_DATA, else ./data)")
    a("--output", default="runs/cse", help="run folder: log.jsonl, checkpoint-<step>/ named by `latest`, best/ (by "
      "STS-B dev) and final/ adapters (default runs/cse; with --resume, the checkpoint's)")
    a("--device", help="cpu, cuda or cuda:N (default: cuda if available; under torchrun, rank i takes cuda:i)")
    a("--dtype", choices=["float32", "bfloat16", "float16"], help="the base's compute precision (default: bfloat16 "
      "on GPUs and CPUs with native bf16, else float32); LoRA weights and the optimizer stay float32")
    a("--bits", choices=["4", "8", "none"], default="4", help="quantize the frozen base: 4 (NF4, QLoRA; default), 8")
    a("--batch-size", type=int, default=256, help="triplets per step over all processes (default 256)")
    a("--chunk-size", type=int, default=32, help="sentences per forward pass: bounds memory (default 32)")
    a("--epochs", type=int, default=1, help="passes over the data (default 1)")
    a("--max-steps", type=int, default=0, help="steps to run; the schedule ends there (default 0: all epochs)")
    a("--lr", type=float, default=5e-4, help="peak AdamW learning rate (default 5e-4)")
    a("--warmup-steps", type=int, help="linear warmup steps, then linear decay (default 100, or 10%% of the steps)")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    a("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (default 1; 0 = off)")
    a("--temp", type=float, default=0.05, help="softmax temperature on cosine similarities (default 0.05)")
    a("--lora-r", type=int, default=64, help="LoRA rank (default 64)")
    a("--lora-alpha", type=float, default=16, help="LoRA alpha; the update is scaled by alpha/r (default 16)")
    a("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input (default 0.05)")
    a("--targets", default="all-linear", help="LoRA targets: all-linear (default) or a regex of layer names (PEFT's)")
    a("--max-tokens", type=int, default=32, help="cut each sentence to this many tokens (default 32)")
    a("--seed", type=int, default=42, help="seed of the LoRA init, data order and dropout (default 42)")
    a("--eval-every", type=int, default=50, help="STS-B dev every N steps and at the end (default 50; 0 = never)")
    a("--save-every", type=int, default=10, help="checkpoint every N steps (default 10; 0 = never)")
    a("--save-minutes", type=float, default=30, help="and every N minutes (default 30; 0 = never)")
    a("--resume", metavar="DIR", help="continue a run (its folder or a checkpoint-<step>) with its recipe")
    return p


def parse_args(argv=None):
    """-> (args, checkpoint, state). --resume: all but LOCAL settings from the checkpoint; other RECIPE refused."""
    p = parser()
    args = p.parse_args(argv)
    p.set_defaults(**dict.fromkeys(vars(args)))                  # parsed again without defaults: the flags given
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    ckpt = state = None
    if args.resume:                                # a checkpoint folder, or a run folder whose `latest` names one
        ckpt = Path(args.resume)
        ckpt = ckpt / (ckpt / "latest").read_text().strip() if (ckpt / "latest").exists() else ckpt
        if not (ckpt / "trainer.pt").exists():
            raise UserError(f"--resume {args.resume}: no checkpoint there (nor a `latest` file naming one)")
        state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
        old = state["args"]
        changed = [f"--{k.replace('_', '-')} {given[k]} (the run's: {old[k]})" for k in RECIPE
                   if given.get(k, old[k]) != old[k]]
        if changed:
            raise UserError(f"--resume {args.resume}: the run was started otherwise: {'; '.join(changed)}")
        args = argparse.Namespace(**{**vars(args), **{k: v for k, v in old.items() if k not in LOCAL}, **given})
        args.output = given.get("output", str(ckpt.parent))
    positive = ("batch_size", "chunk_size", "epochs", "lr", "temp", "lora_r", "lora_alpha", "max_tokens")
    bad = [k for k, v in vars(args).items() if type(v) in (int, float) and (v < 0 or v == 0 and k in positive)]
    bad += ["lora_dropout"] * (args.lora_dropout >= 1)
    if bad:
        raise UserError("out of range: " + ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in bad))
    return args, ckpt, state


def main(argv=None) -> int:
    runs = []                                           # the run, once prepared

    def run(argv):
        runs.append(prepare(*parse_args(argv)))
        train(runs[0])
    try:
        return cli(run, argv, lambda: f"at step {runs[0].pos.step + 1}, {kept(runs[0].out)}" if runs
                          else "nothing was written")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
