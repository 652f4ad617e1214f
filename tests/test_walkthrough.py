"""docs/walkthrough.md: every `file.py:name` reference names a definition; enough references and exercises."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "walkthrough.md").read_text(encoding="utf-8")
REF = re.compile(r"`([\w/]+\.py):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)`")   # `embed.py:prompteol`, `model.py:Class.method`
REFS = sorted(set(REF.findall(DOC)))
EXERCISES = re.split(r"^#+ .*Exercise.*$", DOC, flags=re.M)[1:]           # each exercise's text, to the next one


def definitions(file: str) -> set[str]:
    """Top-level functions, classes and assigned names of a file, and `Class.method` for its classes' methods."""
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
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:   # NAME = ..., A, B = ..., NAME: type = ...
            names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


@pytest.mark.parametrize("file,name", REFS, ids=[f"{f}:{n}" for f, n in REFS])
def test_reference_resolves(file, name):
    assert name in definitions(file), f"docs/walkthrough.md cites `{file}:{name}`, which {file} does not define"


def test_the_checker_rejects_what_is_not_there():
    assert {"prompteol", "Embedder", "Embedder.encode", "TEMPLATES"} <= definitions("embed.py")
    assert not {"no_such_function", "Embedder.no_such_method", "Tokenizer.encode"} & definitions("embed.py")
    assert definitions("no_such_file.py") == set()
    assert REF.findall("`lora.py:LoRALinear.forward` and `x.py:y`") == [("lora.py", "LoRALinear.forward"), ("x.py", "y")]


def test_enough_references_and_exercises():
    assert len(REFS) >= 10, f"{len(REFS)} distinct code references, need at least 10"
    assert len(EXERCISES) >= 6, f"{len(EXERCISES)} exercise headings, need at least 6"
    for n, text in enumerate(EXERCISES, 1):   # each gives the measured result, or (pending) for the lead to fill in
        assert "**Measured:**" in text, f"exercise {n} has no **Measured:** line"
        assert "```bash" in text or "python " in text, f"exercise {n} has no command"
