#!/usr/bin/env python
"""Contrastive QLoRA fine-tuning: a decoder LLM becomes a sentence embedder (Jiang et al. 2023).

NLI triplets (premise x, entailment x+, contradiction x-) are embedded with PromptEOL as at
inference and trained with SimCSE's supervised InfoNCE. QLoRA: a frozen 4-bit base, LoRA r=64,
alpha=16, dropout 0.05 on every linear of the blocks; AdamW at lr 5e-4; one epoch, 256 a step.

    python train_cse.py                                   # the paper's recipe on the default model
    python train_cse.py --batch-size 64 --max-steps 24    # a CPU-sized run
    python train_cse.py --data a.csv b.csv                # the triplets of both files, in turn
    torchrun --nproc_per_node 4 train_cse.py --model opt-6.7b --data nli_for_simcse.csv
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from support.cli import (UserError, cli, data_dir, default_dtype, device, dtype_flag,
                         memory_budget)
import numpy as np
import torch  # after support.cli: it sets OpenMP's waiting policy before torch loads
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

import lora
import model as M
from embed import prompteol, render
from support import hub, nli, tokenizer
from support.files import atomic, write_atomic
from support.provenance import git_commit

RECIPE = ("model", "adapter", "bits", "dtype", "batch_size", "epochs", "max_steps", "lr",
          "warmup_steps", "weight_decay", "max_grad_norm", "temp", "lora_r", "lora_alpha",
          "lora_dropout", "targets", "max_tokens", "seed")   # what a resumed run keeps
LOCAL = ("device", "data_dir", "output", "resume", "graph_memory")   # never from a checkpoint
POSITIVE = "batch_size chunk_size epochs lr temp lora_r lora_alpha max_tokens".split()  # above 0


# ----------------------------------------------------------------------------- the loss
def contrastive_loss(z, temp: float):
    """Supervised SimCSE (Gao et al. 2021, eq. 5) on z (N, 3, H) = rows (x, x+, x-): row i of the
    logits is [cos(x_i, x+_j) / temp for all j] + [cos(x_i, x-_j) / temp for all j], target i."""
    x, pos, neg = F.normalize(z.float(), dim=-1).unbind(1)           # 3 x (N, H)
    logits = torch.cat([x @ pos.T, x @ neg.T], dim=1) / temp          # (N, 2N)
    return F.cross_entropy(logits, torch.arange(len(x), device=z.device))


def batch_loss(local, temp):
    """local: this rank's (3b, H) embeddings (x_1, x+_1, x-_1, x_2, ...). Every rank computes the
    global batch's loss; its own part is `local`, with its graph (all_gather's copies have none)."""
    z = local
    if dist.is_initialized():                                         # under torchrun
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.detach().contiguous())
        parts[dist.get_rank()] = local
        z = torch.cat(parts)                                          # (3B, H)
    return contrastive_loss(z.view(-1, 3, local.shape[-1]), temp)


# ----------------------------------------------------------------------------- gradient caching
def embed_chunk(model, ids, mask):
    return model(ids, mask)[:, -1].float()   # (B, T, H) -> (B, H): the last token (left padding)


def generator(device):                       # the one that draws dropout masks on `device`
    cuda = torch.cuda.default_generators
    return cuda[device.index or 0] if device.type == "cuda" else torch.default_generator


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Within it, `total` sums the bytes autograd keeps for backward, each storage once and the
    model's weights not: a graph's memory, whatever the allocator holds."""

    def __init__(self, model):
        self.total = 0
        self.seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
        super().__init__(self.pack, lambda t: t)

    def pack(self, t):
        storage = t.untyped_storage()
        self.total += storage.nbytes() * (storage.data_ptr() not in self.seen)
        self.seen.add(storage.data_ptr())
        return t


