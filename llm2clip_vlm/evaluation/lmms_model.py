"""lmms-eval model ``llm2clip_llava``: the package's LLaVA-1.5 models (transformers format) in lmms-eval.

lmms-eval finds it through the ``lmms_eval.models`` entry point (see ``manifest.py``), so
``lmms-eval --model llm2clip_llava --model_args pretrained=DIR`` and
``lmms_eval.evaluator.simple_evaluate(model="llm2clip_llava", ...)`` work with no glue code.

What it does the way LLaVA-1.5's own evaluation does:
- the prompt is the conversation template the model was trained with (``llava_template.json``,
  default vicuna_v1), with one ``<image>`` placeholder per image in front of the question;
- images are padded to a square with the image processor's mean colour before preprocessing
  (``image_aspect_ratio=pad``; a task may ask for ``original`` through its generation kwargs);
- decoding is greedy unless the task asks for sampling; ``until`` strings end an answer.

``blind=shuffle`` (or ``blank``) asks every question with the image withheld, the blind baseline
of :mod:`llm2clip_vlm.llava.blind`: ``shuffle`` gives each request the images of a request with
*different* images (a seeded derangement of the distinct image sets of the requests in one call,
so the input stays in distribution and a drop means the model used its own image); ``blank``
replaces each image by a mean-colour one of the same size. Run the task twice, with and without
it, and compare: the gap is what the image adds.

Requests are batched (grouped by generation settings, sorted by prompt length) and the answers
returned in request order. The weights load lazily, so lmms-eval's ``clean()`` (which deletes
every ``nn.Module`` attribute after a run) leaves a usable object: the next call reloads them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image

from llm2clip_vlm.evaluation.prompt import (
    ChatTemplate,
    answer_separator,
    format_conversation,
    load_template,
    with_image_tokens,
)
from llm2clip_vlm.llava.blind import BLIND_MODES, blank_like, derangement
from llm2clip_vlm.llava.data import image_to_pixels, mean_colour
from llm2clip_vlm.llava.prompting import left_padded, prompt_ids
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.progress import make_progress
from llm2clip_vlm.weights import from_pretrained_kwargs, require_safetensors

log = get_logger(__name__)

MODEL_ID = "llm2clip_llava"
ASPECT_RATIOS = ("pad", "original")
DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


@dataclass
class PreparedRequest:
    """One request turned into what the model sees: the prompt text and the images."""

    prompt: str
    images: list[Image.Image]
    task: str
    doc_id: int
    split: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationSettings:
    """A task's generation kwargs resolved against the model's defaults."""

    until: tuple[str, ...]
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float | None
    num_beams: int
    image_aspect_ratio: str


def truncate_at_stop(text: str, until: tuple[str, ...] | list[str]) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            i = text.find(stop)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def batch_order(keys: list[str], lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches of request indices: same generation settings per batch, longest prompts first.

    Grouping keeps one set of generation kwargs per ``generate`` call; sorting by length keeps
    padding small and makes an out-of-memory error happen on the first batch, not the last.

    Args:
        keys: per request, a key of its generation settings.
        lengths: per request, its prompt length.
        batch_size: the largest batch.

    Returns:
        Lists of indices into the requests; every index appears exactly once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    batches: list[list[int]] = []
    for members in groups.values():
        members = sorted(members, key=lambda i: -lengths[i])  # stable: ties keep request order
        batches.extend(members[s : s + batch_size] for s in range(0, len(members), batch_size))
    return batches


class LLM2CLIPLlava(lmms):
    """A transformers ``LlavaForConditionalGeneration`` directory as an lmms-eval model.

    Args:
        pretrained: the model directory (``config.json``, weights, processor files, optionally
            ``llava_template.json``).
        device: ``cpu``, ``cuda``, ``cuda:1``, ... (default: cuda when available). Under
            ``accelerate launch`` each process takes its own GPU.
        dtype: ``auto`` (as saved), ``float32``, ``bfloat16`` or ``float16``.
        batch_size: requests per ``generate`` call.
        max_new_tokens: used when a task does not set it (LLaVA-1.5's evaluation scripts: 128).
        image_aspect_ratio: ``pad`` (LLaVA-1.5) or ``original``.
        template: override the conversation template (``vicuna_v1``, ``plain``, ``chat_template``).
        attn_implementation: passed to ``from_pretrained`` (``sdpa``, ``eager``, ...).
        max_batch_size: accepted for lmms-eval's CLI; unused.
        allow_pickle_weights: accept a model whose weights are only pickles (``pytorch_model.bin``);
            refused by default, as ``reliability.allow_pickle_weights`` does for training.
        blind: ``off`` (default); ``shuffle``: each request gets another request's images (a seeded
            derangement, so none keeps its own); ``blank``: mean-colour images of the same sizes.
            The blind baseline: the same questions with the image withheld.
        blind_seed: the derangement's seed.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_new_tokens: int = 128,
        image_aspect_ratio: str = "pad",
        template: str | None = None,
        attn_implementation: str | None = None,
        max_batch_size: int | None = None,
        allow_pickle_weights: bool | str = False,
        blind: str = "off",
        blind_seed: int | str = 0,
        **unexpected: Any,
    ) -> None:
        super().__init__()
        if unexpected:
            raise TypeError(
                f"{MODEL_ID}: unknown model_args {sorted(unexpected)}; known: pretrained, device, dtype, "
                "batch_size, max_new_tokens, image_aspect_ratio, template, attn_implementation, "
                "allow_pickle_weights, blind, blind_seed"
            )
        path = Path(str(pretrained)).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{MODEL_ID}: {path} is not a model directory (no config.json)")
        if str(dtype) not in DTYPES:
            raise ValueError(f"{MODEL_ID}: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if image_aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(
                f"{MODEL_ID}: image_aspect_ratio must be pad or original, got {image_aspect_ratio!r}"
            )
        if str(blind) not in BLIND_MODES:
            raise ValueError(f"{MODEL_ID}: blind must be one of {', '.join(BLIND_MODES)}, got {blind!r}")
        self.blind = str(blind)
        self.blind_seed = int(blind_seed)
        self.allow_pickle = str(allow_pickle_weights).lower() in ("true", "1", "yes")

        # Before anything loads: a pickle-only model is refused with a message naming the opt-in.
        require_safetensors(path, self.allow_pickle, what=MODEL_ID)
        self.pretrained = path
        self.template: ChatTemplate = load_template(path, template)
        self.dtype = DTYPES[str(dtype)]
        self.batch_size_per_gpu = int(batch_size) if str(batch_size) != "auto" else 1
        self.max_new_tokens = int(max_new_tokens)
        self.image_aspect_ratio = image_aspect_ratio
        self.attn_implementation = attn_implementation

        from accelerate import Accelerator

        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            # Data parallel: every process holds a whole model; lmms-eval shards the requests by rank.
            self._device = accelerator.device
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.accelerator = accelerator
        self._processor: Any = None

    # ------------------------------------------------------------------------------------------
    # Lazy weights (survive lmms-eval's clean())
    # ------------------------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        """The LLaVA model, loaded on first use (and again after ``clean()`` deleted it)."""
        model = self.__dict__.get("_model")
        if model is None:
            from transformers import LlavaForConditionalGeneration

            kwargs: dict[str, Any] = {"dtype": self.dtype, **from_pretrained_kwargs(self.allow_pickle)}
            if self.attn_implementation:
                kwargs["attn_implementation"] = self.attn_implementation
            model = LlavaForConditionalGeneration.from_pretrained(self.pretrained, **kwargs)
            model.to(self._device).eval()
            self._model = model
            log.info("%s: loaded %s on %s (%s)", MODEL_ID, self.pretrained, self._device, model.dtype)
        return model

    @property
    def processor(self) -> Any:
        """The model's ``LlavaProcessor`` (tokenizer padding on the left, for batched generation)."""
        if self._processor is None:
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(self.pretrained)
            processor.tokenizer.padding_side = "left"
            if processor.tokenizer.pad_token is None:
                processor.tokenizer.pad_token = processor.tokenizer.eos_token
            self._processor = processor
        return self._processor

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    # ------------------------------------------------------------------------------------------
    # Requests -> prompts
    # ------------------------------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: int) -> dict[str, Any]:
        return self.task_dict[task][split][doc_id]

    @staticmethod
    def _images(visuals: Any) -> list[Image.Image]:
        if visuals is None:
            return []
        images = list(visuals) if isinstance(visuals, list | tuple) else [visuals]
        for v in images:
            if not isinstance(v, Image.Image):
                raise TypeError(f"{MODEL_ID} takes images only; got a {type(v).__name__} visual")
        return [im.convert("RGB") for im in images]

    def _withhold(self, image_sets: list[list[Image.Image]]) -> list[list[Image.Image]]:
        """The blind baseline's images for each request (``blind=off``: the requests' own)."""
        if self.blind == "off":
            return image_sets
        if self.blind == "blank":
            colour = mean_colour(self.processor.image_processor)
            return [[blank_like(im, colour) for im in images] for images in image_sets]
        # shuffle: a request's images are identified by their pixels (tasks like MME ask two
        # questions of one image: both must get a foreign one, the same one).
        keys = [
            tuple(hashlib.sha1(im.tobytes()).hexdigest() + str(im.size) for im in ims) for ims in image_sets
        ]
        mapping = derangement([k for k in keys if k], self.blind_seed)
        if mapping is None:
            if not any(keys):  # no images at all: nothing to withhold
                return image_sets
            # One image for every request (MME with --limit 2): nothing to shuffle with.
            log.warning("%s: blind=shuffle: all requests show the same image; using blank instead", MODEL_ID)
            colour = mean_colour(self.processor.image_processor)
            return [[blank_like(im, colour) for im in images] for images in image_sets]
        first = {k: image_sets[i] for i, k in reversed(list(enumerate(keys)))}
        return [first[mapping[k]] if k else ims for k, ims in zip(keys, image_sets, strict=True)]

    def _prompt(self, question: str, images: list[Image.Image]) -> str:
        user = with_image_tokens(question, len(images))
        return format_conversation(self.template, [(user, None)], tokenizer=self._template_tokenizer())

    def _template_tokenizer(self) -> Any:
        # Only a template built on the LLM's chat template needs the tokenizer; others stay model-free.
        return self.tokenizer if self.template.needs_tokenizer else None

    def settings(self, gen_kwargs: dict[str, Any]) -> GenerationSettings:
        """A task's generation kwargs resolved against the model's defaults (greedy by default)."""
        gen = dict(gen_kwargs or {})
        until = gen.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        temperature = float(gen.pop("temperature", 0) or 0)
        do_sample = bool(gen.pop("do_sample", False)) and temperature > 0
        top_p = gen.pop("top_p", None)
        aspect = gen.pop("image_aspect_ratio", self.image_aspect_ratio)
        if aspect not in ASPECT_RATIOS:
            aspect = self.image_aspect_ratio
        return GenerationSettings(
            until=tuple(until),
            max_new_tokens=int(gen.pop("max_new_tokens", self.max_new_tokens)),
            do_sample=do_sample,
            temperature=temperature,
            top_p=float(top_p) if top_p is not None and do_sample else None,
            num_beams=int(gen.pop("num_beams", 1) or 1),
            image_aspect_ratio=aspect,
        )

    # ------------------------------------------------------------------------------------------
    # The model calls (a test double overrides these two)
    # ------------------------------------------------------------------------------------------
    def _encode(self, texts: list[str], images: list[Image.Image], aspect: str) -> dict[str, torch.Tensor]:
        # The same input ids and pixels as training and held-out scoring (llava.prompting,
        # llava.data.image_to_pixels: LLaVA's expand2square padding), left-padded.
        processor, config = self.processor, self.model.config
        rows = [
            prompt_ids(t, processor.tokenizer, config.image_token_index, config.image_seq_length)
            for t in texts
        ]
        input_ids, mask = left_padded(rows, processor.tokenizer.pad_token_id)
        out = {"input_ids": input_ids.to(self._device), "attention_mask": mask.to(self._device)}
        if images:
            pixels = torch.stack([image_to_pixels(im, processor.image_processor, aspect) for im in images])
            out["pixel_values"] = pixels.to(self._device).to(self.model.dtype)
        return out

    def _generate_batch(self, batch: list[PreparedRequest], settings: GenerationSettings) -> list[str]:
        """Answers for one batch of prompts (same generation settings), in batch order."""
        images = [im for req in batch for im in req.images]
        inputs = self._encode([req.prompt for req in batch], images, settings.image_aspect_ratio)
        tokenizer = self.tokenizer
        kwargs: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": settings.do_sample,
            "num_beams": settings.num_beams,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
        if settings.do_sample:
            kwargs["temperature"] = settings.temperature
            if settings.top_p is not None:
                kwargs["top_p"] = settings.top_p
        if settings.until:
            kwargs["stop_strings"] = list(settings.until)
            kwargs["tokenizer"] = tokenizer
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [truncate_at_stop(t, settings.until).strip() for t in texts]

    # ------------------------------------------------------------------------------------------
    # lmms API
    # ------------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or task-configured) answers, one per request, in request order."""
        prepared: list[PreparedRequest] = []
        settings: list[GenerationSettings] = []
        args = [r.args for r in requests]
        shown = self._withhold([self._images(a[2](self._doc(a[4], a[5], a[3]))) for a in args])
        for (ctx, gen_kwargs, _, doc_id, task, split), images in zip(args, shown, strict=True):
            prepared.append(PreparedRequest(self._prompt(ctx, images), images, task, doc_id, split))
            settings.append(self.settings(gen_kwargs))
        keys = [json.dumps(s.__dict__, sort_keys=True) for s in settings]
        batches = batch_order(keys, [len(p.prompt) for p in prepared], self.batch_size)
        results: list[str | None] = [None] * len(requests)
        with make_progress(disable=self.rank != 0) as progress:
            bar = progress.add_task(f"{MODEL_ID} generate", total=len(requests), status="", unit="request")
            for indices in batches:
                answers = self._generate_batch([prepared[i] for i in indices], settings[indices[0]])
                if len(answers) != len(indices):
                    raise RuntimeError(f"{len(indices)} prompts gave {len(answers)} answers")
                for i, answer in zip(indices, answers, strict=True):
                    results[i] = answer
                    self.cache_hook.add_partial("generate_until", (prepared[i].prompt, keys[i]), answer)
                progress.update(bar, advance=len(indices))
        return results  # type: ignore[return-value]

    def _score(self, prompt: str, full: str, images: list[Image.Image]) -> tuple[float, bool]:
        inputs = self._encode([prompt, full], images + images, self.image_aspect_ratio)
        # Both rows are left-padded; the continuation is the tail of the full row beyond the prompt.
        mask = inputs["attention_mask"]
        n_prompt, n_full = int(mask[0].sum()), int(mask[1].sum())
        n_cont = n_full - n_prompt
        if n_cont <= 0:
            raise ValueError(f"empty continuation after the prompt {prompt[-40:]!r}")
        row = {k: v[1:] for k, v in inputs.items() if k != "pixel_values"}
        if "pixel_values" in inputs:
            row["pixel_values"] = inputs["pixel_values"][len(images) :]
        with torch.inference_mode():
            logits = self.model(**row).logits[0].float()
        ids = row["input_ids"][0]
        # Token t is predicted by the logits at t-1.
        logprobs = torch.log_softmax(logits[-n_cont - 1 : -1], dim=-1)
        target = ids[-n_cont:]
        score = float(logprobs.gather(1, target[:, None]).sum())
        greedy = bool((logprobs.argmax(-1) == target).all())
        return score, greedy

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """log P(continuation | prompt, images) summed over the continuation's tokens, and greedy-ness."""
        results: list[tuple[float, bool]] = []
        with make_progress(disable=self.rank != 0) as progress:
            bar = progress.add_task(
                f"{MODEL_ID} loglikelihood", total=len(requests), status="", unit="request"
            )
            args = [r.args for r in requests]
            shown = self._withhold([self._images(a[2](self._doc(a[4], a[5], a[3]))) for a in args])
            for (ctx, target, _, doc_id, task, split), images in zip(args, shown, strict=True):
                doc = self._doc(task, split, doc_id)
                continuation = target if isinstance(target, str) else target(doc)
                prompt = self._prompt(ctx, images)
                full = prompt + answer_separator(self.template) + str(continuation).lstrip()
                results.append(self._score(prompt, full, images))
                progress.update(bar, advance=1)
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Multi-round tasks: round 0 asks the task's question; each later round's question and
        images come from the task's ``doc_to_text(doc, previous_output=..., round_idx=...)`` until
        it signals the end. Rounds are separate prompts (the task carries the history it wants),
        as in lmms-eval's reference implementation; the answer is the list of round answers.
        """
        results: list[list[str]] = []
        args = [r.args for r in requests]
        shown = self._withhold([self._images(a[2](self._doc(a[5], a[6], a[4]))) for a in args])
        for (ctx, gen_kwargs, _, doc_to_text, doc_id, task, split), images in zip(args, shown, strict=True):
            doc = self._doc(task, split, doc_id)
            settings = self.settings(gen_kwargs)
            question, answers, info, round_idx = ctx, [], None, 0
            while True:
                if round_idx > 0:
                    visuals, question, terminal, _, info = doc_to_text(
                        doc, previous_output=list(answers), round_idx=round_idx, previous_round_info=info
                    )
                    if terminal:
                        break
                    if visuals is not None:  # a later round's own images: withheld by blank
                        images = self._images(visuals)
                        if self.blind != "off":
                            colour = mean_colour(self.processor.image_processor)
                            images = [blank_like(im, colour) for im in images]
                prepared = PreparedRequest(self._prompt(question, images), images, task, doc_id, split)
                answers.append(self._generate_batch([prepared], settings)[0])
                round_idx += 1
            results.append(answers)
        return results


__all__ = [
    "LLM2CLIPLlava",
    "MODEL_ID",
    "GenerationSettings",
    "PreparedRequest",
    "batch_order",
    "truncate_at_stop",
]
