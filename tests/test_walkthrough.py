"""docs/walkthrough.md: every `file.py:name` reference names a definition; every exercise has a
command and a measured result, the records it cites hold its numbers at the precision it names;
every command names a script and flags that exist."""
import ast
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "walkthrough.md").read_text(encoding="utf-8")
# `embed.py:prompteol`, `model.py:Class.method`
REF = re.compile(r"`([\w/]+\.py):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)`")
REFS = sorted(set(REF.findall(DOC)))
PRECISION = {"torch.float32": "fp32", "torch.bfloat16": "bf16"}
# each exercise's text, to the next heading of an exercise
EXERCISES = re.split(r"^#+ .*Exercise.*$", DOC, flags=re.M)[1:]


def definitions(file: str) -> set[str]:
    """Top-level functions, classes and assigned names of a file, and `Class.method` for its
    classes' methods."""
    path = ROOT / file
    if not path.is_file():
        return set()
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{m.name}" for m in node.body
                      if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))}
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        for t in targets:   # NAME = ..., A, B = ..., NAME: type = ...
            names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


@pytest.mark.parametrize("file,name", REFS, ids=[f"{f}:{n}" for f, n in REFS])
def test_reference_resolves(file, name):
    why = f"docs/walkthrough.md cites `{file}:{name}`, which {file} does not define"
    assert name in definitions(file), why


def test_the_checker_rejects_what_is_not_there():
    assert {"prompteol", "Embedder", "Embedder.encode", "TEMPLATES"} <= definitions("embed.py")
    absent = {"no_such_function", "Embedder.no_such_method", "Tokenizer.encode"}
    assert not absent & definitions("embed.py")
    assert definitions("no_such_file.py") == set()
    found = REF.findall("`lora.py:LoRALinear.forward` and `x.py:y`")
    assert found == [("lora.py", "LoRALinear.forward"), ("x.py", "y")]


def test_every_exercise_has_a_command_and_a_measured_result():
    assert EXERCISES, "no exercise headings found"
    for n, text in enumerate(EXERCISES, 1):
        assert "**Measured:**" in text, f"exercise {n} has no **Measured:** line"
        assert "```bash" in text or "python " in text, f"exercise {n} has no command"


def test_measured_scores_are_the_cited_records_at_the_precision_named():
    """Each results/ file an exercise cites exists; a cited STS-B dev record's score is the number
    the exercise prints, and the exercise names the record's precision."""
    checked = []
    for n, text in enumerate(EXERCISES, 1):
        for path in sorted(set(re.findall(r"`(results/[\w./-]+)`", text))):
            assert (ROOT / path).is_file(), f"exercise {n} cites {path}, which does not exist"
            if not path.endswith(".json"):
                continue
            record = json.loads((ROOT / path).read_text(encoding="utf-8"))
            score = record.get("summary_x100", {}).get("STS-B dev")
            if score is None:
                continue
            why = f"exercise {n} cites {path} but not its score {score:.2f}"
            assert f"{score:.2f}" in text, why
            precision = PRECISION[record["encoder"]["dtype"]]
            assert f"in {precision}" in text or f"{precision} {score:.2f}" in text, (
                f"exercise {n} does not say its {path} score was measured in {precision}")
            checked.append(path)
    assert checked, "no exercise cites an STS-B dev record"


def commands(doc: str) -> list[str]:
    """The `python FILE.py ...` commands of the bash blocks and of inline code, one string each."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", doc, flags=re.S):
        found += [line.strip() for line in block.replace("\\\n", " ").splitlines()]
    found += re.findall(r"`(python [^`]+)`", doc)
    return [c for c in found if re.match(r"python [\w/]+\.py\b", c)]


def flags_defined(file: str) -> set[str]:
    """The --flag string literals of a script and of the shared flags in support/cli.py."""
    flags = set()
    for path in (ROOT / file, ROOT / "support" / "cli.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                flags |= set(re.findall(r"^--[a-z][\w-]*$", node.value))
    return flags


def test_commands_name_scripts_and_flags_that_exist():
    cmds = commands(DOC)
    assert any(c.startswith("python evaluate.py") for c in cmds), cmds
    for cmd in cmds:
        words = shlex.split(cmd, comments=True)
        script = words[1]
        assert (ROOT / script).is_file(), f"`{cmd}`: no {script}"
        unknown = {w.split("=")[0] for w in words[2:] if w.startswith("--")} - flags_defined(script)
        assert not unknown, f"`{cmd}`: {script} defines no {sorted(unknown)}"


def test_the_command_checker_rejects_what_is_not_there():
    doc = "```bash\npython evaluate.py --tasks sts \\\n  --no-such-flag 1   # a comment\n```\n"
    (cmd,) = commands(doc + "and `python -m pytest -q`")
    assert "--no-such-flag" in shlex.split(cmd, comments=True)
    assert "--no-such-flag" not in flags_defined("evaluate.py")
    assert {"--tasks", "--data-dir", "--dtype"} <= flags_defined("evaluate.py")
