"""One QLoRA training step: train_cse.py's vs transformers + PEFT's, same 4-bit base and batch.

    python bench/train_step_vs_peft.py [--batch-size 32] [--repeats 3] [--dtype bfloat16]

Both sides, in one process, on this machine's CPU: the checkpoint's block linears in 4-bit NF4
with double quantization, LoRA r=64, alpha=16, dropout 0.05 on every block linear, AdamW at lr
5e-4, the gradient norm clipped at 1, and the same batch: the first --batch-size triplets of
train_cse.py's first step (its data, seed 42), as PromptEOL prompts cut at --max-tokens, with the
same loss (train_cse.contrastive_loss on the last token's final hidden state).

- ours: what train_cse.py runs (model.load, lora.add_lora, lora.set_precision: LoRA in the
  compute dtype over fp32 weights, the 4-bit base dequantized once on a CPU), and its step:
  gradient caching in chunks of --chunk-size (train_cse.cached_step), clipping, AdamW.
- transformers + PEFT: BitsAndBytesConfig (compute dtype --dtype), LoraConfig "all-linear", and
  the reference's mixed precision: its step (one forward of the whole batch, backward, clipping,
  AdamW) under torch.autocast("cpu", bfloat16) when --dtype is bfloat16; none in float32.
  bitsandbytes dequantizes the base on every call, as QLoRA does.

--dtype defaults to train_cse.py's (bfloat16 where the CPU has native bf16, else float32).
Ours keeps the first-pass graphs of the chunks that fit --graph-memory and replays the others
(at this batch size usually none: plain backprop); "ours, all replayed" is ours with
--graph-memory 0, every chunk embedded twice: pure gradient caching, as a batch far over the
budget costs.
After one warm-up step each, the steps alternate --repeats times. Printed: the median seconds a
step, the ratio ours / transformers (target <= 0.5), and both first-step losses, which agree to
the dtype's rounding: equal base weights, and LoRA's B starts at 0.
"""
import argparse
import contextlib
import os
import pathlib
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# support.cli first: it sets OpenMP's waiting policy before torch loads.
from support.cli import UserError, cli, default_dtype, memory_budget  # noqa: E402
import torch  # noqa: E402

import lora  # noqa: E402
import model as M  # noqa: E402
from support import hub, nli, tokenizer  # noqa: E402
import train_cse as T  # noqa: E402
from embed import render  # noqa: E402

CPU = torch.device("cpu")
LORA = dict(r=64, alpha=16, dropout=0.05)   # the paper's recipe, as train_cse.py's defaults
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}   # first-step losses: the dtype's rounding


def ours(name, dtype):
    """model.load with a 4-bit base, LoRA and train_cse.py's precision -> (Decoder, tokenizer)."""
    path = hub.resolve(name)
    model = M.load(path, dtype, CPU, bits=4)
    tok = tokenizer.load(path, model.config)
    torch.manual_seed(0)
    lora.add_lora(model, LORA["r"], LORA["alpha"], LORA["dropout"], "all-linear")
    lora.set_precision(model, CPU, dtype)
    lora.mark_only_lora_trainable(model).train()
    return model, tok


def theirs(name, dtype):
    """transformers' LlamaModel loaded 4-bit by bitsandbytes + a PEFT LoRA -> (PeftModel, embed)."""
    import transformers
    from peft import LoraConfig, get_peft_model
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=dtype)
    ref = transformers.AutoModel.from_pretrained(str(hub.resolve(name)), quantization_config=q,
                                                 dtype=dtype, device_map="cpu")
    torch.manual_seed(0)
    cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                     target_modules="all-linear")
    peft = get_peft_model(ref, cfg).train()

    def embed(ids, mask):   # positions count real tokens only, as ours do
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = peft(input_ids=ids, attention_mask=mask, position_ids=pos)
        return out.last_hidden_state[:, -1].float()   # (B, H)
    return peft, embed


def autocast(dtype):
    """The reference's mixed precision (Trainer's fp16/bf16 flag): autocast in reduced precision."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


def first_batch(files, size) -> list:
    """The first `size` triplets of train_cse.py's first step (seed 42, epoch 1)."""
    triplets, _ = nli.read_files(files, say=False)
    order = np.random.default_rng([42, 0]).permutation(len(triplets))
    return [triplets[i] for i in order[:size]]


def adamw(model):
    params = [p for p in model.parameters() if p.requires_grad]
    return params, torch.optim.AdamW(params, lr=5e-4)


