"""lmms-eval integration: our model through the REAL harness on local copies of the three tasks.

- A scripted model (the real ``llm2clip_llava`` class with its generate step replaced by known
  answers) is scored by lmms-eval's own MME / ScienceQA / VizWiz functions; every metric must equal
  the value computed here by hand, so a plumbing error cannot pass as a low score.
- The tiny random LlavaForConditionalGeneration runs through the harness and the CLI.
- Entry-point resolution, batching order, clean(), log-likelihood, multi-round.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lmms_eval")

import torch  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402
from PIL import Image  # noqa: E402

from llm2clip_vlm.evaluation.lmms_model import (  # noqa: E402
    GenerationSettings,
    LLM2CLIPLlava,
    PreparedRequest,
    batch_order,
    truncate_at_stop,
)
from llm2clip_vlm.evaluation.local_tasks import write_local_tasks  # noqa: E402
from llm2clip_vlm.evaluation.prompt import VICUNA_SYSTEM  # noqa: E402
from llm2clip_vlm.evaluation.synthetic_tasks import write_eval_data  # noqa: E402
from llm2clip_vlm.evaluation.tiny import save_tiny_llava  # noqa: E402
from llm2clip_vlm.llava.data import expand_to_square  # noqa: E402

TASKS = ["mme", "scienceqa_img", "vizwiz_vqa_val"]
SPLITS = {"mme": "test", "scienceqa_img": "test", "vizwiz_vqa_val": "val"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_world")
    write_eval_data(root / "data", seed=1, mme_images_per_category=4, scienceqa=24, vizwiz=24)
    write_eval_data(root / "small", seed=2, mme_images_per_category=1, scienceqa=4, vizwiz=4)
    return {"data": root / "data", "small": root / "small", "model": save_tiny_llava(root / "tiny", seed=0)}


def _docs(data_dir: Path, task: str) -> list[dict[str, Any]]:
    from datasets import load_dataset

    split = SPLITS[task]
    return list(load_dataset("parquet", data_files={split: str(data_dir / f"{task}.parquet")})[split])


def _task_manager(data_dir: Path, out: Path) -> tuple[Any, dict[str, str]]:
    from lmms_eval.tasks import TaskManager

    names = write_local_tasks(data_dir, out, TASKS)
    return TaskManager("WARNING", include_path=str(out), include_defaults=False), names


class ScriptedLlava(LLM2CLIPLlava):
    """The real model class; only the generate step answers from a script keyed by (task, doc_id)."""

    def __init__(self, answers: dict[tuple[str, int], str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.answers = answers
        self.calls: list[tuple[list[PreparedRequest], GenerationSettings]] = []

    def _generate_batch(self, batch: list[PreparedRequest], settings: GenerationSettings) -> list[str]:
        self.calls.append((batch, settings))
        return [self.answers[(r.task, r.doc_id)] for r in batch]


# ----------------------------------------------------------------------------------------------
# Hand-computed expectations
# ----------------------------------------------------------------------------------------------
def _vqa_accuracy(k: int) -> float:
    """VQA accuracy of an answer given by k of 10 annotators (closed form of the leave-one-out mean)."""
    return (k * min(1.0, (k - 1) / 3) + (10 - k) * min(1.0, k / 3)) / 10


def _script(data_dir: Path, names: dict[str, str]) -> tuple[dict[tuple[str, int], str], dict[str, float]]:
    answers: dict[tuple[str, int], str] = {}
    mme = _docs(data_dir, "mme")
    # Per image (pair), by its index k within its category: k=0 both right (acc 100 + acc+ 100),
    # k=1 first right only (50 + 0), k=2 both wrong (0), k=3 neither yes nor no (0).
    per_category_images: dict[str, int] = {}
    for j in range(0, len(mme), 2):
        k = per_category_images.get(mme[j]["category"], 0)
        per_category_images[mme[j]["category"]] = k + 1
        for offset in (0, 1):
            truth = mme[j + offset]["answer"]
            flip = "No" if truth == "Yes" else "Yes"
            answer = {0: f"{truth}.", 1: truth if offset == 0 else flip.lower(), 2: flip, 3: "Maybe"}[k % 4]
            answers[(names["mme"], j + offset)] = answer
    assert set(per_category_images.values()) == {4}
    per_category = (200 + 50 + 0 + 0) / 4  # 62.5
    expected = {"mme_perception": 4 * per_category, "mme_cognition": 1 * per_category}

    sqa = _docs(data_dir, "scienceqa_img")
    right = 0
    for j, doc in enumerate(sqa):
        letter = "ABCD"[doc["answer"]]
        wrong = "ABCD"[(doc["answer"] + 1) % len(doc["choices"])]
        answers[(names["scienceqa_img"], j)] = [letter, f"{letter}. {doc['choices'][doc['answer']]}", wrong][
            j % 3
        ]
        right += j % 3 != 2
    expected["sqa"] = right / len(sqa)

    viz = _docs(data_dir, "vizwiz_vqa_val")
    accs = []
    for j, doc in enumerate(viz):
        counts: dict[str, int] = {}
        for a in doc["answers"]:
            counts[a] = counts.get(a, 0) + 1
        majority = max(counts, key=counts.get)
        minority = min(counts, key=counts.get)
        choice = [majority, minority, "purple elephant"][j % 3]
        answers[(names["vizwiz_vqa_val"], j)] = choice.capitalize()  # the metric lower-cases
        accs.append(_vqa_accuracy(counts.get(choice, 0)))
    expected["vizwiz"] = sum(accs) / len(accs)
    assert 0 < expected["vizwiz"] < 1  # the planned annotator disagreement shows
    return answers, expected


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------
def test_entry_point_resolves_our_model() -> None:
    from importlib.metadata import entry_points

    from lmms_eval.models import get_model, get_model_manifest

    assert "llm2clip_llava" in {ep.name for ep in entry_points(group="lmms_eval.models")}
    assert get_model("llm2clip_llava") is LLM2CLIPLlava
    assert get_model_manifest("llm2clip_llava").simple_class_path.endswith("lmms_model.LLM2CLIPLlava")


def test_scripted_answers_give_exact_metrics(world: dict[str, Path], tmp_path: Path) -> None:
    from lmms_eval.evaluator import simple_evaluate

    manager, names = _task_manager(world["data"], tmp_path / "tasks")
    answers, expected = _script(world["data"], names)
    model = ScriptedLlava(answers, pretrained=str(world["model"]), device="cpu", batch_size=5)
    out = simple_evaluate(model=model, tasks=list(names.values()), task_manager=manager, verbosity="WARNING")
    res = out["results"]
    assert res["mme_local"]["mme_perception_score,none"] == pytest.approx(
        expected["mme_perception"], abs=1e-9
    )
    assert res["mme_local"]["mme_perception_score,none"] == pytest.approx(250.0)
    assert res["mme_local"]["mme_cognition_score,none"] == pytest.approx(expected["mme_cognition"], abs=1e-9)
    assert res["scienceqa_img_local"]["exact_match,none"] == pytest.approx(expected["sqa"], abs=1e-12)
    assert res["vizwiz_vqa_val_local"]["exact_match,none"] == pytest.approx(expected["vizwiz"], abs=1e-12)

    # The model saw LLaVA-1.5's prompt, one image per question, and the tasks' generation settings.
    seen = {(r.task, r.doc_id): (r, s) for batch, s in model.calls for r in batch}
    assert len(seen) == len(answers)
    doc0 = _docs(world["data"], "mme")[0]
    req, settings = seen[("mme_local", 0)]
    question = doc0["question"].replace(" Please answer yes or no.", "")
    post = "\nAnswer the question using a single word or phrase."
    assert req.prompt == f"{VICUNA_SYSTEM} USER: <image>\n{question}{post} ASSISTANT:"
    assert len(req.images) == 1 and req.images[0].size == (64, 64)
    assert settings.max_new_tokens == 16 and not settings.do_sample
    _, viz_settings = seen[("vizwiz_vqa_val_local", 0)]
    assert viz_settings.until == ("ASSISTANT:",) and viz_settings.max_new_tokens == 128
    assert all(len(batch) <= 5 for batch, _ in model.calls)


def test_tiny_llava_through_harness(world: dict[str, Path], tmp_path: Path) -> None:
    from lmms_eval.evaluator import simple_evaluate

    manager, names = _task_manager(world["small"], tmp_path / "tasks")
    out = simple_evaluate(
        model="llm2clip_llava",
        model_args=f"pretrained={world['model']},device=cpu,max_new_tokens=6",
        tasks=list(names.values()),
        batch_size=4,
        task_manager=manager,
        log_samples=True,
        verbosity="WARNING",
    )
    res = out["results"]
    assert 0 <= res["mme_local"]["mme_perception_score,none"] <= 800  # 4 perception categories
    assert 0 <= res["mme_local"]["mme_cognition_score,none"] <= 200
    assert 0 <= res["scienceqa_img_local"]["exact_match,none"] <= 1
    assert 0 <= res["vizwiz_vqa_val_local"]["exact_match,none"] <= 1
    responses = [s["resps"][0][0] for s in out["samples"]["vizwiz_vqa_val_local"]]
    assert len(responses) == 4 and all(isinstance(r, str) for r in responses)


def _instances(texts: list[str], gens: list[dict[str, Any]]) -> list[Instance]:
    visual = lambda doc: [doc["image"]]  # noqa: E731
    return [
        Instance(
            "generate_until",
            (t, g, visual, i, "t", "test"),
            idx=0,
            metadata={"task": "t", "doc_id": i, "repeats": 1},
        )
        for i, (t, g) in enumerate(zip(texts, gens, strict=True))
    ]


def test_batching_returns_request_order(world: dict[str, Path]) -> None:
    assert batch_order(["a", "b", "a", "a", "b"], [1, 5, 3, 2, 9], 2) == [[2, 3], [0], [4, 1]]
    texts = [f"q{i}" + "x" * ((7 * i) % 11) for i in range(9)]
    gens = [{"max_new_tokens": 4 if i % 3 else 8} for i in range(9)]
    answers = {("t", i): f"answer {i}" for i in range(9)}
    model = ScriptedLlava(answers, pretrained=str(world["model"]), device="cpu", batch_size=2)
    model.task_dict = {"t": {"test": [{"image": Image.new("RGB", (8, 4))} for _ in range(9)]}}
    assert model.generate_until(_instances(texts, gens)) == [f"answer {i}" for i in range(9)]
    for batch, settings in model.calls:
        assert len(batch) <= 2
        assert {gens[r.doc_id]["max_new_tokens"] for r in batch} == {settings.max_new_tokens}
        lengths = [len(r.prompt) for r in batch]
        assert lengths == sorted(lengths, reverse=True)


def test_real_batches_match_single_requests(world: dict[str, Path]) -> None:
    """Left padding done right: a batched answer equals the same request answered alone."""
    model = LLM2CLIPLlava(str(world["model"]), device="cpu", batch_size=3)
    docs = [{"image": Image.new("RGB", (40 + 8 * i, 32), (30 * i, 90, 200))} for i in range(3)]
    model.task_dict = {"t": {"test": docs}}
    texts = ["what?", "what colour is the big shape at the left?", "count"]
    gens = [{"max_new_tokens": 5, "until": ["\n"]} for _ in texts]
    batched = model.generate_until(_instances(texts, gens))
    model.batch_size_per_gpu = 1
    single = model.generate_until(_instances(texts, gens))
    assert batched == single


def test_clean_then_reuse(world: dict[str, Path]) -> None:
    model = LLM2CLIPLlava(str(world["model"]), device="cpu")
    model.task_dict = {"t": {"test": [{"image": Image.new("RGB", (32, 32))}]}}
    req = _instances(["hi"], [{"max_new_tokens": 3}])
    first = model.generate_until(req)
    model.clean()  # lmms-eval deletes every nn.Module attribute
    assert "_model" not in vars(model)
    assert model.generate_until(req) == first


def test_loglikelihood_matches_direct_computation(world: dict[str, Path]) -> None:
    model = LLM2CLIPLlava(str(world["model"]), device="cpu", image_aspect_ratio="original")
    image = Image.new("RGB", (32, 32), (10, 200, 30))
    model.task_dict = {"t": {"test": [{"image": image}]}}
    visual = lambda doc: [doc["image"]]  # noqa: E731
    req = Instance("loglikelihood", ("Is it green?", "Yes", visual, 0, "t", "test"), idx=0,
                   metadata={"task": "t", "doc_id": 0, "repeats": 1})  # fmt: skip
    ((score, greedy),) = model.loglikelihood([req])
    prompt = f"{VICUNA_SYSTEM} USER: <image>\nIs it green? ASSISTANT:"
    proc = model.processor
    full = proc(text=[prompt + " Yes"], images=[image], return_tensors="pt")
    n_prompt = proc(text=[prompt], images=[image], return_tensors="pt")["input_ids"].shape[1]
    with torch.no_grad():
        logits = model.model(**full).logits[0]
    ids = full["input_ids"][0]
    logp = torch.log_softmax(logits.float(), -1)
    manual = sum(float(logp[t - 1, ids[t]]) for t in range(n_prompt, len(ids)))
    assert score == pytest.approx(manual, abs=1e-4) and score < 0
    argmax = all(int(logp[t - 1].argmax()) == int(ids[t]) for t in range(n_prompt, len(ids)))
    assert greedy == argmax


def test_multi_round(world: dict[str, Path]) -> None:
    model = ScriptedLlava({}, pretrained=str(world["model"]), device="cpu")
    replies = iter(["first", "second"])
    model._generate_batch = lambda batch, s: [next(replies)]  # type: ignore[method-assign]
    model.task_dict = {"t": {"test": [{"image": Image.new("RGB", (8, 8))}]}}
    asked = []

    def doc_to_text(doc: dict, previous_output: list, round_idx: int, previous_round_info: Any) -> tuple:
        asked.append((round_idx, list(previous_output)))
        if round_idx == 2:
            return None, None, True, previous_output, None
        return None, f"follow-up {round_idx}", False, previous_output, None

    req = Instance("generate_until_multi_round", ("start", {"max_new_tokens": 3}, lambda d: [d["image"]], doc_to_text, 0, "t", "test"),
                   idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1})  # fmt: skip
    assert model.generate_until_multi_round([req]) == [["first", "second"]]
    assert asked == [(1, ["first"]), (2, ["first", "second"])]


def test_blind_option_withholds_each_requests_image(world: dict[str, Path]) -> None:
    """blind=shuffle: every request gets another request's image (requests sharing an image get the
    same foreign one, as MME's two questions per image); blind=blank: a mean-colour image."""
    colours = [(200, 0, 0), (200, 0, 0), (0, 200, 0), (0, 0, 200), (90, 90, 0), (0, 90, 90)]
    docs = [
        {"image": Image.new("RGB", (16 + max(i, 1), 12), c)} for i, c in enumerate(colours)
    ]  # 0, 1: one image
    texts = [f"q{i}" for i in range(6)]
    gens = [{"max_new_tokens": 2}] * 6
    answers = {("t", i): "a" for i in range(6)}

    def shown(**kwargs: Any) -> dict[int, Image.Image]:
        model = ScriptedLlava(answers, pretrained=str(world["model"]), device="cpu", batch_size=4, **kwargs)
        model.task_dict = {"t": {"test": docs}}
        model.generate_until(_instances(texts, gens))
        seen = {r.doc_id: r for batch, _ in model.calls for r in batch}
        assert all(r.prompt.count("<image>") == 1 for r in seen.values())
        return {i: r.images[0] for i, r in seen.items()}

    own = shown()
    assert all(own[i].tobytes() == docs[i]["image"].convert("RGB").tobytes() for i in range(6))
    moved = shown(blind="shuffle", blind_seed=3)
    assert all(moved[i].getpixel((0, 0)) != colours[i] for i in range(6))
    assert moved[0].tobytes() == moved[1].tobytes()  # one image, one foreign image
    assert shown(blind="shuffle", blind_seed=3)[2].tobytes() == moved[2].tobytes()  # seeded
    blank = shown(blind="blank")
    mean = tuple(int(255 * m) for m in (0.48145466, 0.4578275, 0.40821073))
    assert all(blank[i].size == docs[i]["image"].size and blank[i].getpixel((3, 3)) == mean for i in range(6))
    with pytest.raises(ValueError, match="blind must be one of shuffle, blank, off"):
        LLM2CLIPLlava(str(world["model"]), blind="yes")
    # Every request shows one image (an MME pair under --limit 2): shuffle falls back to blank.
    docs[:] = [{"image": docs[0]["image"]} for _ in range(6)]
    alone = shown(blind="shuffle")
    assert all(alone[i].getpixel((3, 3)) == mean for i in range(6))
    from typer.testing import CliRunner

    from llm2clip_vlm.cli import app

    bad = CliRunner().invoke(app, ["eval", str(world["model"]), "--blind", "yes"])
    assert bad.exit_code == 2 and "--blind must be shuffle, blank or off" in bad.output


