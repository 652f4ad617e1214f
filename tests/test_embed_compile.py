"""embed.py's compiled path (support/compile.py): a compiled and an eager Embedder give the same
vectors, one graph serves a run's batches and other cached prefixes, auto compiles only large
inputs, a missing inductor or C++ compiler means one line and the eager path, the flags, the
stats line."""
import contextlib
import sys

import numpy as np
import pytest
import torch

import embed as E
import evaluate
from support import compile as jit
from helpers import LLAMA_GQA, OPT_PRE, hf_model, save

# Lengths from 1 to 30 tokens; batches of 3 leave a batch of one sentence, which runs eager.
SENTS = ["A man plays a guitar.", "Someone is playing music", "x", "Is a woman slicing an onion?",
         "two  spaces", "A dog runs after a red ball in the park on a sunny day.", "ok ok",
         "The quick brown fox jumps over the lazy dog while a cat watches it closely."]
DEMO = [("A jockey riding a horse.", "Equestrian")]
MIN_COSINE = {"float32": 0.99999, "bfloat16": 0.999}


def cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def graphs() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """An empty compile cache for this module: the tests measure a cold compile, and leave
    nothing in the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("compile")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    save(hf_model(LLAMA_GQA), d)
    return str(d)


def check_compiled_equals_eager(path, dtype):
    eager = E.Embedder(path, demonstrations=DEMO, batch_size=3, dtype=dtype, compile=False)
    compiled = E.Embedder(path, demonstrations=DEMO, batch_size=3, dtype=dtype, compile=True)
    before = graphs()
    got = compiled.encode(SENTS)
    assert compiled.stats["compile_seconds"] > 0 and eager.stats["compile_seconds"] == 0
    assert cosines(got, eager.encode(SENTS)).min() >= MIN_COSINE[dtype]
    # Another demonstration (another prefix length), other batch sizes: the same graph.
    other = compiled.with_demonstrations([])
    other.batch_size = 5
    want = eager.with_demonstrations([]).encode(SENTS)
    assert cosines(other.encode(SENTS), want).min() >= MIN_COSINE[dtype]
    assert other.stats["compile_seconds"] == 0
    assert graphs() - before == 1


@pytest.fixture
def untimed(monkeypatch):
    """Frozen weights without timing the products (seconds a test): oneDNN's products only."""
    monkeypatch.setattr(jit, "FROZEN", {"freezing": True})


def test_compiled_equals_eager_float32(tiny_llama, untimed, monkeypatch):
    """On the CPU the graph is built with the weights frozen in (inductor's freezing pass runs)."""
    import torch._inductor.freezing as freezing
    frozen = []
    freeze = freezing.freeze
    monkeypatch.setattr(freezing, "freeze", lambda *a: frozen.append(1) or freeze(*a))
    check_compiled_equals_eager(tiny_llama, "float32")
    assert frozen


@pytest.mark.slow
def test_compiled_equals_eager_bfloat16(tiny_llama):
    """As the CPU runs it: frozen weights, the products timed between oneDNN and the templates."""
    check_compiled_equals_eager(tiny_llama, "bfloat16")


@pytest.mark.slow
def test_compiled_equals_eager_opt(tmp_path, untimed):
    save(hf_model(OPT_PRE), tmp_path)
    check_compiled_equals_eager(str(tmp_path), "float32")


@pytest.fixture
def fake_compile(monkeypatch):
    """jit.compiled without compiling: the eager model, and a record of each call."""
    calls = []

    def fake(model):
        calls.append(model)
        return model
    monkeypatch.setattr(jit, "compiled", fake)
    monkeypatch.setattr(jit, "BREAK_EVEN", 5)
    return calls


def test_auto_compiles_only_inputs_past_the_break_even(tiny_llama, fake_compile):
    e = E.Embedder(tiny_llama, dtype="float32")
    e.encode(SENTS[:4])
    assert fake_compile == []
    e.encode(SENTS[:6])
    assert len(fake_compile) == 1
    e.encode(SENTS)                       # built once
    assert len(fake_compile) == 1
    never = E.Embedder(tiny_llama, dtype="float32", compile=False)
    never.encode(SENTS)
    assert len(fake_compile) == 1
    asked = E.Embedder(tiny_llama, dtype="float32", compile=True)
    asked.encode(SENTS[:2])
    assert len(fake_compile) == 2


def test_auto_counts_what_expect_announces_and_a_whole_file(tiny_llama, fake_compile, tmp_path):
    e = E.Embedder(tiny_llama, dtype="float32")
    e.expect(100)                         # an evaluation's sentences, encoded 512 at a time
    e.encode(SENTS[:2])
    assert len(fake_compile) == 1
    f = tmp_path / "in.txt"
    f.write_text("\n".join(SENTS[:6]) + "\n")
    e = E.Embedder(tiny_llama, dtype="float32")
    e.encode_file(f, tmp_path / "out.npy")
    assert e.expected == 6 and len(fake_compile) == 2


def test_auto_never_compiles_on_gpus():
    assert jit.pays(jit.BREAK_EVEN, torch.device("cpu"))
    assert not jit.pays(jit.BREAK_EVEN - 1, torch.device("cpu"))
    assert not jit.pays(10 ** 9, torch.device("cuda"))


@pytest.mark.parametrize("missing", ["compiler", "inductor"])
def test_missing_compiler_or_inductor_is_one_line_and_eager(tiny_llama, monkeypatch, capsys,
                                                            missing):
    if missing == "compiler":
        import torch._inductor.config as inductor_config
        # inductor's own patch: pytest's monkeypatch (9.2) deletes the setting when it undoes
        patched = inductor_config.patch({"cpp.cxx": ("/no/such/c++",)})
        said = "inductor needs a C++ compiler on the CPU; none found"
    else:
        monkeypatch.setitem(sys.modules, "torch._inductor.cpp_builder", None)
        patched = contextlib.nullcontext()
        said = "this torch has no inductor"
    e = E.Embedder(tiny_llama, demonstrations=DEMO, dtype="float32", compile=True)
    with patched:
        got = e.encode(SENTS)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0] and err[0].endswith("running eager"), err
    want = E.Embedder(tiny_llama, demonstrations=DEMO, dtype="float32", compile=False)
    np.testing.assert_array_equal(got, want.encode(SENTS))
    assert e.stats["compile_seconds"] == 0
    e.encode(SENTS)                       # said once
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("flags,value", [([], None), (["--compile"], True),
                                         (["--no-compile"], False)])
def test_compile_flags(flags, value):
    assert E.parser().parse_args(["x", *flags]).compile is value
    assert evaluate.parser().parse_args(flags).compile is value


def test_stats_line_names_the_compile_time(tiny_llama, fake_compile, monkeypatch, capsys):
    monkeypatch.setattr(jit, "warm_up", lambda *args: 12.5)
    E.main(["--model", tiny_llama, "--dtype", "float32", "--compile", "a b", "c"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "(compiled: 12.5 s of it compiling, not in the rate)" in line, line
    E.main(["--model", tiny_llama, "--dtype", "float32", "a b", "c"])
    assert "compil" not in capsys.readouterr().err
