"""Used by every stage's command line: the one error type, the CLI ending, shared flags, devices.

A user error (a bad flag, a missing file) ends a command in one line on stderr and exit 1; Ctrl-C
ends it in one line saying what was kept, and exit 130."""
import argparse
import os
import signal
import sys
import threading
from pathlib import Path


def openmp_waits(environ, load: float, cores: int) -> dict:
    """How OpenMP's threads wait between operations, as environment variables. Spinning keeps
    them ready for the next operation, which a step's many small ones need; beside another busy
    process a spinning thread takes the core that the thread it waits for needs (bench/README.md,
    "A shared CPU"). So: a short spin where the machine is quiet as the process starts (load
    average under a quarter of the cores), passive waits where it is busy; the user's setting
    wins."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return {}
    if load < cores / 4:
        return {"GOMP_SPINCOUNT": "20000"}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def load_average() -> float:
    """The last minute's load average; infinite where the system does not say (passive waits)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows has none; some containers cannot read it
        return float("inf")


# torch reads these when it loads, so stages import this module first.
os.environ.update(openmp_waits(os.environ, load_average(), os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
DOWNLOAD_HINT = "run `python data/download.py` or pass --data-dir"
DTYPES = ["float32", "bfloat16", "float16"]


class UserError(ValueError):
    """Something the user can fix (a bad flag, a missing file): one line on stderr, exit 1."""

    user_error = True


def is_user_error(e: BaseException) -> bool:
    """UserError, or model.py's ModelError (model.py stands alone: it cannot import this one)."""
    return getattr(e, "user_error", False) is True


def program() -> str:
    """The command as the user typed it: `embed.py`, or `python -m support.gguf` for a module."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None:   # python -m pkg runs pkg.__main__
        return f"python -m {spec.name.removesuffix('.__main__')}"
    return Path(sys.argv[0]).name


def interrupted_while_loading(signum, frame):
    print(f"{program()}: interrupted while loading; nothing was written", file=sys.stderr,
          flush=True)
    os._exit(130)


def running_a_script() -> bool:
    """Whether this process runs one of the project's scripts (not a test, not a user's code)."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    return main is not None and REPO in Path(main).resolve().parents


# Ctrl-C while a script loads its libraries (torch takes seconds) ends it in one line, as later;
# cli() hands Ctrl-C back to Python when the command starts.
if running_a_script() and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, interrupted_while_loading)


def cli(main, argv=None, interrupted="nothing was written") -> int:
    """Run main(argv) -> exit code. A user error: one line, 1. Ctrl-C: one line (`interrupted`, or
    what the callable returns, says what the stopped run kept), 130. argv given: the line starts
    "sentemb:" (a call from Python), else with the program's name."""
    prog = program() if argv is None else "sentemb"
    if argv is None and signal.getsignal(signal.SIGINT) is interrupted_while_loading:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return main(argv) or 0
    except ValueError as e:
        if not is_user_error(e):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if argv is None:   # the process ends now: a second Ctrl-C must not add a traceback
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        said = interrupted() if callable(interrupted) else interrupted
        print(f"{prog}: interrupted; {said}", file=sys.stderr)
        return 130


def data_dir(arg=None, need="sts") -> Path:
    """--data-dir if given, else $SENTEMB_DATA, else <repo>/data; it must hold the folder `need`."""
    path = Path(arg or os.environ.get("SENTEMB_DATA") or REPO / "data").expanduser()
    if not (path / need).exists():
        raise UserError(f"no data in {path} (no {need}/ folder there): {DOWNLOAD_HINT}")
    return path


def parse_demonstrations(values):
    """--demonstration values -> None (flag absent: the model's default), [] ('none'), or
    [(sentence, word)]."""
    if values is None:
        return None
    if [v.strip().lower() for v in values] == ["none"]:
        return []
    pairs = []
    for v in values:
        sentence, sep, word = (x.strip() for x in v.rpartition("=>"))
        if not (sentence and sep and word):
            raise UserError(f"--demonstration {v!r}: expected \"SENTENCE=>WORD\" or none")
        pairs.append((sentence, word))
    return pairs


