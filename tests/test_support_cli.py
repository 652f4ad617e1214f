"""support/cli.py, files.py and hub.py: the one error path of every CLI and its Ctrl-C ending,
atomic writes, the shared flags, the default precision, model names; and the import rules that
keep the layers apart (model.py stands alone, support/ imports no stage, nothing imports bench/
or docs/)."""
import ast
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import model as M
from support import cli as C
from support import hub
from support.files import atomic

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"model", "lora", "embed", "icl", "train_cse", "evaluate"}


def test_cli_ends_user_errors_and_ctrl_c_in_one_line(capsys):
    def bad(argv):
        raise C.UserError("no such file: x.txt")

    def interrupted(argv):
        raise KeyboardInterrupt

    assert C.cli(bad, []) == 1
    assert capsys.readouterr().err == "sentemb: error: no such file: x.txt\n"
    handler = signal.getsignal(signal.SIGINT)
    assert C.cli(interrupted, [], interrupted=lambda: "3 rows kept") == 130
    assert capsys.readouterr().err == "sentemb: interrupted; 3 rows kept\n"
    assert signal.getsignal(signal.SIGINT) is handler   # a call from Python keeps its Ctrl-C
    assert C.cli(lambda argv: None, []) == 0


def test_model_errors_end_like_user_errors(tmp_path, capsys):
    def load(argv):
        M.load(tmp_path)   # an empty folder: no config.json

    assert C.cli(load, []) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"sentemb: error: {tmp_path}") and err.count("\n") == 1


def test_a_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        C.cli(lambda argv: 1 / 0, [])
    with pytest.raises(ValueError):   # a ValueError that is no user error is a bug too
        C.cli(lambda argv: int("x"), [])


CTRL_C_JOB = """
import sys, threading, time
from support.cli import cli

def main(argv):
    # A thread the interpreter joins at exit: a second Ctrl-C arrives during that join.
    threading.Thread(target=time.sleep, args=(1.5,)).start()
    print("ready", flush=True)
    time.sleep(60)

sys.exit(cli(main, interrupted="nothing was written"))
"""


def test_ctrl_c_exits_130_with_one_line_and_nothing_after_it(tmp_path):
    job = tmp_path / "job.py"
    job.write_text(textwrap.dedent(CTRL_C_JOB))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, str(job)], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout.readline() == "ready\n"
        p.send_signal(signal.SIGINT)
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)     # impatient: a second Ctrl-C while it shuts down
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 130
    assert err == "job.py: interrupted; nothing was written\n"
    assert out == ""


def test_program_is_named_as_the_user_ran_it(tmp_path):
    (tmp_path / "job.py").write_text("from support.cli import program; print(program())\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for command, name in ((["job.py"], "job.py"), (["-m", "job"], "python -m job")):
        run = subprocess.run([sys.executable, *command], cwd=tmp_path, env=env,
                             capture_output=True, text=True, check=True)
        assert run.stdout == f"{name}\n"


def test_atomic_file_and_folder(tmp_path):
    out = tmp_path / "emb.npy"
    out.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["emb.npy"]
    with atomic(out) as tmp:
        tmp.write_text("new")
    assert out.read_text() == "new"
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "a").write_text("old")
    with atomic(folder) as tmp:
        tmp.mkdir()
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in folder.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "emb.npy"]


# ----------------------------------------------------------------------------- flags
def test_demonstration_flags():
    assert C.parse_demonstrations(None) is None
    assert C.parse_demonstrations(["None"]) == []
    pair = ("A jockey riding a horse.", "Equestrian")
    assert C.parse_demonstrations(["A jockey riding a horse.=>Equestrian"]) == [pair]
    want = r"^--demonstration 'x': expected \"SENTENCE=>WORD\" or none$"
    with pytest.raises(C.UserError, match=want):
        C.parse_demonstrations(["x"])


def test_positive_names_the_flag_as_typed():
    C.positive(batch_size=1, max_tokens=None, lora_r=64)
    with pytest.raises(C.UserError, match=r"^--batch-size 0: must be at least 1$"):
        C.positive(max_tokens=8, batch_size=0)
    with pytest.raises(C.UserError, match=r"^--max-tokens -3: must be at least 1$"):
        C.positive(max_tokens=-3, batch_size=0)   # the first bad flag


def test_device_flag():
    assert C.device("cpu").type == "cpu"
    want = r"^--device 'gpu0': not a device; use cpu, cuda or cuda:N$"
    with pytest.raises(C.UserError, match=want):
        C.device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(C.UserError, match=r"^--device cuda: this torch has no CUDA device"):
            C.device("cuda")
        assert C.device(None).type == "cpu"