def test_helpers_and_bad_arguments(world: dict[str, Path], tmp_path: Path) -> None:
    square = expand_to_square(Image.new("RGB", (4, 2), (255, 0, 0)), (122, 116, 104))
    assert square.size == (4, 4)
    assert square.getpixel((0, 0)) == (122, 116, 104) and square.getpixel((0, 1)) == (255, 0, 0)
    assert truncate_at_stop("yes ASSISTANT: no", ["ASSISTANT:", "\n"]) == "yes "
    with pytest.raises(TypeError, match="unknown model_args \\['temperature'\\]"):
        LLM2CLIPLlava(str(world["model"]), temperature=1)
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        LLM2CLIPLlava(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no data for task 'mme'"):
        write_local_tasks(tmp_path, tmp_path / "tasks", ["mme"])
    with pytest.raises(ValueError, match="no local copy"):
        write_local_tasks(world["data"], tmp_path / "tasks", ["gqa"])


@pytest.mark.slow
def test_cli_eval_on_tiny_model(world: dict[str, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from llm2clip_vlm.cli import app

    out = tmp_path / "run"
    args = ["eval", str(world["model"]), "--data-dir", str(world["small"]), "--limit", "1", "-o", str(out),
            "--batch-size", "2", "--device", "cpu", "--model-args", "max_new_tokens=4", "--blind", "shuffle"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "MME perception" in result.output and "1505.8" in result.output
    summary = json.loads((out / "summary.json").read_text())
    metrics = summary["rows"]["tiny"]
    # --blind: the same model again with blind=shuffle, its own row and lmms-eval files.
    assert (
        set(summary["rows"]["tiny-blind"]) == set(metrics)
        and "| tiny-blind |" in (out / "comparison.md").read_text()
    )
    blind_config = json.loads(Path(summary["files"]["tiny-blind"]).read_text())["config"]["model_args"]
    assert "blind=shuffle" in blind_config and "max_new_tokens=4" in blind_config
    assert set(metrics) == {"MME perception", "SQA-IMG", "VizWiz"}  # limit 1 -> 2: one perception pair
    results_file = Path(summary["files"]["tiny"])
    lmms_results = json.loads(results_file.read_text())
    assert set(lmms_results["results"]) == {"mme_local", "scienceqa_img_local", "vizwiz_vqa_val_local"}
    assert (out / "tasks" / "mme_local.yaml").is_file()
    table = (out / "comparison.md").read_text()
    assert "| tiny |" in table and "test-dev" in table

    # --compare renders earlier results without running anything.
    again = CliRunner().invoke(app, ["eval", "--compare", str(results_file), "-o", str(tmp_path / "cmp")])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "cmp" / "summary.json").read_text())["rows"]["tiny"] == metrics
    missing = CliRunner().invoke(
        app, ["eval", str(world["model"]), "--data-dir", str(tmp_path / "none"), "-o", str(out)]
    )
    assert missing.exit_code == 2 and "no data for task 'mme'" in " ".join(missing.output.split())


def test_standard_tasks_need_the_hub(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llm2clip_vlm.evaluation.run import EvalOptions, EvalSetupError, run_eval

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EvalSetupError, match="hub is not reachable.*--data-dir demo"):
        run_eval([world["model"]], EvalOptions(), tmp_path)
    with pytest.raises(EvalSetupError, match="not a model directory"):
        run_eval([tmp_path], EvalOptions(data_dir=str(world["small"])), tmp_path)


# lmms-eval moved its image data sets from lmms-lab/* to lmms-lab-encoder/* after v0.7.2
# (EvolvingLMMs-Lab/lmms-eval PR #1416, "chore: migrate dataset paths to new orgs").
def test_dataset_org_per_task(tmp_path: Path) -> None:
    import yaml
    from lmms_eval.tasks import TaskManager

    from llm2clip_vlm.evaluation.local_tasks import (
        TASKS as SOURCES,
    )
    from llm2clip_vlm.evaluation.local_tasks import (
        builtin_task_config,
        parse_dataset_orgs,
        write_hub_tasks,
    )

    assert parse_dataset_orgs("lmms-lab", TASKS) == dict.fromkeys(TASKS, "lmms-lab")
    assert parse_dataset_orgs("mme=lmms-lab, vizwiz_vqa_val=lmms-lab-encoder", TASKS) == {
        "mme": "lmms-lab", "vizwiz_vqa_val": "lmms-lab-encoder"}  # fmt: skip
    assert parse_dataset_orgs("", TASKS) == {}
    with pytest.raises(ValueError, match="'lmms-lab-encodr' is not one of"):
        parse_dataset_orgs("lmms-lab-encodr", TASKS)
    with pytest.raises(ValueError, match="unknown task 'gqa'"):
        parse_dataset_orgs("gqa=lmms-lab", TASKS)

    for org in ("lmms-lab", "lmms-lab-encoder"):
        out = tmp_path / org
        names = write_hub_tasks(out, TASKS, {t: org for t in TASKS if t != "vizwiz_vqa_val"})
        assert names == {t: t for t in TASKS}  # lmms-eval's own task names
        for task in TASKS:
            builtin = builtin_task_config(SOURCES[task])
            text = (out / f"{task}.yaml").read_text()
            ours = yaml.safe_load("\n".join(line.replace("!function ", "") for line in text.splitlines()))
            repo = builtin["dataset_path"].split("/", 1)[1]  # MME, ScienceQA, VizWiz-VQA
            want = org if task != "vizwiz_vqa_val" else builtin["dataset_path"].split("/")[0]
            assert ours["dataset_path"] == f"{want}/{repo}"
            # Everything else is lmms-eval's: name, split, subset, prompts, metrics.
            assert ours["task"] == task and ours["test_split"] == builtin["test_split"]
            assert ours.get("dataset_name") == builtin.get("dataset_name")
            assert ours["metric_list"] == builtin["metric_list"]
            assert str(ours["process_results"]).startswith(f"lmms_eval.tasks.{SOURCES[task].task_dir}.utils.")
        manager = TaskManager("WARNING", include_path=str(out), include_defaults=False)
        assert set(TASKS) <= set(manager.all_tasks) and not any(
            t.endswith("_local") for t in manager.all_tasks
        )
    assert "ScienceQA-IMG" in (tmp_path / "lmms-lab" / "scienceqa_img.yaml").read_text()


def test_local_copies_keep_lmms_evals_metrics(world: dict[str, Path], tmp_path: Path) -> None:
    import yaml

    from llm2clip_vlm.evaluation.local_tasks import TASKS as SOURCES
    from llm2clip_vlm.evaluation.local_tasks import builtin_task_config

    names = write_local_tasks(world["small"], tmp_path, TASKS)
    for task, name in names.items():
        text = (tmp_path / f"{name}.yaml").read_text()
        ours = yaml.safe_load("\n".join(line.replace("!function ", "") for line in text.splitlines()))
        builtin = builtin_task_config(SOURCES[task])
        assert ours["metric_list"] == builtin["metric_list"] and ours["dataset_path"] == "parquet"
        assert ours["process_results"] == str(builtin["process_results"])
        assert ours["dataset_kwargs"]["data_files"][SOURCES[task].split].endswith(f"{task}.parquet")


def test_cli_dataset_org_errors(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from llm2clip_vlm.cli import app

    bad = CliRunner().invoke(app, ["eval", str(world["model"]), "--dataset-org", "lmms", "-o", str(tmp_path)])
    assert bad.exit_code == 2 and "'lmms' is not one of lmms-lab, lmms-lab-encoder" in " ".join(
        bad.output.split()
    )
    both = CliRunner().invoke(app, ["eval", str(world["model"]), "--dataset-org", "lmms-lab",
                                    "--data-dir", str(world["small"]), "-o", str(tmp_path)])  # fmt: skip
    assert both.exit_code == 2 and "cannot be combined with --data-dir" in " ".join(both.output.split())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = CliRunner().invoke(
        app, ["eval", str(world["model"]), "--dataset-org", "lmms-lab", "-o", str(tmp_path)]
    )
    assert offline.exit_code == 2 and "hub is not reachable" in " ".join(offline.output.split())
