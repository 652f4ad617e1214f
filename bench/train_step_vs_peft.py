"""One QLoRA training step: ours (model.py + lora.py) vs transformers + PEFT, same 4-bit base and
batch.

    python bench/train_step_vs_peft.py [--batch-size 8] [--repeats 3] [--data nli.csv]

Both sides, in one process: the checkpoint's block linears in 4-bit NF4 with double quantization,
computing in --dtype (ours: model.load; transformers: BitsAndBytesConfig), LoRA r=64, alpha=16,
dropout 0.05 on every block linear (ours: lora.add_lora; PEFT: LoraConfig "all-linear"), and
AdamW at lr 5e-4. They get the same token ids (PromptEOL prompts of the NLI triplets, sentences
cut at --max-tokens) and the same loss (train_cse.contrastive_loss on the last token's final
hidden state). A step is a plain forward, backward and optimizer step on the whole batch;
--cached adds ours with train_cse.py's gradient caching (--chunk-size). After one warm-up step
each, the steps alternate --repeats times. Printed: the median seconds per step, the ratio
ours / transformers, and both first-step losses, which agree: equal base weights, and LoRA's B
starts at 0.
"""
import argparse
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# support.cli first: it sets OpenMP's waiting policy before torch loads.
from support.cli import UserError, cli  # noqa: E402
import torch  # noqa: E402

import lora  # noqa: E402
import model as M  # noqa: E402
from support import hub, nli, tokenizer  # noqa: E402
import train_cse as T  # noqa: E402
from embed import render  # noqa: E402

LORA = dict(r=64, alpha=16, dropout=0.05)   # the paper's recipe, as train_cse.py's defaults


def ours(name, dtype):
    """model.load with a 4-bit base + lora.add_lora on all block linears -> (Decoder, tokenizer,
    embed)."""
    path = hub.resolve(name)
    model = M.load(path, dtype, "cpu", bits=4)
    tok = tokenizer.load(path, model.config)
    torch.manual_seed(0)
    lora.add_lora(model, LORA["r"], LORA["alpha"], LORA["dropout"], "all-linear")
    lora.mark_only_lora_trainable(model).train()

    def embed(ids, mask):
        return model(ids, mask)[:, -1].float()   # (B, T, H) -> (B, H)
    return model, tok, embed


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


def plain_step(embed, opt, ids, mask, temp):
    """Forward the whole batch, backward, AdamW: the step a plain transformers + PEFT training loop
    takes."""
    opt.zero_grad(set_to_none=True)
    z = embed(ids, mask)   # (3N, H): x_1, x+_1, x-_1, x_2, ...
    loss = T.contrastive_loss(z.view(-1, 3, z.shape[-1]), temp)
    loss.backward()
    opt.step()
    return loss.item()


def cached_step(model, opt, chunks, temp):
    opt.zero_grad(set_to_none=True)
    loss = T.cached_step(model, chunks, temp)
    opt.step()
    return loss.item()


def adamw(model, lr):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr), sum(p.numel() for p in params)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=hub.DEFAULT_MODEL,
                   help="a LLaMA-family alias or directory (default: %(default)s)")
    p.add_argument("--data", default=str(ROOT / "tests" / "fixtures" / "nli_triplets.csv"),
                   help="SimCSE-format NLI csv (default: the test fixture)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="triplets per step (default: %(default)s)")
    p.add_argument("--chunk-size", type=int, default=32,
                   help="sentences per forward pass of gradient caching")
    p.add_argument("--max-tokens", type=int, default=32,
                   help="cut sentences to this many tokens (default: 32)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute precision, both")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed steps of each, alternating (default: 3)")
    p.add_argument("--cached", action="store_true",
                   help="also time ours with gradient caching (--chunk-size)")
    p.add_argument("--temp", type=float, default=0.05,
                   help="contrastive temperature (default: 0.05)")
    a = p.parse_args(argv)
    triplets = nli.read_triplets(a.data)[0][:a.batch_size]
    if len(triplets) < a.batch_size:
        raise UserError(f"--batch-size {a.batch_size}: {a.data} holds only {len(triplets)} "
                        f"triplets")
    dtype = getattr(torch, a.dtype)
    model, tok, embed = ours(a.model, dtype)
    peft, ref_embed = theirs(a.model, dtype)
    n_lora = sum(".lora_A." in n for n, _ in model.named_parameters())
    n_peft = sum(".lora_A." in n for n, _ in peft.named_parameters())
    opt, size = adamw(model, 5e-4)
    ref_opt, ref_size = adamw(peft, 5e-4)
    if (n_lora, size) != (n_peft, ref_size):
        raise UserError(f"the adapters differ: ours {n_lora} layers, {size} weights; "
                        f"PEFT's {n_peft}, {ref_size}")
    prompts = [render(tok, s, "eol", "", a.max_tokens, clean=False)[0] for t in triplets for s in t]
    seqs = [tok.encode(p) for p in prompts]
    ids, mask = tok.pad(seqs)   # (3N, T), left padding
    chunks = T.make_chunks(tok, seqs, a.chunk_size, torch.device("cpu"))
    print(f"{a.model}, 4-bit NF4 base computing in {a.dtype}, LoRA r=64 on {n_lora} linears "
          f"({size:,} weights), {len(triplets)} triplets ({ids.numel()} token slots), "
          f"{torch.get_num_threads()} threads")
    steps = {"ours": lambda: plain_step(embed, opt, ids, mask, a.temp),
             "transformers + PEFT": lambda: plain_step(ref_embed, ref_opt, ids, mask, a.temp)}
    if a.cached:
        steps["ours, cached"] = lambda: cached_step(model, opt, chunks, a.temp)
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
        # ours, cached's warm-up follows ours' first step: its loss is not at B = 0
        loss = f"  first-step loss {first[k]:.6f}" if k != "ours, cached" else ""
        each = ", ".join(f"{x:.2f}" for x in s)
        print(f"{k:<20} {med:7.2f} s/step (median of {len(s)}: {each})  "
              f"ratio to transformers {med / theirs_s:.2f}x{loss}")
    diff = abs(first["ours"] - first["transformers + PEFT"])
    verdict = "within" if diff <= 1e-4 else "OVER"
    print(f"first-step loss |ours - transformers| = {diff:.2e} ({verdict} 1e-4)")


if __name__ == "__main__":
    sys.exit(cli(main))
