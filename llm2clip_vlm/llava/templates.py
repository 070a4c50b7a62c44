"""Conversation templates of LLaVA-1.5 and their label masks, exact to the token.

A LLaVA record's ``conversations`` (alternating ``human`` / ``gpt`` turns, the first human turn
holding one ``<image>``) become one token sequence and its labels. One class per template
(:class:`PlainTemplate`, :class:`VicunaV1Template`, :class:`LLMChatTemplate`, looked up with
:func:`get_template`) writes a conversation both for training (with the answers' character
spans) and for generation; training (:mod:`llm2clip_vlm.llava.data`), held-out scoring
(:mod:`llm2clip_vlm.llava.evaluate`) and the lmms-eval model (:mod:`llm2clip_vlm.evaluation.prompt`)
all use them. A new template is one more class in :data:`REGISTRY` (and its name in the config's
``Literal``).

[IMPORTANT] LLaVA computes its masks by re-tokenizing pieces of the prompt and subtracting
lengths, which silently goes wrong when a tokenizer merges across a piece boundary (its
"tokenization mismatch" warning). Here the whole conversation is tokenized once, with character
offsets, and a token is supervised iff its characters lie inside an answer span. The mask is
exact by construction for any fast tokenizer (a token counts as supervised when any of its
characters does, so a space glued to an answer's first word goes with the answer, as in LLaVA;
vicuna_v1 spans start at the space before the answer, so a space that is a token of its own is
learnt too, as in LLaVA); ``tests/test_llava_templates.py`` pins it on hand-checked examples.

The ``<image>`` placeholder stays one token here; the collator expands it to the number of
image features the model produces. As LLaVA's ``tokenizer_image_token`` (llava/mm_utils.py), the
text before and after ``<image>`` is tokenized as separate chunks (each chunk's BOS dropped, one
BOS in front): a SentencePiece tokenizer then starts the text after the image with its own ``▁``
prefix, exactly as LLaVA-1.5 trained. Every sequence starts with a BOS, also for tokenizers that
add none (SmolLM2): see :func:`tokenize_image_chunks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from llm2clip_vlm.data.conversations import IMAGE_PLACEHOLDER, ConversationError, conversation_turns

IGNORE_INDEX = -100
# Written into every trained model directory: which template (and system prompt) it learnt.
TEMPLATE_FILE = "llava_template.json"
TemplateName = Literal["plain", "vicuna_v1", "chat_template"]
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# The vicuna_v1 prompt as a Jinja chat template, saved with the processor so that transformers'
# ``apply_chat_template`` (lmms-eval, serving engines) builds the same prompt the model learnt.
VICUNA_V1_JINJA = (
    "{% set sys = '" + VICUNA_SYSTEM.replace("'", "\\'") + "' %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}{% set sys = message['content'] %}{% endif %}{% endfor %}"
    "{{ sys + ' ' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass(frozen=True)
class Tokenized:
    """One conversation as tokens: ``labels`` is ``IGNORE_INDEX`` where no loss is taken."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_supervised(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def _normalise_image_turn(question: str) -> str:
    """LLaVA puts the image first: ``"Q\\n<image>"`` and ``"<image>\\nQ"`` both become the latter."""
    if IMAGE_PLACEHOLDER not in question:
        return question
    rest = question.replace(IMAGE_PLACEHOLDER, "").strip()
    return f"{IMAGE_PLACEHOLDER}\n{rest}" if rest else IMAGE_PLACEHOLDER


class Template:
    """One conversation template: how a conversation is written for training (with the character
    spans of the answers, which carry the loss) and for generation (ending where the model answers).

    Both go through :meth:`text`, so a model is asked questions exactly as it was trained, except
    where LLaVA itself differs (``plain``, see :class:`PlainTemplate`).
    """

    name: ClassVar[str]
    default_system: ClassVar[str] = ""
    # What joins a generation prompt and the answer text (the prompt ends before it).
    answer_separator: ClassVar[str] = ""
    # Whether a generation prompt needs the tokenizer (its chat template); else prompts are
    # built from the text alone.
    prompt_needs_tokenizer: ClassVar[bool] = False
    # A Jinja chat template saved with a trained model's processor, so transformers'
    # ``apply_chat_template`` (lmms-eval, serving engines) builds the prompt the model learnt;
    # None: the processor keeps its own.
    processor_chat_template: ClassVar[str | None] = None

    def system(self, system: str | None) -> str:
        return self.default_system if system is None else system

    def text(
        self, turns: Sequence[tuple[str, str | None]], tokenizer: Any, system: str | None = None
    ) -> tuple[str, list[tuple[int, int]]]:
        """``(text, answer spans)`` of ``[(question, answer), ...]``; a last answer of None leaves
        the text open where the model answers."""
        raise NotImplementedError

    def render(
        self, conversations: Sequence[dict[str, Any]], tokenizer: Any, system: str | None = None
    ) -> tuple[str, list[tuple[int, int]]]:
        """Training: the text of a LLaVA conversation and the ``[start, end)`` spans with loss."""
        pairs = conversation_turns(conversations)
        turns = [(_normalise_image_turn(q) if i == 0 else q, a) for i, (q, a) in enumerate(pairs)]
        return self.text(turns, tokenizer, system)

    def prompt(
        self, turns: Sequence[tuple[str, str | None]], tokenizer: Any = None, system: str | None = None
    ) -> str:
        """Generation: the prompt text of ``turns``; the last answer may be None (open)."""
        for i, (_, answer) in enumerate(turns[:-1]):
            if answer is None:
                raise ValueError(f"turn {i}: only the last assistant message may be open")
        return self.text(turns, tokenizer, system)[0]


