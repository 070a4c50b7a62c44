"""import-encoder: llm2vec-style releases (merged, or base + MNTP + supervised LoRA adapters) ->
CaptionEncoder; embeddings match peft's merge + the reference's llm2vec pooling to 1e-5."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_caption_template import SEPARATOR, llama3_like_tokenizer, reference_embed_mask
from transformers import AutoModel, AutoModelForCausalLM
from typer.testing import CliRunner

from llm2clip_vlm.cli import app
from llm2clip_vlm.imports.checkpoint import ImportRefused
from llm2clip_vlm.imports.encoder import import_encoder
from llm2clip_vlm.text.encoder import CaptionEncoder
from llm2clip_vlm.text.pooling import LLAMA3_CHAT_TEMPLATE
from llm2clip_vlm.text.tiny import tiny_config

CAPTIONS = ["a red circle", "two green triangles above a yellow star", "a blue square in the corner"]


def _bare(path: Path) -> torch.nn.Module:
    model = AutoModel.from_pretrained(path)
    model.config.is_causal = False  # llm2vec's bidirectional LlamaBiModel
    return model.eval()


def _adapter(model: torch.nn.Module, out: Path, r: int, targets: list[str], seed: int) -> None:
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # B starts at zero; a trained adapter's does not
    peft.save_pretrained(out)


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Meta-Llama-3-Instruct-like base (Llama-3 chat tokenizer) + MNTP and supervised adapters,
    as McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp(-supervised) are laid out."""
    root = tmp_path_factory.mktemp("release")
    tok = llama3_like_tokenizer()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(vocab_size=len(tok))).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    _adapter(_bare(root / "base"), root / "mntp", 4, ["q_proj", "v_proj", "gate_proj"], 1)
    first = PeftModel.from_pretrained(_bare(root / "base"), root / "mntp").merge_and_unload()
    _adapter(first, root / "supervised", 2, ["o_proj", "up_proj", "k_proj"], 2)
    return {"root": root, "base": root / "base", "mntp": root / "mntp", "supervised": root / "supervised"}


def oracle(release: dict[str, Path]) -> tuple[torch.Tensor, torch.nn.Module]:
    """peft merges in order (llm2vec_wrapper.py:60-95), then llm2vec's encode: Llama-3 header,
    tokenize with the separator, forward, mean over the last len(caption tokens) positions."""
    model = _bare(release["base"])
    for adapter in ("mntp", "supervised"):
        model = PeftModel.from_pretrained(model, release[adapter]).merge_and_unload()
    tok = llama3_like_tokenizer()
    mask, batch = reference_embed_mask(tok, [SEPARATOR + c for c in CAPTIONS], max_length=512)
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    lengths = mask.sum(-1)
    pooled = torch.stack([hidden[i, -int(n) :, :].mean(dim=0) for i, n in enumerate(lengths)])
    return pooled, model


def test_base_plus_adapters_matches_the_reference(release: dict[str, Path], tmp_path: Path) -> None:
    summary = import_encoder(
        release["base"], tmp_path / "enc", adapters=[release["mntp"], release["supervised"]]
    )
    assert [a["modules"] for a in summary["adapters"]] == [3 * 2, 3 * 2]  # 3 targets x 2 layers
    assert summary["caption_template"] == LLAMA3_CHAT_TEMPLATE  # Llama-3 Instruct: the reference's header
    encoder = CaptionEncoder.from_pretrained(tmp_path / "enc", device="cpu")
    expected, _ = oracle(release)
    got = encoder.encode(CAPTIONS)
    assert (got - expected).abs().max() < 1e-5
    # The merge is not a no-op: without the adapters the embeddings differ.
    bare = import_encoder(release["base"], tmp_path / "bare")
    assert not torch.allclose(
        CaptionEncoder.from_pretrained(tmp_path / "bare", device="cpu").encode(CAPTIONS), expected, atol=1e-3
    )
    assert bare["identity"] != summary["identity"]


def test_merged_release_layout(release: dict[str, Path], tmp_path: Path) -> None:
    """LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned: one merged checkpoint with remote code we never run."""
    expected, merged = oracle(release)
    src = tmp_path / "cc-finetuned"
    merged.save_pretrained(src)
    llama3_like_tokenizer().save_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(
        architectures=["LlamaEncoderModel"],
        auto_map={"AutoModel": "modeling_bidirectional_llama_encoder.LlamaEncoderModel"},
    )
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "modeling_bidirectional_llama_encoder.py").write_text("raise SystemExit('remote code was run')\n")
    import_encoder(src, tmp_path / "enc")
    got = CaptionEncoder.from_pretrained(tmp_path / "enc", device="cpu").encode(CAPTIONS)
    assert (got - expected).abs().max() < 1e-5

    # Unknown tensors and adapters that match nothing are refused by name.
    state = load_file(str(src / "model.safetensors"))
    save_file({**state, "layers.0.extra.weight": torch.zeros(2)}, str(src / "model.safetensors"))
    with pytest.raises(ImportRefused, match=r"layers\.0\.extra\.weight"):
        import_encoder(src, tmp_path / "bad")
    save_file(state, str(src / "model.safetensors"))
    ad = tmp_path / "stray"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    save_file({"base_model.model.layers.0.cross_attn.lora_A.weight": torch.zeros(2, 32),
               "base_model.model.layers.0.cross_attn.lora_B.weight": torch.zeros(32, 2)}, str(ad / "adapter_model.safetensors"))  # fmt: skip
    with pytest.raises(ImportRefused, match=r"layers\.0\.cross_attn"):
        import_encoder(src, tmp_path / "bad2", adapters=[ad])


