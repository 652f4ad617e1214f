#!/usr/bin/env python
"""Supervised contrastive QLoRA fine-tuning: a decoder LLM becomes a sentence embedder.

The recipe of Jiang et al. 2023, "Scaling Sentence Embeddings with Large Language Models" (code: kongds/scaling_sentemb,
ft_llm.py / train_llm.sh): SimCSE's supervised objective (Gao, Yao & Chen 2021) on NLI triplets (premise x, entailment
x+, contradiction x-), every sentence embedded with PromptEOL, no demonstration: the last token's final hidden state of
  This sentence : "<sentence>" means in one word:"
Cosine / 0.05; x_i's positive is x+_i, its negatives every other x+ and every x- of the GLOBAL batch. QLoRA (Dettmers
et al. 2023): frozen 4-bit NF4 base, LoRA r=64, alpha=16, dropout 0.05 on every linear of the blocks; AdamW lr 5e-4;
one epoch; 256 triplets a batch, which took the authors 2-8 GPUs. Here:

* Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"): embed
  the batch chunk by chunk WITHOUT a graph, remembering each chunk's random state; compute the loss and its gradient
  with respect to the embeddings; re-run each chunk WITH a graph under the same random state (the same LoRA dropout
  masks) and backpropagate the cached gradient: the gradients of full-batch backpropagation, with peak memory
  following --chunk-size, not --batch-size.
* Many GPUs or machines: `torchrun --nproc_per_node N train_cse.py ...` (NCCL on GPUs, gloo on CPUs). Embeddings are
  all-gathered, so every rank sees the global batch; all ranks compute the same loss, each backpropagates through its
  own embeddings only, and one all-reduce SUMS the LoRA gradients (no DistributedDataParallel: it would average them).

    python train_cse.py                                   # defaults: smollm2-135m, <data dir>/nli triplets
    python train_cse.py --batch-size 64 --max-steps 24    # a CPU-sized run
    torchrun --nproc_per_node 4 train_cse.py --model opt-6.7b --data nli_for_simcse.csv
    python train_cse.py --resume runs/cse                 # continue exactly where a run stopped
    python evaluate.py --bits 4 --demonstration none --adapter runs/cse/final

--out gets log.jsonl (a JSON object per step, evaluation or event), checkpoint-<step>/ named by `latest` (adapter,
optimizer, scheduler, random states, data position; written atomically), best/ (the best STS-B dev adapter), final/
(the last adapter, PEFT format) and summary.json.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import lora
import model as M

COLUMNS = ("sent0", "sent1", "hard_neg")            # SimCSE's nli_for_simcse.csv header
# What must not change when a run is resumed (else it would not continue the same run).
RECIPE = ("model", "bits", "batch_size", "epochs", "max_steps", "lr", "warmup_steps", "weight_decay",
          "max_grad_norm", "temp", "lora_r", "lora_alpha", "lora_dropout", "targets", "max_tokens", "seed")


class UserError(ValueError):
    """A problem the user can fix: one line on stderr, exit status 1, no traceback."""


class TrainingStopped(RuntimeError):
    """A non-finite loss or gradient: stop, keep the last good checkpoint."""


def rank_world():
    """(rank, world size): (0, 1) unless started by torchrun."""
    on = dist.is_available() and dist.is_initialized()
    return (dist.get_rank(), dist.get_world_size()) if on else (0, 1)


# ----------------------------------------------------------------------------- data
def read_triplets(path) -> tuple[list, list]:
    """SimCSE csv (header sent0,sent1,hard_neg; more columns are ignored) -> (triplets, bad line numbers). Malformed
    rows (wrong field count, an empty sentence) are SKIPPED and reported by line number: one bad row should not cost a
    run over SimCSE's 275k rows. A wrong header, a csv error (such as an unterminated quote that swallows the rest of
    the file) or a file with no valid row is refused."""
    try:
        raw = Path(path).read_bytes()
        text = raw.decode("utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"no such file: {path} (SimCSE's nli_for_simcse.csv: `python data/download.py --sets "
                        f"nli`; or pass --data)") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}:{raw.count(10, 0, e.start) + 1}: not UTF-8 text") from None   # 10 = newline
    reader, triplets, bad = csv.reader(io.StringIO(text, newline="")), [], []
    try:
        header = [h.strip() for h in next(reader, [])]
        if not set(COLUMNS) <= set(header):
            raise UserError(f"{path}: the header is {','.join(header) or 'empty'}; "
                            f"expected SimCSE's {','.join(COLUMNS)}")
        cols, line = [header.index(c) for c in COLUMNS], reader.line_num + 1
        for row in reader:
            if row and (len(row) != len(header) or not all(row[c].strip() for c in cols)):
                bad.append(line)
            elif row:                                          # (blank lines are not rows)
                triplets.append(tuple(row[c] for c in cols))
            line = reader.line_num + 1
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: malformed csv ({e})") from None
    if not triplets:
        raise UserError(f"{path}: no valid triplet ({len(bad)} malformed rows)")
    return triplets, bad


def tokenize(emb, sentences) -> tuple[list, int]:
    """PromptEOL prompt ids, rendered by embed.Embedder.prompt exactly as at inference (the sentence cut to
    max_tokens, the reference's clean-up, the template); full ids (inference reuses a prefix cache). -> (ids, cut)"""
    prompts = [emb.prompt(s) for s in sentences]                  # [(text, was the sentence cut?)]
    return [emb.tok.encode(text) for text, _ in prompts], sum(cut for _, cut in prompts)


def make_chunks(tok, ids, chunk_size, device) -> list:
    """-> [(rows, ids, mask)]: sentences sorted longest first (the first chunk is the peak, and chunks carry little
    padding), `chunk_size` per forward pass; rows are positions in the input list."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    groups = [order[j:j + chunk_size] for j in range(0, len(order), chunk_size)]
    return [(torch.tensor(rows, device=device), *tok.pad([ids[i] for i in rows], device=device)) for rows in groups]


# ----------------------------------------------------------------------------- loss
def embed_chunk(model, ids, mask):
    """PromptEOL: the last token's final hidden state (prompts are left-padded), in fp32 for the loss."""
    return model(ids, mask)[:, -1].float()


def contrastive_loss(z, temp: float):
    """Supervised SimCSE (Gao et al. 2021, eq. 5) on z (N, 3, H) = rows (x, x+, x-): row i of the
    logits is [cos(x_i, x+_j) / temp for all j] + [cos(x_i, x-_j) / temp for all j], target j = i."""
    x, pos, neg = F.normalize(z.float(), dim=-1).unbind(1)
    logits = torch.cat([x @ pos.T, x @ neg.T], dim=1) / temp
    return F.cross_entropy(logits, torch.arange(len(x), device=z.device))


def batch_loss(local, temp):
    """local: this rank's (3b, H) embeddings, triplet-major (x_1, x+_1, x-_1, x_2, ...). The loss sees all ranks'
    embeddings (rank order), the global batch; our own slice is `local` itself, which keeps its autograd graph
    (all_gather's copies have none) -- SimCSE's trick."""
    rank, world = rank_world()
    z = local
    if world > 1:
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.detach().contiguous())
        parts[rank] = local
        z = torch.cat(parts)
    return contrastive_loss(z.view(-1, 3, local.shape[-1]), temp)


