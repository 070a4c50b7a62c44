"""The LLaVA-1.5 / LLaVA-NeXT shim, tested against a fake ``llava`` package with the real module paths.

The fake copies, minimally, the logic that matters: each codebase's ``build_vision_tower`` (the
dispatch on the name), LLaVA's ``CLIPVisionTower`` (load + feature select), and ``llava_arch``
importing the builder function by name and building the tower with ``delay_load=True``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llm2clip_vlm.adapters.llava.patch import patch_llava, split_launcher_args
from llm2clip_vlm.tower.synthetic import TowerShape, save_random_tower

SHAPE = TowerShape(
    image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64
)

CLIP_ENCODER = """
import torch
import torch.nn as nn
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel


class CLIPVisionTower(nn.Module):
    def __init__(self, vision_tower, args, delay_load=False):
        super().__init__()
        self.is_loaded = False
        self.vision_tower_name = vision_tower
        self.select_layer = args.mm_vision_select_layer
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        if not delay_load:
            self.load_model()
        else:
            self.cfg_only = CLIPVisionConfig.from_pretrained(self.vision_tower_name)

    def load_model(self, device_map=None):
        self.image_processor = CLIPImageProcessor.from_pretrained(self.vision_tower_name)
        self.vision_tower = CLIPVisionModel.from_pretrained(self.vision_tower_name, device_map=device_map)
        self.vision_tower.requires_grad_(False)
        self.is_loaded = True

    @torch.no_grad()
    def forward(self, images):
        outs = self.vision_tower(images.to(dtype=self.vision_tower.dtype), output_hidden_states=True)
        feats = outs.hidden_states[self.select_layer]
        if self.select_feature == "patch":
            feats = feats[:, 1:]
        return feats.to(images.dtype)
"""

BUILDERS = {
    # haotian-liu/LLaVA (v1.2+): any existing path is a CLIP tower.
    "llava15": """
import os
from .clip_encoder import CLIPVisionTower


