"""Several teachers (``teacher.routes`` / ``teacher.others``), end to end with embedded engines.

The prompts come from two data sources, ``alpha`` (the record's ``data_source`` field) and
``beta``; ``teacher.routes: {beta: second}`` sends beta's prompts to a second teacher (another
random tiny model of the same vocabulary) and alpha's to the default one. Reference: plain
transformers' log-probs of each saved response under each teacher. Every trajectory was scored
by exactly the teacher its source routes to (its log-probs match that teacher's and not the
other's), and the per-teacher metrics count the routed prompts and their accuracy. A second
teacher whose tokenizer maps the student's tokens to other ids is refused at startup, naming it.
"""

from __future__ import annotations

import json

import pytest

from tests.loop_utils import asset_overrides, hf_logprobs, read_metrics, run_train, tail

pytestmark = pytest.mark.timeout(420)
PROMPTS_PER_STEP, GROUP_SIZE = 4, 2
SOURCES = ["alpha", "beta"] * 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from scope_megatron.examples.tiny import PROBLEMS, prepare
    from scope_megatron.examples.tiny_models import save_tiny_hf_model

    root = tmp_path_factory.mktemp("teachers")
    assets = prepare(root / "tiny")
    assets["second"] = save_tiny_hf_model(root / "second_hf", "qwen3", seed=2)
    assets["prompts"] = root / "sources.jsonl"
    with assets["prompts"].open("w") as f:
        for i, source in enumerate(SOURCES):
            problem, answer = PROBLEMS[i]
            f.write(json.dumps({"id": f"q{i}", "problem": problem, "answer": answer, "data_source": source}) + "\n")
    return assets


def _overrides(assets, run_dir, second_tokenizer=None) -> list[str]:
    extra = [f"teacher.others.second.tokenizer={second_tokenizer}"] if second_tokenizer else []
    return [*asset_overrides(assets, run_dir), "steps=1", f"rollout.prompts_per_step={PROMPTS_PER_STEP}",
            f"rollout.group_size={GROUP_SIZE}", "teacher.routes={beta: second}",
            f"teacher.others.second.model={assets['second']}", "teacher.others.second.embedded_max_batch_size=4",
            "logging.save_rollouts=true", "checkpoint.every=0", "checkpoint.save_at_end=false", *extra]


def test_each_prompt_is_scored_by_its_routed_teacher(assets, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(*_overrides(assets, run_dir), timeout=360)
    assert proc.returncode == 0, tail(proc)
    rollouts = [json.loads(line) for line in (run_dir / "rollouts" / "step_00000001.jsonl").read_text().splitlines()]
    assert len(rollouts) == PROMPTS_PER_STEP * GROUP_SIZE
    teachers = {"default": assets["teacher"], "second": assets["second"]}
    scored = {"default": 0, "second": 0}
    for t in rollouts:
        expected = "second" if SOURCES[t["prompt_index"]] == "beta" else "default"
        assert t["teacher"] == expected, t["prompt_index"]
        if not t["response_ids"]:
            continue
        own = hf_logprobs(teachers[expected], t["prompt_ids"], t["response_ids"])
        other = hf_logprobs(teachers["second" if expected == "default" else "default"], t["prompt_ids"],
                            t["response_ids"])
        assert t["teacher_logprobs"] == pytest.approx(own, abs=1e-4)
        assert max(abs(a - b) for a, b in zip(t["teacher_logprobs"], other)) > 1e-2  # the teachers differ
        scored[expected] += 1
    assert all(scored.values()), scored  # both teachers scored something (seeded sampling: deterministic)
    m = read_metrics(run_dir)[1]
    for name in teachers:
        mine = [t for t in rollouts if t["teacher"] == name]
        assert m[f"teacher/{name}/groups"] == len({t["group"] for t in mine})
        assert m[f"teacher/{name}/accuracy"] == pytest.approx(sum(t["correct"] for t in mine) / len(mine))
        lps = [lp for t in mine for lp in t["teacher_logprobs"]]
        assert m[f"teacher/{name}/ppl"] == pytest.approx(2.718281828459045 ** (-sum(lps) / len(lps)), rel=1e-9)


def test_a_teacher_with_another_vocabulary_is_refused(assets, tmp_path):
    from tests.test_vocab_check import tiny_vocab, tokenizer_with_vocab
    from scope_megatron.examples.tiny_models import SPECIAL_TOKENS

    vocab = tiny_vocab()
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    permuted = tmp_path / "permuted_tokenizer"
    tokenizer_with_vocab(vocab, SPECIAL_TOKENS).save_pretrained(permuted)
    proc = run_train(*_overrides(assets, tmp_path / "run", second_tokenizer=permuted), timeout=300)
    assert proc.returncode == 2, tail(proc)
    assert "'teacher.others.second.tokenizer'" in proc.stderr and "does not share the student's vocabulary" in proc.stderr