class PlainTemplate(Template):
    """LLaVA's ``conv_llava_plain`` (projector pretraining).

    Training is LLaVA's ``preprocess_plain``: the human turn is replaced by the image alone,
    ``<image>`` + caption + ``"\\n"``, with the loss on the caption and the newline. Generation is
    LLaVA's ``Conversation.get_prompt`` for ``SeparatorStyle.PLAIN``: the system prompt (none by
    default), then every message followed by ``"\\n"``, no roles (``"<image>\\nQ\\n"``).
    """

    name = "plain"

    def render(
        self, conversations: Sequence[dict[str, Any]], tokenizer: Any, system: str | None = None
    ) -> tuple[str, list[tuple[int, int]]]:
        answer = conversation_turns(conversations)[0][1]
        text = f"{IMAGE_PLACEHOLDER}{answer}\n"
        return text, [(len(IMAGE_PLACEHOLDER), len(text))]

    def text(
        self, turns: Sequence[tuple[str, str | None]], tokenizer: Any, system: str | None = None
    ) -> tuple[str, list[tuple[int, int]]]:
        out, spans = self.system(system), []
        for question, answer in turns:
            out += f"{question}\n"
            if answer is not None:
                spans.append((len(out), len(out) + len(answer) + 1))
                out += f"{answer}\n"
        return out, spans


class VicunaV1Template(Template):
    """LLaVA-1.5's ``conv_vicuna_v1`` (``SeparatorStyle.TWO``):
    ``"{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:"``; the loss is on every answer
    and the ``</s>`` (the tokenizer's eos) after it."""

    name = "vicuna_v1"
    default_system = VICUNA_SYSTEM
    answer_separator = " "
    processor_chat_template = VICUNA_V1_JINJA

    def text(
        self, turns: Sequence[tuple[str, str | None]], tokenizer: Any, system: str | None = None
    ) -> tuple[str, list[tuple[int, int]]]:
        eos = getattr(tokenizer, "eos_token", None)
        if not eos:
            if tokenizer is not None and all(a is not None for _, a in turns):
                raise ConversationError("vicuna_v1 needs a tokenizer with an eos token to end answers")
            eos = "</s>"  # Vicuna's / Llama's, for prompts built without a tokenizer
        out, spans = self.system(system) + " ", []
        for question, answer in turns:
            out += f"USER: {question} ASSISTANT:"
            if answer is not None:
                # The space before the answer belongs to the answer's span. LLaVA masks
                # len(tokenize("... ASSISTANT: ")) - 2 tokens of a round (haotian-liu/LLaVA
                # llava/train/train.py:471-475, :481): the -2 drops the BOS and the token holding
                # the trailing space, so that token is learnt. It matters when the space is a token
                # of its own (Llama SentencePiece before a digit: "▁", "3"); a space glued to the
                # first word ("▁Yes", " yes") is learnt either way.
                start = len(out)
                out += " " + answer + eos
                spans.append((start, len(out)))
        return out, spans


class LLMChatTemplate(Template):
    """The LLM's own chat template (``tokenizer.apply_chat_template``); the loss is on every
    assistant message and the end-of-turn token right after it."""

    name = "chat_template"
    prompt_needs_tokenizer = True

    def text(
        self, turns: Sequence[tuple[str, str | None]], tokenizer: Any, system: str | None = None
    ) -> tuple[str, list[tuple[int, int]]]:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ConversationError("template 'chat_template' needs a tokenizer with a chat template")
        system = self.system(system)
        messages = [{"role": "system", "content": system}] if system else []
        for question, answer in turns:
            messages.append({"role": "user", "content": question})
            if answer is not None:
                messages.append({"role": "assistant", "content": answer})
        open_turn = turns[-1][1] is None
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=open_turn)
        spans, pos = [], 0
        end_of_turn = tokenizer.eos_token or ""
        for _, answer in turns:
            if answer is None:
                continue
            start = text.find(answer, pos)
            if start < 0:
                raise ConversationError("the chat template changed an answer's text; cannot locate it")
            end = start + len(answer)
            # The end-of-turn token after the answer is learnt too (it stops generation).
            if end_of_turn and text.startswith(end_of_turn, end):
                end += len(end_of_turn)
            spans.append((start, end))
            pos = end
        return text, spans


REGISTRY: dict[str, Template] = {t.name: t for t in (PlainTemplate(), VicunaV1Template(), LLMChatTemplate())}
TEMPLATES = tuple(REGISTRY)
# A model directory without llava_template.json is taken to be LLaVA-1.5's.
DEFAULT_TEMPLATE: TemplateName = VicunaV1Template.name


