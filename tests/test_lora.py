"""lora.py against PEFT (the reference oracle) in float32, 4-/8-bit bases through bitsandbytes, and
the training precision: bf16 LoRA compute, a 4-bit base dequantized once."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora as L
import model as M
from support.cli import UserError
from helpers import batch, hf_model, ref_hidden, save, weight_bytes

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# Widths that are multiples of 64: bitsandbytes' CPU 4-bit inference kernel asserts
# out_features % 32 == 0 and in_features % 64 (its block size) == 0.
LLAMA = dict(model_type="llama", vocab_size=300, hidden_size=64, num_hidden_layers=2,
             intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, tie_word_embeddings=False)
OPT = dict(model_type="opt", vocab_size=300, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
           num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64)
CONFIGS = {"llama": LLAMA, "opt": OPT}
BLOCK = {"llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
         "opt": {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """name -> (cfg, checkpoint directory), each saved once."""
    out = {}
    for name, cfg in CONFIGS.items():
        d = tmp_path_factory.mktemp(name)
        save(hf_model(cfg), d)
        out[name] = (cfg, d)
    return out


def ours(ckpt, name, dtype=torch.float32, **kw):
    """Our model of a saved checkpoint, float32 unless told: the parity tests' precision."""
    return M.load(ckpt[name][1], dtype=dtype, device="cpu", **kw)


def randomize_B(model, scale=0.05):   # B = 0 makes every check trivial
    with torch.no_grad():
        for m in L._lora_layers(model).values():
            m.lora_B.weight.normal_(0, scale)


def real(model, ids, mask):
    with torch.no_grad():
        return model(ids, mask)[mask.bool()]


_, IDS, MASK = batch([7, 3, 12])


# ----------------------------------------------------------------------------- the layer
def test_zero_B_is_the_base_and_targets(ckpt):
    for name in CONFIGS:
        m = ours(ckpt, name)
        want = real(m, IDS, MASK)
        L.add_lora(m, r=8, alpha=16)
        wrapped = L._lora_layers(m)
        assert {n.rpartition(".")[2] for n in wrapped} == BLOCK[name]     # all-linear = the blocks
        assert len(wrapped) == 2 * len(BLOCK[name]) and "lm_head" not in wrapped
        torch.testing.assert_close(real(m, IDS, MASK), want, atol=0, rtol=0)
    m = L.add_lora(ours(ckpt, "llama"), r=4, targets=["q_proj", "v_proj"])
    want = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert sorted(L._lora_layers(m)) == want
    with pytest.raises(UserError, match="already has LoRA"):
        L.add_lora(m)
    with pytest.raises(UserError, match="'fc1' matches no linear layer"):
        L.add_lora(ours(ckpt, "llama"), targets=["q_proj", "fc1"])


def test_merge_equals_unmerged(ckpt):
    m = L.add_lora(ours(ckpt, "opt"), r=8, alpha=16)
    randomize_B(m)
    before = real(m, IDS, MASK)
    L.merge_lora(m)
    assert not L._lora_layers(m) and type(m.model.decoder.layers[0].fc1) is nn.Linear
    torch.testing.assert_close(real(m, IDS, MASK), before, atol=1e-5, rtol=0)


def test_4bit_only_lora_trains_and_grads_flow(ckpt):
    m = ours(ckpt, "llama", bits=4)
    real(m, IDS, MASK)   # an eval no-grad forward: bitsandbytes repacks the CPU weights in place
    L.mark_only_lora_trainable(L.add_lora(m, r=8, alpha=16, dropout=0.1))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * len(BLOCK["llama"])
    m.train()
    m(IDS, MASK)[:, -1].pow(2).sum().backward()
    for n, p in m.named_parameters():
        if n.endswith("lora_B.weight"):   # layer 0's B: a gradient through layer 1's 4-bit bases
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        elif not p.requires_grad:
            assert p.grad is None, n
    m.eval()


def test_4bit_merge_needs_dequantize(ckpt):
    m = L.add_lora(ours(ckpt, "llama", bits=4), r=8)
    randomize_B(m)
    before = real(m, IDS, MASK)
    with pytest.raises(UserError, match="Linear4bit.*dequantize=True"):
        L.merge_lora(m)
    L.merge_lora(m, dequantize=True)
    assert type(m.model.layers[1].mlp.down_proj) is nn.Linear
    after = real(m, IDS, MASK)   # the packed CPU kernel computes in bf16: close, not equal
    assert F.cosine_similarity(after, before, dim=-1).min() > 0.999