def test_data_dir_names_the_missing_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("SENTEMB_DATA", raising=False)
    with pytest.raises(C.UserError, match=f"^no data in {tmp_path} \\(no sts/ folder there\\)"):
        C.data_dir(tmp_path)
    (tmp_path / "sts").mkdir()
    assert C.data_dir(tmp_path) == tmp_path
    monkeypatch.setenv("SENTEMB_DATA", str(tmp_path))
    assert C.data_dir() == tmp_path
    want = r"\(no icl/ folder there\): run `python data/download.py`"
    with pytest.raises(C.UserError, match=want):
        C.data_dir(need="icl")


def test_writable_fails_before_any_work(tmp_path):
    assert C.writable("--output", tmp_path / "r.json") == tmp_path / "r.json"
    assert list(tmp_path.iterdir()) == []   # the probe leaves nothing behind
    with pytest.raises(C.UserError, match=f"^--output {tmp_path}: is a directory$"):
        C.writable("--output", tmp_path)
    with pytest.raises(C.UserError, match="^--plot .*: its folder does not exist$"):
        C.writable("--plot", tmp_path / "new" / "p.png")


@pytest.mark.parametrize("avx512_bf16, amx, want", [(False, False, torch.float32),
                                                    (True, False, torch.bfloat16),
                                                    (False, True, torch.bfloat16)])
def test_default_dtype_follows_the_cpu(avx512_bf16, amx, want, monkeypatch):
    monkeypatch.delenv("SENTEMB_DTYPE", raising=False)     # the machine's default, not a forced one
    assert C.default_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert C.default_dtype("cpu") == want


