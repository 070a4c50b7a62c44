"""The data bench suite measures every reader and stage-2 start-up in fresh processes."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from llm2clip_vlm.bench import data
from llm2clip_vlm.cli import app


@pytest.mark.slow  # ~16 fresh processes, each importing torch: 1-4 min on a shared 2-core CPU
def test_data_suite_reports_every_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(data.PRESETS, "test", data.DataPreset(300, 4))
    res = CliRunner().invoke(app, ["bench", "data", "--preset", "test", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    results = report["results"]
    assert results["records"] == 300
    for reader in data.READERS:
        r = results[reader]
        assert r["cold_seconds"] > 0 and r["warm_seconds"] > 0
        assert 0 < r["cache_bytes_per_record"] < 2000  # an index, not a copy of the data
    # Shards: the index holds no image bytes (each record's tar members are ~3 KB).
    assert results["shards"]["cache_bytes_per_record"] < results["shards"]["input_bytes_per_record"] / 4
    assert results["stage2_stream"]["seconds_to_first_batch"] > 0
    # The same records as a list of 3 img2dataset-like sets (keys collide, namespaced): same costs.
    assert results["sets"]["cache_bytes_per_record"] < results["sets"]["input_bytes_per_record"] / 4
    for name in ("stage2_stream_sets", "stage2_map_sets"):
        assert results[name]["seconds_to_first_batch"] > 0 and results[name]["rss_bytes_per_record"] > 0
    assert results["loader"]["images_per_s_per_worker"] > 0 and results["loader"]["jpeg_bytes"] > 20_000
    # Content identity: sampled reads at most 1024 images, full hashes every one.
    ident = results["content_identity"]
    assert 0 < ident["sampled_seconds"] and 0 < ident["full_us_per_record"]
    assert ident["full_40kb_us_per_record"] > 0 and ident["full_40kb_seconds_at_10m"] > 0
