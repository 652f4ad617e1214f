"""Used by embed (Embedder.as_mteb) and evaluate (--tasks mteb:NAME,...): sentemb encoders in MTEB.

`MtebEncoder` wraps an embed.Embedder as the encoder mteb's own API evaluates (mteb 2.x
EncoderProtocol: `encode(DataLoader of {"text": [...]}, task_metadata=...)`, `mteb_model_meta`),
with PromptEOL prompts: the Embedder's demonstrations for every task unless a task name or task
type has its own, its embedding cache (support.cache.CachedEncoder: longest sentences first, a
progress bar), and the model's metadata. `local_sts_task` builds an mteb STS task from pairs read
here, with no hub access.

    enc = Embedder("opt-1.3b").as_mteb(demonstrations={"Retrieval": [("A query.", "Search")]})
    mteb.evaluate(enc, mteb.get_tasks(["STSBenchmark", "SICK-R"]), cache=None)

mteb (PyPI, requirements-dev.txt) is optional: it is imported only here, and only when used.
"""
import json
import re
import time
from pathlib import Path

import numpy as np

from support.cache import CachedEncoder, fingerprint_key
from support.cli import REPO, UserError, writable
from support.files import write_atomic
from support.hub import ALIASES, DEFAULT_MODEL

PREFIX = "mteb:"
INSTALL = "mteb is not installed: pip install mteb (it is in requirements-dev.txt)"


def require():
    """The mteb module, or a one-line UserError saying how to install it."""
    try:
        import mteb
    except ImportError:
        raise UserError(INSTALL) from None
    return mteb


def get_task(name: str):
    """An mteb task by the name mteb spells it (STSBenchmark, SICK-R, ...); unknown: one line."""
    mteb = require()
    try:
        return mteb.get_task(name)
    except KeyError as e:   # mteb's message names the closest task names
        hint = str(e.args[0] if e.args else e).removeprefix("KeyError: ")
        raise UserError(f"mteb does not know the task {name!r}: {hint}") from None


def load_data(task):
    """mteb's own data for the task (the Hugging Face hub or its cache); unreachable: one line."""
    import datasets
    import huggingface_hub
    from datasets.exceptions import DatasetNotFoundError
    datasets.utils.logging.set_verbosity_error()          # no retry warnings before our one line
    huggingface_hub.utils.logging.set_verbosity_error()
    try:
        task.load_data()
    except (OSError, DatasetNotFoundError) as e:   # offline (ConnectionError), not cached, gated
        where = task.metadata.dataset.get("path", "?")
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"mteb task {task.metadata.name}: its data ({where} on the Hugging Face "
                        f"hub) is not available here ({first}); run once with network access to "
                        f"cache it (STS-B from local files: python bench/mteb_stsb.py)") from None
    return task


def local_sts_task(name: str, a, b, gold, split: str = "test"):
    """mteb's STS task `name` (its metadata, main score and evaluator) over the pairs (a[i], b[i])
    with gold scores, evaluated as its one split `split`: the data comes from here, not the hub."""
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.sts import AbsTaskSTS
    base = get_task(name)
    if not isinstance(base, AbsTaskSTS):
        raise UserError(f"mteb task {name} is a {base.metadata.type} task, not STS")
    if not (len(a) == len(b) == len(gold)) or not len(a):
        raise UserError(f"{name}: {len(a)}, {len(b)} sentences and {len(gold)} scores: "
                        f"need equal, non-zero counts")
    meta = base.metadata.model_copy(update={"eval_splits": [split]})
    cls = type(f"Local{type(base).__name__}", (type(base),), {"metadata": meta})
    task = cls()
    first, second = task.column_names
    rows = {first: list(a), second: list(b), "score": [float(g) for g in gold]}
    task.dataset = DatasetDict({split: Dataset.from_dict(rows)})
    task.data_loaded = True   # mteb.evaluate then never calls load_data
    return task


def parameter_count(model) -> int:
    # A 4-bit weight (bitsandbytes Params4bit) packs two values a byte; quant_state has the shape.
    params = model.parameters()
    shapes = [getattr(getattr(p, "quant_state", None), "shape", p.shape) for p in params]
    return sum(shape.numel() for shape in shapes)


