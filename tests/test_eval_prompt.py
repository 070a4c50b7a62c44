"""Evaluation pieces that need no lmms-eval: conversation templates and the synthetic task copies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm2clip_vlm.evaluation.prompt import (
    VICUNA_SYSTEM,
    ChatTemplate,
    format_conversation,
    load_template,
    with_image_tokens,
)
from llm2clip_vlm.evaluation.synthetic_tasks import MME_COGNITION, MME_PERCEPTION, write_eval_data


def test_vicuna_v1_is_llava15_prompt() -> None:
    t = ChatTemplate()
    q = with_image_tokens("What is it?", 1)
    assert format_conversation(t, [(q, None)]) == f"{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT:"
    two = format_conversation(t, [(q, "A cat."), ("Sure?", None)])
    assert two == f"{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Sure? ASSISTANT:"
    with pytest.raises(ValueError, match="only the last"):
        format_conversation(t, [("a", None), ("b", None)])


def test_plain_and_chat_template() -> None:
    plain = ChatTemplate("plain", "")
    assert format_conversation(plain, [(with_image_tokens("", 1), None)]) == "<image>\n\n"
    assert format_conversation(plain, [("<image>\nq", "a")]) == "<image>\nq\na\n"
    with pytest.raises(ValueError, match="chat template"):
        format_conversation(ChatTemplate("chat_template", ""), [("q", None)])


def test_image_tokens() -> None:
    assert with_image_tokens("q", 0) == "q"
    assert with_image_tokens("q", 2) == "<image> <image>\nq"
    assert with_image_tokens("<image> q", 1) == "<image> q"


def test_load_template(tmp_path: Path) -> None:
    assert load_template(tmp_path) == ChatTemplate("vicuna_v1", VICUNA_SYSTEM)  # no file: LLaVA-1.5
    (tmp_path / "llava_template.json").write_text(json.dumps({"template": "plain", "system": ""}))
    assert load_template(tmp_path) == ChatTemplate("plain", "")
    assert load_template(tmp_path, override="vicuna_v1").name == "vicuna_v1"
    (tmp_path / "llava_template.json").write_text(json.dumps({"template": "llama9"}))
    with pytest.raises(ValueError, match="unknown conversation template 'llama9'"):
        load_template(tmp_path)
    (tmp_path / "llava_template.json").write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_template(tmp_path)


def test_synthetic_copies_have_hub_columns(tmp_path: Path) -> None:
    from datasets import load_dataset

    counts = write_eval_data(tmp_path, seed=3, mme_images_per_category=2, scienceqa=6, vizwiz=8)
    assert counts == {"mme": 20, "scienceqa_img": 6, "vizwiz_vqa_val": 8}
    mme = load_dataset("parquet", data_files={"test": str(tmp_path / "mme.parquet")})["test"]
    assert list(mme.features) == ["question_id", "image", "question", "answer", "category"]
    assert mme.features["image"].__class__.__name__ == "Image"
    # Pairs: two adjacent questions per image, one Yes and one No, same question_id and image.
    for i in range(0, len(mme), 2):
        a, b = mme[i], mme[i + 1]
        assert a["question_id"] == b["question_id"] and {a["answer"], b["answer"]} == {"Yes", "No"}
        assert a["question"].endswith(" Please answer yes or no.")
        assert a["image"].tobytes() == b["image"].tobytes()
    assert set(mme["category"]) == set(MME_PERCEPTION + MME_COGNITION)
    sqa = load_dataset("parquet", data_files={"test": str(tmp_path / "scienceqa_img.parquet")})["test"]
    assert list(sqa.features) == ["image", "question", "choices", "answer", "hint", "task", "grade", "subject",
                                  "topic", "category", "skill", "lecture", "solution"]  # fmt: skip
    assert sqa.features["answer"].dtype == "int8"
    assert all(0 <= r["answer"] < len(r["choices"]) <= 4 for r in sqa)
    viz = load_dataset("parquet", data_files={"val": str(tmp_path / "vizwiz_vqa_val.parquet")})["val"]
    assert list(viz.features) == ["question_id", "image", "question", "answers", "category"]
    assert all(len(r["answers"]) == 10 for r in viz)
    assert set(viz["category"]) == {"other", "number", "yes/no", "unanswerable"}
    # Deterministic per seed.
    again = tmp_path / "again"
    write_eval_data(again, seed=3, mme_images_per_category=2, scienceqa=6, vizwiz=8)
    assert (again / "mme.parquet").read_bytes() == (tmp_path / "mme.parquet").read_bytes()