def test_all_linear_and_4bit_take_opt350ms_projections(tmp_path):
    """As PEFT and transformers' 4-bit loading do."""
    import bitsandbytes as bnb
    # opt-350m-like: post-LN, projections between 64-wide embeddings and 128-wide layers
    cfg = dict(OPT, hidden_size=128, word_embed_proj_dim=64, do_layer_norm_before=False)
    save(hf_model(cfg), tmp_path)
    conf = peft.LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    ref = peft.get_peft_model(hf_model(cfg), conf)
    want = {n.removeprefix("base_model.model.") for n, mod in ref.named_modules()
            if hasattr(mod, "lora_A")}
    m = L.add_lora(M.load(tmp_path, bits=4), r=4)         # the machine's default precision
    assert set(L._lora_layers(m)) == want
    assert {"model.decoder.project_in", "model.decoder.project_out"} <= want
    assert isinstance(L._lora_layers(m)["model.decoder.project_in"].base_layer, bnb.nn.Linear4bit)
    assert m(IDS, MASK).isfinite().all()


# ------------------------------------------------------------------------ PEFT parity and files
@pytest.mark.parametrize("name", list(CONFIGS))
def test_peft_parity_both_ways(ckpt, name, tmp_path):
    cfg, _ = ckpt[name]
    # PEFT -> here: random A and B (init_lora_weights=False), saved by PeftModel.save_pretrained
    # PEFT saves full names / suffixes
    targets = "all-linear" if name == "opt" else sorted(BLOCK[name])
    conf = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                           task_type="CAUSAL_LM")
    ref = peft.get_peft_model(hf_model(cfg), conf).eval()
    ref.save_pretrained(tmp_path / "from_peft")
    m = L.load_adapter(ours(ckpt, name), tmp_path / "from_peft")
    assert len(L._lora_layers(m)) == 2 * len(BLOCK[name])
    want = ref_hidden(cfg, ref, IDS, MASK)[MASK.bool()]
    torch.testing.assert_close(real(m, IDS, MASK), want, atol=1e-5, rtol=0)
    # here -> PEFT
    m = L.add_lora(ours(ckpt, name), r=8, alpha=16)
    randomize_B(m)
    L.save_adapter(m, tmp_path / "from_here", "tiny")
    ref = peft.PeftModel.from_pretrained(hf_model(cfg), tmp_path / "from_here").eval()
    want = ref_hidden(cfg, ref, IDS, MASK)[MASK.bool()]
    torch.testing.assert_close(real(m, IDS, MASK), want, atol=1e-5, rtol=0)


def test_save_load_round_trip_and_bin(ckpt, tmp_path):
    m = L.add_lora(ours(ckpt, "llama"), r=8, alpha=32, targets=["q_proj", "down_proj"])
    randomize_B(m)
    want = real(m, IDS, MASK)
    out = tmp_path / "adapters" / "a"
    L.save_adapter(m, out, "base/name")
    L.save_adapter(m, out, "base/name")   # replacing an adapter is allowed
    assert sorted(p.name for p in out.parent.iterdir()) == ["a"]   # no temporary directories left
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 8 and conf["lora_alpha"] == 32
    assert conf["target_modules"] == ["down_proj", "q_proj"]
    assert conf["base_model_name_or_path"] == "base/name"
    got = L.load_adapter(ours(ckpt, "llama"), out)
    torch.testing.assert_close(real(got, IDS, MASK), want, atol=0, rtol=0)
    # adapter_model.bin (older PEFT), read with weights_only
    from safetensors.torch import load_file
    torch.save(load_file(str(out / "adapter_model.safetensors")), out / "adapter_model.bin")
    (out / "adapter_model.safetensors").unlink()
    got = L.load_adapter(ours(ckpt, "llama"), out)
    torch.testing.assert_close(real(got, IDS, MASK), want, atol=0, rtol=0)
    (out / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="holds more than an adapter"):
        L.save_adapter(m, out)