def _names(embedder) -> tuple[str, str | None]:
    """(name as mteb wants it, owner/name; the base's name when there is an adapter, else None)."""
    def name(given: str, parts: int) -> str:   # a local folder: its last `parts` path parts
        hub_id = ALIASES.get(given, given)
        local = Path(given).expanduser().is_dir()
        if hub_id and not local and re.fullmatch(r"[\w.-]+/[\w.-]+", hub_id):
            return hub_id
        return "sentemb/" + "-".join(Path(given).expanduser().resolve().parts[-parts:])
    fp = embedder.fingerprint
    base = name(fp.get("model") or str(embedder.model.source), 1)
    if not fp.get("adapter"):
        return base, None
    return name(fp["adapter"], 2), base   # runs/cse/best -> sentemb/cse-best


def model_meta(embedder, experiment: dict):
    """mteb's ModelMeta: name, revision (the hub commit of a snapshot, else sentemb's weights and
    adapter digest), parameters, embedding size, positions, memory; the configuration goes in
    experiment_kwargs."""
    from mteb.models.model_meta import ModelMeta
    model, fp = embedder.model, embedder.fingerprint
    name, adapted_from = _names(embedder)
    snapshot = re.search(r"snapshots/([0-9a-f]{40})", str(model.source))
    revision = snapshot[1] if snapshot and not fp.get("adapter") else None
    if revision is None:
        revision = "sentemb-" + (fp.get("adapter_sha256") or fp["weights"])[:16]
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}   # tied weights once
    memory = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
    return ModelMeta(
        loader=None, name=name, revision=revision, release_date=None, languages=None,
        n_parameters=parameter_count(model),
        n_embedding_parameters=model.embeddings().weight.numel(),
        memory_usage_mb=round(memory, 1), max_tokens=model.config.max_position_embeddings,
        embed_dim=model.embeddings().embedding_dim, license=None, open_weights=True,
        public_training_code=None, public_training_data=None, framework=["PyTorch"],
        reference=None, similarity_fn_name="cosine", use_instructions=False, training_datasets=None,
        adapted_from=adapted_from, experiment_kwargs=experiment)


class MtebEncoder:
    """embedder as an mteb encoder. demonstrations: None (the Embedder's own for every task), a list
    of (sentence, word) pairs for every task, or {task name or task type: pairs} (a name wins over a
    type; other tasks keep the Embedder's own). cache: keep vectors on disk (support.cache), as
    evaluate.py does. mteb's batch_size groups its DataLoader only: the Embedder batches with its
    own batch_size."""

    def __init__(self, embedder, demonstrations=None, cache: bool = True, cache_dir=None,
                 progress: bool = True):
        require()
        self.embedder = embedder
        self.progress = progress
        self.cache = cache
        self.cache_dir = cache_dir
        if isinstance(demonstrations, dict):
            self.per_task = dict(demonstrations)
        else:
            self.per_task = {}
            if demonstrations is not None:
                self.embedder = embedder.with_demonstrations(demonstrations)
        self._check_keys()
        self.encoders = {}   # demonstrations (a tuple) -> CachedEncoder of an Embedder with them
        variants = [self.embedder.demonstrations, *self.per_task.values()]
        for demos in variants:
            self.encoder_for(demos)   # checks every demonstration now, before any task runs
        self._meta = None

    def _check_keys(self):
        from typing import get_args

        from mteb.abstasks.task_metadata import TaskType
        types = set(get_args(TaskType))
        for key in self.per_task:
            if key not in types:
                get_task(key)   # a task name mteb knows, else one line

    def encoder_for(self, demos) -> CachedEncoder:
        """The cached encoder of the Embedder with these demonstrations (checked: one line)."""
        emb = self.embedder.with_demonstrations(demos)   # a copy that shares the model
        key = tuple(emb.demonstrations)
        if key not in self.encoders:
            self.encoders[key] = CachedEncoder(emb, cache_dir=self.cache_dir, disk=self.cache)
        return self.encoders[key]

    def demonstrations_for(self, task_metadata) -> list:
        """The task name's demonstrations, else its type's, else the Embedder's."""
        for key in (task_metadata.name, task_metadata.type):
            if key in self.per_task:
                return self.per_task[key]
        return self.embedder.demonstrations

    def encode(self, inputs, *, task_metadata, hf_split=None, hf_subset=None, prompt_type=None,
               **kwargs) -> np.ndarray:
        """mteb's DataLoader of {"text": [...]} batches -> (n, hidden) float32, in input order.
        PromptEOL embeds queries and documents alike: prompt_type does not change the prompt."""
        sentences = [text for batch in inputs for text in batch["text"]]
        enc = self.encoder_for(self.demonstrations_for(task_metadata))
        progress = kwargs.get("show_progress_bar", self.progress)
        return enc.encode(sentences, progress=progress)

    def similarity(self, embeddings1, embeddings2):
        from mteb.similarity_functions import cos_sim
        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        from mteb.similarity_functions import pairwise_cos_sim
        return pairwise_cos_sim(embeddings1, embeddings2)

    @property
    def n_encoded(self) -> int:
        return sum(e.n_encoded for e in self.encoders.values())

    @property
    def mteb_model_meta(self):
        if self._meta is None:
            fp = self.embedder.fingerprint
            keys = ("template", "pooling", "max_tokens", "dtype", "bits", "adapter",
                    "demonstrations")
            experiment = {k: fp.get(k) for k in keys if fp.get(k) not in (None, [])}
            experiment["sentemb"] = fingerprint_key(fp)[:16]   # the cache folder's name: any change
            if self.per_task:
                experiment["task_demonstrations"] = {k: [list(d) for d in v]
                                                     for k, v in self.per_task.items()}
            self._meta = model_meta(self.embedder, experiment)
        return self._meta


