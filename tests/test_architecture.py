"""The package's shape: every module imports, the import graph has no cycle (function-local
imports included), the package's own modules are imported at module level, the recipe schema stays
above the stages, no private names cross modules, and the trainers stay small."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "llm2clip_vlm"
# The command layer: the only modules that may see the recipe schema (RunConfig).
COMMAND_LAYER = {
    f"{PACKAGE}.cli",
    f"{PACKAGE}.pipeline",
    f"{PACKAGE}.commands",
    f"{PACKAGE}.llava_compare",
    f"{PACKAGE}.recipe",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str], bool]]:
    """``(module imported, names taken from it, inside TYPE_CHECKING)`` for every import of ``path``."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only |= {id(n) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], id(node) in type_only) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            names = [a.name for a in node.names]
            # ``from pkg import submodule`` imports the submodule (its parent package is only
            # initialised on the way, as for every submodule import): an edge to the submodule.
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in MODULES]
            others = [n for n in names if f"{mod}.{n}" not in MODULES]
            if others or not subs:
                found.append((mod, others, id(node) in type_only))
            found += [(s, [], id(node) in type_only) for s in subs]
    return [(m, n, t) for m, n, t in found if m == PACKAGE or m.startswith(PACKAGE + ".")]


def _graph() -> dict[str, set[str]]:
    return {
        name: {m for m, _, type_only in _imports(name, path) if m in MODULES and m != name and not type_only}
        for name, path in MODULES.items()
    }


def test_every_module_imports() -> None:
    for name in MODULES:
        try:
            importlib.import_module(name)
        except ImportError as e:  # only an optional third-party package may be missing
            assert (e.name or "").split(".")[0] != PACKAGE, f"{name}: {e}"


def test_the_import_graph_has_no_cycle() -> None:
    graph = _graph()
    # Tarjan's strongly connected components: any component of 2+ modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_only_the_command_layer_imports_the_recipe_schema() -> None:
    offenders = sorted(
        name
        for name, path in MODULES.items()
        if name not in COMMAND_LAYER
        and any(m == f"{PACKAGE}.recipe" and not type_only for m, _, type_only in _imports(name, path))
    )
    assert not offenders, f"below the CLI/pipeline, these import the recipe schema: {offenders}"


def test_no_private_name_crosses_a_module() -> None:
    offenders = sorted(
        f"{name} imports {mod}.{n}"
        for name, path in MODULES.items()
        for mod, names, _ in _imports(name, path)
        for n in names
        if n.startswith("_") and not n.startswith("__") and mod != name
    )
    assert not offenders, offenders


@pytest.mark.parametrize("trainer", ["text/train.py", "vision/train.py", "llava/train.py"])
def test_each_trainer_is_about_300_lines(trainer: str) -> None:
    lines = (ROOT / PACKAGE / trainer).read_text().count("\n")
    assert lines <= 300, f"{trainer} has {lines} lines"


TRAINERS = ("text.train", "vision.train", "llava.train")


@pytest.mark.parametrize("trainer", TRAINERS)
def test_trainers_are_not_packed_with_fmt_skip_and_open_their_run_through_the_scaffold(trainer: str) -> None:
    source = MODULES[f"{PACKAGE}.{trainer}"].read_text()
    assert "fmt: skip" not in source, f"{trainer}: write it so the formatter can keep it readable"
    imported = {m for m, _, _ in _imports(f"{PACKAGE}.{trainer}", MODULES[f"{PACKAGE}.{trainer}"])}
    # One scaffold opens and closes every run (accelerator, Run, tracker, metrics.json schema).
    assert f"{PACKAGE}.training.session" in imported, trainer
    for owned in ("make_accelerator(", "RunTracker.start(", "Run(", '"metrics.json"', "json.dumps("):
        assert owned not in source, f"{trainer} opens or closes its run itself ({owned})"


def test_every_trainer_runs_the_one_loop() -> None:
    for trainer in ("text.train", "text.mntp", "vision.train", "llava.train"):
        imported = {m for m, _, _ in _imports(f"{PACKAGE}.{trainer}", MODULES[f"{PACKAGE}.{trainer}"])}
        # Directly, or through the scaffold whose Run it trains with.
        assert {f"{PACKAGE}.training.loop", f"{PACKAGE}.training.session"} & imported, trainer
        source = MODULES[f"{PACKAGE}.{trainer}"].read_text()
        # The loop owns these: no trainer has its own copy.
        for owned in ("GracefulExit", "NonFiniteGuard", "make_progress", "LambdaLR", "class TrainState"):
            assert owned not in source, f"{trainer} still has {owned}"


def test_bench_is_outside_the_core_import_graph() -> None:
    importers = sorted(
        name
        for name, path in MODULES.items()
        if not name.startswith(f"{PACKAGE}.bench")
        and any(m.startswith(f"{PACKAGE}.bench") for m, _, _ in _imports(name, path))
    )
    assert importers == [f"{PACKAGE}.cli"]  # the `bench` command, lazily
    tree = ast.parse(MODULES[f"{PACKAGE}.cli"].read_text())
    top_level = [
        n
        for n in tree.body
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith(f"{PACKAGE}.bench")
    ]
    assert not top_level
    for name in MODULES:
        if name.startswith(f"{PACKAGE}.bench"):
            text = MODULES[name].read_text()
            assert "issue " not in text.lower() and "SPEC section" not in text, name


# Import lazily: the CLI (so ``--help`` stays fast) and errors.py (importable from anywhere).
LAZY_IMPORTERS = {f"{PACKAGE}.cli", f"{PACKAGE}.errors"}