def build_vision_tower(vision_tower_cfg, **kwargs):
    vision_tower = getattr(vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", None))
    is_absolute_path_exists = os.path.exists(vision_tower)
    if is_absolute_path_exists or vision_tower.startswith("openai") or vision_tower.startswith("laion"):
        return CLIPVisionTower(vision_tower, args=vision_tower_cfg, **kwargs)
    raise ValueError(f"Unknown vision tower: {vision_tower}")
""",
    # LLaVA-VL/LLaVA-NeXT: dispatch on substrings of the name.
    "llava_next": """
import os
from .clip_encoder import CLIPVisionTower


def build_vision_tower(vision_tower_cfg, **kwargs):
    vision_tower = getattr(vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", None))
    if "clip" in vision_tower or vision_tower.startswith("openai") or vision_tower.startswith("laion"):
        return CLIPVisionTower(vision_tower, args=vision_tower_cfg, **kwargs)
    raise ValueError(f"Unknown vision tower: {vision_tower}")
""",
}

LLAVA_ARCH = """
from .multimodal_encoder.builder import build_vision_tower


class LlavaMetaModel:
    def __init__(self, config):
        if hasattr(config, "mm_vision_tower"):
            self.vision_tower = build_vision_tower(config, delay_load=True)

    def initialize_vision_modules(self, model_args):
        self.vision_tower = build_vision_tower(model_args)
        return self.vision_tower
"""

LAUNCHED_SCRIPT = """
import sys
from types import SimpleNamespace
from llava.model.llava_arch import LlavaMetaModel

cfg = SimpleNamespace(mm_vision_tower=sys.argv[-1], mm_vision_select_layer=-2)
tower = LlavaMetaModel(cfg).vision_tower
print(type(tower).__name__, tower.is_loaded, tower.num_patches, " ".join(sys.argv[1:-1]))
"""


def _write_fake_llava(root: Path, flavour: str) -> Path:
    files = {
        "llava/__init__.py": "",
        "llava/model/__init__.py": "",
        "llava/model/multimodal_encoder/__init__.py": "",
        "llava/model/multimodal_encoder/clip_encoder.py": CLIP_ENCODER,
        "llava/model/multimodal_encoder/builder.py": BUILDERS[flavour],
        "llava/model/llava_arch.py": LLAVA_ARCH,
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text))
    return root


def _forget_llava() -> None:
    for name in [m for m in sys.modules if m == "llava" or m.startswith("llava.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    # Folder names without "clip"/"siglip", so LLaVA-NeXT's substring dispatch cannot pick them up.
    root = tmp_path_factory.mktemp("exported")
    return {
        kind: save_random_tower(root / f"tower_{i}", kind, SHAPE, seed=2)
        for i, kind in enumerate(("clip", "siglip"))
    }


@pytest.fixture(params=["llava15", "llava_next"])
def fake_llava(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = _write_fake_llava(tmp_path / "checkout", request.param)
    _forget_llava()
    sys.path.insert(0, str(root))
    try:
        yield request.param, root
    finally:
        sys.path.remove(str(root))
        _forget_llava()


def _cfg(name: str, **extra: object) -> SimpleNamespace:
    return SimpleNamespace(mm_vision_tower=name, mm_vision_select_layer=-2, **extra)


def test_clip_tower_works_as_plain_path_without_patch(towers: dict[str, Path]) -> None:
    """LLaVA-1.5's own CLIPVisionTower loads the exported CLIP directory and gives our features."""
    root = _write_fake_llava(Path(towers["clip"]).parent / "plain_checkout", "llava15")
    _forget_llava()
    sys.path.insert(0, str(root))
    try:
        from llava.model.llava_arch import LlavaMetaModel

        from llm2clip_vlm import LLM2CLIPVisionTower

        theirs = LlavaMetaModel(_cfg(str(towers["clip"]))).vision_tower
        assert type(theirs).__name__ == "CLIPVisionTower"
        theirs.load_model()
        ours = LLM2CLIPVisionTower(str(towers["clip"]), _cfg(str(towers["clip"])))
        images = torch.randn(
            2, 3, SHAPE.image_size, SHAPE.image_size, generator=torch.Generator().manual_seed(3)
        )
        assert torch.equal(theirs(images), ours(images))
        crop = theirs.image_processor.crop_size
        assert (crop["height"], crop["width"]) == (SHAPE.image_size, SHAPE.image_size)
    finally:
        sys.path.remove(str(root))
        _forget_llava()


def test_patch_routes_llm2clip_names_through_both_modules(
    fake_llava: tuple[str, Path], towers: dict[str, Path], tmp_path: Path
) -> None:
    flavour, _ = fake_llava
    import llava.model.llava_arch as arch
    import llava.model.multimodal_encoder.builder as builder

    from llm2clip_vlm import LLM2CLIPVisionTower

    original = builder.build_vision_tower
    name = f"llm2clip:{towers['siglip']}"
    # Unpatched, LLaVA cannot build it (LLaVA-1.5: unknown name; LLaVA-NeXT: "clip" in the name
    # sends it to its CLIPVisionTower, which cannot find "llm2clip:/..." and looks on the hub).
    with pytest.raises(ValueError if flavour == "llava15" else OSError):
        arch.LlavaMetaModel(_cfg(name))

    installed = patch_llava()
    assert builder.build_vision_tower is installed and arch.build_vision_tower is installed
    assert patch_llava() is installed and installed._llm2clip_original is original  # idempotent

    # llava_arch's by-name import: LlavaMetaModel.__init__ builds with delay_load=True.
    tower = arch.LlavaMetaModel(_cfg(name)).vision_tower
    assert isinstance(tower, LLM2CLIPVisionTower) and not tower.is_loaded
    assert tower.num_patches == (SHAPE.image_size // SHAPE.patch_size) ** 2  # SigLIP: no CLS
    tower.load_model()
    feats = tower(torch.zeros(1, 3, SHAPE.image_size, SHAPE.image_size))
    assert feats.shape == (1, tower.num_patches, tower.hidden_size)
    # initialize_vision_modules (no delay_load) loads at once; `vision_tower` attribute name works too.
    meta = arch.LlavaMetaModel(SimpleNamespace())
    args = SimpleNamespace(vision_tower=f"llm2clip:{towers['clip']}", mm_vision_select_layer=-2)
    eager = meta.initialize_vision_modules(args)
    assert isinstance(eager, LLM2CLIPVisionTower) and eager.is_loaded

    # Everything else still goes to LLaVA's own builder: a CLIP tower path (named so that both
    # codebases' dispatch accepts it) gets LLaVA's CLIPVisionTower, an unknown name its error.
    plain = tmp_path / "clip-tower"
    plain.symlink_to(towers["clip"], target_is_directory=True)
    theirs = arch.LlavaMetaModel(_cfg(str(plain))).vision_tower
    assert type(theirs).__name__ == "CLIPVisionTower" and theirs.cfg_only.hidden_size == SHAPE.hidden_size
    with pytest.raises(ValueError, match="Unknown vision tower"):
        arch.LlavaMetaModel(_cfg("some-other-tower"))


def test_patch_without_llava_says_how_to_fix() -> None:
    _forget_llava()
    with pytest.raises(ImportError, match="LLaVA / LLaVA-NeXT checkout"):
        patch_llava("llava_not_installed_anywhere")


def test_launcher_argument_split() -> None:
    assert split_launcher_args(["--local_rank=3", "train.py", "--bf16", "True"]) == (
        ["--local_rank=3"],
        "train.py",
        False,
        ["--bf16", "True"],
    )
    assert split_launcher_args(["--local_rank", "1", "-m", "llava.eval.x", "--a"]) == (
        ["--local_rank", "1"],
        "llava.eval.x",
        True,
        ["--a"],
    )
    with pytest.raises(SystemExit, match="usage"):
        split_launcher_args(["--bf16"])


@pytest.mark.parametrize("as_module", [False, True], ids=["script", "module"])
def test_launcher_runs_llava_code_patched(tmp_path: Path, towers: dict[str, Path], as_module: bool) -> None:
    root = _write_fake_llava(tmp_path, "llava15")
    (root / "llava" / "train").mkdir()
    (root / "llava" / "train" / "__init__.py").write_text("")
    (root / "llava" / "train" / "probe.py").write_text(LAUNCHED_SCRIPT)
    target = ["-m", "llava.train.probe"] if as_module else ["llava/train/probe.py"]
    cmd = [sys.executable, "-m", "llm2clip_vlm.adapters.llava.patch", "--local_rank=0", *target]
    cmd += ["--bf16", "True", f"llm2clip:{towers['clip']}"]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    n = (SHAPE.image_size // SHAPE.patch_size) ** 2
    assert out.stdout.strip().splitlines()[-1] == f"LLM2CLIPVisionTower False {n} --local_rank=0 --bf16 True"
