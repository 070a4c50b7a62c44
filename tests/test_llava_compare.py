"""``llava-compare``: the same tiny LLaVA trained on two tiny towers, their held-out tables side by
side; the table's numbers are each run's ``metrics.json``; finished towers are skipped on a rerun,
an unfinished phase is resumed, a changed config is refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from llm2clip_vlm import llava_compare
from llm2clip_vlm.cli import app, resolve_config
from llm2clip_vlm.data.synthetic_llava import write_llava_demo
from llm2clip_vlm.errors import RunDirError
from llm2clip_vlm.llava_compare import TowerSpecError, parse_towers, run_compare
from llm2clip_vlm.recipe import RunConfig
from llm2clip_vlm.reports.compare import NoHeldoutError, TowerRun, build_comparison, table_rows, to_markdown
from llm2clip_vlm.text.tiny import save_tiny_llm
from llm2clip_vlm.tower.synthetic import TowerShape, save_random_tower


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llava_compare")
    data = root / "data"
    write_llava_demo(data, pretrain_images=16, instruct_images=16, heldout_images=6, image_size=32)
    shape = TowerShape(32, 8, 32, 3, 2, 64)
    return {
        "root": root,
        "a": save_random_tower(root / "tower-a", "clip", shape, seed=1),
        "b": save_random_tower(root / "tower-b", "clip", shape, seed=2),
        "llm": save_tiny_llm(root / "llm", hidden_size=64, seed=3),
        "data": data,
    }


def _overrides(parts: dict[str, Path], extra: list[str] = ()) -> list[str]:
    out = [f"llava.llm={parts['llm']}"]
    for phase, name in (("pretrain", "llava_pretrain.json"), ("finetune", "llava_instruct.json")):
        p = f"llava.{phase}"
        out += [
            f"{p}.data.path={parts['data'] / name}", f"{p}.batch_size=8", f"{p}.micro_batch_size=8",
            f"{p}.num_workers=0", f"{p}.loop.precision=fp32", f"{p}.loop.max_steps=2",
            f"{p}.eval_max_new_tokens=3", f"{p}.loop.warmup_ratio=0",
        ]  # fmt: skip
    out.append(f"llava.finetune.data.heldout_path={parts['data'] / 'llava_heldout.json'}")
    return out + list(extra)


def _tower_args(parts: dict[str, Path]) -> list[str]:
    return ["--tower", f"llm2clip={parts['a']}", "--tower", f"control={parts['b']}"]


@pytest.fixture(scope="module")
def compared(parts: dict[str, Path]) -> tuple[Path, str]:
    out = parts["root"] / "cmp"
    args = ["llava-compare", "-o", str(out), *_tower_args(parts)]
    for s in _overrides(parts):
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out, result.output


def _heldout(run: Path) -> dict[str, Any]:
    return json.loads((run / "metrics.json").read_text())["eval"]["after"]


def test_the_side_by_side_numbers_are_each_runs_metrics(compared: tuple[Path, str]) -> None:
    out, output = compared
    doc = json.loads((out / "comparison.json").read_text())
    assert [t["name"] for t in doc["towers"]] == ["llm2clip", "control"]
    keys = ("n", "accuracy", "blind_accuracy", "gap", "majority_accuracy")
    for tower in doc["towers"]:
        after = _heldout(out / tower["name"] / "finetune")
        assert after["blind"] == tower["blind"] == "shuffle"  # the default blind baseline
        assert tower["all"] == {k: after[k] for k in keys}
        assert set(tower["per_type"]) == set(after["per_type"]) and len(after["per_type"]) >= 3
        for qtype, row in after["per_type"].items():
            assert tower["per_type"][qtype] == {k: row[k] for k in (*keys, "majority_answer")}
    # The same held-out questions for both towers: one majority column, no warning.
    assert doc["notes"] == []
    # The markdown and the console show the same numbers, one row per type plus "all".
    md = (out / "comparison.md").read_text()
    head, rows = table_rows(doc)
    assert head[:3] == ["type", "n", "majority answer"] and head[3:6] == [
        "llm2clip acc",
        "llm2clip blind",
        "llm2clip gap",
    ]
    assert [r[0] for r in rows] == [*sorted(_heldout(out / "control" / "finetune")["per_type"]), "all"]
    control_all = _heldout(out / "control" / "finetune")
    assert rows[-1][6:9] == [
        f"{control_all['accuracy']:.1f}",
        f"{control_all['blind_accuracy']:.1f}",
        f"{control_all['gap']:+.1f}",
    ]
    assert "| " + " | ".join(rows[-1]) + " |" in md
    # The console table (wrapped to the terminal's width) and where the files are.
    assert "per tower" in output and "acc / blind" in output and str(out / "comparison.md") in output
    html = (out / "report.html").read_text()
    assert "<table>" in html and "control blind" in html
    log = (out / "compare.log").read_text()  # the progress, also in a file
    assert "tower 1/2 'llm2clip': llava-pretrain" in log and "tower 2/2 'control': llava-finetune" in log


def test_a_rerun_skips_finished_towers_and_resumes_an_unfinished_phase(
    parts: dict[str, Path], compared: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, _ = compared
    before = (out / "comparison.json").read_text()
    cfg = resolve_config(None, _overrides(parts))  # as the command resolves it
    towers = parse_towers([f"llm2clip={parts['a']}", f"control={parts['b']}"])
    calls: list[tuple[str, str]] = []
    real = llava_compare.run_llava

    def recording(cfg: RunConfig, run: Path, phase: str, **kw: Any) -> dict[str, Any]:
        calls.append((Path(run).parent.name, phase))
        return real(cfg, run, phase, **kw)

    monkeypatch.setattr(llava_compare, "run_llava", recording)
    doc = run_compare(cfg, towers, out)
    assert calls == []  # both towers finished with this config and inputs: nothing trains
    assert json.loads(before)["towers"] == doc["towers"]

    # A finetune stopped before its end (its run.json not complete) is run again, nothing else.
    owner = out / "control" / "finetune" / "run.json"
    owner.write_text(json.dumps(dict(json.loads(owner.read_text()), status="interrupted")))
    run_compare(cfg, towers, out)
    assert calls == [("control", "finetune")]

    # A changed finetune setting: the finished pretraining runs are still this config's (a
    # pretraining run does not read llava.finetune) and are reused; the finetune run is refused in
    # one line naming its folder and the key.
    changed = resolve_config(None, _overrides(parts, ["llava.finetune.lr=3e-4"]))
    calls.clear()
    tcfg = llava_compare.tower_config(changed, towers[0], out)  # as run_compare makes it
    assert llava_compare.finished(tcfg, "pretrain", out / "llm2clip" / "pretrain", None)
    with pytest.raises(
        RunDirError,
        match=r"llm2clip/finetune holds a `llava-finetune` run made with another config \(llava\.finetune\.lr: 0\.0001 -> 0\.0003\)",
    ) as refused:
        run_compare(changed, towers, out)
    assert calls == []
    assert str(refused.value).endswith(
        f"Use --restart to train every tower again, another -o, or remove {out / 'llm2clip' / 'finetune'} "
        "to train only this finetune again (its pretraining is reused)"
    )
    # A changed pretraining setting is refused at the pretraining run, naming the key.
    changed = resolve_config(None, _overrides(parts, ["llava.pretrain.lr=3e-4"]))
    with pytest.raises(
        RunDirError,
        match=r"llm2clip/pretrain holds a `llava-pretrain` run made with another config \(llava\.pretrain\.lr: 0\.0001 -> 0\.0003\)",
    ) as refused:
        run_compare(changed, towers, out)
    assert calls == []
    # What to do, in options llava-compare has (it has no --allow-config-change).
    assert str(refused.value).endswith("Use --restart to train every tower again, or another -o")
    assert "\n" not in str(refused.value)

    # The finetunes removed as the message says: the finetune change trains only the finetunes.
    changed = resolve_config(None, _overrides(parts, ["llava.finetune.lr=3e-4"]))
    for name in ("llm2clip", "control"):
        shutil.rmtree(out / name / "finetune")
    doc = run_compare(changed, towers, out)
    assert calls == [("llm2clip", "finetune"), ("control", "finetune")]
    assert [t["name"] for t in doc["towers"]] == ["llm2clip", "control"]


def test_bad_tower_arguments_are_one_line(parts: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(TowerSpecError, match="NAME=DIR"):
        parse_towers([str(parts["a"]), f"b={parts['b']}"])
    with pytest.raises(TowerSpecError, match="given twice"):
        parse_towers([f"a={parts['a']}", f"a={parts['b']}"])
    with pytest.raises(TowerSpecError, match="two or more"):
        parse_towers([f"a={parts['a']}"])
    with pytest.raises(TowerSpecError, match="no config.json"):
        parse_towers([f"a={parts['a']}", f"b={tmp_path}"])
    result = CliRunner().invoke(
        app, ["llava-compare", "-o", str(tmp_path / "x"), "--tower", f"a={parts['a']}"]
    )
    assert result.exit_code == 2 and "two or more" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def _run(tmp_path: Path, name: str, after: dict[str, Any] | None) -> TowerRun:
    run = tmp_path / name
    run.mkdir()
    doc: dict[str, Any] = {"schema": 1, "train": {"steps": 5, "seconds": 12.0}, "eval": {"metric": "heldout"}}
    if after is not None:
        doc["eval"]["after"] = after
    (run / "metrics.json").write_text(json.dumps(doc))
    return TowerRun(name, f"/towers/{name}", run)


def test_different_question_sets_are_flagged_and_missing_evaluations_named(tmp_path: Path) -> None:
    def after(n: int, acc: float) -> dict[str, Any]:
        row = {"n": n, "accuracy": acc, "blind_accuracy": 10.0, "gap": acc - 10.0, "majority_accuracy": 25.0}
        return {**row, "blind": "blank", "per_type": {"colour": {**row, "majority_answer": "red|blue"}}}

    doc = build_comparison([_run(tmp_path, "a", after(4, 50.0)), _run(tmp_path, "b", after(8, 37.5))])
    assert any("different numbers of questions" in n for n in doc["notes"])
    md = to_markdown(doc)
    assert "| colour | 4 | 25.0 (red\\|blue) | 50.0 | 10.0 | +40.0 | 37.5 | 10.0 | +27.5 |" in md
    assert "a blank (mean-colour) image" in md
    # Held-out questions without a question_type (LLaVA data of other sources): one "all" row.
    untyped = {**after(4, 50.0), "per_type": {"all": after(4, 50.0)}}
    untyped["per_type"]["all"].pop("per_type")
    doc = build_comparison([_run(tmp_path, "u1", untyped), _run(tmp_path, "u2", untyped)])
    assert [r[0] for r in table_rows(doc)[1]] == ["all"]
    with pytest.raises(NoHeldoutError, match="no held-out evaluation"):
        build_comparison([_run(tmp_path, "c", None), _run(tmp_path, "d", after(4, 1.0))])
    with pytest.raises(NoHeldoutError, match="has not finished"):
        build_comparison([TowerRun("e", "/t", tmp_path / "missing")])


def test_a_llava_phase_is_checked_on_the_keys_it_reads(tmp_path: Path) -> None:
    """Each phase reads the shared llava keys and its own phase: the other phase's settings are not
    part of its identity (run_dir.COMMAND_UNREAD); everything it reads still is."""
    import copy

    import yaml

    from llm2clip_vlm import config_io, run_dir

    cfg = RunConfig()
    for phase in ("pretrain", "finetune"):
        run = tmp_path / phase
        (run / "model").mkdir(parents=True)  # finished work: the config is compared
        (run / "run.json").write_text(json.dumps({"command": f"llava-{phase}", "status": "complete"}))
        (run / "config.yaml").write_text(yaml.safe_dump(config_io.to_dict(cfg)))
        other = "finetune" if phase == "pretrain" else "pretrain"

        changed = copy.deepcopy(cfg)
        getattr(changed.llava, other).lr *= 3
        getattr(changed.llava, other).loop.max_steps += 1
        assert run_dir.check(run, f"llava-{phase}", changed) == run

        for key, value in (
            (f"llava.{phase}.lr", 0.5),
            (f"llava.{phase}.loop.max_steps", 7),
            ("llava.vision_feature_layer", -1),
        ):
            changed = copy.deepcopy(cfg)
            *parents, last = key.split(".")
            target = changed
            for name in parents:
                target = getattr(target, name)
            setattr(target, last, value)
            with pytest.raises(RunDirError, match=rf"another config \({re.escape(key)}: "):
                run_dir.check(run, f"llava-{phase}", changed)


def test_a_tower_whose_training_stopped_early_is_flagged(tmp_path: Path) -> None:
    """A phase cut by its time cap (llava.<phase>.loop.max_seconds on a loaded machine) trains the
    towers unequally: the comparison names the tower, the phase and the steps."""
    row = {"n": 4, "accuracy": 50.0, "blind_accuracy": 25.0, "gap": 25.0, "majority_accuracy": 25.0}
    after = {**row, "blind": "shuffle", "per_type": {"colour": {**row, "majority_answer": "red"}}}
    runs = []
    for name, steps in (("a", 74), ("b", 80)):
        run = _run(tmp_path, name, after).finetune
        doc = json.loads((run / "metrics.json").read_text())
        doc["train"] = {"steps": steps, "planned_steps": 80, "seconds": 100.0}
        (run / "metrics.json").write_text(json.dumps(doc))
        pre = tmp_path / f"{name}-pretrain"
        pre.mkdir()
        (pre / "metrics.json").write_text(
            json.dumps({"train": {"steps": 120, "planned_steps": 120, "seconds": 50.0}})
        )
        runs.append(TowerRun(name, f"/towers/{name}", run, pre))
    doc = build_comparison(runs)
    assert doc["notes"] == [
        "a: finetune stopped at step 74 of 80 (llava.finetune.loop.max_seconds or an early stop)",
        "finetune: the towers trained different numbers of steps {'a': 74, 'b': 80}",
    ]
    assert [(t["pretrain_steps"], t["steps"], t["train_seconds"]) for t in doc["towers"]] == [
        (120, 74, 150.0),
        (120, 80, 150.0),
    ]
    md = to_markdown(doc)
    assert "(pretrain 120 steps, finetune 74 of 80 steps; training 150 s)" in md
    assert "(pretrain 120 steps, finetune 80 steps; training 150 s)" in md
    assert "note: a: finetune stopped at step 74 of 80" in md
