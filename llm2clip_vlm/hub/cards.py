"""Model cards in the hub's format: YAML metadata (with a ``model-index``) + a readable body.

The metadata is built with ``huggingface_hub``'s ``ModelCardData`` / ``EvalResult``, so it is the
exact structure the hub parses: ``base_model``, ``datasets``, ``license``, ``pipeline_tag``,
``tags``, and ``model-index`` holding the metrics this run measured (retrieval R@k for a tower,
held-out accuracy for a LLaVA model).
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from llm2clip_vlm.hub.config import HubConfig
from llm2clip_vlm.llava.config import LlavaConfig
from llm2clip_vlm.llava.templates import get_template

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
R_KEYS = (("i2t_r1", "I2T R@1"), ("i2t_r5", "I2T R@5"), ("i2t_r10", "I2T R@10"),
          ("t2i_r1", "T2I R@1"), ("t2i_r5", "T2I R@5"), ("t2i_r10", "T2I R@10"))  # fmt: skip


def is_hub_id(name: str) -> bool:
    """``owner/name`` that is not a local path (a card may only name hub repositories)."""
    return bool(name) and bool(HUB_ID.match(name)) and not Path(name).exists()


def _hub_ids(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(n for n in names if is_hub_id(n)))


def _metadata(
    hub: HubConfig, base_models: list[str], datasets: list[str], pipeline_tag: str, tags: list[str], name: str,
    results: list[Any],
) -> str:  # fmt: skip
    from huggingface_hub import ModelCardData

    bases = list(hub.base_model) or _hub_ids(base_models)
    data = ModelCardData(
        # One base model is written as a string, as the hub's own cards do.
        base_model=(bases[0] if len(bases) == 1 else bases) or None,
        datasets=list(hub.datasets) or _hub_ids(datasets) or None,
        license=hub.license or None,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=list(dict.fromkeys([*tags, *hub.tags])),
        model_name=name,
        eval_results=results or None,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def _invocation() -> str:
    """The command line of this process, as the user typed it (``llm2clip-vlm ...``)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("llm2clip-vlm", "cli.py", "__main__.py"):
        argv[0] = "llm2clip-vlm"
    return shlex.join(argv)