def cached_step(model, chunks, temp, budget=0):
    """Full-batch gradients with memory following the chunk size, not the batch size: gradient
    caching (Gao et al. 2021). Chunks whose graphs fit in `budget` bytes keep them from the first
    pass instead of replaying: the same gradients, a forward less (plain backprop when all fit).
    Returns the loss; a non-finite loss backpropagates nothing."""
    device = chunks[0][1].device
    states, parts, kept = [], [], []          # per chunk: random state, (c, H), graph kept
    used = 0                                  # bytes of the kept graphs
    per_slot = 0.0                            # a graph's bytes per token slot, once measured
    for _, ids, mask in chunks:                             # 1. embed every chunk, remembering
        states.append(generator(device).get_state())        #    its random state; where its
        fits = budget > 0 and used + per_slot * ids.numel() <= budget   # graph fits, with it
        saved = SavedBytes(model)
        with torch.inference_mode(not fits), saved:
            z = embed_chunk(model, ids, mask)               #    (c, H)
        per_slot = max(per_slot, saved.total / ids.numel())
        kept.append(fits and used + saved.total <= budget)
        used += saved.total if kept[-1] else 0
        parts.append(z if kept[-1] else z.detach())
    order = torch.argsort(torch.cat([rows for rows, _, _ in chunks]))   # chunk order -> input order
    local = torch.cat([z.detach() for z in parts])[order].requires_grad_()   # (3b, H)
    loss = batch_loss(local, temp)                          # 2. the loss and d loss / d embeddings
    if torch.isfinite(loss):
        loss.backward()                                     #    -> local.grad, nothing else
        for (rows, ids, mask), z, state, graph in zip(chunks, parts, states, kept, strict=True):
            if not graph:                                   # 3. replay each other chunk in its
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    generator(device).set_state(state)      #    random state (same dropout
                    z = embed_chunk(model, ids, mask)       #    masks): (c, H)
            torch.autograd.backward(z, local.grad[rows])    #    and backpropagate its rows' grads
    return loss.detach()


def make_chunks(tok, ids, chunk_size, device) -> list:
    """-> [(rows in the input list, ids, mask)], `chunk_size` sentences each, longest first."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))      # (little padding)
    groups = [order[j:j + chunk_size] for j in range(0, len(order), chunk_size)]
    return [(torch.tensor(rows, device=device), *tok.pad([ids[i] for i in rows], device=device))
            for rows in groups]


# ----------------------------------------------------------------------------- the step
def sum_gradients(params):
    """Every rank backpropagated the global loss through its own embeddings: the gradient's SUM."""
    for p in params if dist.is_initialized() else []:
        p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        dist.all_reduce(p.grad)


def warmup_then_decay(warmup: int, total: int):
    """Linear warmup to the peak lr, then linear decay; step s (from 0) has a factor in (0, 1]."""
    return lambda s: min((s + 1) / (warmup + 1), (total - s) / max(1, total - warmup))


def attention_kernels(dev, dtype: str):
    """On a CPU in bf16 or fp16, SDPA's math kernel for both passes of a step: the flash kernel's
    backward runs several times slower there in half precision. Elsewhere PyTorch's choice."""
    if dev.type != "cpu" or dtype == "float32":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def train_step(run) -> dict:
    """One optimizer step on the next global batch; a non-finite loss or gradient stops first."""
    a = run.args
    b = a.batch_size // run.world                            # triplets per rank
    epoch, k = divmod(run.pos.step, run.steps_per_epoch)     # the data position follows the step
    order = np.random.default_rng([a.seed, epoch]).permutation(len(run.triplets))  # fixed an epoch
    batch = order[k * a.batch_size:(k + 1) * a.batch_size]
    mine = batch[run.rank * b:(run.rank + 1) * b]            # this rank's share of the global batch
    sentences = [s for i in mine for s in run.triplets[i]]   # x_1, x+_1, x-_1, x_2, ...
    prompts = [render(run.tok, s, "eol", "", a.max_tokens, clean=False) for s in sentences]
    ids = [run.tok.encode(text) for text, _ in prompts]
    chunks = make_chunks(run.tok, ids, a.chunk_size, run.device)
    t0 = time.perf_counter()
    run.opt.zero_grad(set_to_none=True)
    with attention_kernels(run.device, a.dtype):
        loss = cached_step(run.model, chunks, a.temp, run.graph_budget)
    sum_gradients(run.params)
    norm = torch.nn.utils.clip_grad_norm_(run.params, a.max_grad_norm or math.inf)
    rec = {"step": run.pos.step + 1, "epoch": epoch + 1, "loss": round(loss.item(), 6),
           "grad_norm": round(norm.item(), 6)}
    if not (torch.isfinite(loss) and torch.isfinite(norm)):
        return {"event": "stopped", **rec}
    rec["lr"] = run.opt.param_groups[0]["lr"]
    run.opt.step()
    run.sched.step()
    run.pos.step += 1
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    rec["truncated"] = sum(cut for _, cut in prompts)
    return rec