def finish(params, opt, loss):
    """Clip at 1 and step, as train_cse.py and Trainer do -> the loss."""
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=hub.DEFAULT_MODEL,
                   help="a LLaMA-family alias or directory (default: %(default)s)")
    p.add_argument("--data", nargs="+", help="SimCSE-format NLI csv file(s) (default: "
                   "train_cse.py's)")
    p.add_argument("--data-dir", help="data folder (default: $SENTEMB_DATA, else ./data)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="triplets a step (default %(default)s: PEFT's one-forward step keeps "
                        "the whole batch's graph)")
    p.add_argument("--chunk-size", type=int, default=T.parser().get_default("chunk_size"),
                   help="sentences a forward of ours (default: train_cse.py's, %(default)s)")
    p.add_argument("--max-tokens", type=int, default=32,
                   help="cut sentences to this many tokens (default: 32)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="compute dtype, both sides (default: train_cse.py's)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed steps of each, alternating (default: 3)")
    p.add_argument("--graph-memory", type=float, metavar="GIB",
                   help="ours keeps first-pass graphs up to GIB (default: train_cse.py's, half "
                        "the free memory)")
    p.add_argument("--temp", type=float, default=0.05,
                   help="contrastive temperature (default: 0.05)")
    p.add_argument("--output", default=str(ROOT / "results" / "bench-train-step-vs-peft.txt"),
                   help="write the report here too (default: %(default)s)")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype) if a.dtype else default_dtype(CPU)
    triplets = first_batch(a.data or nli.default_files(a.data_dir), a.batch_size)
    if len(triplets) < a.batch_size:
        raise UserError(f"--batch-size {a.batch_size}: the data holds {len(triplets)} triplets")
    model, tok = ours(a.model, dtype)
    peft, ref_embed = theirs(a.model, dtype)
    params, opt = adamw(model)
    ref_params, ref_opt = adamw(peft)
    size = sum(x.numel() for x in params)
    if size != sum(x.numel() for x in ref_params) or len(params) != len(ref_params):
        raise UserError(f"the adapters differ: ours {len(params)} tensors, {size} weights; "
                        f"PEFT's {len(ref_params)}")
    prompts = [render(tok, s, "eol", "", a.max_tokens, clean=False)[0] for t in triplets for s in t]
    seqs = [tok.encode(x) for x in prompts]
    ids, mask = tok.pad(seqs)   # (3N, T), left padding
    chunks = T.make_chunks(tok, seqs, a.chunk_size, CPU)
    name = str(dtype).removeprefix("torch.")
    budget = memory_budget(CPU, a.graph_memory)

    def our_step(budget):
        opt.zero_grad(set_to_none=True)
        with T.attention_kernels(CPU, name):
            loss = T.cached_step(model, chunks, a.temp, budget)
        return finish(params, opt, loss)

    def their_step():
        ref_opt.zero_grad(set_to_none=True)
        with autocast(dtype):
            z = ref_embed(ids, mask)   # (3N, H): x_1, x+_1, x-_1, x_2, ...
        loss = T.contrastive_loss(z.view(-1, 3, z.shape[-1]), a.temp)
        loss.backward()
        return finish(ref_params, ref_opt, loss)

    mixed = "autocast bfloat16" if dtype == torch.bfloat16 else "float32, no autocast"
    lines = [f"python bench/train_step_vs_peft.py {' '.join(argv or sys.argv[1:])}".rstrip(),
             f"CPU: {cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, one process; load average "
             f"{os.getloadavg()[0]:.2f} at the start",
             f"{a.model}, 4-bit NF4 base, LoRA r=64 on {len(params) // 2} linears ({size:,} "
             f"weights), {len(triplets)} triplets ({len(seqs)} prompts, {ids.numel()} token "
             f"slots padded to the longest)",
             f"ours: {name}, 4-bit base dequantized once, gradient caching in chunks of "
             f"{a.chunk_size}, first-pass graphs kept up to {budget / 2**30:.1f} GiB; "
             f"transformers + PEFT: {mixed}, dequantized on every call, one forward of the "
             f"batch"]
    print("\n".join(lines), flush=True)
    steps = {"ours (train_cse.py)": lambda: our_step(budget), "transformers + PEFT": their_step,
             "ours, all replayed": lambda: our_step(0)}
    first = {k: step() for k, step in steps.items()}   # warm-up: the loss at B = 0
    seconds = {k: [] for k in steps}
    for _ in range(a.repeats):
        for k, step in steps.items():
            t = time.perf_counter()
            step()
            seconds[k].append(time.perf_counter() - t)
    theirs_s = statistics.median(seconds["transformers + PEFT"])
    for k, s in seconds.items():
        med = statistics.median(s)
        each = ", ".join(f"{x:.2f}" for x in s)
        # (the last one's warm-up follows our first step: its loss is not at B = 0)
        loss = f"  first-step loss {first[k]:.6f}" if k != "ours, all replayed" else ""
        lines.append(f"{k:<22} {med:7.2f} s/step (median of {len(s)}: {each})  ratio "
                     f"{med / theirs_s:.2f}x{loss}")
    diff = abs(first["ours (train_cse.py)"] - first["transformers + PEFT"])
    verdict = "within" if diff <= TOLERANCE[dtype] else "OVER"
    ratio = statistics.median(seconds["ours (train_cse.py)"]) / theirs_s
    lines.append(f"first-step loss |ours - transformers| = {diff:.2e} ({verdict} "
                 f"{TOLERANCE[dtype]:g}); ours / transformers + PEFT = {ratio:.2f}x (target "
                 f"<= 0.5: {'met' if ratio <= 0.5 else 'NOT met'}); load average "
                 f"{os.getloadavg()[0]:.2f} at the end")
    print("\n".join(lines[4:]), flush=True)
    out = pathlib.Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


def cpu_name() -> str:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(cli(main))
