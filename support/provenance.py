"""Used by evaluate, icl and train_cse: what a results record says about how to reproduce it."""
import os
import platform
import re
import subprocess
import sys
import time

from support.cli import REPO

LIBRARIES = {"numpy": "numpy", "scipy": "scipy", "scikit-learn": "sklearn", "torch": "torch",
             "bitsandbytes": "bitsandbytes", "sentence-transformers": "sentence_transformers"}


def git_commit():
    """The checkout's commit, or None outside a git checkout."""
    try:
        run = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        return run.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> str:
    """The CPU's model name and whether it computes bf16 natively (documented numbers name both)."""
    name = platform.processor() or platform.machine()
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        name = re.search(r"model name\s*:\s*(.+)", info)[1].strip()
        flags = info
    except (OSError, TypeError):   # no /proc (macOS), or no model name line
        pass
    native = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    kind = "native bf16: " + ", ".join(native) if native else "no native bf16"
    return f"{name}, {os.cpu_count()} cores, {kind}"


def provenance(script, argv, started) -> dict:
    """Commit, command, versions of the libraries loaded, start time and duration."""
    versions = {"python": platform.python_version()}
    for name, module in LIBRARIES.items():
        if module in sys.modules:
            versions[name] = sys.modules[module].__version__
    args = sys.argv[1:] if argv is None else list(argv)
    return {
        "git_commit": git_commit(),
        "command": [script, *args],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_seconds": round(time.time() - started, 1),
        "versions": versions,
        "machine": machine(),
    }
