"""Prompt data: jsonl/parquet, chat template, the paper's suffix, length filter, resumable shuffle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scope_megatron.rollout.data import (PAPER_SUFFIX, REFERENCE_CODE_FORMAT, PromptDataConfig, PromptDataset,
                                         PromptFormat, PromptSampler, format_prompt, read_records)
from scope_megatron.examples.tiny_models import make_tiny_tokenizer

MATH_DIR = Path("/work/shared/data/math")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_format_matches_the_paper(tokenizer):
    text = format_prompt("What is 1+1?", tokenizer)
    assert text == ("<|im_start|>user\nWhat is 1+1? Put your final answer within \\boxed{}.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ref = format_prompt("What is 1+1?", tokenizer, REFERENCE_CODE_FORMAT)
    assert "1+1?Put your final answer within \\boxed{{}}." in ref
    plain = format_prompt("Q", tokenizer, PromptFormat(use_chat_template=False))
    assert plain == "Q " + PAPER_SUFFIX
    with_system = format_prompt("Q", tokenizer, PromptFormat(system_prompt="Be brief."))
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ ")


def test_jsonl_and_parquet_with_custom_fields_and_length_filter(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": "Short?", "gold": "1", "uid": "a"},
            {"question": "x" * 500, "gold": "2", "uid": "b"},
            {"question": "Also short?", "gold": 3, "uid": "c"},
            {"question": "", "gold": "4", "uid": "d"}]
    jl = write_jsonl(tmp_path / "p.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows[:2]), tmp_path / "p.parquet")
    cfg = PromptDataConfig(paths=[jl, tmp_path / "p.parquet"], problem_key="question", answer_key="gold",
                           id_key="uid", max_prompt_tokens=200)
    ds = PromptDataset(cfg, tokenizer)
    assert ds.stats() == {"loaded": 6, "kept": 3, "dropped_too_long": 2, "dropped_invalid": 1}
    assert [r.record_id for r in ds.records] == ["a", "c", "a"]
    assert [r.answer for r in ds.records] == ["1", "3", "1"]
    first = ds[0]
    assert first.prompt_ids == tokenizer(format_prompt("Short?", tokenizer), add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(first.prompt_ids) == first.prompt_text
    assert all(len(r.prompt_ids) <= 200 for r in ds.records)
    assert first.extra == {"uid": "a"}  # other fields ride along


def test_bad_files_name_the_problem(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "a", "answer": "1"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_records(bad)
    with pytest.raises(ValueError, match="unsupported"):
        read_records(tmp_path / "x.csv")
    empty = write_jsonl(tmp_path / "e.jsonl", [{"problem": "a"}])
    with pytest.raises(ValueError, match="no usable prompts"):
        PromptDataset(PromptDataConfig(paths=[empty]), tokenizer)


def test_sampler_is_deterministic_covers_each_epoch_and_resumes():
    a, b = PromptSampler(10, seed=3), PromptSampler(10, seed=3)
    seq_a = a.next_indices(25)
    assert seq_a == b.next_indices(25)
    assert sorted(seq_a[:10]) == list(range(10)) and sorted(seq_a[10:20]) == list(range(10))
    assert seq_a[:10] != seq_a[10:20]  # a new permutation each epoch
    assert PromptSampler(10, seed=4).next_indices(10) != seq_a[:10]
    assert PromptSampler(10, shuffle=False).next_indices(12) == list(range(10)) + [0, 1]
    # resume mid-epoch and across an epoch boundary
    c = PromptSampler(10, seed=3)
    c.next_indices(7)
    state = json.loads(json.dumps(c.state_dict()))
    d = PromptSampler(10, seed=3)
    d.load_state_dict(state)
    assert d.next_indices(18) == seq_a[7:25]
    with pytest.raises(ValueError, match="size"):
        PromptSampler(11, seed=3).load_state_dict(state)


@pytest.mark.skipif(not MATH_DIR.exists(), reason="shared math data not present")
def test_real_math_data(tokenizer):
    cfg = PromptDataConfig(paths=[MATH_DIR / "benchmarks" / "math500.jsonl"], max_prompt_tokens=300)
    ds = PromptDataset(cfg, tokenizer)
    assert ds.num_loaded == 500
    assert ds.num_dropped_too_long > 0 and len(ds) + ds.num_dropped_too_long + ds.num_dropped_invalid == 500
    assert all(len(r.prompt_ids) <= 300 for r in ds.records)
    assert all(r.prompt_text.rstrip().endswith("<|im_start|>assistant") for r in ds.records)
    assert all(PAPER_SUFFIX in r.prompt_text for r in ds.records)
    assert ds[0].record_id and ds[0].answer
