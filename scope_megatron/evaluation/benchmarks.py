"""Benchmark files: jsonl, one ``{"id", "problem", "answer", "source"}`` object a line.

The schema is that of ``shared/data/math/benchmarks/`` (aime24, aime25, amc23, math500,
minerva_math, olympiadbench). ``problem`` and ``answer`` are required non-empty strings;
``id`` and ``source`` are optional strings (``id`` defaults to ``<benchmark>-<line>``); ids must
be unique within a file; other keys are kept in ``extra``. Blank lines are skipped.

Every malformed row raises :class:`BenchmarkFormatError` whose message starts with
``path:line:`` and says what is wrong (bad JSON, not an object, missing / non-string / empty
field, duplicate id), so the user can open the file at that line.

Answers are kept exactly as written (AIME's zero-padded ``'025'`` too): the grader,
math-verify, compares them numerically (``025`` = ``25``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..rollout.data import iter_jsonl_objects

REQUIRED_FIELDS = ("problem", "answer")
OPTIONAL_STRING_FIELDS = ("id", "source")

# Column titles of the paper's Table 1, by file stem.
DISPLAY_NAMES = {
    "aime24": "AIME24",
    "aime25": "AIME25",
    "amc23": "AMC23",
    "math500": "MATH500",
    "minerva_math": "Minerva",
    "minerva": "Minerva",
    "olympiadbench": "Olympiad",
}
# The paper's column order.
PAPER_ORDER = ("aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench")


class BenchmarkFormatError(ValueError):
    """A benchmark file is unreadable or has a malformed row; the message names ``file:line``."""


@dataclass(frozen=True)
class Problem:
    """One benchmark problem."""

    id: str
    problem: str
    answer: str
    source: str | None
    line: int
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass
class Benchmark:
    """A named list of problems read from ``path``."""

    name: str
    path: Path
    problems: list[Problem]

    @property
    def display_name(self) -> str:
        """The paper's column title for known benchmarks, else the name."""
        return DISPLAY_NAMES.get(self.name, self.name)

    def __len__(self) -> int:
        return len(self.problems)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def load_benchmark(path: str | Path, name: str | None = None, limit: int | None = None) -> Benchmark:
    """Read and validate one benchmark file; ``name`` defaults to the file stem; ``limit`` keeps
    the first N problems (all rows are still validated)."""
    path = Path(path)
    name = name or path.stem
    if not path.is_file():
        raise BenchmarkFormatError(f"{path}: benchmark file not found")
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    try:
        rows = list(iter_jsonl_objects(path, BenchmarkFormatError))
    except UnicodeDecodeError as exc:
        raise BenchmarkFormatError(f"{path}: not UTF-8 text ({exc})") from exc
    for line_no, obj in rows:
        where = f"{path}:{line_no}"
        for key in REQUIRED_FIELDS:
            if key not in obj:
                raise BenchmarkFormatError(f"{where}: missing required field {key!r} (fields present: "
                                           f"{', '.join(sorted(obj)) or 'none'})")
            value = obj[key]
            if not isinstance(value, str):
                raise BenchmarkFormatError(f"{where}: field {key!r} must be a string, got {_type_name(value)} "
                                           f"{json.dumps(value)[:60]}")
            if not value.strip():
                raise BenchmarkFormatError(f"{where}: field {key!r} is empty")
        for key in OPTIONAL_STRING_FIELDS:
            if key in obj and not isinstance(obj[key], str):
                raise BenchmarkFormatError(f"{where}: field {key!r} must be a string, got {_type_name(obj[key])} "
                                           f"{json.dumps(obj[key])[:60]}")
        pid = obj.get("id") or f"{name}-{line_no}"
        if pid in seen:
            raise BenchmarkFormatError(f"{where}: duplicate id {pid!r} (first on line {seen[pid]})")
        seen[pid] = line_no
        extra = {k: v for k, v in obj.items() if k not in REQUIRED_FIELDS + OPTIONAL_STRING_FIELDS}
        problems.append(Problem(id=pid, problem=obj["problem"], answer=obj["answer"].strip(),
                                source=obj.get("source"), line=line_no, extra=extra))
    if not problems:
        raise BenchmarkFormatError(f"{path}: no problems (the file is empty)")
    if limit is not None:
        problems = problems[:limit]
    return Benchmark(name=name, path=path, problems=problems)


def expand_benchmark_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given; a directory stands for its ``*.jsonl`` files (the paper's six in the
    paper's order first, then the rest by name)."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files = sorted(p.glob("*.jsonl"))
            if not files:
                raise BenchmarkFormatError(f"{p}: directory has no .jsonl benchmark files")
            rank = {stem: i for i, stem in enumerate(PAPER_ORDER)}
            files.sort(key=lambda f: (rank.get(f.stem, len(rank)), f.name))
            out.extend(files)
        else:
            out.append(p)
    return out


def load_benchmarks(paths: Sequence[str | Path], limit: int | None = None) -> list[Benchmark]:
    """:func:`load_benchmark` for each path (directories expanded); benchmark names must be unique."""
    benchmarks = [load_benchmark(p, limit=limit) for p in expand_benchmark_paths(paths)]
    names: dict[str, Path] = {}
    for b in benchmarks:
        if b.name in names:
            raise BenchmarkFormatError(f"two benchmarks are named {b.name!r} ({names[b.name]} and {b.path}); "
                                       "benchmark names come from the file names and must be unique")
        names[b.name] = b.path
    return benchmarks
