"""Eval end to end: a tiny Qwen3 model served by the embedded engine, graded by math-verify.

The model is a real transformers Qwen3 whose weights make it a bigram machine with a known
answer: attention and MLP outputs are zeroed, so the next token depends only on the current
one, and the embedding / LM-head rows encode the chain
``"\\n" -> "\\boxed{" -> "7" (or "8") -> "}" -> <|im_end|>``. Every prompt ends with the chat
template's ``assistant\\n``, so every response is ``\\boxed{7}`` or ``\\boxed{8}``: greedy decoding
always gives ``\\boxed{7}``; at the paper's temperature 0.6, ``7`` has probability 0.75. Gold
answers then fix the expected correctness: "7" and the zero-padded "007" are right, "9" never.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from scope_megatron.evaluation import cli as eval_cli
from scope_megatron.evaluation.benchmarks import load_benchmarks
from scope_megatron.evaluation.metrics import pass_at_k_bootstrap
from scope_megatron.evaluation.runner import EvalError, EvalSettings, evaluate, run_evaluation
from scope_megatron.rollout.client import BackgroundLoop, SGLangClient
from scope_megatron.rollout.embedded_server import start_embedded_server
from scope_megatron.rollout.rewards import MathRewardPool
from scope_megatron.examples.tiny_models import make_tiny_tokenizer, save_tiny_hf_model

pytestmark = pytest.mark.timeout(180)

P7 = 0.75                                   # probability of "7" at temperature 0.6
CHAIN = ["\n", "\\", "b", "o", "x", "e", "d", "{"]
AIME = [{"id": "t-1", "problem": "Compute 3+4.", "answer": "7", "source": "toy"},
        {"id": "t-2", "problem": "Padded gold.", "answer": "007", "source": "toy"},
        {"id": "t-3", "problem": "Never produced.", "answer": "9", "source": "toy"}]
AMC = [{"id": "u-1", "problem": "Seven?", "answer": "7", "source": "toy"},
       {"id": "u-2", "problem": "Eight?", "answer": "8", "source": "toy"}]


def make_boxed_seven_model(out_dir: Path) -> Path:
    """The bigram Qwen3 described in the module docstring, saved with the tiny tokenizer."""
    from transformers import AutoModelForCausalLM

    save_tiny_hf_model(out_dir, "qwen3", seed=3)
    tok = make_tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    tid = {c: tok.convert_tokens_to_ids(c) for c in CHAIN + ["7", "8", "}"]}
    eos = tok.eos_token_id
    hidden = model.config.hidden_size
    order = CHAIN + ["7", "8", "}"]
    basis = {c: i for i, c in enumerate(order)}
    sink = len(order)                      # every other token embeds here and predicts nothing in particular
    scale = 10.0 / math.sqrt(hidden)       # RMSNorm maps a one-hot to sqrt(hidden) * one-hot: logits = 10 * coeff
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        emb = model.model.embed_tokens.weight
        emb.zero_()
        emb[:, sink] = 1.0
        for c, i in basis.items():
            emb[tid[c]].zero_()
            emb[tid[c], i] = 1.0
        head = model.lm_head.weight
        head.zero_()
        successors = {CHAIN[j]: CHAIN[j + 1] for j in range(len(CHAIN) - 1)}
        for src, dst in successors.items():
            head[tid[dst], basis[src]] = 5.0 * scale
        # after "{": "7" with logit 50, "8" with logit 50 - 0.6 ln 3 (probability 3/4 vs 1/4 at T = 0.6)
        head[tid["7"], basis["{"]] = 5.0 * scale
        head[tid["8"], basis["{"]] = (5.0 - 0.06 * math.log(3.0)) * scale
        head[tid["}"], basis["7"]] = 5.0 * scale
        head[tid["}"], basis["8"]] = 5.0 * scale
        head[eos, basis["}"]] = 5.0 * scale
    model.save_pretrained(out_dir)
    return out_dir


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_boxed_seven_model(tmp_path_factory.mktemp("boxed7"))


@pytest.fixture(scope="module")
def server(model_dir):
    handle = start_embedded_server(model_dir, random_seed=0, max_batch_size=16,
                                   enable_deterministic_inference=True)  # seeded evaluations, as the eval CLI
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def pool():
    with MathRewardPool(num_workers=1, timeout_s=20.0) as p:
        yield p


@pytest.fixture(scope="module")
def bench_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    return [write_jsonl(d / "aime24.jsonl", AIME), write_jsonl(d / "amc23.jsonl", AMC)]


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def greedy(n=3, ks=(1, 3), **kw) -> EvalSettings:
    return EvalSettings(n=n, ks=ks, temperature=0.0, max_new_tokens=16, **kw)


def test_greedy_run_gives_known_scores_records_and_tables(server, pool, bench_files, tokenizer, tmp_path):
    client = SGLangClient(server.url, max_concurrency=8)
    result = run_evaluation(client, load_benchmarks(bench_files), tokenizer, greedy(), tmp_path / "out",
                            reward_pool=pool, model_name="boxed7", progress=False)
    aime, amc = result.benchmarks
    assert aime.score.metrics == pytest.approx({"avg@1": 2 / 3, "pass@1": 2 / 3, "avg@3": 2 / 3, "pass@3": 2 / 3})
    assert amc.score.metrics == pytest.approx({"avg@1": 0.5, "pass@1": 0.5, "avg@3": 0.5, "pass@3": 0.5})
    assert result.mean == pytest.approx({k: (2 / 3 + 0.5) / 2 for k in ("avg@1", "pass@1", "avg@3", "pass@3")})
    assert aime.status_counts["correct"] == 6 and aime.status_counts["wrong"] == 3
    assert (aime.num_resumed, aime.num_generated, aime.truncated_fraction) == (0, 3, 0.0)

    records = read_records(tmp_path / "out" / "records" / "aime24.jsonl")
    assert sorted(r["id"] for r in records) == ["t-1", "t-2", "t-3"]
    by_id = {r["id"]: r for r in records}
    for pid, ok in (("t-1", True), ("t-2", True), ("t-3", False)):
        r = by_id[pid]
        assert r["n"] == 3 and len(r["samples"]) == 3 and r["correct"] == [ok] * 3 and r["num_correct"] == 3 * ok
        assert r["benchmark"] == "aime24" and r["answer"] == {"t-1": "7", "t-2": "007", "t-3": "9"}[pid]
        # the student's chat template and the paper's suffix
        problem = r["problem"]
        assert r["prompt"] == (f"<|im_start|>user\n{problem} Put your final answer within \\boxed{{}}.<|im_end|>\n"
                               "<|im_start|>assistant\n")
        assert r["num_prompt_tokens"] == len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"])
        for s in r["samples"]:
            assert s["text"] == "\\boxed{7}" and s["extracted"] == "7" and s["finish_reason"] == "stop"
            assert s["status"] == ("correct" if ok else "wrong") and s["correct"] is ok
            assert s["num_tokens"] in (9, 10)   # the 9 characters, and the eos token if the server returns it

    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["estimator"] == "unbiased" and "C(n-c,k)" in data["estimator_description"]
    assert data["sampling"]["temperature"] == 0.0 and data["sampling"]["max_new_tokens"] == 16
    assert data["benchmarks"]["aime24"]["metrics"]["pass@3"] == pytest.approx(2 / 3)
    assert data["mean"]["avg@3"] == pytest.approx(7 / 12)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| Model | AIME24 A | AIME24 P | AMC23 A | AMC23 P | Avg A | Avg P |" in md
    assert "| boxed7 | 66.7 | 66.7 | 50.0 | 50.0 | 58.3 | 58.3 |" in md
    assert "Pass@k estimator: **unbiased**" in md


def test_resume_skips_finished_problems_and_refuses_other_settings(server, pool, bench_files, tokenizer, tmp_path):
    client = SGLangClient(server.url, max_concurrency=8)
    benchmarks = load_benchmarks(bench_files[:1])
    out = tmp_path / "out"
    run_evaluation(client, benchmarks, tokenizer, greedy(), out, reward_pool=pool, progress=False)
    path = out / "records" / "aime24.jsonl"
    first = read_records(path)[0]
    first["marker"] = "kept from the first run"
    # an interrupted run: one finished record, then half a line
    path.write_text(json.dumps(first) + "\n" + '{"benchmark": "aime24", "id": "t-')
    result = run_evaluation(client, benchmarks, tokenizer, greedy(), out, reward_pool=pool, progress=False)
    b = result.benchmarks[0]
    assert (b.num_resumed, b.num_generated) == (1, 2)
    records = read_records(path)                      # the half line was dropped, two problems appended
    assert len(records) == 3 and records[0]["marker"] == "kept from the first run"
    assert sorted(r["id"] for r in records) == ["t-1", "t-2", "t-3"]
    assert b.score.metrics["avg@3"] == pytest.approx(2 / 3)
    # a run that only changes k or the estimator reuses everything
    again = run_evaluation(client, benchmarks, tokenizer, greedy(ks=(2,), estimator="bootstrap"), out,
                           reward_pool=pool, progress=False)
    assert again.benchmarks[0].num_generated == 0 and len(read_records(path)) == 3
    assert json.loads((out / "results.json").read_text())["estimator"] == "bootstrap"
    # other sampling settings would mix two distributions: refused
    with pytest.raises(EvalError, match="max_new_tokens: 16 -> 12"):
        run_evaluation(client, benchmarks, tokenizer, EvalSettings(n=3, ks=(1,), temperature=0.0,
                                                                   max_new_tokens=12), out, reward_pool=pool,
                       progress=False)
    # a changed gold answer is refused too
    changed = [dict(AIME[0], answer="8"), *AIME[1:]]
    with pytest.raises(EvalError, match="t-1.*does not match"):
        run_evaluation(client, load_benchmarks([write_jsonl(tmp_path / "aime24.jsonl", changed)]), tokenizer,
                       greedy(), out, reward_pool=pool, progress=False)


def test_truncated_responses_are_wrong(server, pool, bench_files, tokenizer):
    client = SGLangClient(server.url, max_concurrency=8)
    benchmarks = load_benchmarks(bench_files[:1], limit=1)
    result = run_evaluation(client, benchmarks, tokenizer, EvalSettings(n=2, ks=(1,), temperature=0.0,
                                                                        max_new_tokens=4),
                            None, reward_pool=pool, progress=False)
    b = result.benchmarks[0]
    assert b.status_counts["truncated"] == 2 and b.truncated_fraction == 1.0 and b.score.metrics["avg@1"] == 0.0


def brute_pass(correct: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


def test_paper_sampling_metrics_agree_with_the_records(server, pool, bench_files, tokenizer, tmp_path):
    """Default paper sampling (T 0.6, top-p 0.95, top-k 20): "7" or "8" at random; the metrics must
    be what the records imply, the records what the responses say."""
    client = SGLangClient(server.url, max_concurrency=16)
    settings = EvalSettings(n=4, ks=(1, 2, 4), max_new_tokens=16, seed=123)
    result = run_evaluation(client, load_benchmarks(bench_files), tokenizer, settings, tmp_path / "out",
                            reward_pool=pool, progress=False)
    all_samples = []
    for b in result.benchmarks:
        records = {r["id"]: r for r in read_records(tmp_path / "out" / "records" / f"{b.benchmark.name}.jsonl")}
        expected = {"avg@1": 0.0, "avg@2": 0.0, "avg@4": 0.0, "pass@1": 0.0, "pass@2": 0.0, "pass@4": 0.0}
        for p in b.benchmark.problems:
            r = records[p.id]
            assert r["seed"] is not None
            digits = []
            for s in r["samples"]:
                assert s["text"] in ("\\boxed{7}", "\\boxed{8}")
                digits.append(s["text"][7])
            correct = [int(d) == int(p.answer) for d in digits]      # numerical comparison, "007" == "7"
            assert r["correct"] == correct and r["num_correct"] == sum(correct)
            all_samples += digits
            for k in (1, 2, 4):
                expected[f"avg@{k}"] += sum(correct) / 4 / len(records)
                expected[f"pass@{k}"] += brute_pass(correct, k) / len(records)
        assert b.score.metrics == pytest.approx(expected)
    # both branches are sampled, in roughly the designed proportion (20 samples; P("7") = 0.75)
    sevens = all_samples.count("7") / len(all_samples)
    assert 0.4 <= sevens <= 0.98, all_samples
    # the seeded run is reproducible
    again = run_evaluation(client, load_benchmarks(bench_files), tokenizer, settings, None, reward_pool=pool,
                           progress=False)
    assert [b.score.metrics for b in again.benchmarks] == [b.score.metrics for b in result.benchmarks]


def test_trainer_evaluate_returns_named_scalars(server, pool, bench_files, tokenizer):
    loop = BackgroundLoop("eval-test")
    try:
        client = SGLangClient(server.url, max_concurrency=8)
        scalars = evaluate(client, bench_files, tokenizer, n=2, ks=[1, 2], reward_pool=pool, loop=loop,
                           settings=EvalSettings(n=2, ks=(1, 2), temperature=0.0, max_new_tokens=16))
    finally:
        loop.close()
    assert scalars["eval/aime24/avg@2"] == pytest.approx(2 / 3)
    assert scalars["eval/aime24/pass@1"] == pytest.approx(2 / 3)
    assert scalars["eval/amc23/pass@2"] == pytest.approx(0.5)
    assert scalars["eval/mean/avg@1"] == pytest.approx(7 / 12)
    assert scalars["eval/aime24/truncated"] == 0.0 and scalars["eval/time_s"] > 0
    assert {k for k in scalars if k.startswith("eval/mean/")} == {
        f"eval/mean/{m}{se}" for m in ("avg@1", "avg@2", "pass@1", "pass@2") for se in ("", "_se")}
    # standard errors over problems: aime24 per-problem accuracy 1, 1, 0 (sd sqrt(1/3), 3 problems);
    # amc23 1, 0 (sd sqrt(1/2), 2 problems); their mean sqrt(se1^2 + se2^2) / 2
    assert scalars["eval/aime24/avg@1_se"] == pytest.approx(1 / 3)
    assert scalars["eval/amc23/avg@1_se"] == pytest.approx(0.5)
    assert scalars["eval/mean/avg@1_se"] == pytest.approx((1 / 9 + 1 / 4) ** 0.5 / 2)


# ------------------------------------------------------------------------------ the command
def test_cli_with_hf_dir_then_bootstrap_rerun(model_dir, bench_files, tmp_path, capsys):
    out = tmp_path / "cli_out"
    args = ["--model", str(model_dir), "--benchmarks", *map(str, bench_files), "--n", "2", "--k", "1,2",
            "--max-new-tokens", "16", "--temperature", "0", "--out", str(out), "--no-progress",
            "--reward-workers", "1", "--device", "cpu", "--max-batch-size", "8"]
    assert eval_cli.main(args) == 0
    text = capsys.readouterr().out
    assert "Pass@k estimator: unbiased" in text
    assert f"| {model_dir} | 66.7 | 66.7 | 50.0 | 50.0 | 58.3 | 58.3 |" in text
    data = json.loads((out / "results.json").read_text())
    assert data["estimator"] == "unbiased" and data["n"] == 2 and data["ks"] == [1, 2]
    assert data["sampling"]["top_k"] == 20 and data["sampling"]["top_p"] == 0.95
    assert (out / "results.md").read_text().count("| Mean |") == 1

    # same directory, bootstrap estimator: nothing is sampled again, and the output says which estimator
    assert eval_cli.main(args + ["--estimator", "bootstrap"]) == 0
    text = capsys.readouterr().out
    assert "Pass@k estimator: bootstrap" in text and "5 problems were taken from earlier records" in text
    assert "recomputing the metrics without sampling" in text and "starting the embedded engine" not in text
    data = json.loads((out / "results.json").read_text())
    assert data["estimator"] == "bootstrap" and data["bootstrap"] == {"draws": 1000, "seed": 42}
    assert data["benchmarks"]["aime24"]["problems_generated"] == 0
    records = read_records(out / "records" / "aime24.jsonl")
    expected = sum(pass_at_k_bootstrap(r["correct"], 2) for r in records) / len(records)
    assert data["benchmarks"]["aime24"]["metrics"]["pass@2"] == pytest.approx(expected)


def test_cli_with_url(server, model_dir, bench_files, tmp_path, capsys):
    out = tmp_path / "url_out"
    rc = eval_cli.main(["--url", server.url, "--tokenizer", str(model_dir), "--benchmarks", str(bench_files[1]),
                        "--n", "2", "--max-new-tokens", "16", "--temperature", "0", "--out", str(out),
                        "--no-progress", "--reward-workers", "1", "--name", "served"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| served | 50.0 | 50.0 | 50.0 | 50.0 |" in text and "k=1,2" in text


def test_cli_bad_input_fails_before_sampling(tmp_path, capsys):
    bad = tmp_path / "aime24.jsonl"
    bad.write_text(json.dumps(AIME[0]) + "\n" + '{"id": "t-2", "problem": "p", "answer": 7}\n')
    missing_model = str(tmp_path / "no_such_model")   # never loaded: the file is checked first
    assert eval_cli.main(["--model", missing_model, "--benchmarks", str(bad), "--out", str(tmp_path / "o"),
                          "--n", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: field 'answer' must be a string, got int 7" in err
    good = write_jsonl(tmp_path / "good.jsonl", AIME)
    assert eval_cli.main(["--model", missing_model, "--benchmarks", str(good), "--out", str(tmp_path / "o"),
                          "--n", "4", "--k", "1,8"]) == 2
    assert "k=8 is larger than the number of samples per problem n=4" in capsys.readouterr().err


def test_cli_server_refusal_names_the_problem(server, model_dir, tmp_path, capsys):
    rows = [AIME[0], {"id": "long", "problem": "x" * 600, "answer": "7"}]   # over the tiny model's 512 positions
    bench = write_jsonl(tmp_path / "long.jsonl", rows)
    rc = eval_cli.main(["--url", server.url, "--tokenizer", str(model_dir), "--benchmarks", str(bench), "--n", "2",
                        "--max-new-tokens", "16", "--out", str(tmp_path / "o"), "--no-progress",
                        "--reward-workers", "1", "--concurrency", "2"])
    assert rc == 1
    err = capsys.readouterr().err
    assert f"sampling long problem 'long' ({bench}:2" in err and "context length is 512" in err
    assert "rerun to resume" in err


def test_dispatcher_help(capsys):
    from scope_megatron.cli import main as top_main

    with pytest.raises(SystemExit) as info:
        top_main(["eval", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--estimator {unbiased,bootstrap}" in text and "--repetition-penalty" in text
