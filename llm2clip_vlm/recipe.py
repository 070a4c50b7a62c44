"""The recipe schema: RunConfig, one section per pipeline stage (imported only by the CLI and the pipeline)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from llm2clip_vlm.config_io import COUNT, NONNEGATIVE, Range
from llm2clip_vlm.data.config import DataConfig
from llm2clip_vlm.hub.config import HubConfig
from llm2clip_vlm.llava.config import LlavaConfig
from llm2clip_vlm.reliability import ReliabilityConfig
from llm2clip_vlm.store.config import EmbedConfig
from llm2clip_vlm.text.config import Stage1Config
from llm2clip_vlm.tracking.config import TrackingConfig
from llm2clip_vlm.vision.config import ExportConfig, Stage2Config


@dataclass
class RuntimeConfig:
    """Process settings that change speed, not results (no stage fingerprint includes them).

    Reading a recipe never applies them: the CLI does, once a command has its config
    (``cli.apply_runtime``).
    """

    # torch intra-op CPU threads; 0 = torch's default (one per core). On a CPU shared with other
    # busy processes, fewer threads than cores avoids OpenMP threads spinning while they wait for
    # each other's turn on a core (see the demo recipe for the measured effect).
    threads: int = 0
    # When stderr is not a terminal (nohup, slurm, CI), long loops log a progress line (step,
    # loss, s/step, ETA) every this many seconds and/or steps (0 = not by that criterion).
    progress_seconds: float = 30.0
    progress_steps: int = 0

    # Accepted values, checked when a recipe is read (llm2clip_vlm.config_io.Range).
    RANGES: ClassVar[dict[str, Range]] = {
        "threads": COUNT,
        "progress_seconds": NONNEGATIVE,
        "progress_steps": COUNT,
    }


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    export: ExportConfig = field(default_factory=ExportConfig)
    llava: LlavaConfig = field(default_factory=LlavaConfig)
    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    hub: HubConfig = field(default_factory=HubConfig)