def get_template(name: str) -> Template:
    """The registered template ``name`` (unknown names are refused, listing the known ones)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown template {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def saved_chat_template(name: str, tokenizer: Any) -> str | None:
    """The Jinja chat template to save with a model trained on template ``name`` (None: keep the
    processor's own), so that ``apply_chat_template`` + ``processor(text=...)`` give the token ids
    training used. Training puts a BOS first even when the tokenizer adds none
    (:func:`tokenize_image_chunks`); for such a tokenizer (SmolLM2, GPT-2) the template writes it,
    since the processor's tokenization will not."""
    jinja = get_template(name).processor_chat_template
    if jinja is None:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return jinja
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return jinja if ids and ids[0] == bos else "{{ bos_token }}" + jinja


def render(
    template: TemplateName,
    conversations: Sequence[dict[str, Any]],
    tokenizer: Any,
    system: str | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """Training text of a conversation and the character spans that carry the loss."""
    return get_template(template).render(conversations, tokenizer, system)


def generation_prompt(
    template: TemplateName, question: str, tokenizer: Any, system: str | None = None, has_image: bool = True
) -> str:
    """The prompt for answering ``question`` (one turn), ending where the answer starts."""
    q = _normalise_image_turn(question)
    if has_image and IMAGE_PLACEHOLDER not in q:
        q = f"{IMAGE_PLACEHOLDER}\n{q}"
    return get_template(template).prompt([(q, None)], tokenizer, system)


def tokenize_conversation(
    template: TemplateName,
    conversations: Sequence[dict[str, Any]],
    tokenizer: Any,
    system: str | None = None,
) -> Tokenized:
    """Token ids and labels of a conversation (see the module docstring for the masking rule).

    The tokenizer's own special tokens are added as it adds them, and a BOS in front where it adds
    none (:func:`tokenize_image_chunks`); neither is supervised.

    Raises:
        ConversationError: the conversation does not fit the template.
    """
    text, spans = render(template, conversations, tokenizer, system)
    ids, offsets = tokenize_image_chunks(text, tokenizer)
    labels = []
    for tok, (s, e) in zip(ids, offsets, strict=True):
        # A token is supervised when any of its characters is: byte-level BPE glues the space
        # before an answer to its first word (" yes"), which must still be learnt. (0, 0) offsets
        # are added special tokens (BOS): never supervised.
        inside = e > s and any(max(s, a) < min(e, b) for a, b in spans)
        labels.append(tok if inside else IGNORE_INDEX)
    return Tokenized(list(ids), labels)


def tokenize_image_chunks(text: str, tokenizer: Any) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` and each token's character span in it, LLaVA's way around ``<image>``.

    As ``tokenizer_image_token`` (haotian-liu/LLaVA llava/mm_utils.py:185-204): the chunks between
    ``<image>`` placeholders are tokenized one by one with the tokenizer's special tokens; the BOS
    the tokenizer adds is kept once, in front, and dropped from every later chunk; each placeholder
    becomes the ``<image>`` token. Without a placeholder this is the plain tokenization.

    Every sequence starts with the tokenizer's BOS, also when the tokenizer adds none of its own
    (SmolLM2, GPT-2): LLaVA-1.5's Llama tokenizer puts ``<s>`` first, so its ``plain`` sequences are
    ``<s> <image> caption\n`` (``preprocess_plain``, llava/train/train.py:588-607, masks those two
    tokens). Without it the first image token is the sequence's first token and becomes the LLM's
    attention sink; measured on the demo (docs/BENCHMARKS.md), the projector's pretraining then
    aligns no image content for twice as many steps. A text that already starts with the BOS (a
    chat template that writes it) gets no second one. Added tokens (BOS) get the span ``(0, 0)``.
    """
    chunks = text.split(IMAGE_PLACEHOLDER)
    image_id = None
    if len(chunks) > 1:
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        if image_id is None or image_id == tokenizer.unk_token_id:
            raise ConversationError(f"the tokenizer has no {IMAGE_PLACEHOLDER} token")
    bos = getattr(tokenizer, "bos_token_id", None)
    encoded = [tokenizer(c, add_special_tokens=True, return_offsets_mapping=True) for c in chunks]
    first = encoded[0]["input_ids"]
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    if bos is not None and not (first and first[0] == bos):
        ids, offsets = [bos], [(0, 0)]  # the tokenizer adds no BOS: put it first, as Llama's does
    start = 0
    for k, (chunk, enc) in enumerate(zip(chunks, encoded, strict=True)):
        pairs = list(zip(enc["input_ids"], enc["offset_mapping"], strict=True))
        if k:
            ids.append(image_id)
            offsets.append((start - len(IMAGE_PLACEHOLDER), start))
            # The BOS the tokenizer added to this chunk (zero-width): kept only once, in front.
            if pairs and pairs[0][0] == bos and pairs[0][1][1] <= pairs[0][1][0]:
                pairs = pairs[1:]
        for t, (s, e) in pairs:
            ids.append(t)
            offsets.append((start + s, start + e) if e > s else (0, 0))
        start += len(chunk) + len(IMAGE_PLACEHOLDER)
    return ids, offsets