def test_cli_import_encoder(release: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    args = [
        "import-encoder",
        str(release["base"]),
        "-o",
        str(tmp_path / "enc"),
        "--adapter",
        str(release["mntp"]),
    ]
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "enc" / "llm2clip_encoder.json").is_file()
    bad = runner.invoke(app, ["import-encoder", str(tmp_path / "missing"), "-o", str(tmp_path / "e2")])
    assert bad.exit_code == 1 and "missing" in bad.output and "Traceback" not in bad.output


def test_embed_runs_on_the_imported_encoder(release: dict[str, Path], tmp_path: Path) -> None:
    """`embed` writes a store with the imported encoder; it wraps captions as the encoder says."""
    from llm2clip_vlm.data.records import Caption, ImageCaptions
    from llm2clip_vlm.store.config import EmbedConfig
    from llm2clip_vlm.store.store import EmbeddingStore, write_store

    import_encoder(release["base"], tmp_path / "enc", adapters=[release["mntp"], release["supervised"]])
    encoder = CaptionEncoder.from_pretrained(tmp_path / "enc", device="cpu")
    records = [
        ImageCaptions(
            f"k{i}", f"/x/{i}.jpg", [Caption(CAPTIONS[i], "short"), Caption(CAPTIONS[-1 - i], "long")]
        )
        for i in range(3)
    ]
    write_store(
        encoder, records, tmp_path / "store", EmbedConfig(dtype="fp32", shard_size=4, precision="fp32")
    )
    store = EmbeddingStore.open(tmp_path / "store", captions=records, encoder_identity=encoder.identity())
    expected, _ = oracle(release)  # embeddings of CAPTIONS in order
    assert (torch.from_numpy(store[[0, 2, 4]]) - expected).abs().max() < 1e-5


# The text sides of the EVA02 / SigLIP2 towers: Llama-3.2-1B and Llama-3.1-8B encoders. Their
# config.json carries Llama-3.1's rope_scaling (rope_type "llama3") and, for 3.2-1B, tied
# embeddings (no lm_head in the file); the reference wraps their captions in the Llama-3 header
# too (microsoft/LLM2CLIP llm2clip/llm2vec/llm2vec.py prepare_for_tokenization: "Llama-3" and
# "Instruct" in the name).
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 500000.0}  # fmt: skip


@pytest.mark.parametrize("tied", [True, False], ids=["llama-3.2-1b", "llama-3.1-8b"])
def test_llama31_and_32_text_sides_import(tmp_path: Path, tied: bool) -> None:
    tok = llama3_like_tokenizer()
    cfg = tiny_config(vocab_size=len(tok))
    cfg.rope_parameters = dict(LLAMA31_ROPE)
    cfg.tie_word_embeddings = tied
    torch.manual_seed(3)
    src = tmp_path / "release"
    AutoModel.from_config(cfg).save_pretrained(src)  # the bare (bidirectional) encoder, as released
    tok.save_pretrained(src)
    raw = json.loads((src / "config.json").read_text())
    raw.update(
        architectures=["LlamaEncoderModel"],
        auto_map={"AutoModel": "modeling_llama_encoder.LlamaEncoderModel"},
    )
    # As meta-llama/Llama-3.2-1B-Instruct's config.json spells it (transformers 4.x keys).
    raw.pop("rope_parameters", None)
    raw["rope_theta"] = LLAMA31_ROPE["rope_theta"]
    raw["rope_scaling"] = {k: v for k, v in LLAMA31_ROPE.items() if k != "rope_theta"}
    (src / "config.json").write_text(json.dumps(raw))
    (src / "modeling_llama_encoder.py").write_text("raise SystemExit('remote code was run')\n")

    summary = import_encoder(src, tmp_path / "enc")
    assert summary["caption_template"] == LLAMA3_CHAT_TEMPLATE
    encoder = CaptionEncoder.from_pretrained(tmp_path / "enc", device="cpu")
    rope = getattr(encoder.model.config, "rope_parameters", None) or encoder.model.config.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0

    oracle_model = _bare(src)
    mask, batch = reference_embed_mask(tok, [SEPARATOR + c for c in CAPTIONS], max_length=512)
    with torch.no_grad():
        hidden = oracle_model(**batch).last_hidden_state
    expected = torch.stack([hidden[i, -int(n) :].mean(0) for i, n in enumerate(mask.sum(-1))])
    assert (encoder.encode(CAPTIONS) - expected).abs().max() < 1e-5
