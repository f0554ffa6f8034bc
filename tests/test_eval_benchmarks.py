"""Benchmark files: valid ones load as written; each malformed row is named by file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scope_megatron.evaluation.benchmarks import (BenchmarkFormatError, expand_benchmark_paths, load_benchmark,
                                                  load_benchmarks)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "math" / "benchmarks"
GOOD = [{"id": "a-1", "problem": "What is 2+3?", "answer": "5", "source": "toy"},
        {"id": "a-2", "problem": "Pad me", "answer": "025", "source": "toy"},
        {"id": "a-3", "problem": "Third", "answer": "\\frac{1}{2}", "source": "toy", "level": 3}]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_valid_file_loads_as_written(tmp_path):
    path = write_lines(tmp_path / "toy.jsonl", [json.dumps(GOOD[0]), "", json.dumps(GOOD[1]), json.dumps(GOOD[2])])
    b = load_benchmark(path)
    assert b.name == "toy" and len(b) == 3
    assert [p.id for p in b.problems] == ["a-1", "a-2", "a-3"]
    assert [p.line for p in b.problems] == [1, 3, 4]
    assert b.problems[1].answer == "025"            # kept as given; the grader compares numerically
    assert b.problems[2].extra == {"level": 3}
    assert len(load_benchmark(path, limit=2)) == 2


def test_id_defaults_to_name_and_line(tmp_path):
    path = write_lines(tmp_path / "noid.jsonl", [json.dumps({"problem": "p", "answer": "1"})])
    assert load_benchmark(path).problems[0].id == "noid-1"


BAD_ROWS = [
    ('{"id": "x", "problem": "p"}', "missing required field 'answer'"),
    ('{"id": "x", "answer": "1"}', "missing required field 'problem'"),
    ('{"id": "x", "problem": "p", "answer": 5}', "field 'answer' must be a string, got int 5"),
    ('{"id": "x", "problem": "p", "answer": null}', "field 'answer' must be a string, got null"),
    ('{"id": "x", "problem": ["p"], "answer": "1"}', "field 'problem' must be a string, got list"),
    ('{"id": 7, "problem": "p", "answer": "1"}', "field 'id' must be a string, got int"),
    ('{"id": "x", "problem": "p", "answer": "1", "source": 3}', "field 'source' must be a string"),
    ('{"id": "x", "problem": "p", "answer": "  "}', "field 'answer' is empty"),
    ('{"id": "x", "problem": "p", "answer": "1"', "not valid JSON"),
    ('["p", "1"]', "expected a JSON object, got list"),
    ('{"id": "a-1", "problem": "p", "answer": "1"}', "duplicate id 'a-1' \\(first on line 1\\)"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS)
def test_malformed_row_names_file_and_line(tmp_path, row, message):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD[0]), json.dumps(GOOD[1]), "", row,
                                                json.dumps(GOOD[2])])
    with pytest.raises(BenchmarkFormatError, match=rf"bad\.jsonl:4: {message}") as info:
        load_benchmark(path)
    assert str(info.value).startswith(f"{path}:4: ")


def test_unreadable_or_empty_files(tmp_path):
    with pytest.raises(BenchmarkFormatError, match="not found"):
        load_benchmark(tmp_path / "missing.jsonl")
    with pytest.raises(BenchmarkFormatError, match="no problems"):
        load_benchmark(write_lines(tmp_path / "empty.jsonl", ["", "  "]))
    (tmp_path / "latin.jsonl").write_bytes(b'{"problem": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(BenchmarkFormatError, match="not UTF-8"):
        load_benchmark(tmp_path / "latin.jsonl")


def test_directories_expand_in_paper_order_and_names_are_unique(tmp_path):
    d = tmp_path / "bench"
    d.mkdir()
    for stem in ("zeta", "math500", "aime24"):
        write_lines(d / f"{stem}.jsonl", [json.dumps(GOOD[0])])
    assert [p.stem for p in expand_benchmark_paths([d])] == ["aime24", "math500", "zeta"]
    other = tmp_path / "other"
    other.mkdir()
    write_lines(other / "aime24.jsonl", [json.dumps(GOOD[0])])
    with pytest.raises(BenchmarkFormatError, match="two benchmarks are named 'aime24'"):
        load_benchmarks([d, other / "aime24.jsonl"])
    assert load_benchmarks([d])[0].display_name == "AIME24"


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared benchmark data not present")
def test_the_six_shared_benchmarks_load():
    benchmarks = load_benchmarks([SHARED])
    sizes = {b.name: len(b) for b in benchmarks}
    assert sizes == {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500, "minerva_math": 272,
                     "olympiadbench": 581}
    assert [b.display_name for b in benchmarks] == ["AIME24", "AIME25", "AMC23", "MATH500", "Minerva", "Olympiad"]
    aime24 = benchmarks[0]
    assert sum(p.answer.startswith("0") for p in aime24.problems) == 7   # zero-padded, as the README says