def test_sentemb_dtype_sets_the_default_precision(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.delenv("SENTEMB_DTYPE", raising=False)
    assert C.default_dtype("cpu") == torch.bfloat16          # a native-bf16 CPU
    monkeypatch.setenv("SENTEMB_DTYPE", "float32")
    assert C.default_dtype("cpu") == torch.float32
    assert C.default_dtype("cuda") == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setenv("SENTEMB_DTYPE", "bfloat16")
    assert C.default_dtype("cpu") == torch.bfloat16          # emulated, but asked for
    monkeypatch.setenv("SENTEMB_DTYPE", "fp32")
    want = r"^SENTEMB_DTYPE=fp32: use float32, bfloat16 or float16$"
    with pytest.raises(C.UserError, match=want):
        C.default_dtype("cpu")


SCRIPTS = ["embed", "lora", "evaluate", "icl", "train_cse", "support.gguf"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_sets_openmp_waiting_before_torch_loads(script):
    """OpenMP reads how to wait when torch loads: support.cli must be imported first."""
    code = (f"import sys, os; import {script}; m = list(sys.modules); "
            "print(any(k in os.environ for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')), "
            "'torch' not in m or m.index('support.cli') < m.index('torch'))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


# ----------------------------------------------------------------------------- model names
def test_looks_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for name in ("./x", "/x", "~/x", "a/b/c", "models/mysmol"):
        assert hub.looks_local(name), name
    for name in ("facebook/opt-125m", "opt-125m", "Qwen/Qwen2-0.5B"):
        assert not hub.looks_local(name), name


def test_a_mistyped_local_path_is_named_as_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(C.UserError, match=r"^--model models/mysmol: no such directory$"):
        hub.resolve("models/mysmol")
    with pytest.raises(C.UserError, match=r"^--model ./mysmol: no such directory$"):
        hub.resolve("./mysmol")
    (tmp_path / "models" / "mysmol").mkdir()
    assert hub.resolve("models/mysmol") == Path("models/mysmol")


def test_unknown_names_list_the_aliases():
    with pytest.raises(C.UserError, match=r"^unknown model 'gpt-9000': not a local directory, an "
                                          r"alias \(opt-125m, .*smollm2-135m\) or a Hugging Face"):
        hub.resolve("gpt-9000")
    assert hub.hub_id("opt-125m") == "facebook/opt-125m" and hub.hub_id("a/b") == "a/b"


def test_offline_hub_error_is_one_clear_line(monkeypatch):
    pytest.importorskip("huggingface_hub")
    with pytest.raises(C.UserError) as e:
        hub.resolve("nobody/no-such-model")
    msg = str(e.value)
    assert msg.startswith("could not fetch model 'nobody/no-such-model' from the Hugging Face Hub")
    assert msg.endswith("without network pass a local directory") and "\n" not in msg


@pytest.mark.parametrize("repo_files, fetched", [
    (["consolidated.safetensors", "model-00001-of-00002.safetensors",
      "model-00002-of-00002.safetensors", "model.safetensors.index.json", "params.json",
      "config.json", "tokenizer.json", "tokenizer.model"],
     ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
      "model.safetensors.index.json", "params.json", "tokenizer.json", "tokenizer.model"]),
    (["pytorch_model.bin", "training_args.bin", "config.json", "vocab.json", "merges.txt"],
     ["config.json", "merges.txt", "pytorch_model.bin", "vocab.json"]),
], ids=["mistral-7b-v0.3", "pickles-only"])
def test_hub_fetch_takes_the_weights_transformers_loads_once(repo_files, fetched, tmp_path,
                                                            monkeypatch):
    import fnmatch

    def snapshot(repo, patterns, what="model"):   # the hub, offline: the files that match
        for f in repo_files:
            if any(fnmatch.fnmatch(f, p) for p in patterns):
                (tmp_path / f).touch()
        return tmp_path

    monkeypatch.setattr(hub, "hub_snapshot", snapshot)
    assert hub.resolve("owner/model") == tmp_path
    assert sorted(f.name for f in tmp_path.iterdir()) == fetched


# ----------------------------------------------------------------------------- import rules
def imported(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function (absolute names)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def python_files(*skip: str) -> list[Path]:
    """The repo's .py files, but those under the folders `skip` and hidden folders."""
    files = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if not any(p.startswith(".") for p in parts) and parts[0] not in skip:
            files.append(path)
    return files


def test_model_py_imports_only_the_standard_library_torch_safetensors():
    allowed = set(sys.stdlib_module_names) | {"torch", "safetensors", "bitsandbytes"}
    tops = {name.split(".")[0] for name in imported(ROOT / "model.py")}
    assert tops <= allowed, sorted(tops - allowed)
    assert "torch" in tops and "bitsandbytes" in tops    # the check sees lazy imports too


def test_support_imports_no_stage():
    for path in sorted((ROOT / "support").glob("*.py")):
        stages = {n.split(".")[0] for n in imported(path)} & STAGES
        assert not stages, f"{path.relative_to(ROOT)} imports {sorted(stages)}"


def test_nothing_outside_docs_and_bench_imports_from_them():
    """Their own tests load them from their files; everything else stays independent of them."""
    own_names = {p.stem for folder in ("bench", "docs") for p in (ROOT / folder).glob("*.py")}
    theirs = own_names - STAGES - {p.stem for p in (ROOT / "support").glob("*.py")}
    subjects = {"test_bench.py", "test_figures.py"}
    checked = 0
    for path in python_files("bench", "docs"):
        if path.name in subjects:
            continue
        tops = {n.split(".")[0] for n in imported(path)}
        assert not tops & ({"bench", "docs"} | theirs), f"{path.relative_to(ROOT)} imports them"
        source = path.read_text(encoding="utf-8")
        for call in ast.walk(ast.parse(source)):   # sys.path.insert(0, ... "docs" ...)
            if isinstance(call, ast.Call) and "sys.path" in ast.unparse(call.func):
                text = ast.unparse(call)
                assert "'docs'" not in text and "'bench'" not in text, (path, text)
        checked += 1
    assert checked > 10 and "figures" in theirs and "quant" in theirs


def test_the_import_rules_see_what_they_look_for(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nfrom bench.quant import weight_bytes\n\n"
                     "def f():\n    import embed\n    from support import hub\n")
    assert imported(probe) == {"os", "bench.quant", "bench.quant.weight_bytes", "embed",
                               "support", "support.hub"}


def test_support_modules_are_short_and_say_which_stages_use_them():
    for path in sorted((ROOT / "support").glob("*.py")):
        if path.name == "__init__.py":
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        assert len(lines) <= 300, f"{path.name}: {len(lines)} lines"
        first = ast.get_docstring(ast.parse("\n".join(lines))).splitlines()[0]
        assert first.startswith("Used by "), f"{path.name}: {first}"


def test_multi_process_tests_are_marked_slow():
    """`pytest -m "not slow"` stays quick: a test that starts torchrun or spawns processes is
    marked slow (this file, which names them, is not such a test)."""
    found = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        if path.name == Path(__file__).name:
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_")):
                continue
            body = "\n".join(ast.unparse(statement) for statement in node.body)
            if "torch.distributed.run" in body or ".spawn(" in body:
                marks = [ast.unparse(d) for d in node.decorator_list]
                assert "pytest.mark.slow" in marks, f"{path.name}::{node.name} is not marked slow"
                found.append(node.name)
    assert found, "no multi-process test found: has the check gone blind?"


def test_ctrl_c_while_a_script_loads_torch_is_one_line():
    p = subprocess.Popen([sys.executable, str(ROOT / "embed.py"), "a sentence"], cwd=ROOT,
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(0.8)                  # importing torch: seconds
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130
    assert len(err.splitlines()) == 1 and err.startswith("embed.py: interrupted"), err
    assert out == ""


def test_openmp_threads_spin_briefly_on_a_quiet_machine_and_sleep_on_a_busy_one():
    from support.cli import openmp_waits
    assert openmp_waits({}, load=0.2, cores=2) == {"GOMP_SPINCOUNT": "20000"}
    assert openmp_waits({}, load=1.0, cores=2) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp_waits({}, load=float("inf"), cores=64) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp_waits({"OMP_WAIT_POLICY": "ACTIVE"}, load=0.0, cores=2) == {}   # the user's
    assert openmp_waits({"GOMP_SPINCOUNT": "0"}, load=9.0, cores=2) == {}
