"""The ``hub`` config section: what model cards say about licence, base model and data."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class HubConfig:
    """Model-card metadata. Changes only the cards, never what is trained or exported."""

    # SPDX-style licence id for the card (the weights inherit the base models' licences too).
    license: str = "apache-2.0"
    # Hub id(s) of the model(s) this one is built from; [] = the stage-2 backbone / the LLaVA LLM
    # when the config names them by hub id (local paths are not hub ids and are left out).
    base_model: list[str] = field(default_factory=list)
    # Hub ids of the training data sets; [] = the configured data paths that are hub ids.
    datasets: list[str] = field(default_factory=list)
    # Extra tags next to the ones every card gets (llm2clip, ...).
    tags: list[str] = field(default_factory=list)