def assemble(parts, chunks):
    """Chunk outputs (in chunk order) -> one (n, H) tensor in the original sentence order."""
    rows = torch.cat([r for r, _, _ in chunks])
    return torch.cat(parts)[torch.argsort(rows)]


# ----------------------------------------------------------------------------- steps
def rng_state(device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(state, device):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def cached_step(model, chunks, temp, tick=lambda msg: None):
    """One step's gradients by gradient caching (GradCache); returns the (global) loss. If the loss is not finite,
    nothing is backpropagated. Gradients land in .grad: this rank's share, see sum_gradients."""
    device, states, parts = chunks[0][1].device, [], []
    with torch.no_grad():                                         # 1. embed every chunk, no graph
        for k, (_, ids, mask) in enumerate(chunks):
            states.append(rng_state(device))                      #    (CPU and CUDA generators)
            parts.append(embed_chunk(model, ids, mask))
            tick(f"embed {k + 1}/{len(chunks)}")
    local = assemble(parts, chunks).requires_grad_()
    loss = batch_loss(local, temp)                                # 2. loss, d loss / d embeddings
    if torch.isfinite(loss):
        loss.backward()                                           #    -> local.grad, nothing else
        devices = [device] if device.type == "cuda" else []
        for k, ((rows, ids, mask), state) in enumerate(zip(chunks, states)):
            with torch.random.fork_rng(devices=devices):          # 3. replay with the chunk's random
                set_rng_state(state, device)                      #    state: same dropout masks
                torch.autograd.backward(embed_chunk(model, ids, mask), local.grad[rows])
            tick(f"backprop {k + 1}/{len(chunks)}")
    return loss.detach()


def plain_step(model, chunks, temp, tick=lambda msg: None):
    """The same gradients by ordinary backpropagation: every chunk's graph is kept until one backward (memory grows
    with the batch). Same chunks, same random stream, hence the same dropout masks."""
    parts = []
    for k, (_, ids, mask) in enumerate(chunks):
        parts.append(embed_chunk(model, ids, mask))
        tick(f"forward {k + 1}/{len(chunks)}")
    loss = batch_loss(assemble(parts, chunks), temp)
    if torch.isfinite(loss):
        loss.backward()
    return loss.detach()


def sum_gradients(params):
    """Every rank computed the same global loss, each through its own embeddings: the full gradient is the SUM."""
    if rank_world()[1] > 1:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for p, g in zip(params, torch.split(flat, [g.numel() for g in grads])):
            p.grad = g.view_as(p)


def linear_warmup(warmup: int, total: int):
    """transformers' get_linear_schedule_with_warmup (the reference's Trainer default): 0 -> lr over `warmup` steps,
    then linearly down to 0 at `total`. Its first step runs at lr 0, as there."""
    return lambda s: s / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))


