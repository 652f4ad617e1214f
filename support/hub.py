"""Used by embed, train_cse, evaluate, icl and lora: model aliases and the Hugging Face Hub.

model.py never touches the hub: model.load reads a local directory, which resolve() finds first."""
import re
from pathlib import Path

from support.cli import UserError

# The paper evaluates OPT 125M..66B and LLaMA-1 7B..30B; e5-mistral, gte-Qwen2, LLM2Vec build on
# the others.
OPT_SIZES = ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b")
ALIASES = {f"opt-{size}": f"facebook/opt-{size}" for size in OPT_SIZES}
ALIASES.update({
    "llama-7b": "huggyllama/llama-7b",
    "llama-13b": "huggyllama/llama-13b",
    "llama-30b": "huggyllama/llama-30b",
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2-0.5b": "Qwen/Qwen2-0.5B",
    "qwen2-1.5b": "Qwen/Qwen2-1.5B",
    "qwen2-7b": "Qwen/Qwen2-7B",
    "smollm2-135m": None,   # the offline default: converted from a PyPI wheel (support/gguf.py)
})
DEFAULT_MODEL = "smollm2-135m"
REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def looks_local(name: str) -> bool:
    """A path the user means on this machine: ./x, /x, ~/x, x/y/z, or x/y where the folder x
    exists here."""
    first = name.split("/")[0]
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(first).is_dir()


def hub_snapshot(repo: str, patterns: list[str], what: str = "model") -> Path:
    """Download the files of a Hugging Face Hub repo matching `patterns` -> the local folder.
    `what` is the flag's name (model, adapter): a path that looks local is named with it."""
    if looks_local(repo):
        raise UserError(f"--{what} {repo}: no such directory")
    if not REPO_ID.fullmatch(repo):
        raise UserError(f"{what} {repo!r} is neither a local directory nor a Hugging Face repo id "
                        f"(owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:   # offline, unknown, gated
        lines = str(e).strip().splitlines() or [""]
        reason = f"{type(e).__name__}: {lines[0][:160]}"
        raise UserError(f"could not fetch {what} {repo!r} from the Hugging Face Hub ({reason}); "
                        f"without network pass a local directory") from None


def resolve(name: str) -> Path:
    """Alias, local directory or hub id -> a local directory with config.json (for model.load)."""
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    if name in ALIASES and ALIASES[name] is None:
        from support import gguf
        return gguf.smollm2_dir()
    repo = ALIASES.get(name, name)
    if not REPO_ID.fullmatch(repo) and not looks_local(repo):
        raise UserError(f"unknown model {name!r}: not a local directory, an alias "
                        f"({', '.join(ALIASES)}) or a Hugging Face repo id (owner/name)")
    # The weights as transformers names them: not consolidated.* (Mistral's other copy).
    meta = ["*.json", "*.txt", "tokenizer.model"]
    path = hub_snapshot(repo, meta + ["model*.safetensors"])
    if not any(path.glob("model*.safetensors")):   # repos with only pickles (read weights_only)
        path = hub_snapshot(repo, meta + ["pytorch_model*.bin"])
    return path


def hub_id(name: str) -> str:
    """The hub id an alias stands for, else the name itself: what adapters record as their base."""
    return ALIASES.get(name) or name
