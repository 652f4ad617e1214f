"""Forward throughput of model.py vs transformers' LlamaModel on the same random weights.

    python bench/model.py [--layers 30] [--batch 64] [--tokens 32] [--repeats 3]

A random LLaMA shaped like SmolLM2-135M (hidden 576, 9 heads, 3 KV heads, FFN 1536),
fp32, a full (unpadded) batch; both models run alternately in one process and the
best of --repeats is kept. Prints tokens/s of each and their ratio.
"""
import argparse
import pathlib
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import model as M  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M: 30)")
    ap.add_argument("--batch", type=int, default=64, help="sequences per forward")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per sequence")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is kept")
    args = ap.parse_args()
    import transformers
    conf = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                    num_hidden_layers=args.layers, num_attention_heads=9,
                                    num_key_value_heads=3, rope_theta=100000.0,
                                    tie_word_embeddings=True)
    torch.manual_seed(0)
    ref = transformers.LlamaModel(conf).eval()
    with tempfile.TemporaryDirectory() as d:
        # Same shapes; the weights are copied below.
        transformers.LlamaForCausalLM(conf).save_pretrained(d)
        (pathlib.Path(d) / "vocab.json").write_text('{"a": 0}')
        (pathlib.Path(d) / "merges.txt").write_text("#version: 0.2\n")
        ours = M.load(d, dtype=torch.float32, device="cpu")   # the bench compares fp32
    ours.model.load_state_dict(ref.state_dict())
    ids = torch.randint(0, conf.vocab_size, (args.batch, args.tokens))
    mask = torch.ones_like(ids)
    best = {"model.py": 0.0, "transformers": 0.0}
    with torch.inference_mode():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        diff = (ours(ids, mask) - want).abs().max().item()
        for _ in range(args.repeats):
            for name, fn in (("model.py", lambda: ours(ids, mask)),
                             ("transformers", lambda: ref(input_ids=ids, attention_mask=mask))):
                start = time.perf_counter()
                fn()
                seconds = time.perf_counter() - start
                best[name] = max(best[name], ids.numel() / seconds)
    print(f"{args.layers} layers, batch {args.batch} x {args.tokens} tokens, fp32, "
          f"{torch.get_num_threads()} threads")
    for name, tps in best.items():
        print(f"{name:<13} {tps:9.0f} tokens/s")
    ratio = best["model.py"] / best["transformers"]
    print(f"ratio model.py / transformers: {ratio:.2f}x   max |diff| {diff:.1e}")


if __name__ == "__main__":
    main()