def test_own_modules_are_imported_at_module_level() -> None:
    """A function-local import of the package's own modules needs a ``# lazy: why`` comment."""
    offenders = set()
    for name, path in MODULES.items():
        if name in LAZY_IMPORTERS:
            continue
        source = path.read_text()
        lines = source.splitlines()
        for fn in ast.walk(ast.parse(source)):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    own = any(a.name.split(".")[0] == PACKAGE for a in node.names)
                elif isinstance(node, ast.ImportFrom):
                    own = node.level > 0 or (node.module or "").split(".")[0] == PACKAGE
                else:
                    continue
                text = "\n".join(lines[node.lineno - 1 : node.end_lineno])
                if own and "# lazy:" not in text:
                    offenders.add(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"import these at module level (or say why not with '# lazy:'): {sorted(offenders)}"


# Conversation-template names: a template carries its own properties (default system prompt,
# whether prompts need the tokenizer, the chat template saved with a model), so no code outside
# the registry decides by a template's name. "plain" is also an ordinary word (a poster's ground):
# it counts where the other side of the comparison speaks of a template.
TEMPLATE_REGISTRY = f"{PACKAGE}.llava.templates"
TEMPLATE_NAMES = {"vicuna_v1", "chat_template"}
AMBIGUOUS_TEMPLATE_NAMES = {"plain"}


def _template_name_checks(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        literals = set()
        for op in operands:
            items = op.elts if isinstance(op, (ast.Tuple, ast.List, ast.Set)) else [op]
            literals |= {i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)}
        text = ast.unparse(node)
        if literals & TEMPLATE_NAMES or (literals & AMBIGUOUS_TEMPLATE_NAMES and "template" in text.lower()):
            found.append(f"line {node.lineno}: {text}")
    return found


def test_no_code_checks_a_template_name() -> None:
    offenders = {
        name: checks
        for name, path in MODULES.items()
        if name != TEMPLATE_REGISTRY and (checks := _template_name_checks(path.read_text()))
    }
    assert not offenders, (
        f"decide by the template's properties (llava/templates.py), not its name: {offenders}"
    )
    # The check itself sees the forms it forbids.
    assert _template_name_checks('x = VICUNA if name == "vicuna_v1" else ""')
    assert _template_name_checks('t = tok if self.template.name in ("chat_template",) else None')
    assert _template_name_checks('chat = p.template != "plain"')
    assert not _template_name_checks('if poster.ground == "plain": pass')


# Helpers and constants with one definition in the package (each once existed two to four times).
ONE_DEFINITION = (
    "file_sha256",
    "file_identity",
    "file_stamp",
    "PICKLE_SUFFIXES",
    "CHECKPOINTS",
    "CLIP_MEAN",
    "CLIP_STD",
    "GracefulExit",
    "TrainingInterrupted",
    "NonFiniteGuard",
    "from_pretrained_kwargs",
    "expand_image_tokens",
    "generation_ids",
    "left_padded",
)


def _top_level_definitions(source: str) -> set[str]:
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def test_shared_helpers_have_one_definition() -> None:
    where: dict[str, list[str]] = {n: [] for n in ONE_DEFINITION}
    for name, path in MODULES.items():
        for defined in _top_level_definitions(path.read_text()) & set(ONE_DEFINITION):
            where[defined].append(name)
    assert {n: w for n, w in where.items() if len(w) != 1} == {}


# What reads files: builtins, pathlib, json/numpy/torch loaders, archives, and the package's data
# readers (docs/ARCHITECTURE.md: a stage sees records, never files; the command layer reads them).
FILE_READERS = {"open", "read_text", "read_bytes", "load", "loadtxt", "fromfile", "read_csv", "read_json",
                "read_parquet", "load_llava_records", "load_caption_set", "load_caption_sets",
                "resolve_data", "load_text_corpus", "open_table", "index_llava_shards", "phase_data",
                "read_phase"}  # fmt: skip
FILE_MODULES = {"tarfile", "webdataset", "pyarrow", "pandas", "zipfile", "csv"}


# text/train.py joins once its CRA-before cache moves out of it (the run scaffold's work).
@pytest.mark.parametrize("trainer", ["text/mntp.py", "vision/train.py", "llava/train.py"])
def test_trainers_read_no_files(trainer: str) -> None:
    """A trainer is handed records (and writes its outputs); it opens no data file of its own."""
    tree = ast.parse((ROOT / PACKAGE / trainer).read_text())
    calls = sorted(
        {
            f"line {node.lineno}: {ast.unparse(node.func)}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", ""))
            in FILE_READERS
        }
    )
    assert not calls, f"{trainer} reads files: {calls}"
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not modules & FILE_MODULES, f"{trainer} imports {modules & FILE_MODULES}"


def test_one_data_policy() -> None:
    """``skip_bad`` (and the rest of the bad-record / image-check / streaming policy) is declared
    once, by ``data.config.DataPolicy``; the data sections inherit it."""
    declared = sorted(
        f"{name}.{node.name}"
        for name, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
        and any(
            isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.target.id == "skip_bad"
            for s in node.body
        )
    )
    assert declared == [f"{PACKAGE}.data.config.DataPolicy"], declared
    from llm2clip_vlm.data.config import DataConfig, DataPolicy
    from llm2clip_vlm.llava.config import LlavaDataConfig

    assert issubclass(DataConfig, DataPolicy) and issubclass(LlavaDataConfig, DataPolicy)


def test_one_streamed_loader() -> None:
    """Every stage streams through ``data.train_stream.TrainStream`` (its own sample hook and collate):
    no other module builds a ``ShardStream`` or ``StreamLoader`` (the data bench times the bare
    shard stream's decoding)."""
    builders = sorted(
        name
        for name, path in MODULES.items()
        if name != f"{PACKAGE}.bench.data"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("ShardStream", "StreamLoader")
    )
    assert set(builders) == {f"{PACKAGE}.data.train_stream"}, builders
