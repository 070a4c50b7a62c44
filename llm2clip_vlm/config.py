"""The run configuration: one section per pipeline stage, shared by every CLI command."""

from __future__ import annotations

from dataclasses import dataclass, field

from llm2clip_vlm.data.config import DataConfig
from llm2clip_vlm.llava.config import LlavaConfig
from llm2clip_vlm.reliability import ReliabilityConfig
from llm2clip_vlm.store.config import EmbedConfig
from llm2clip_vlm.text.config import Stage1Config
from llm2clip_vlm.vision.config import ExportConfig, Stage2Config


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    export: ExportConfig = field(default_factory=ExportConfig)
    llava: LlavaConfig = field(default_factory=LlavaConfig)
    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)
