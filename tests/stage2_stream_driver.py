"""Stage 2 on streamed shards, as a script for ``accelerate launch`` (the DDP config; FSDP2 on CPU: tests/test_fsdp.py).

    accelerate launch --config_file recipes/accelerate/ddp-8gpu.yaml --num_processes 2 --cpu \\
        tests/stage2_stream_driver.py DATA_DIR OUT [override ...]

Writes ``OUT/losses.rank<r>.json``; the checkpoint's ``state.extra.data`` says what each rank read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_stage2_stream import _run  # noqa: E402


def main() -> None:
    root, out, overrides = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    torch.set_num_threads(1)
    metrics = _run(root, out, overrides)
    from accelerate import PartialState

    rank = PartialState().process_index
    (out / f"losses.rank{rank}.json").write_text(json.dumps(metrics["train"]["losses"]))


if __name__ == "__main__":
    main()
