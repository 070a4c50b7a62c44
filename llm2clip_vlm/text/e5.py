"""Stage 1's reference data mix: llm2vec's E5 tasks plus the caption pairs as one more task.

The reference's supervised step (microsoft/LLM2CLIP ``llm_caption_contrastive/dataset/E5_cc3m.py``,
``E5Data``, built on McGill-NLP/llm2vec ``llm2vec/dataset/E5Data.py``) reads
``<folder>/<task>.jsonl`` for every task of ``E5_EMBEDDING_PROMPTS`` (records
``{"query", "positive", "negative"}``), gives each query its task's instruction (list-valued
prompts alternate with the record's line number, ``i % 2``), and adds the CC3M short/long pairs as
the task ``cc3m``: per image a coin flip picks the query's kind, the positive is the other kind,
the negative a caption of the positive's kind from a random other image, the instruction is the
query kind's. Every task's sample ids are shuffled, cut into batches of the *global* batch size
(incomplete ones dropped), and the batches shuffled: each optimizer step sees one task.

:class:`TaskBatches` replays exactly that algorithm with ``random.Random(seed)`` in place of the
reference's global ``random`` seeded by ``set_seed(seed)`` (run_supervised.py:395, :427): on the
same files, captions and seed the step order is the reference's (pinned by
tests/test_e5_batches.py against a copy of ``E5Data``). The order is a pure function of
(seed, files, captions), so N processes and a resumed run see the same batches; every epoch
replays it (the reference's Trainer reads the fixed list with a ``SequentialSampler``).

Records are not held in memory: each file's line offsets are, and a batch's lines are read back
by seek. ``<task>_split1.jsonl`` / ``_split2.jsonl`` are merged into ``<task>`` when
``<task>.jsonl`` is absent (llm2vec's README layout ships both; ``<task>.jsonl`` holds the union).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llm2clip_vlm.data.errors import DataError
from llm2clip_vlm.data.records import ImageCaptions
from llm2clip_vlm.logging import get_logger
from llm2clip_vlm.text.simcse import Triplet

log = get_logger(__name__)

# microsoft/LLM2CLIP llm_caption_contrastive/dataset/E5_cc3m.py:10-35 (commit cba3b45), in order:
# the order decides which task's ids are shuffled first.
E5_EMBEDDING_PROMPTS: dict[str, str | list[str]] = {
    "allnli": [
        "Given a premise, retrieve a hypothesis that is entailed by the premise",
        "Retrieve semantically similar text",
    ],
    "dureader": "Given a Chinese search query, retrieve web passages that answer the question",
    "eli5_question_answer": "Provided a user question, retrieve the highest voted answers on Reddit ELI5 forum",
    "fever": "Given a claim, retrieve documents that support or refute the claim",
    "hotpot_qa": "Given a multi-hop question, retrieve documents that can help answer the question",
    "miracl": "Given a question, retrieve Wikipedia passages that answer the question",
    "mrtydi": "Given a question, retrieve Wikipedia passages that answer the question",
    "msmarco_passage": "Given a web search query, retrieve relevant passages that answer the query",
    "msmarco_document": "Given a web search query, retrieve relevant documents that answer the query",
    "nq": "Given a question, retrieve Wikipedia passages that answer the question",
    "quora_duplicates": [
        "Given a question, retrieve questions that are semantically equivalent to the given question",
        "Find questions that have the same meaning as the input question",
    ],
    "squad": "Retrieve Wikipedia passages that answer the question",
    "t2ranking": "Given a Chinese search query, retrieve web passages that answer the question",
    "trivia_qa": "Retrieve Wikipedia passages that answer the question",
}
CAPTION_TASK = "cc3m"  # the reference's name for the caption pairs (its last task)
FIELDS = ("query", "positive", "negative")


@dataclass(frozen=True)
class E5File:
    """One jsonl file of a task: where each record's line starts (bytes) and its line number."""

    path: Path
    offsets: np.ndarray  # int64 byte offset of every record
    lines: np.ndarray  # int64 0-based line number of every record (the reference's ``i``)