# --------------------------------------------------------------------------------------------
# Tower
# --------------------------------------------------------------------------------------------
def tower_card(p: dict[str, Any], hub: HubConfig, datasets: Sequence[str]) -> str:
    """``README.md`` of an exported tower from its provenance (see ``vision.export``).

    Args:
        p: the tower's provenance (``llm2clip_provenance.json``).
        hub: the card's metadata settings.
        datasets: the data sets it was trained and evaluated on (those that are hub ids are named).
    """
    from huggingface_hub import EvalResult

    s2 = p["stage2"]
    name = f"llm2clip-{p['backbone']['kind']}-tower"
    results = [
        EvalResult(
            task_type="zero-shot-retrieval",
            task_name="Zero-shot image-text retrieval",
            dataset_type=set_name if is_hub_id(set_name) else "held-out",
            dataset_name=f"{set_name} (held-out)",
            metric_type=key,
            metric_name=label,
            metric_value=round(float(m[key]), 2),
        )  # fmt: skip
        for set_name, m in p["retrieval"].items()
        for key, label in R_KEYS
        if key in m
    ]
    meta = _metadata(
        hub, [p["backbone"]["init"]], list(datasets),
        "image-feature-extraction", ["llm2clip", "clip", "vision-tower", "llava"], name, results,
    )  # fmt: skip
    lines = [
        f"# LLM2CLIP vision tower ({p['backbone']['kind']})",
        "",
        "The vision encoder of an LLM2CLIP stage-2 run (arXiv 2411.04997): a CLIP-style ViT whose",
        "features were aligned to a frozen LLM caption embedder (stage 1). Saved in the backbone's own",
        "transformers format:",
        "",
        "```python",
        "from transformers import AutoImageProcessor, AutoModel",
        "tower = AutoModel.from_pretrained(PATH)            # e.g. CLIPVisionModel",
        "processor = AutoImageProcessor.from_pretrained(PATH)",
        "```",
        "",
        "LLaVA-1.5 uses it as `--vision_tower PATH` (patch features of layer -2);",
        "`llm2clip-vlm llava-pretrain --tower PATH` trains a LLaVA model on it.",
        "",
        "## Provenance",
        "",
        f"- backbone: `{p['backbone']['kind']}` initialised from `{p['backbone']['init']}`; weights in {p['dtype']}",
        f"- caption encoder: `{p['caption_encoder']['path'] or '-'}` (identity `{p['caption_encoder']['identity'][:16] or '-'}`, dim {p['caption_encoder']['dim']})",
        f"- training data: {p['data']['train']}",
        f"- stage 2: {p['train'].get('steps', '?')} steps, global batch {s2['batch_size']}, lr {s2['lr']} "
        f"(head {s2['head_lr'] or s2['lr']}), layer decay {s2['layer_decay']}, loss {s2['loss']}, "
        f"long-caption ratio {s2['long_caption_ratio']}, {(s2.get('loop') or s2).get('precision', '?')}",
        f"- run: `{p['run_dir']}` (full config in its `config.yaml`, also in `llm2clip_provenance.json`)",
        "",
        "## Zero-shot retrieval on held-out sets (percent)",
        "",
        "| set | images | captions | I2T R@1 | I2T R@5 | I2T R@10 | T2I R@1 | T2I R@5 | T2I R@10 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for when, results_ in (("before", p["retrieval_before"]), ("after", p["retrieval"])):
        for set_name, m in results_.items():
            lines.append(
                f"| {set_name} ({when} stage 2) | {m['n_images']} | {m['n_captions']} | {m['i2t_r1']:.1f} | "
                f"{m['i2t_r5']:.1f} | {m['i2t_r10']:.1f} | {m['t2i_r1']:.1f} | {m['t2i_r5']:.1f} | {m['t2i_r10']:.1f} |"
            )
    lines.append("")
    return meta + "\n".join(lines)


# --------------------------------------------------------------------------------------------
# LLaVA
# --------------------------------------------------------------------------------------------
def llava_card(
    llava: LlavaConfig, hub: HubConfig, phase: str, metrics: dict[str, Any], run_dir: Path, init: Path | None,
    data_file: Path, heldout_file: Path | None,
) -> str:  # fmt: skip
    """``README.md`` of a LLaVA model directory (``RUN/model``) after ``llava-pretrain``/``-finetune``.

    Args:
        llava: the run's LLaVA section (the phase's settings, the LLM and the tower).
        hub: the card's metadata settings.
    """
    import json

    from huggingface_hub import EvalResult

    p = getattr(llava, phase)
    tower = llava.tower.removeprefix("llm2clip:")
    provenance_file = Path(tower) / "llm2clip_provenance.json"
    tower_info = json.loads(provenance_file.read_text()) if provenance_file.is_file() else {}
    after, before = metrics["eval"].get("after") or {}, metrics["eval"].get("before") or {}
    held_name = heldout_file.name if heldout_file else "held-out"
    results = []
    if after:
        results.append(("accuracy", "held-out accuracy", after["accuracy"]))
        results += [
            (f"accuracy_{t}", f"accuracy ({t})", v["accuracy"]) for t, v in after.get("per_type", {}).items()
        ]
    eval_results = [
        EvalResult(
            task_type="visual-question-answering",
            task_name="Held-out visual questions",
            dataset_type="held-out",
            dataset_name=held_name,
            metric_type=key,
            metric_name=label,
            metric_value=round(float(value), 2),
        )  # fmt: skip
        for key, label, value in results
    ]
    name = f"llava-1.5-llm2clip-{phase}"
    meta = _metadata(
        hub, [llava.llm, llava.tower], [p.data.path],
        "image-text-to-text", ["llava", "llava-1.5", "llm2clip", "vision-language"], name, eval_results,
    )  # fmt: skip
    rerun = ["llm2clip-vlm", f"llava-{phase}", str(run_dir / "config.yaml"), "--output", str(run_dir)]
    if init is not None:
        rerun += ["--from", str(init)]
    config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    # A template saved as the processor's chat template: apply_chat_template builds its prompt.
    chat = get_template(p.template).processor_chat_template is not None
    lines = [
        f"# LLaVA-1.5 on an LLM2CLIP vision tower ({phase})",
        "",
        "transformers' `LlavaForConditionalGeneration`: the LLM2CLIP tower (frozen, features of layer "
        f"{llava.vision_feature_layer}, patch tokens), an `mlp2x_gelu` projector and the LLM.",
        "",
        "## What it is made of",
        "",
        f"- base LLM: `{llava.llm}`",
        f"- vision tower: `{llava.tower}`"
        + (f" ({tower_info['backbone']['kind']} from `{tower_info['backbone']['init']}`, LLM2CLIP stage 2)" if tower_info else ""),
        f"- phase: {phase}, tuning `{p.tune}`, template `{p.template}`, {metrics['train']['steps']} steps of "
        f"{p.batch_size}, lr {p.lr}, {p.loop.precision}",
        f"- training data: `{p.data.path or 'the synthetic demo world'}` ({metrics['details']['records']} records; `{data_file.name}`)",
        f"- projector initialised from: `{init}`" if init is not None else "- projector initialised at random",
        "",
        "## Held-out accuracy (percent)",
        "",
    ]  # fmt: skip
    if after:
        # Blind: the same questions with the image withheld (another question's image); majority:
        # always the type's most frequent held-out answer. A model that looks beats both.
        nan = float("nan")
        lines += [
            "| question type | before | after | after, blind | majority answer | questions |",
            "|---|---|---|---|---|---|",
        ]
        rows = [("all", before, after), *((t, before.get("per_type", {}).get(t, {}), v)
                                          for t, v in after.get("per_type", {}).items())]  # fmt: skip
        for t, b, v in rows:
            # llava.<phase>.eval_before=false skips the pass before training: say so, not "nan"
            was = f"{b['accuracy']:.1f}" if "accuracy" in b else "not measured"
            lines.append(
                f"| {t} | {was} | {v['accuracy']:.1f} "
                f"| {v.get('blind_accuracy', nan):.1f} "
                f"| {v.get('majority_accuracy', nan):.1f} | {v.get('n', '?')} |"
            )
    else:
        lines.append("No held-out questions were evaluated in this run.")
    lines += [
        "",
        "## Load it",
        "",
        "With plain transformers:",
        "",
        "```python",
        "import torch",
        "from PIL import Image",
        "from transformers import AutoProcessor, LlavaForConditionalGeneration",
        "",
        "model = LlavaForConditionalGeneration.from_pretrained(PATH, dtype=torch.bfloat16)",
        "processor = AutoProcessor.from_pretrained(PATH)",
    ]
    if chat:
        lines += [
            'messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]',
            "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)  # vicuna_v1, as trained",
        ]
    else:
        lines.append('prompt = "<image>\\n"  # the "plain" template of projector pretraining: it captions')
    lines += [
        'inputs = processor(images=Image.open("photo.jpg"), text=prompt, return_tensors="pt").to(model.device, torch.bfloat16)',
        "out = model.generate(**inputs, max_new_tokens=64)",
        'print(processor.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        "With LLaVA (haotian-liu/LLaVA): the projector is also saved under LLaVA's names in the run",
        f"directory (`{run_dir / 'mm_projector.bin'}`); pass it as `--pretrain_mm_mlp_adapter` with",
        f"`--vision_tower {tower}` (see `adapters/llava/README.md` of llm2clip-vlm). Evaluate with",
        "lmms-eval: `llm2clip-vlm eval PATH`.",
        "",
        "## How it was made",
        "",
        "```bash",
        f"# as invoked: {_invocation()}",
        "# to rerun from the resolved config:",
        shlex.join(rerun),
        "```",
        "",
    ]  # fmt: skip
    if config_text:
        lines += [
            "<details><summary>Resolved config (config.yaml)</summary>",
            "",
            "```yaml",
            config_text.rstrip(),
            "```",
            "",
            "</details>",
            "",
        ]
    return meta + "\n".join(lines)