# ----------------------------------------------------------------------------- the run
def prepare(args, ckpt: Path | None = None, state: dict | None = None) -> SimpleNamespace:
    """-> the run: processes, data, model with LoRA, optimizer, schedule: new, or as `ckpt` was."""
    dev = device(args.device)
    out = Path(args.output)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:                              # torchrun: gloo on CPUs, else NCCL with a GPU a rank
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if not state and ((out / "latest").exists() or (out / "final").exists()):
        raise UserError(f"{out} holds a run: continue it with --resume {out}, or another --output")
    if args.eval_every:                        # STS-B dev must be there before hours of training
        data_dir(args.data_dir)
    args.data = args.data or nli.default_files(args.data_dir)
    triplets, files = nli.read_files(args.data, say=rank == 0)
    if len(triplets) < args.batch_size:
        raise UserError(f"--batch-size {args.batch_size}: more than the {len(triplets)} triplets")
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size}: not divisible by the {world} processes")
    now = " ".join(f["sha256"][:12] for f in files)
    was = " ".join(sha[:12] for sha in state["data_sha256"]) if state else now
    if state and (now, world) != (was, state["world_size"]):     # a run continues as it started
        raise UserError(f"--resume {args.resume}: the run had {state['world_size']} process(es) "
                        f"and data of sha256 {was}; this one {world}, --data of sha256 {now}")
    steps_per_epoch = len(triplets) // args.batch_size    # (an epoch's last partial batch: dropped)
    total = min(args.max_steps or math.inf, steps_per_epoch * args.epochs)
    if args.warmup_steps is None:
        args.warmup_steps = min(100, math.ceil(0.1 * total))
    args.dtype = args.dtype or str(default_dtype(dev)).removeprefix("torch.")  # (LoRA's: fp32)
    bits = None if args.bits == "none" else int(args.bits)
    path = hub.resolve(args.model)
    model = M.load(path, getattr(torch, args.dtype), dev, bits)
    tok = tokenizer.load(path, model.config)
    torch.manual_seed(args.seed)                            # the same LoRA init on every rank
    if ckpt or args.adapter:
        lora.load_adapter(model, ckpt / "adapter" if ckpt else args.adapter)
    else:
        lora.add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.targets)
    lora.set_precision(model, dev, getattr(torch, args.dtype), say=rank == 0)
    budget = memory_budget(dev, args.graph_memory)
    if rank == 0:
        print(f"first-pass graphs kept up to {budget / 2**30:.1f} GiB (--graph-memory), other "
              f"chunks replayed", file=sys.stderr)
    params = [p for p in lora.mark_only_lora_trainable(model).parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)  # Trainer's betas
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_then_decay(args.warmup_steps, total))
    pos = SimpleNamespace(step=0, best_score=None, best_step=None)
    if state:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        generator(dev).set_state(state["rng"][rank])
        pos = SimpleNamespace(**state["position"])
    else:
        torch.manual_seed(args.seed + rank)                 # each rank its own dropout masks
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0 and not state:                # a run stopped before its first checkpoint: anew
        (out / "log.jsonl").unlink(missing_ok=True)
    return SimpleNamespace(args=args, out=out, device=dev, rank=rank, world=world, tok=tok,
                           model=model.train(), params=params, opt=opt, sched=sched, pos=pos,
                           total=total, triplets=triplets, files=files, final_saved=False,
                           steps_per_epoch=steps_per_epoch, graph_budget=budget,
                           phase="before its first step")