def _index_file(path: Path) -> E5File:
    """Check every line of ``path`` is a record with string query/positive/negative; index them."""
    offsets, lines = [], []
    pos = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f):
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{path}:{lineno + 1}: not a JSON record ({e})") from e
            bad = [k for k in FIELDS if not isinstance(rec, dict) or not isinstance(rec.get(k), str)]
            if bad:
                raise DataError(f"{path}:{lineno + 1}: field {bad[0]!r} is missing or not a string")
            offsets.append(pos)
            lines.append(lineno)
            pos += len(raw)
    return E5File(path, np.asarray(offsets, dtype=np.int64), np.asarray(lines, dtype=np.int64))


def task_files(folder: str | Path, task: str) -> list[Path]:
    """The files of ``task`` in ``folder``: ``<task>.jsonl``, else its split1/split2 files."""
    folder = Path(folder)
    whole = folder / f"{task}.jsonl"
    if whole.is_file():
        return [whole]
    splits = [folder / f"{task}_split{k}.jsonl" for k in (1, 2)]
    if any(p.is_file() for p in splits):
        return [p for p in splits if p.is_file()]
    raise FileNotFoundError(f"E5 data {folder}: no {task}.jsonl (nor {task}_split1/2.jsonl)")


def instruction_of(task: str, line: int) -> str:
    """The reference's instruction of an E5 record (``E5_cc3m.py:126-130``)."""
    prompt = E5_EMBEDDING_PROMPTS[task]
    return prompt if isinstance(prompt, str) else prompt[line % 2]