# ------------------------------------------------------------------- evaluate.py --tasks mteb:...
def task_names(spec: str) -> list[str]:
    """'mteb:STSBenchmark,SICK-R' -> ['STSBenchmark', 'SICK-R'] (mteb's spelling, each once)."""
    names = [n.strip() for n in spec[len(PREFIX):].split(",") if n.strip()]
    if not spec.startswith(PREFIX) or not names:
        raise UserError(f"--tasks {spec!r}: expected mteb:NAME[,NAME...] with mteb's task names, "
                        f"e.g. mteb:STSBenchmark,SICK-R")
    return list(dict.fromkeys(names))


def run(encoder, tasks) -> dict:
    """{task name: {"score": main score (a fraction), "main_score": its name, "scores": mteb's}}."""
    mteb = require()
    # The encoder shows its own progress (MtebEncoder.progress): mteb's bar per task stays off.
    result = mteb.evaluate(encoder, tasks, cache=None, co2_tracker=False, show_progress_bar=False,
                           encode_kwargs={"batch_size": 32})
    out = {}
    for r in result.task_results:
        main = r.task.metadata.main_score
        out[r.task_name] = {"score": float(r.get_score()), "main_score": main, "scores": r.scores}
    return out


def table(rows) -> str:
    """rows: [(model, {task: result})] -> the x100 main scores, one row per model."""
    names = list(rows[0][1])
    width = max(len(m) for m, _ in rows)
    cols = [max(7, len(n)) for n in names]
    head = "".join(f" {n:>{w}}" for n, w in zip(names, cols, strict=True))
    lines = ["mteb, main score x100", " " * width + head]
    for model, res in rows:
        scores = [100 * res[n]["score"] for n in names]
        cells = "".join(f" {x:{w}.2f}" for x, w in zip(scores, cols, strict=True))
        lines.append(f"{model:<{width}}{cells}")
    return "\n".join(lines)


def evaluate_command(args, build, argv=None, started=None) -> int:
    """evaluate.py --tasks mteb:...: every check first (mteb, task names, output, data), then each
    --model through `build(model) -> (Embedder, parameter count)`; a table and a JSON record."""
    from support.provenance import provenance
    started = started or time.time()
    names = task_names(args.tasks)
    mteb = require()
    tasks = [get_task(n) for n in names]
    if args.output is None:
        (REPO / "runs").mkdir(exist_ok=True)
    default = REPO / "runs" / f"eval-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out = writable("--output", args.output or default)
    for task in tasks:
        load_data(task)   # before any model loads
    rows = []
    for model in args.model or [DEFAULT_MODEL]:
        embedder, params = build(model)
        encoder = MtebEncoder(embedder, cache=not args.no_cache)
        results = run(encoder, tasks)
        label = f"{model} + {args.adapter}" if args.adapter else model
        rows.append({"model": label, "params": params, "encoder": embedder.fingerprint,
                     "mteb_model_meta": encoder.mteb_model_meta.to_dict(), "tasks": results,
                     "summary_x100": {n: round(100 * r["score"], 2) for n, r in results.items()},
                     "sentences_encoded": encoder.n_encoded})
        del embedder, encoder
    print(table([(r["model"], r["tasks"]) for r in rows]))
    record = {"protocol": f"mteb {mteb.__version__}: its tasks, data and evaluators",
              **provenance("evaluate.py", argv, started)}
    record = {**rows[0], **record} if len(rows) == 1 else {"rows": rows, **record}
    write_atomic(out, json.dumps(record, indent=1, default=str) + "\n")
    print(f"\nwrote {out} ({record['wall_seconds']} s)")
    return 0