# ----------------------------------------------------------------------------- checkpoints
@dataclass
class Position:
    step: int = 0                   # optimizer steps done
    best_score: float | None = None  # best STS-B dev Spearman so far, and its step
    best_step: int | None = None


def save_checkpoint(run):
    """checkpoint-<step>/{adapter/, trainer.pt}: written to a temporary folder, renamed into place, then the `latest`
    pointer is replaced atomically; older checkpoints are removed only after that."""
    (rank, world), out, step = rank_world(), run.out, run.pos.step
    rngs = [rng_state(run.emb.device)] * world
    if world > 1:                                                 # every rank's random state
        dist.all_gather_object(rngs, rng_state(run.emb.device))
    if rank != 0:
        return
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.tmp-", dir=out))
    lora.save_adapter(run.emb.model, tmp / "adapter", base_name(run.args))
    epoch, batch = divmod(step, run.steps_per_epoch)
    torch.save({"position": vars(run.pos), "epoch": epoch, "batch_in_epoch": batch, "seed": run.args.seed,
                "world_size": world, "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(),
                "rng": rngs, **run.meta}, tmp / "trainer.pt")
    final = out / f"checkpoint-{step}"
    shutil.rmtree(final, ignore_errors=True)     # a leftover of a crashed run that `latest` never named
    os.replace(tmp, final)
    (out / "latest.tmp").write_text(final.name + "\n")
    os.replace(out / "latest.tmp", out / "latest")
    for old in set(out.glob("checkpoint-*")) - {final}:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- training
def setup_distributed(device: str | None):
    """torchrun sets WORLD_SIZE/LOCAL_RANK: NCCL with one GPU per rank, else gloo on CPU."""
    if (device or "").startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device not in (None, "cpu", "cuda"):
        raise UserError(f"--device {device}: under torchrun use cpu or cuda (rank i takes cuda:LOCAL_RANK)")
    cuda = device != "cpu" and torch.cuda.is_available()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dev