def save_checkpoint(run):
    """checkpoint-<step>/{adapter/, trainer.pt}, then `latest` naming it, atomically; older go."""
    rngs = [generator(run.device).get_state()] * run.world
    if run.world > 1:                                             # every rank's random state
        dist.all_gather_object(rngs, rngs[0])
    if run.rank != 0:
        return
    path = run.out / f"checkpoint-{run.pos.step}"
    trainer = {"args": vars(run.args), "position": vars(run.pos), "world_size": run.world,
               "rng": rngs, "data_sha256": [f["sha256"] for f in run.files],
               "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict()}
    with atomic(path) as tmp:
        tmp.mkdir()
        lora.save_adapter(run.model, tmp / "adapter", hub.hub_id(run.args.model))
        torch.save(trainer, tmp / "trainer.pt")
    write_atomic(run.out / "latest", path.name + "\n")
    for old in set(run.out.glob("checkpoint-*")) - {path}:
        shutil.rmtree(old)


def kept(run) -> str:                                # what a stopped run leaves, in words
    latest = run.out / "latest"
    if run.final_saved:
        return f"the adapter of step {run.pos.step} is kept in {run.out / 'final'}"
    if not latest.exists():
        return f"no checkpoint yet: the same command starts {run.out} over"
    return f"{latest.read_text().strip()} in {run.out} is kept: continue with --resume {run.out}"


def log(run, record):
    if run.rank == 0:
        with open(run.out / "log.jsonl", "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def evaluate_and_keep_best(run, say):
    """STS-B dev as evaluate.py scores the adapter, with a progress bar; the best -> best/."""
    import evaluate
    step = run.pos.step
    size = run.args.chunk_size
    run.phase = f"in the STS-B dev evaluation after step {step}"
    dev = evaluate.load_stsb(data_dir(run.args.data_dir), "dev")      # (for the bar's total)
    bar = tqdm(total=len(set(dev.a + dev.b)), desc=f"STS-B dev, step {step}", unit="sent")

    def encode(sentences):                           # -> (n, H), --chunk-size sentences a forward
        vectors = []
        for i in range(0, len(sentences), size):
            vectors.append(prompteol(run.model, run.tok, sentences[i:i + size]).float().cpu())
            bar.update(len(vectors[-1]))
        return torch.cat(vectors).numpy()
    run.model.eval()                                 # no dropout
    with bar, torch.no_grad():
        score = evaluate.stsb_dev(SimpleNamespace(encode=encode), data=run.args.data_dir)
    run.model.train()
    best = run.pos.best_score is None or score > run.pos.best_score
    if best:                                         # (the paper's checkpoint selection)
        run.pos.best_score, run.pos.best_step = score, step
        lora.save_adapter(run.model, run.out / "best", hub.hub_id(run.args.model))
    log(run, {"step": step, "stsb_dev": round(score, 6), "best": best})
    say(f"step {step}: STS-B dev Spearman {100 * score:.2f}{' (best)' * best}", file=sys.stderr)


def train(run):
    """Steps, evaluating and checkpointing on the way; then final/, then its STS-B dev score."""
    a = run.args
    log(run, {"event": "resume" if run.pos.step else "start", "step": run.pos.step, "args": vars(a),
              "world_size": run.world, "data": run.files, "steps_per_epoch": run.steps_per_epoch,
              "total_steps": run.total, "commit": git_commit()})
    start = run.pos.step
    saved_at = time.monotonic()
    with tqdm(total=run.total, initial=start, unit="step", disable=run.rank, smoothing=0) as bar:
        while run.pos.step < run.total:
            run.phase = f"in step {run.pos.step + 1}"
            rec = train_step(run)
            log(run, rec)
            if rec.get("event") == "stopped":
                raise UserError(f"loss {rec['loss']}, gradient norm {rec['grad_norm']} at step "
                                f"{rec['step']}: stopped before updating the adapter; {kept(run)}")
            bar.update(1)
            bar.set_postfix_str(f"loss {rec['loss']:.4f}")
            step = run.pos.step
            if step == start + 1 and run.rank == 0:         # the run's time, from its first step
                left = run.total - step
                eta = f"; the {left} steps left take about {left * rec['seconds'] / 60:.0f} min"
                bar.write(f"{len(run.triplets)} triplets, {a.batch_size} a step: step {step} took "
                          f"{rec['seconds']:.0f} s{eta * bool(left)} -> {run.out}", file=sys.stderr)
            if a.eval_every and step % a.eval_every == 0 and step < run.total and run.rank == 0:
                evaluate_and_keep_best(run, bar.write)
            by_time = a.save_minutes and time.monotonic() - saved_at > 60 * a.save_minutes
            due = [step < run.total and ((a.save_every and step % a.save_every == 0) or by_time)]
            if run.world > 1:
                dist.broadcast_object_list(due, 0)        # rank 0's clock decides for all
            if due[0]:
                run.phase = f"after step {step}, saving checkpoint-{step}"
                save_checkpoint(run)
                saved_at = time.monotonic()
    final = run.out / "final"                            # first: nothing after it loses the run
    if run.rank == 0:
        run.phase = f"after step {run.pos.step}, saving {final}"
        lora.save_adapter(run.model, final, hub.hub_id(a.model))
        run.final_saved = True
        if a.eval_every:
            evaluate_and_keep_best(run, print)
        log(run, {"event": "done", **vars(run.pos)})
        print(f"done: {run.pos.step} steps -> {final}\nevaluate: python evaluate.py --model "
              f"{a.model} --demonstration none --adapter {final}")   # (the unquantized base)
    if run.world > 1:                   # no rank closes its connections while another still works
        dist.barrier()


# ----------------------------------------------------------------------------- CLI
def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Defaults: the paper's.")
    a = p.add_argument
    a("--model", default=hub.DEFAULT_MODEL, help="alias, local dir or hub id (default %(default)s)")
    a("--adapter", help="start from this LoRA adapter (PEFT format), with its rank, alpha, dropout")
    a("--data", nargs="+", metavar="CSV", help="SimCSE csv file(s) (sent0,sent1,hard_neg), joined "
      "(default: <data dir>/nli/nli_for_simcse.csv if there, else every nli_triplets_*.csv there)")
    a("--data-dir", help="data folder with nli/ and sts/ (default: $SENTEMB_DATA, else ./data)")
    a("--output", default="runs/cse", help="run folder: log, checkpoints, best/, final/ (runs/cse)")
    a("--device", help="cpu, cuda or cuda:N (default: cuda if available; torchrun rank i: cuda:i)")
    dtype_flag(p, " for the base; LoRA weights and the optimizer stay float32")
    a("--bits", choices=["4", "8", "none"], default="4", help="quantize the base (default 4: NF4)")
    a("--batch-size", type=int, default=256, help="triplets a step, all processes (default 256)")
    a("--chunk-size", type=int, default=64, help="sentences a forward: bounds memory (default 64)")
    a("--graph-memory", type=float, metavar="GIB", help="keep first-pass graphs up to GIB instead "
      "of replaying their chunks: faster, same gradients (default: half the free memory; 0: none)")
    a("--epochs", type=int, default=1, help="passes over the data (default 1)")
    a("--max-steps", type=int, default=0, help="steps to run, the schedule's end (default: epochs)")
    a("--lr", type=float, default=5e-4, help="peak AdamW learning rate (default 5e-4)")
    a("--warmup-steps", type=int, help="linear warmup, then decay (default 100, or 10%% of steps)")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    a("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (default 1; 0: off)")
    a("--temp", type=float, default=0.05, help="softmax temperature on cosines (default 0.05)")
    a("--lora-r", type=int, default=64, help="LoRA rank (default 64)")
    a("--lora-alpha", type=float, default=16, help="LoRA alpha; updates scale alpha/r (default 16)")
    a("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input (default 0.05)")
    a("--targets", default="all-linear", help="all-linear (default) or a regex of layer names")
    a("--max-tokens", type=int, default=32, help="cut each sentence to N tokens (default 32)")
    a("--seed", type=int, default=42, help="seed of LoRA init, data order, dropout (default 42)")
    a("--eval-every", type=int, default=50, help="STS-B dev every N steps, at the end (50; 0: off)")
    a("--save-every", type=int, default=10, help="checkpoint every N steps (default 10; 0: never)")
    a("--save-minutes", type=float, default=30, help="and every N minutes (default 30; 0: never)")
    a("--resume", metavar="DIR", help="continue a run (its folder, or a checkpoint-<step>) as is")
    return p


def parse_args(argv=None):
    """-> (args, checkpoint, state). --resume: all but LOCAL from the checkpoint; no new RECIPE."""
    p = parser()
    args = p.parse_args(argv)
    p.set_defaults(**dict.fromkeys(vars(args)))           # parsed again with no defaults: the given
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    ckpt = state = None
    if args.resume:                        # a checkpoint, or a run folder whose `latest` names one
        ckpt = Path(args.resume)
        if (ckpt / "latest").exists():
            ckpt = ckpt / (ckpt / "latest").read_text().strip()
        if not (ckpt / "trainer.pt").exists():
            raise UserError(f"--resume {args.resume}: no checkpoint (nor a `latest` naming one)")
        state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
        old = state["args"]
        if isinstance(old["data"], str):                  # a checkpoint of a one-file run
            old["data"], state["data_sha256"] = [old["data"]], [state["data_sha256"]]
        changed = [f"--{k.replace('_', '-')} {given[k]} (the run's: {old[k]})" for k in RECIPE
                   if given.get(k, old[k]) != old[k]]
        if changed:
            raise UserError(f"--resume {args.resume}: the run was started otherwise: "
                            + "; ".join(changed))
        taken = {k: v for k, v in old.items() if k not in LOCAL}
        args = argparse.Namespace(**{**vars(args), **taken, **given})
        args.output = given.get("output", str(ckpt.parent))
    bad = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if type(v) in (int, float)
           and (v < 0 or (v == 0 and k in POSITIVE) or (k == "lora_dropout" and v >= 1))]
    if bad:
        raise UserError("out of range: " + ", ".join(bad))
    return args, ckpt, state


def main(argv=None) -> int:
    runs = []                                           # the run, once prepared

    def run(argv):
        runs.append(prepare(*parse_args(argv)))
        train(runs[0])
    try:                                                # Ctrl-C: where it stopped, what is kept
        return cli(run, argv, lambda: f"{runs[0].phase}, {kept(runs[0])}" if runs
                   else "nothing was written")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