def test_mismatched_adapters_fail_clearly(ckpt, tmp_path):
    opt = L.add_lora(ours(ckpt, "opt"), r=4)
    L.save_adapter(opt, tmp_path / "opt")
    with pytest.raises(UserError, match=r"it adapts model\.decoder\.layers\.0\.fc1, which the "
                                        r"model does not have"):
        L.load_adapter(ours(ckpt, "llama"), tmp_path / "opt")
    # same names, other widths: the first mis-shaped tensor is named
    wide = dict(LLAMA, intermediate_size=192)
    save(hf_model(wide), tmp_path / "wide")
    wide_model = M.load(tmp_path / "wide")
    L.save_adapter(L.add_lora(wide_model, r=4, targets=["up_proj"]), tmp_path / "w")
    m = ours(ckpt, "llama")
    with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.up_proj\.lora_B\.weight has "
                                        r"shape \(192, 4\), expected \(128, 4\)"):
        L.load_adapter(m, tmp_path / "w")
    assert not L._lora_layers(m)   # checked before the model changes
    # a shallower adapter: target_modules cover layer 1, the file has no weights for it
    from safetensors.torch import load_file, save_file
    f = str(tmp_path / "opt" / "adapter_model.safetensors")
    save_file({k: v for k, v in load_file(f).items() if ".layers.1." not in k}, f)
    with pytest.raises(UserError, match=r"cover model\.decoder\.layers\.1\.[\w.]+ but it has no "
                                        r"weights"):
        L.load_adapter(ours(ckpt, "opt"), tmp_path / "opt")
    with pytest.raises(UserError, match="could not fetch adapter 'nobody/no-such-adapter' from "
                                        "the Hugging Face Hub"):
        L.load_adapter(ours(ckpt, "opt"), "nobody/no-such-adapter")
    (tmp_path / "opt" / "adapter_config.json").write_text("{")
    with pytest.raises(UserError, match=r"is not a PEFT adapter: adapter_config\.json: Expecting"):
        L.load_adapter(ours(ckpt, "opt"), tmp_path / "opt")
    with pytest.raises(UserError, match="is not a PEFT adapter: adapter_config.json: No such file"):
        L.load_adapter(ours(ckpt, "opt"), tmp_path)


def test_config_allowlist(ckpt, tmp_path):
    """PEFT's own config (every key, defaults included) loads; a key that changes what the adapter
    computes, or one lora.py does not know, is refused by name unless it is off."""
    cfg = LLAMA
    conf = peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM",
                           init_lora_weights="gaussian")
    ref = peft.get_peft_model(hf_model(cfg), conf)
    ref.save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    # PEFT writes every key
    assert {"use_dora", "use_rslora", "megatron_core", "init_lora_weights"} <= set(conf)
    L.load_adapter(ours(ckpt, "llama"), tmp_path)
    harmless = {"revision": "main", "layers_to_transform": [0, 1], "no_such_option": None,
                "use_qalora": False}
    cases = [(harmless, None),
             ({"use_dora": True}, "use_dora=True"),
             ({"bias": "all"}, "bias='all'"),
             ({"modules_to_save": ["lm_head"]}, r"modules_to_save=\['lm_head'\]"),
             ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
             ({"peft_type": "IA3"}, "peft_type='IA3'"),
             ({"no_such_option": 3}, "no_such_option=3")]
    for extra, refused in cases:
        (tmp_path / "adapter_config.json").write_text(json.dumps(conf | extra))
        if refused is None:
            L.load_adapter(ours(ckpt, "llama"), tmp_path)
            continue
        with pytest.raises(UserError, match=rf"^adapter {tmp_path}: {refused} is not supported by "
                                            rf"lora\.py"):
            L.load_adapter(ours(ckpt, "llama"), tmp_path)


# ----------------------------------------------------------------------------- 4-bit / 8-bit bases
@pytest.mark.parametrize("name,bits", [("llama", 4), ("opt", 4), ("llama", 8)])
def test_quantized_base(ckpt, name, bits):
    import bitsandbytes as bnb
    cls = {4: bnb.nn.Linear4bit, 8: bnb.nn.Linear8bitLt}[bits]
    full = ours(ckpt, name)
    q = ours(ckpt, name, bits=bits)
    for n, mod in q.named_modules():
        if isinstance(mod, nn.Linear):
            assert isinstance(mod, cls) == (n.rpartition(".")[2] in BLOCK[name]), n
    assert type(q.lm_head) is nn.Linear and type(q.embeddings()) is nn.Embedding
    assert weight_bytes(q) < weight_bytes(full)
    _, ids, mask = batch([9, 4, 12], seed=3)
    with torch.no_grad():
        cos = F.cosine_similarity(q(ids, mask)[:, -1], full(ids, mask)[:, -1], dim=-1)
    assert cos.min() > (0.98 if bits == 4 else 0.995), cos


# ----------------------------------------------------------------------------- training precision
def test_compute_dtype_runs_the_update_in_it():
    """bf16 compute: x, A and B are cast per call, as autocast does; A, B and their gradients stay
    fp32."""
    base = nn.Linear(64, 32).requires_grad_(False)
    layer = L.LoRALinear(base, r=8, alpha=16)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 64)
    fp32 = layer(x)
    L.set_compute_dtype(layer, torch.bfloat16)
    got = layer(x)
    a = layer.lora_A.weight.bfloat16()
    b = layer.lora_B.weight.bfloat16()
    delta = F.linear(F.linear(x.bfloat16(), a), b) * layer.scaling
    torch.testing.assert_close(got, base(x) + delta.float(), atol=0, rtol=0)
    assert not torch.equal(got, fp32)                 # bf16 rounding shows: not the fp32 update
    got.sum().backward()
    assert layer.lora_A.weight.dtype == layer.lora_A.weight.grad.dtype == torch.float32
    assert layer.lora_B.weight.grad.dtype == torch.float32
    L.set_compute_dtype(layer, None)
    torch.testing.assert_close(layer(x), fp32, atol=0, rtol=0)   # None: A and B's own dtype again