@dataclass
class Run:
    """What a training run holds between steps."""
    args: argparse.Namespace
    out: Path
    emb: object                     # embed.Embedder: the model (with LoRA), tokenizer, prompt rendering
    params: list                    # the LoRA weights, the only trainable ones
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    pos: Position
    triplets: list
    steps_per_epoch: int
    total: int
    meta: dict                      # the recipe and the data's hash, checked on --resume


def prepare(args) -> Run:
    """Data, model with LoRA, optimizer and schedule -- fresh, or restored from --resume."""
    import evaluate
    from embed import Embedder
    rank, world = rank_world()
    ckpt = Path(args.resume) if args.resume else None
    if ckpt:                                       # a checkpoint folder, or a run folder whose `latest` names one
        if (ckpt / "latest").exists():
            ckpt = ckpt / (ckpt / "latest").read_text().strip()
        if not (ckpt / "trainer.pt").exists():
            raise UserError(f"--resume {args.resume}: no checkpoint there (expected a run folder with `latest`, "
                            f"or a checkpoint-<step> folder)")
    out = Path(args.out or (ckpt.parent if ckpt else "runs/cse"))
    if not ckpt and any((out / f).exists() for f in ("log.jsonl", "latest", "final")):
        raise UserError(f"{out} already holds a run: continue it with --resume {out}, or pick another --out")
    if args.eval_every:                            # STS-B dev must be there before hours of training
        evaluate.data_dir(args.data_dir)
    if args.data:
        data = Path(args.data)
    else:                                          # SimCSE's full file if it was downloaded, else the partial one
        nli = evaluate.data_dir(args.data_dir) / "nli"
        data = next((nli / f for f in ("nli_for_simcse.csv", "nli_triplets_partial.csv") if (nli / f).exists()),
                    nli / "nli_for_simcse.csv")
    triplets, bad = read_triplets(data)
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    steps_per_epoch = len(triplets) // args.batch_size          # an epoch's last incomplete batch is dropped
    if steps_per_epoch == 0:
        raise UserError(f"{data}: {len(triplets)} triplets, fewer than one batch of --batch-size {args.batch_size}")
    total = min(args.max_steps or math.inf, steps_per_epoch * args.epochs)
    if args.warmup_steps is None:                  # the reference's 100 steps were 9% of its 1,077
        args.warmup_steps = min(100, math.ceil(0.1 * total))
    if rank == 0 and bad:
        print(f"train_cse.py: {data}: skipped {len(bad)} malformed row(s) at line(s) {', '.join(map(str, bad[:20]))}"
              f"{' ...' if len(bad) > 20 else ''} (all in log.jsonl)", file=sys.stderr)
    meta = {"recipe": {k: getattr(args, k) for k in RECIPE},
            "data_sha256": hashlib.sha256(data.read_bytes()).hexdigest(), "data": str(data), "malformed_lines": bad}
    state = torch.load(ckpt / "trainer.pt", weights_only=True) if ckpt else None
    if state:                                      # checked before the (slow) model load
        changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run's: {v})"
                   for k, v in state["recipe"].items() if getattr(args, k) != v]
        changed += ["--data: other content"] if state["data_sha256"] != meta["data_sha256"] else []
        changed += [f"{world} processes (the run's: {state['world_size']})"] if state["world_size"] != world else []
        if changed:
            raise UserError(f"--resume {ckpt}: settings differ from the run's: {'; '.join(changed)}")

    bits, dtype = {16: (None, "bfloat16"), 32: (None, "float32")}.get(args.bits, (args.bits, None))
    emb = Embedder(args.model, demonstrations=[], max_tokens=args.max_tokens, device=args.device, dtype=dtype,
                   bits=bits)
    torch.manual_seed(args.seed)                   # the same LoRA init on every rank
    if ckpt:
        lora.load_adapter(emb.model, ckpt / "adapter")
    else:
        targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
        lora.add_lora(emb.model, args.lora_r, args.lora_alpha, args.lora_dropout, targets)
    params = [p for p in lora.mark_only_lora_trainable(emb.model).parameters() if p.requires_grad]
    # AdamW as transformers' Trainer has it (betas 0.9/0.999, eps 1e-8), on the LoRA weights only
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup(args.warmup_steps, total))
    if state:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][rank], emb.device)
    else:
        for p in params if world > 1 else []:
            dist.broadcast(p.data, 0)
        torch.manual_seed(args.seed + rank)        # each rank its own dropout masks
    pos = Position(**state["position"]) if state else Position()
    return Run(args, out, emb, params, opt, sched, pos, triplets, steps_per_epoch, total, meta)


