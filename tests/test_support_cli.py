"""support/cli.py and support/files.py: the one error path of every CLI, atomic writes, flags shared by every script, import order."""
import subprocess
import sys

import pytest

from support import cli as C
from support.files import atomic

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_cli_ends_user_errors_and_ctrl_c_in_one_line(capsys):
    def bad(argv):
        raise C.UserError("no such file: x.txt")

    def interrupted(argv):
        raise KeyboardInterrupt

    assert C.cli(bad, []) == 1
    assert capsys.readouterr().err == "sentemb: error: no such file: x.txt\n"
    assert C.cli(interrupted, [], interrupted=lambda: "3 rows kept") == 130
    assert capsys.readouterr().err == "sentemb: interrupted; 3 rows kept\n"
    assert C.cli(lambda argv: None, []) == 0


def test_a_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        C.cli(lambda argv: 1 / 0, [])


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


def test_demonstration_flags():
    assert C.parse_demonstrations(None) is None
    assert C.parse_demonstrations(["None"]) == []
    assert C.parse_demonstrations(["A jockey riding a horse.=>Equestrian"]) == [("A jockey riding a horse.", "Equestrian")]
    with pytest.raises(C.UserError, match=r"^--demonstration 'x': expected \"SENTENCE=>WORD\" or none$"):
        C.parse_demonstrations(["x"])


def test_device_flag():
    assert C.device("cpu").type == "cpu"
    with pytest.raises(C.UserError, match=r"^--device 'gpu0': not a device; use cpu, cuda or cuda:N$"):
        C.device("gpu0")
    import torch
    if not torch.cuda.is_available():
        with pytest.raises(C.UserError, match=r"^--device cuda: this torch has no CUDA device"):
            C.device("cuda")


def test_data_dir_names_the_missing_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("SENTEMB_DATA", raising=False)
    with pytest.raises(C.UserError, match=f"^no data in {tmp_path} \\(no sts/ folder there\\)"):
        C.data_dir(tmp_path)
    (tmp_path / "sts").mkdir()
    assert C.data_dir(tmp_path) == tmp_path


@pytest.mark.parametrize("script", ["embed", "lora", "evaluate", "icl", "train_cse", "support.gguf"])
def test_every_script_sets_passive_waiting_before_torch_loads(script):
    """OpenMP reads OMP_WAIT_POLICY when torch loads: common must be imported first."""
    code = (f"import sys, os; os.environ.pop('OMP_WAIT_POLICY', None); import {script}; m = list(sys.modules); "
            "print(os.environ['OMP_WAIT_POLICY'], 'torch' not in m or m.index('support.cli') < m.index('torch'))")
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PASSIVE", "True"]
