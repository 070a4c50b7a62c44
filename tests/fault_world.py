"""Tiny inputs shared by the round-3 fault tests (tests/test_faults_inputs.py and friends).

Built once per test module, in-process, with the smallest shapes that run every command: 32 demo
images, a 2-layer caption encoder, a 2-step stage-2 run, a random CLIP tower and a tiny LLM for
LLaVA. Each getter builds its part on first use only.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cli_inproc import Result, run_main

STAGE2_TINY = [
    "stage2.backbone.image_size=32", "stage2.backbone.hidden_size=32", "stage2.backbone.num_layers=2",
    "stage2.backbone.num_heads=2", "stage2.embed_dim=16", "stage2.num_workers=0", "stage2.loop.precision=fp32",
    "stage2.eval_batch_size=32", "stage2.batch_size=8", "stage2.loop.max_steps=2", "stage2.loop.save_every_steps=1",
]  # fmt: skip


def sets(items: list[str]) -> list[str]:
    return [f"--set={s}" for s in items]


@dataclass
class World:
    root: Path
    cache: dict[str, Any] = field(default_factory=dict)

    def _once(self, name: str, make: Any) -> Any:
        if name not in self.cache:
            self.cache[name] = make()
        return self.cache[name]

    @property
    def data(self) -> Path:
        from llm2clip_vlm.data.synthetic import write_demo_dataset

        def make() -> Path:
            write_demo_dataset(
                self.root / "data", seed=0, train_images=32, heldout_images=16, show_progress=False
            )
            return self.root / "data"

        return self._once("data", make)

    @property
    def encoder(self) -> Path:
        def make() -> Path:
            from llm2clip_vlm.text.encoder import CaptionEncoder
            from llm2clip_vlm.text.modeling import ModelRef, load_bidirectional, load_tokenizer
            from llm2clip_vlm.text.tiny import save_tiny_llm

            ref = ModelRef(str(save_tiny_llm(self.root / "enc-llm")))
            enc = CaptionEncoder(load_bidirectional(ref), load_tokenizer(ref), max_length=64)
            return enc.save_pretrained(self.root / "enc")

        return self._once("encoder", make)

    def common(self, data: Path | None = None) -> list[str]:
        return sets([
            f"data.demo_dir={data or self.data}", "data.demo_train_images=32", "data.demo_heldout_images=16",
            "embed.batch_size=16", "embed.precision=fp32", "embed.dtype=fp32", f"embed.encoder={self.encoder}",
        ])  # fmt: skip

    def embed(self, out: Path, *extra: str, data: Path | None = None) -> Result:
        return run_main("embed", "-o", str(out), *self.common(data), *extra)

    @property
    def store(self) -> Path:
        def make() -> Path:
            r = self.embed(self.root / "store")
            assert r.code == 0, r.err[-3000:]
            return self.root / "store"

        return self._once("store", make)

    def stage2(self, out: Path, *extra: str, store: Path | None = None) -> Result:
        return run_main(
            "stage2", "-o", str(out), f"--store={store or self.store}", *self.common(), *sets(STAGE2_TINY), *extra
        )  # fmt: skip

    @property
    def stage2_run(self) -> Path:
        def make() -> Path:
            r = self.stage2(self.root / "s2")
            assert r.code == 0, r.err[-3000:]
            return self.root / "s2"

        return self._once("s2", make)

    def copy(self, src: Path, name: str) -> Path:
        dst = self.root / name
        shutil.copytree(src, dst)
        return dst

    # -- LLaVA ------------------------------------------------------------------------------
    @property
    def llava_data(self) -> Path:
        def make() -> Path:
            from llm2clip_vlm.data.synthetic_llava import write_llava_demo

            write_llava_demo(
                self.root / "llava-data",
                pretrain_images=8,
                instruct_images=8,
                heldout_images=4,
                image_size=32,
            )
            return self.root / "llava-data"

        return self._once("llava_data", make)

    @property
    def tower(self) -> Path:
        def make() -> Path:
            from llm2clip_vlm.tower.synthetic import TowerShape, save_random_tower

            return save_random_tower(self.root / "tower", "clip", TowerShape(32, 8, 32, 3, 2, 64), seed=1)

        return self._once("tower", make)

    @property
    def llm(self) -> Path:
        def make() -> Path:
            from llm2clip_vlm.text.tiny import save_tiny_llm

            return save_tiny_llm(self.root / "llm", hidden_size=64, seed=2)

        return self._once("llm", make)

    def llava_sets(self, phase: str = "pretrain", tower: Path | None = None, llm: Path | None = None,
                   data: Path | None = None) -> list[str]:  # fmt: skip
        name = "llava_pretrain.json" if phase == "pretrain" else "llava_instruct.json"
        p = f"llava.{phase}"
        return sets([
            f"llava.tower={tower or self.tower}", f"llava.llm={llm or self.llm}",
            f"{p}.data.path={data or self.llava_data / name}", f"{p}.batch_size=4", f"{p}.micro_batch_size=4",
            f"{p}.num_workers=0", f"{p}.loop.precision=fp32", f"{p}.loop.max_steps=1", f"{p}.eval_max_new_tokens=2",
            f"{p}.gradient_checkpointing=false", f"{p}.loop.warmup_ratio=0",
        ])  # fmt: skip

    def llava(self, phase: str, out: Path, *extra: str, **kw: Any) -> Result:
        return run_main(f"llava-{phase}", "-o", str(out), *self.llava_sets(phase, **kw), *extra)

    @property
    def pretrained(self) -> Path:
        def make() -> Path:
            r = self.llava("pretrain", self.root / "pre")
            assert r.code == 0, r.err[-3000:]
            return self.root / "pre"

        return self._once("pre", make)
