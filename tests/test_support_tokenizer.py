"""support/tokenizer.py against transformers' tokenizers, on a small BPE trained by the tests."""
import json

import pytest

import model as M
from helpers import LLAMA_MHA, OPT_PRE, TEXTS, _train_bpe
from support import tokenizer


def test_tokenizer_parity_opt_vocab_merges(tmp_path):
    transformers = pytest.importorskip("transformers")
    bpe = _train_bpe()
    bpe.save_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(OPT_PRE | {"vocab_size": 400}))
    ref = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"),
                                     bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                     unk_token="<unk>", add_bos_token=True)
    ours = tokenizer.load(tmp_path, M.Config.from_hf(OPT_PRE))
    for t in TEXTS:
        assert ours.encode(t) == ref(t)["input_ids"], t
        assert ours.encode(t)[0] == 2  # OPT prepends </s>


def test_tokenizer_parity_tokenizer_json(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers.processors import TemplateProcessing
    bpe = _train_bpe()
    bpe.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    bpe.save(str(tmp_path / "tokenizer.json"))
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                        "eos_token": "</s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    ours = tokenizer.load(tmp_path, M.Config.from_hf(LLAMA_MHA))
    for t in TEXTS:
        assert ours.encode(t) == ref(t)["input_ids"], t
        assert ours.decode(ours.encode(t, bos=False)) == t
    ids, mask = ours.pad([ours.encode("a b c d"), ours.encode("a")])
    assert mask.tolist()[1][:-2] == [0] * (ids.shape[1] - 2)       # left padding
    assert ids[1, -1] == ours.encode("a")[-1]