class TaskBatches:
    """Task-homogeneous SimCSE global batches over the E5 tasks and the caption pairs.

    Same interface as :class:`~llm2clip_vlm.text.simcse.SimCSEBatches` (``batch(step, B)``,
    ``steps_per_epoch(B)``, ``len``), so stage 1 trains on either.

    Args:
        folder: the E5 folder (``echo-data``); empty = captions only (still task batching).
        tasks: E5 task names (empty = all of :data:`E5_EMBEDDING_PROMPTS`, in its order).
        records: the caption images (images with fewer than two captions are left out).
        instructions: ``{"short": ..., "long": ...}`` caption query instructions.
        batch_size: the global batch size (the reference's "effective batch size").
        seed: the stage's seed.
    """

    def __init__(
        self,
        folder: str | Path,
        tasks: Sequence[str],
        records: Sequence[ImageCaptions],
        instructions: dict[str, str],
        batch_size: int,
        seed: int,
    ) -> None:
        unknown = [t for t in tasks if t not in E5_EMBEDDING_PROMPTS]
        if unknown:
            raise DataError(
                f"stage1.e5.tasks: unknown task {unknown[0]!r}; known: {', '.join(E5_EMBEDDING_PROMPTS)}"
            )
        self.tasks = [t for t in E5_EMBEDDING_PROMPTS if t in tasks] if tasks else list(E5_EMBEDDING_PROMPTS)
        if not folder:
            self.tasks = []
        self.instructions = instructions
        self.batch_size = batch_size
        self.records = [r for r in records if len(r.captions) >= 2]
        # Global sample ids, as the reference numbers them: the E5 tasks' records in task order,
        # then one per caption image. _starts[t] is task t's first id.
        self.files: list[tuple[str, E5File]] = []
        counts: dict[str, int] = {}
        for task in self.tasks:
            for path in task_files(folder, task):
                self.files.append((task, _index_file(path)))
            counts[task] = sum(len(f.offsets) for t, f in self.files if t == task)
        self._file_starts = np.cumsum([0] + [len(f.offsets) for _, f in self.files])
        n_e5 = int(self._file_starts[-1])
        rng = random.Random(seed)
        ids: dict[str, list[int]] = {t: list(range(s, s + counts[t])) for t, s in self._task_starts(counts)}
        # The caption task (E5_cc3m.py:61-98): one coin and one negative image per image, drawn in
        # image order from the same generator before any shuffle.
        n = len(self.records)
        self.query_long = np.zeros(n, dtype=bool)
        self.negative_image = np.zeros(n, dtype=np.int64)
        if n >= 2:
            for i in range(n):
                self.query_long[i] = rng.randint(0, 1) == 1
                while True:
                    j = rng.randint(0, n - 1)
                    if j != i:
                        break
                self.negative_image[i] = j
            ids[CAPTION_TASK] = list(range(n_e5, n_e5 + n))
            counts[CAPTION_TASK] = n
        self._n_e5 = n_e5
        self.seed = seed
        for task_ids in ids.values():  # E5_cc3m.py:173-175, in task order
            rng.shuffle(task_ids)
        batches: list[list[int]] = []
        self.task_batches: dict[str, int] = {}
        for task, task_ids in ids.items():  # E5_cc3m.py:182-191
            full = [task_ids[k : k + batch_size] for k in range(0, len(task_ids), batch_size)]
            full = [b for b in full if len(b) == batch_size]
            self.task_batches[task] = len(full)
            batches += full
        rng.shuffle(batches)
        if not batches:
            raise DataError(
                f"stage 1: no task has {batch_size} samples for one batch of stage1.batch_size "
                f"(samples per task: {counts})"
            )
        self.order = np.asarray(batches, dtype=np.int64)  # [steps per epoch, batch_size]
        self.task_samples = counts
        log_task_counts(self)

    def _task_starts(self, counts: dict[str, int]) -> list[tuple[str, int]]:
        out, start = [], 0
        for task in self.tasks:
            out.append((task, start))
            start += counts[task]
        return out

    def describe(self) -> dict[str, dict[str, int]]:
        """Per task: samples read and full batches kept (``metrics.json`` and the log)."""
        return {
            t: {"samples": self.task_samples[t], "batches": self.task_batches.get(t, 0)}
            for t in self.task_samples
        }

    def __len__(self) -> int:
        return int(self.order.size)

    def steps_per_epoch(self, batch_size: int) -> int:
        if batch_size != self.batch_size:
            raise ValueError(f"task batches were cut at {self.batch_size}, not {batch_size}")
        return len(self.order)

    def batch(self, step: int, batch_size: int) -> list[Triplet]:
        """The global batch of ``step`` (every epoch replays the same order, as the reference)."""
        row = self.order[step % self.steps_per_epoch(batch_size)]
        return [self.triplet(int(i)) for i in row]

    def task_of_step(self, step: int) -> str:
        """The task the batch of ``step`` comes from."""
        i = int(self.order[step % len(self.order), 0])
        if i >= self._n_e5:
            return CAPTION_TASK
        return self.files[int(np.searchsorted(self._file_starts, i, side="right")) - 1][0]

    def triplet(self, i: int) -> Triplet:
        """Sample ``i`` (a global id) as a triplet; E5 records are read from their file."""
        if i >= self._n_e5:
            return self._caption_triplet(i - self._n_e5)
        k = int(np.searchsorted(self._file_starts, i, side="right")) - 1
        task, f = self.files[k]
        row = i - int(self._file_starts[k])
        with f.path.open("rb") as fh:
            fh.seek(int(f.offsets[row]))
            rec = json.loads(fh.readline())
        return Triplet(
            rec["query"], instruction_of(task, int(f.lines[row])), rec["positive"], rec["negative"]
        )

    def _caption_triplet(self, i: int) -> Triplet:
        # With one caption per kind this is the reference's pair; several captions of a kind are
        # drawn from a generator of their own, so the shared sequence above stays the reference's.
        r = self.records[i]
        local = np.random.default_rng([self.seed, 7_919, i])
        q_kind, p_kind = ("long", "short") if self.query_long[i] else ("short", "long")
        queries = [c.text for c in r.captions if c.kind == q_kind]
        positives = [c.text for c in r.captions if c.kind == p_kind]
        if not queries or not positives:  # one kind only: two different captions of it
            texts = [c.text for c in r.captions]
            a, b = local.choice(len(texts), size=2, replace=False)
            query, positive = texts[int(a)], texts[int(b)]
            q_kind = p_kind = r.captions[int(a)].kind
        else:
            query = queries[int(local.integers(len(queries)))]
            positive = positives[int(local.integers(len(positives)))]
        other = self.records[int(self.negative_image[i])].captions
        pool = [c.text for c in other if c.kind == p_kind] or [c.text for c in other]
        negative = pool[int(local.integers(len(pool)))]
        return Triplet(query, self.instructions.get(q_kind), positive, negative)


def log_task_counts(batches: TaskBatches) -> None:
    """One line per task: samples read, batches kept, samples dropped with the incomplete batch."""
    for task, d in batches.describe().items():
        dropped = d["samples"] - d["batches"] * batches.batch_size
        log.info(
            "stage 1 data: task %-22s %9d samples, %7d batches (%d dropped)",
            task,
            d["samples"],
            d["batches"],
            dropped,
        )