def train_step(run: Run, tick) -> dict:
    """One optimizer step on the next global batch; raises TrainingStopped before a non-finite update."""
    a, pos, (rank, world) = run.args, run.pos, rank_world()
    epoch, k = divmod(pos.step, run.steps_per_epoch)       # the data position follows from the step
    # the shuffled order of an epoch is a pure function of (seed, epoch), so resuming needs no state
    order = np.random.default_rng([a.seed, epoch]).permutation(len(run.triplets))
    B, b = a.batch_size, a.batch_size // world
    mine = order[k * B:(k + 1) * B][rank * b:(rank + 1) * b]
    ids, cut = tokenize(run.emb, [s for i in mine for s in run.triplets[i]])
    chunks = make_chunks(run.emb.tok, ids, a.chunk_size, run.emb.device)
    t0 = time.perf_counter()
    run.opt.zero_grad(set_to_none=True)
    loss = (plain_step if a.no_grad_cache else cached_step)(run.emb.model, chunks, a.temp, tick)
    sum_gradients(run.params)
    norm = torch.nn.utils.clip_grad_norm_(run.params, a.max_grad_norm or math.inf)
    if not (torch.isfinite(loss) and torch.isfinite(norm)):
        what = f"loss {loss.item()}" if not torch.isfinite(loss) else f"gradient norm {norm.item()}"
        last = (run.out / "latest").read_text().strip() if (run.out / "latest").exists() else None
        raise TrainingStopped(f"{what} at step {pos.step + 1} (epoch {epoch + 1}, batch {k + 1}): stopped before "
                              f"updating the adapter; last good checkpoint: {run.out / last if last else 'none yet'}")
    lr = run.opt.param_groups[0]["lr"]
    run.opt.step()
    run.sched.step()
    pos.step += 1
    return {"step": pos.step, "epoch": epoch + 1, "loss": round(loss.item(), 6), "lr": lr,
            "grad_norm": round(norm.item(), 6), "seconds": round(time.perf_counter() - t0, 3), "truncated": cut,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def evaluate_and_keep_best(run: Run) -> dict:
    """STS-B dev Spearman of the current adapter (the paper's checkpoint selection); best one -> <out>/best."""
    import evaluate
    t0 = time.perf_counter()
    eval_mode(run.emb.model)
    try:   # a fresh copy of the embedder: its prefix key/value cache must see the current adapter
        score = evaluate.stsb_dev(run.emb.with_demonstrations([]), data=run.args.data_dir)
    finally:
        run.emb.model.train()
    best = run.pos.best_score is None or score > run.pos.best_score
    if best:
        run.pos.best_score, run.pos.best_step = score, run.pos.step
        lora.save_adapter(run.emb.model, run.out / "best", base_name(run.args))
    return {"step": run.pos.step, "stsb_dev": round(score, 6), "best": best,
            "seconds": round(time.perf_counter() - t0, 1)}


def eval_mode(model):
    """Dropout off for evaluation. (model.load turns off bitsandbytes' CPU repacking of 4-bit weights, so the frozen
    base is bit-identical before and after an evaluation; a test checks it.)"""
    return model.eval()


def base_name(args):
    return M.ALIASES.get(args.model) or args.model


def train(args) -> dict:
    from tqdm import tqdm
    args.device = str(setup_distributed(args.device))
    run = prepare(args)
    (rank, world), a, out = rank_world(), run.args, run.out
    out.mkdir(parents=True, exist_ok=True)

    def log(record):
        if rank == 0:
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    log({"event": "resume" if a.resume else "start", "step": run.pos.step, "args": vars(a), **run.meta,
         "triplets": len(run.triplets), "steps_per_epoch": run.steps_per_epoch, "total_steps": run.total,
         "world_size": world})
    if rank == 0:
        print(f"{len(run.triplets)} triplets from {run.meta['data']}: {run.steps_per_epoch} steps of {a.batch_size} "
              f"per epoch; training steps {run.pos.step + 1}-{run.total} (warmup {a.warmup_steps}) -> {out}",
              file=sys.stderr)
    seconds, losses = [], []
    with tqdm(total=run.total, initial=run.pos.step, unit="step", disable=rank != 0, smoothing=0) as bar:
        run.emb.model.train()
        while run.pos.step < run.total:
            try:
                rec = train_step(run, lambda m: bar.set_postfix_str(f"step {run.pos.step + 1}: {m}"))
            except TrainingStopped as e:
                log({"event": "stopped", "step": run.pos.step + 1, "reason": str(e)})
                raise
            log(rec)
            seconds.append(rec["seconds"])
            losses.append(rec["loss"])
            bar.update(1)
            step = run.pos.step
            if a.eval_every and rank == 0 and (step % a.eval_every == 0 or step == run.total):
                bar.set_postfix_str(f"step {step}: STS-B dev")
                ev = evaluate_and_keep_best(run)
                log(ev)
                tqdm.write(f"step {step}: STS-B dev Spearman {100 * ev['stsb_dev']:.2f}{' (best)' * ev['best']}")
            bar.set_postfix_str(f"loss {rec['loss']:.4f}, {np.mean(seconds):.1f} s/step")
            if a.save_every and step % a.save_every == 0 and step < run.total:
                save_checkpoint(run)
    summary = {"steps": run.pos.step, "steps_this_process": len(seconds),
               "seconds_per_step": round(float(np.mean(seconds)), 3) if seconds else None,
               "mean_loss_last_10_steps": round(float(np.mean(losses[-10:])), 6) if losses else None,
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               "best_stsb_dev": run.pos.best_score, "best_step": run.pos.best_step, "final": str(out / "final")}
    if rank == 0:
        lora.save_adapter(run.emb.model, out / "final", base_name(a))
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        log({"event": "done", **summary})
        flag = {4: " --bits 4", 8: " --bits 8", 16: " --dtype bfloat16"}.get(a.bits, "")
        print(f"done: {summary['steps']} steps, {summary['seconds_per_step']} s/step, peak RSS "
              f"{summary['peak_rss_mb']} MB -> {summary['final']}\nevaluate: python evaluate.py --tasks sts "
              f"--model {a.model}{flag} --demonstration none --adapter {summary['final']}")
    return summary


# ----------------------------------------------------------------------------- CLI
def parser():
    p = argparse.ArgumentParser(description="Supervised contrastive (SimCSE) QLoRA fine-tuning of a decoder LLM "
                                "into a PromptEOL sentence embedder, with gradient caching and torchrun DDP.",
                                epilog="Defaults are the paper's recipe except: the offline default model; the data "
                                "(the partial NLI file unless SimCSE's is downloaded); a warmup cut to 10% of the "
                                "steps in runs under 1,000 steps; fp32 compute on CPU (the reference: fp16 mixed "
                                "precision on GPUs). On a 2-core CPU a 256-triplet step of the default model takes "
                                "minutes: --batch-size and --max-steps size a run to the time at hand.")
    a = p.add_argument
    a("--model", default=M.DEFAULT_MODEL, help=f"alias, local directory or hub id (default {M.DEFAULT_MODEL}, "
      "offline; the paper fine-tunes OPT 125M-13B and LLaMA 7B-13B)")
    a("--data", help="SimCSE csv with header sent0,sent1,hard_neg (default: <data dir>/nli/nli_for_simcse.csv, "
      "the paper's 275k triplets, if downloaded, else <data dir>/nli/nli_triplets_partial.csv, 8,364 triplets). "
      "Malformed rows are skipped and reported by line number")
    a("--data-dir", help="data folder with nli/ and sts/ (default: $SENTEMB_DATA, else ./data)")
    a("--out", help="run folder (default runs/cse; with --resume, the checkpoint's run folder)")
    a("--bits", type=int, default=4, choices=[4, 8, 16, 32], help="frozen base: 4 = NF4 with double quantization "
      "(QLoRA, paper; compute in fp32 on CPU, bf16 on GPU), 8 = int8, 16 = bf16, 32 = fp32 (default 4)")
    a("--batch-size", type=int, default=256, help="triplets per step across all processes, i.e. the global batch "
      "of in-batch negatives (default 256, paper). The last incomplete batch of an epoch is dropped")
    a("--chunk-size", type=int, default=32, help="sentences per forward pass (3 per triplet); with gradient caching "
      "it bounds peak memory whatever the batch size (default 32, sized for a CPU; raise it on a GPU)")
    a("--no-grad-cache", action="store_true", help="plain backpropagation: keep every chunk's graph until one "
      "backward pass (same gradients, one forward pass less, but memory grows with the batch)")
    a("--epochs", type=int, default=1, help="passes over the data (default 1, paper)")
    a("--max-steps", type=int, default=0, help="steps to run; the lr schedule ends there (default 0 = all epochs)")
    a("--lr", type=float, default=5e-4, help="peak AdamW learning rate (default 5e-4, paper)")
    a("--warmup-steps", type=int, help="linear warmup steps, then linear decay to 0 (the reference: 100 of its "
      "1,077 steps; default: 100, or 10%% of the steps if that is fewer, so short runs still reach the peak)")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0, the reference's Trainer)")
    a("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (default 1.0, reference; 0 = off)")
    a("--temp", type=float, default=0.05, help="softmax temperature on cosine similarities (default 0.05)")
    a("--lora-r", type=int, default=64, help="LoRA rank (default 64)")
    a("--lora-alpha", type=float, default=16, help="LoRA alpha; the update is scaled by alpha/r (default 16)")
    a("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input (default 0.05)")
    a("--targets", default="all-linear", help="LoRA targets: all-linear (every linear of the blocks, QLoRA and "
      "the paper) or comma-separated layer names such as q_proj,v_proj")
    a("--max-tokens", type=int, default=32, help="cut each sentence to this many tokens before templating (default 32)")
    a("--seed", type=int, default=42, help="seed of the LoRA init, data order and dropout (default 42, reference)")
    a("--eval-every", type=int, default=50, help="STS-B dev Spearman every N steps and after the last one; the "
      "best adapter is kept in <out>/best (default 50, the reference's checkpoint interval; 0 = never)")
    a("--save-every", type=int, default=10, help="checkpoint every N steps for --resume (default 10; 0 = never)")
    a("--resume", metavar="DIR", help="continue a run exactly: its folder, or one of its checkpoint-<step> "
      "folders; the other flags must repeat the run's recipe")
    a("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available; under torchrun cpu or cuda)")
    return p


def check(args):
    for name, ok in (("batch_size", args.batch_size >= 1), ("chunk_size", args.chunk_size >= 1),
                     ("epochs", args.epochs >= 1), ("max_steps", args.max_steps >= 0), ("lr", args.lr > 0),
                     ("warmup_steps", args.warmup_steps is None or args.warmup_steps >= 0),
                     ("weight_decay", args.weight_decay >= 0), ("max_grad_norm", args.max_grad_norm >= 0),
                     ("temp", args.temp > 0), ("lora_r", args.lora_r >= 1), ("lora_alpha", args.lora_alpha > 0),
                     ("lora_dropout", 0 <= args.lora_dropout < 1), ("max_tokens", args.max_tokens >= 1),
                     ("eval_every", args.eval_every >= 0), ("save_every", args.save_every >= 0)):
        if not ok:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} is out of range")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        check(args)
        train(args)
    except (ValueError, OSError, TrainingStopped) as e:       # UserError, evaluate's and model.py's errors
        if rank_world()[0] == 0:
            print(f"train_cse.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("train_cse.py: interrupted; continue from the last checkpoint with --resume", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
