"""Used by embed, train_cse, icl and support/export: a checkpoint's tokenizer (the `tokenizers`
library) with its family's BOS rule, and left padding, so a batch's last column is every row's last
token."""
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from support.cli import UserError


@dataclass
class Tokenizer:
    """A `tokenizers` tokenizer plus the family's BOS rule and left padding."""
    tok: object                  # tokenizers.Tokenizer
    bos_id: int | None           # what encode() prepends; None: nothing
    pad_id: int
    eos_id: int | None

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def pad(self, seqs: list[list[int]], device=None):
        """Token lists -> ids, mask (B, T), padded left: each row ends in its last real token."""
        T = max(len(s) for s in seqs)
        ids = [[self.pad_id] * (T - len(s)) + s for s in seqs]
        mask = [[0] * (T - len(s)) + [1] * len(s) for s in seqs]
        return (torch.tensor(ids, dtype=torch.long, device=device),
                torch.tensor(mask, dtype=torch.long, device=device))


def load(path: Path, c) -> Tokenizer:
    """The tokenizer of the model directory `path`, whose model.Config is `c`."""
    path = Path(path)
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers
    tcfg_file = path / "tokenizer_config.json"
    tcfg = json.loads(tcfg_file.read_text()) if tcfg_file.exists() else {}
    if (path / "tokenizer.json").exists():
        tok = HFTok.from_file(str(path / "tokenizer.json"))
        # Its post-processor prepends BOS or not (LLaMA: yes, SmolLM2: no); add_bos_token rules.
        probe = tok.encode("a", add_special_tokens=True).ids
        adds_bos = len(probe) > len(tok.encode("a", add_special_tokens=False).ids)
        add_bos = tcfg.get("add_bos_token", adds_bos)
        bos = probe[0] if adds_bos else c.bos_token_id
    elif (path / "vocab.json").exists() and (path / "merges.txt").exists():   # OPT: GPT-2's BPE
        tok = HFTok(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = ("<s>", "<pad>", "</s>", "<unk>")
        tok.add_special_tokens([t for t in specials if tok.token_to_id(t) is not None])
        add_bos = tcfg.get("add_bos_token", True)
        bos = c.bos_token_id                  # OPT prepends </s> (id 2)
    else:
        raise UserError(f"no tokenizer in {path}: expected tokenizer.json or vocab.json + "
                         f"merges.txt")
    pad = c.pad_token_id if c.pad_token_id is not None else (c.eos_token_id or 0)
    return Tokenizer(tok, bos if add_bos else None, pad, c.eos_token_id)
