"""Weight memory and forward time of a model at 32/16/8/4 bits, as ratios to fp32.

    python bench/quant.py [--model smollm2-135m] [--batch 16] [--reps 3]

4/8 bits quantize the linear layers of the decoder blocks (bitsandbytes NF4 with double
quantization / LLM.int8()); embeddings, norms and the LM head stay in the load dtype (float32
on CPU, as model.load picks). 16 bits is bfloat16 throughout. Also reports the cosine of the
last-token hidden states (the PromptEOL embedding) to fp32's. If the default model is not
available, a random LLaMA shaped like SmolLM2-135M stands in (memory ratios are the same;
the cosine then says little).
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support.cli import UserError  # noqa: E402  (before torch: it sets OpenMP's waiting policy)
import torch  # noqa: E402
import model as M  # noqa: E402
from support import hub  # noqa: E402

SMOLLM2_SHAPE = dict(model_type="llama", vocab_size=49152, hidden_size=576, num_hidden_layers=30,
                     intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                     max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True,
                     rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
TEMPLATE = 'This sentence : "{}" means in one word:"'   # PromptEOL
SENTENCES = ["A man is playing a guitar.", "The cat sits on the mat near the window.",
             "Stocks fell sharply after the announcement.",
             "Two kids are riding bikes in the park.",
             "She is reading a long novel about the sea.", "The weather will be sunny tomorrow."]


def random_checkpoint(d: Path) -> str:
    """A SmolLM2-135M-shaped LLaMA with random weights and a throwaway BPE tokenizer, in d."""
    from safetensors.torch import save_file
    from tokenizers import ByteLevelBPETokenizer
    (d / "config.json").write_text(json.dumps(SMOLLM2_SHAPE))
    c = M.Config.from_hf(SMOLLM2_SHAPE)
    torch.manual_seed(0)
    with torch.device("meta"):
        state = M.Decoder(c).state_dict()
    shapes = {k: v.shape for k, v in state.items() if k != "lm_head.weight"}
    weights = {}
    for k, s in shapes.items():   # norms at 1, everything else small and random
        weights[k] = torch.ones(s) if k.endswith("norm.weight") else torch.randn(s) * 0.02
    save_file(weights, str(d / "model.safetensors"))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(SENTENCES * 10, vocab_size=300,
                            special_tokens=["<s>", "<pad>", "</s>"])
    bpe.save(str(d / "tokenizer.json"))
    return str(d)


def weight_bytes(model) -> int:
    """Bytes held by parameters and buffers (4-bit weights count as their packed bytes)."""
    # Tied weights count once.
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    n = sum(t.numel() * t.element_size() for t in tensors.values())
    for m in model.modules():  # NF4 statistics live in quant_state (nested: state2), not parameters
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        while qs is not None:
            held = (qs.absmax, getattr(qs, "code", None))
            stats = [t for t in held if isinstance(t, torch.Tensor)]
            n += sum(t.numel() * t.element_size() for t in stats)
            qs = getattr(qs, "state2", None)
    return n


def forward(model, ids, mask):
    t = time.perf_counter()
    with torch.no_grad():
        out = model(ids, mask)
    return time.perf_counter() - t, out[:, -1].float()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=hub.DEFAULT_MODEL)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bits", default="32,16,8,4")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="quant-bench-") as tmp:
        try:
            hub.resolve(args.model)
            name = args.model
        except (UserError, OSError) as e:  # no default model here: use the stand-in
            print(f"# {args.model} unavailable ({str(e).splitlines()[0][:100]}); "
                  f"using a random SmolLM2-135M-shaped LLaMA")
            name = random_checkpoint(Path(tmp))
        bench(args, name)


def bench(args, name):
    bits = [int(b) for b in args.bits.split(",")]
    path = hub.resolve(name)
    models = {}
    for b in bits:   # 16: bf16 throughout; 4 and 8: quantized linears over fp32
        dtype = "bfloat16" if b == 16 else "float32"
        models[b] = M.load(path, dtype, "cpu", b if b in (4, 8) else None)
    tok = models[bits[0]][1]
    prompts = [TEMPLATE.format(SENTENCES[i % len(SENTENCES)]) for i in range(args.batch)]
    ids, mask = tok.pad([tok.encode(p) for p in prompts])
    before = {b: weight_bytes(m) for b, (m, _) in models.items()}
    # Warm-up: bitsandbytes repacks its weights here, which may change the bytes.
    last = {b: forward(m, ids, mask)[1] for b, (m, _) in models.items()}
    after = {b: weight_bytes(m) for b, (m, _) in models.items()}
    secs = {b: [] for b in bits}
    for _ in range(args.reps):          # interleaved, best of reps: load drift hits every row alike
        for b, (m, _) in models.items():
            secs[b].append(forward(m, ids, mask)[0])
    rows = []
    b0 = bits[0]
    for b in bits:
        cos = torch.nn.functional.cosine_similarity(last[b], last[b0], dim=-1)
        rows.append((b, before[b], after[b], min(secs[b]), cos.mean().item(), cos.min().item()))
    base_bytes = rows[0][1]
    base_secs = rows[0][3]
    shown = args.model if name == args.model else "random SmolLM2-135M-shaped LLaMA"
    policy = os.environ.get("OMP_WAIT_POLICY") or f"spin {os.environ.get('GOMP_SPINCOUNT')}"
    print(f"model: {shown}; batch {args.batch} x {ids.shape[1]} tokens; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU, OpenMP waits: {policy}; "
          f"ratios to the first row")
    print(f"{'bits':>4} {'weights MB':>10} {'ratio':>6} {'after fwd':>9} {'fwd ms':>8} "
          f"{'ratio':>6} {'cos mean':>8} {'cos min':>8}")
    for n_bits, b, a, s, cm, cn in rows:
        print(f"{n_bits:>4} {b / 1e6:>10.1f} {b / base_bytes:>6.3f} {a / base_bytes:>9.3f} "
              f"{s * 1e3:>8.1f} {s / base_secs:>6.2f} {cm:>8.4f} {cn:>8.4f}")


if __name__ == "__main__":
    main()
