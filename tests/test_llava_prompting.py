"""One LLaVA input builder: training's sample, the held-out answers and the lmms-eval model ask a
question with the same token ids, attention mask and pixels (llava/prompting.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoProcessor

from llm2clip_vlm.data.conversations import LlavaRecord
from llm2clip_vlm.evaluation.tiny import save_tiny_llava
from llm2clip_vlm.llava.data import LlavaDataset
from llm2clip_vlm.llava.evaluate import answer_questions
from llm2clip_vlm.llava.prompting import expand_image_tokens, generation_ids, left_padded
from llm2clip_vlm.llava.templates import IGNORE_INDEX, VICUNA_SYSTEM, saved_chat_template

QUESTION = "What colour is the big shape at the left?"


@pytest.fixture(scope="module", params=["adds_bos", "no_bos"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("prompting")
    model_dir = save_tiny_llava(root / "tiny", seed=0)
    if request.param == "no_bos":  # as SmolLM2's: a BOS token, but the tokenizer adds none
        from tokenizers import processors

        processor = AutoProcessor.from_pretrained(model_dir)
        processor.tokenizer._tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        processor.save_pretrained(model_dir)
    image = root / "photo.png"
    Image.new("RGB", (48, 32), (200, 40, 90)).save(image)  # not square: the pad path runs
    return {"dir": model_dir, "image": image, "config": AutoConfig.from_pretrained(model_dir)}


class _Recorder:
    """Stands in for the model in ``answer_questions``: keeps what ``generate`` was given."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def eval(self) -> None:
        pass

    def generate(self, **kwargs: Any) -> torch.Tensor:
        self.calls.append(kwargs)
        return torch.cat([kwargs["input_ids"], kwargs["input_ids"][:, -1:]], dim=1)


def test_training_heldout_and_lmms_eval_build_the_same_inputs(tiny: dict[str, Any]) -> None:
    pytest.importorskip("lmms_eval")
    from llm2clip_vlm.evaluation.lmms_model import LLM2CLIPLlava

    config = tiny["config"]
    image_token, n_image = config.image_token_index, config.image_seq_length
    processor = AutoProcessor.from_pretrained(tiny["dir"])
    tokenizer = processor.tokenizer
    record = LlavaRecord(
        "q0", tiny["image"],
        [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": "Red"}], "test[#0]",
    )  # fmt: skip

    # Held-out scoring: what answer_questions hands to generate.
    recorder = _Recorder()
    answer_questions(
        recorder, tokenizer, processor.image_processor, [record], template="vicuna_v1",
        image_token_id=image_token, image_seq_length=n_image, show_progress=False,
    )  # fmt: skip
    heldout = recorder.calls[0]

    # lmms-eval: the model's prompt for the same question and image, encoded.
    lmms = LLM2CLIPLlava(str(tiny["dir"]), device="cpu", image_aspect_ratio="pad")
    with Image.open(tiny["image"]) as im:
        pil = im.convert("RGB")
    encoded = lmms._encode([lmms._prompt(QUESTION, [pil])], [pil], "pad")

    # Training: the sample of the record with its answer; the prompt is its first tokens.
    dataset = LlavaDataset(
        [record], tokenizer, processor.image_processor, "vicuna_v1", image_token, n_image, 4096
    )
    sample = dataset.sample(record)

    ids = generation_ids("vicuna_v1", QUESTION, tokenizer, image_token, n_image, system=None)
    assert ids.count(image_token) == n_image
    # One BOS first, whether or not the tokenizer adds it (LLaVA-1.5's Llama ``<s>``,
    # haotian-liu/LLaVA llava/mm_utils.py:185-204 tokenizer_image_token).
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert heldout["input_ids"][0].tolist() == ids
    assert encoded["input_ids"][0].tolist() == ids
    assert heldout["attention_mask"].tolist() == encoded["attention_mask"].tolist() == [[1] * len(ids)]
    assert sample.input_ids[: len(ids)].tolist() == ids
    assert (sample.labels[: len(ids)] == IGNORE_INDEX).all() and (
        sample.labels[len(ids) :] != IGNORE_INDEX
    ).any()
    assert torch.equal(heldout["pixel_values"][0], sample.pixel_values)
    assert torch.equal(encoded["pixel_values"][0].float(), sample.pixel_values)
    # The prompt is LLaVA-1.5's vicuna_v1 prompt (the model's llava_template.json).
    text = tokenizer.decode([t for t in ids if t != image_token], skip_special_tokens=True)
    assert text.startswith(VICUNA_SYSTEM) and text.rstrip().endswith(f"{QUESTION} ASSISTANT:")


def test_image_tokens_expand_without_loss_and_rows_pad_on_the_left() -> None:
    ids, labels = expand_image_tokens([1, 9, 5, 6], [-100, -100, 5, 6], image_token_id=9, image_seq_length=3)
    assert ids == [1, 9, 9, 9, 5, 6] and labels == [-100, -100, -100, -100, 5, 6]
    assert expand_image_tokens([9, 2], None, 9, 2) == ([9, 9, 2], [])
    input_ids, mask = left_padded([[4, 5, 6], [7]], pad_token_id=0)
    assert input_ids.tolist() == [[4, 5, 6], [0, 0, 7]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_the_builder_is_the_one_every_caller_uses() -> None:
    root = Path(__file__).resolve().parents[1] / "llm2clip_vlm"
    for caller in ("llava/evaluate.py", "evaluation/lmms_model.py", "llava/data.py"):
        source = (root / caller).read_text()
        assert "llm2clip_vlm.llava.prompting import" in source, caller
        assert "tokenize_image_chunks" not in source and "processor(text=" not in source, caller


def test_the_saved_chat_template_builds_the_trained_prompt(tiny: dict[str, Any]) -> None:
    """A serving engine's ``apply_chat_template`` + ``processor(text=...)`` on a saved model gives
    the ids training and the held-out answers use, BOS included, also for a tokenizer that adds no
    BOS of its own (the saved Jinja then writes it)."""
    config = tiny["config"]
    processor = AutoProcessor.from_pretrained(tiny["dir"])
    processor.chat_template = saved_chat_template("vicuna_v1", processor.tokenizer)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    with Image.open(tiny["image"]) as im:
        served = processor(text=prompt, images=im.convert("RGB"), return_tensors="pt")
    tok, image_token, n_image = processor.tokenizer, config.image_token_index, config.image_seq_length
    ids = generation_ids("vicuna_v1", QUESTION, tok, image_token, n_image, system=None)
    assert served["input_ids"][0].tolist() == ids
    assert saved_chat_template("plain", processor.tokenizer) is None  # plain keeps the processor's own