def test_lora_dropout_is_dropout_and_replays():
    """LoRADropout, as nn.Dropout: each element zeroed with probability p independently, the rest
    scaled by 1 / (1 - p), the gradient through the same mask; the same generator state gives the
    same mask (gradient caching replays it); eval mode and p = 0 change nothing."""
    p = 0.05
    drop = L.LoRADropout(p)
    x = torch.randn(400, 640, requires_grad=True)           # 256,000 elements
    torch.manual_seed(3)
    y = drop(x)
    torch.manual_seed(3)
    assert torch.equal(drop(x), y)
    kept = y != 0
    assert abs((~kept).float().mean().item() - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), atol=0, rtol=1e-6)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / (1 - p), atol=0, rtol=1e-6)
    hits = L.dropped(1_000_000, p)                            # sorted, distinct, in range
    assert torch.all(hits[1:] > hits[:-1]) and 0 <= hits[0] and hits[-1] < 1_000_000
    gaps = torch.diff(hits).float()                           # geometric: mean 1/p, var (1-p)/p^2
    assert abs(gaps.mean().item() * p - 1) < 0.02
    assert abs(gaps.var().item() * p * p / (1 - p) - 1) < 0.05
    per_tenth = torch.bincount(hits // 100_000, minlength=10).float() / 100_000
    assert (per_tenth - p).abs().max() < 6 * (p * (1 - p) / 100_000) ** 0.5   # uniform over n
    assert drop.eval()(x) is x
    assert L.LoRALinear(nn.Linear(8, 8), r=2, alpha=4, dropout=p).lora_dropout.p == p


def training_step(model, compute_dtype):
    """One AdamW step of LoRA on `model` (B random) -> (loss before, loss after, gradients,
    optimizer). The same A, B and target on every call."""
    torch.manual_seed(0)
    L.add_lora(model, r=8, alpha=16, dropout=0.0)
    randomize_B(model)
    L.set_compute_dtype(model, compute_dtype)
    params = [p for p in L.mark_only_lora_trainable(model).train().parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    target = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))

    def loss_fn():                  # a fixed direction for each last hidden state (3, 64)
        return (model(IDS, MASK)[:, -1].float() * target).sum()

    loss = loss_fn()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in params])
    optimizer.step()
    with torch.no_grad():
        after = loss_fn()
    return loss.item(), after.item(), grads, optimizer


@pytest.mark.parametrize("bits", [None, 4])
def test_bf16_lora_step_equals_fp32_lora_step(ckpt, bits):
    """Over a bf16 base (4-bit or not), a step with LoRA computing in bf16 equals the fp32-LoRA
    step within bf16's precision, and A, B, their gradients and AdamW's state stay fp32."""
    before32, after32, grads32, _ = training_step(ours(ckpt, "llama", torch.bfloat16, bits=bits),
                                                   None)
    before16, after16, grads16, optimizer = training_step(
        ours(ckpt, "llama", torch.bfloat16, bits=bits), torch.bfloat16)
    assert before16 == pytest.approx(before32, rel=2e-2)
    assert after16 == pytest.approx(after32, rel=2e-2)
    assert after32 < before32 - 1                     # the step moved the loss
    assert (grads16 - grads32).norm() / grads32.norm() < 3e-2
    assert grads16.dtype == torch.float32
    for p, state in optimizer.state.items():
        assert p.dtype == state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_base_once_equals_the_per_call_path(ckpt, dtype):
    """A 4-bit base dequantized once gives bitsandbytes' per-call numbers: the same loss, the same
    gradients, and no 4-bit layer left."""
    import bitsandbytes as bnb
    per_call = ours(ckpt, "llama", dtype, bits=4)
    once = ours(ckpt, "llama", dtype, bits=4)
    assert L.dequantize_base(once) == 2 * len(BLOCK["llama"])
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in once.modules())
    assert {p.dtype for p in once.parameters()} == {dtype}
    before, after, grads, _ = training_step(per_call, None)
    before_once, after_once, grads_once, _ = training_step(once, None)
    assert (before_once, after_once) == (before, after)
    torch.testing.assert_close(grads_once, grads, atol=0, rtol=0)
    # After add_lora too: the wrapped base layers are replaced.
    wrapped = L.add_lora(ours(ckpt, "llama", dtype, bits=4), r=8)
    assert L.dequantize_base(wrapped) == 2 * len(BLOCK["llama"])
    assert all(type(m.base_layer) is nn.Linear for m in L._lora_layers(wrapped).values())