def embedder_flags(p):
    """Add the flags that configure embed.Embedder to parser p, one meaning in every script.
    A flag not given is None."""
    a = p.add_argument
    a("--template", choices=["eol", "prompt", "none"],
      help="PromptEOL (default), without 'in one word', or bare")
    a("--pooling", choices=["last", "mean"],
      help="the last token's state (default) or the prompt's mean")
    a("--demonstration", action="append", metavar="SENTENCE=>WORD",
      help="repeatable, or none (default: the model's in data/demonstrations.json; "
           "none with --adapter)")
    model_flags(p)
    from support.compile import BREAK_EVEN
    a("--compile", action=argparse.BooleanOptionalAction,
      help="run the decoder through torch.compile: faster, after minutes of compiling "
           f"(default: on the CPU for inputs of {BREAK_EVEN:,} sentences or more)")


def model_flags(p):
    """The flags that load and run a model: adapter, cut, batch, device, precision, bits, data."""
    a = p.add_argument
    a("--adapter", help="LoRA adapter (PEFT format): local directory or hub id")
    a("--max-tokens", type=int,
      help="cut each sentence to this many tokens (default: no cut, as the paper)")
    a("--batch-size", type=int, default=64, help="sentences per forward pass (default 64)")
    a("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    dtype_flag(p)
    a("--bits", type=int, choices=[4, 8],
      help="quantize the linears but the LM head to 4 or 8 bits (bitsandbytes)")
    a("--data-dir", help="data folder (default: $SENTEMB_DATA, else ./data)")


def dtype_flag(p, help_tail=""):
    p.add_argument("--dtype", choices=DTYPES,
                   help="compute precision (default: $SENTEMB_DTYPE, else bfloat16 on GPUs and "
                        f"CPUs with native bf16, else float32){help_tail}")


def default_dtype(device):
    """$SENTEMB_DTYPE if set; else bfloat16 on GPUs and on CPUs with native bf16 (AVX512-BF16,
    AMX), float32 where bf16 is emulated (slower)."""
    import torch
    forced = os.environ.get("SENTEMB_DTYPE")
    if forced:
        if forced not in ("float32", "bfloat16", "float16"):
            raise UserError(f"SENTEMB_DTYPE={forced}: use float32, bfloat16 or float16")
        return getattr(torch, forced)
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    names = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")     # absent in older torch
    checks = [getattr(torch.cpu, name, None) for name in names]
    native = any(check is not None and check() for check in checks)
    return torch.bfloat16 if native else torch.float32


def memory_budget(dev, gib=None) -> int:
    """Bytes train_cse may keep first-pass graphs in (--graph-memory): `gib` GiB, else half the
    memory free now (the GPU's; on a CPU, shared by the processes of this machine)."""
    import torch
    if gib is not None:
        return int(gib * 2**30)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0] // 2
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return free // 2 // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def positive(**flags):
    """Fail on the first flag whose value is set and below 1, naming it as the user typed it."""
    for name, value in flags.items():
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be at least 1")


def device(name=None):
    """--device value -> torch.device; None: cuda if available, else cpu.
    "auto" is embed.py's alone (support/corpus.py places the model)."""
    import torch
    try:
        dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device {name!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this torch has no CUDA device ({torch.__version__}); "
                        f"use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return dev


def writable(flag, path) -> Path:
    """Fail before any work if `path`, the value of `flag`, cannot be written."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {path}: is a directory")
    if not p.parent.is_dir():
        raise UserError(f"{flag} {path}: its folder does not exist")
    existed = p.exists()
    try:  # the real test: permissions, a read-only file system, root on /proc
        p.open("a").close()
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write there ({e.strerror})") from None
    if not existed:
        # another process (a torchrun rank) may have checked the same path
        p.unlink(missing_ok=True)
    return p
