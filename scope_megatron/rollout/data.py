"""Prompt data for rollouts: jsonl / parquet problems with gold answers, formatted like the paper.

- Records come from ``.jsonl`` (one JSON object a line) or ``.parquet`` files; the problem and
  answer fields are configurable (default ``problem`` / ``answer``, the schema of
  ``shared/data/math``).
- The prompt is ``problem + separator + suffix`` with the paper's suffix
  ``"Put your final answer within \\boxed{}."``, as a single user message through the student
  tokenizer's chat template with ``add_generation_prompt=True`` and no system prompt (the
  reference code appends the suffix with no separator and a literal ``{{}}``: use
  :data:`REFERENCE_CODE_FORMAT` to reproduce it exactly).
- Prompts longer than ``max_prompt_tokens`` are dropped and counted.
- :class:`PromptSampler` shuffles deterministically per epoch from a seed and resumes exactly
  from its ``state_dict()``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

logger = logging.getLogger(__name__)

PAPER_SUFFIX = "Put your final answer within \\boxed{}."
REFERENCE_CODE_SUFFIX = "Put your final answer within \\boxed{{}}."


@dataclass(frozen=True)
class PromptFormat:
    """How a problem becomes the user message."""

    suffix: str = PAPER_SUFFIX
    separator: str = " "
    system_prompt: str | None = None
    use_chat_template: bool = True


PAPER_FORMAT = PromptFormat()
REFERENCE_CODE_FORMAT = PromptFormat(suffix=REFERENCE_CODE_SUFFIX, separator="")


@dataclass
class PromptDataConfig:
    """Where the prompts are and how to turn them into token ids."""

    paths: Sequence[str | Path]
    problem_key: str = "problem"
    answer_key: str = "answer"
    id_key: str | None = "id"
    prompt_format: PromptFormat = PAPER_FORMAT
    max_prompt_tokens: int | None = 4096
    limit: int | None = None          # keep only the first N records (after loading, before filtering)
    source_key: str | None = "data_source"  # the record's data source; absent: the file's name stem


@dataclass
class PromptRecord:
    """One usable prompt."""

    index: int                 # position in the filtered dataset
    record_id: str             # the file's id field, else "path:line"
    problem: str
    answer: str
    prompt_text: str
    prompt_ids: list[int]
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = ""           # data source (teacher routing): the record's source_key field, else the file stem


def iter_jsonl_objects(path: Path, error: type[Exception] = ValueError) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON-lines file; ``error`` names the bad line."""
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{line_no}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                kind = "null" if obj is None else type(obj).__name__
                raise error(f"{path}:{line_no}: expected a JSON object, got {kind}")
            yield line_no, obj


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``.jsonl`` or ``.parquet`` file, as dicts."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix in (".jsonl", ".json"):
        records = []
        for line_no, obj in iter_jsonl_objects(path):
            obj.setdefault("__line__", line_no)
            records.append(obj)
        return records
    raise ValueError(f"{path}: unsupported prompt file type {path.suffix!r} (use .jsonl or .parquet)")


def format_prompt(problem: str, tokenizer: Any, prompt_format: PromptFormat = PAPER_FORMAT) -> str:
    """The prompt text for ``problem`` (chat template applied when configured)."""
    content = f"{problem}{prompt_format.separator}{prompt_format.suffix}" if prompt_format.suffix else problem
    if not prompt_format.use_chat_template:
        return content
    messages = []
    if prompt_format.system_prompt:
        messages.append({"role": "system", "content": prompt_format.system_prompt})
    messages.append({"role": "user", "content": content})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class PromptDataset:
    """Prompts loaded, formatted, tokenized and length-filtered; ``dataset[i]`` is a :class:`PromptRecord`."""

    def __init__(self, config: PromptDataConfig, tokenizer: Any):
        self.config = config
        self.records: list[PromptRecord] = []
        self.num_loaded = 0
        self.num_dropped_too_long = 0
        self.num_dropped_invalid = 0
        for path in config.paths:
            for raw in read_records(path):
                if config.limit is not None and self.num_loaded >= config.limit:
                    break
                self.num_loaded += 1
                self._add(raw, Path(path), tokenizer)
        if not self.records:
            raise ValueError(f"no usable prompts in {[str(p) for p in config.paths]} (loaded {self.num_loaded}, "
                             f"too long {self.num_dropped_too_long}, invalid {self.num_dropped_invalid})")
        logger.info("prompt data: %d usable of %d loaded (%d over %s tokens, %d invalid)", len(self.records),
                    self.num_loaded, self.num_dropped_too_long, config.max_prompt_tokens, self.num_dropped_invalid)

    def _add(self, raw: dict[str, Any], path: Path, tokenizer: Any) -> None:
        cfg = self.config
        line = raw.pop("__line__", None)
        problem, answer = raw.get(cfg.problem_key), raw.get(cfg.answer_key)
        where = f"{path}:{line}" if line is not None else f"{path}[{self.num_loaded - 1}]"
        if not isinstance(problem, str) or not problem.strip() or answer is None or str(answer).strip() == "":
            if self.num_dropped_invalid == 0:
                logger.warning("%s: record without a usable %r / %r field; dropped (further ones counted only)",
                               where, cfg.problem_key, cfg.answer_key)
            self.num_dropped_invalid += 1
            return
        text = format_prompt(problem, tokenizer, cfg.prompt_format)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if cfg.max_prompt_tokens is not None and len(ids) > cfg.max_prompt_tokens:
            self.num_dropped_too_long += 1
            return
        record_id = str(raw[cfg.id_key]) if cfg.id_key and raw.get(cfg.id_key) is not None else where
        extra = {k: v for k, v in raw.items() if k not in (cfg.problem_key, cfg.answer_key)}
        source = raw.get(cfg.source_key) if cfg.source_key else None
        source = str(source) if isinstance(source, (str, int)) and str(source) else path.name.split(".")[0]
        self.records.append(PromptRecord(index=len(self.records), record_id=record_id, problem=problem,
                                         answer=str(answer), prompt_text=text, prompt_ids=ids, extra=extra,
                                         source=source))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> PromptRecord:
        return self.records[index]

    def stats(self) -> dict[str, int]:
        """Counts for logging: loaded, kept, dropped (too long / invalid)."""
        return {"loaded": self.num_loaded, "kept": len(self.records), "dropped_too_long": self.num_dropped_too_long,
                "dropped_invalid": self.num_dropped_invalid}


class PromptSampler:
    """Deterministic, resumable order over ``size`` prompts.

    Epoch ``e`` visits a permutation drawn from ``numpy.random.default_rng([seed, e])`` (identity
    when ``shuffle`` is False). Batches run across epoch boundaries. ``state_dict()`` /
    ``load_state_dict()`` resume at the exact next prompt.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def next_indices(self, count: int) -> list[int]:
        """The next ``count`` dataset indices."""
        out: list[int] = []
        while len(out) < count:
            if self.position >= self.size:
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            take = min(count - len(out), self.size - self.position)
            out.extend(int(i) for i in self._order[self.position:self.position + take])
            self.position += take
        return out

    def __iter__(self) -> Iterator[int]:
        while True:
            yield self.next_indices(1)[0]

    def state_dict(self) -> dict[str, int | bool]:
        """Everything needed to resume."""
        return {"size": self.size, "seed": self.seed, "shuffle": self.shuffle, "epoch": self.epoch,
                "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (the dataset size and seed must match)."""
        for key in ("size", "seed", "shuffle"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state.get(key)!r}, this sampler has {getattr(self, key)!r} "
                                 "(the prompt data or seed changed since the checkpoint)")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._permutation(self.epoch)
