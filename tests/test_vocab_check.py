"""The teacher-vocabulary check (scope_megatron.rollout.vocab) and the masking of teacher top-k ids
the student does not have (trainer.controller.mask_topk_row + objective.logprobs.topk_kl).

References: tokenizers built here with known token -> id maps (a permutation, a missing special
token, extra teacher tokens, a padded config vocabulary), and the top-k KL of a row with its
out-of-vocabulary entries removed, computed by the unmasked formula on the shorter row.
"""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

from scope_megatron.config import ConfigError
from scope_megatron.objective.logprobs import topk_kl, vocab_parallel_topk_kl
from scope_megatron.rollout.vocab import VocabularyMismatch, check_teacher_vocabulary, load_tokenizer
from scope_megatron.examples.tiny_models import CHARS, SPECIAL_TOKENS, make_tiny_tokenizer, save_tiny_hf_model, tiny_hf_config
from scope_megatron.trainer.controller import mask_topk_row

pytestmark = pytest.mark.timeout(120)


def tokenizer_with_vocab(vocab: dict[str, int], special: list[str]):
    """A character-level fast tokenizer over ``vocab`` (token -> id), like make_tiny_tokenizer's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=special[0]))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=special[-1], pad_token=special[0],
                                   unk_token=special[0], additional_special_tokens=special[1:-1])


def tiny_vocab() -> dict[str, int]:
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    path = tmp_path_factory.mktemp("student")
    make_tiny_tokenizer().save_pretrained(path)
    return load_tokenizer(path), str(path)


def check(student, teacher_dir, **kw):
    tokenizer, name = student
    return check_teacher_vocabulary(tokenizer, student_name=name, tokenizer_dir=kw.get("tokenizer_dir"),
                                    model_dir=None if teacher_dir is None else str(teacher_dir),
                                    model_info=kw.get("model_info"), teacher_url=kw.get("teacher_url"))


def test_permuted_teacher_vocabulary_is_refused_with_examples(student, tmp_path):
    vocab = tiny_vocab()
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # two tokens swap ids
    teacher = tmp_path / "teacher"
    tokenizer_with_vocab(vocab, SPECIAL_TOKENS).save_pretrained(teacher)
    with pytest.raises(VocabularyMismatch) as info:
        check(student, teacher)
    assert isinstance(info.value, ConfigError) and info.value.field == "teacher.model"
    text = str(info.value)
    a, b = tiny_vocab()["a"], tiny_vocab()["b"]
    assert student[1] in text and str(teacher) in text
    assert "2 of the student's" in text
    assert f"('a', student {a}, teacher {b})" in text and f"('b', student {b}, teacher {a})" in text


def test_teacher_missing_a_special_token_is_refused(student, tmp_path):
    # the teacher lacks <|im_start|> (its chars keep their ids): the chat template's token has no teacher id
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS) if tok != "<|im_start|>"}
    teacher = tmp_path / "teacher"
    tokenizer_with_vocab(vocab, ["<|endoftext|>", "<|im_end|>"]).save_pretrained(teacher)
    with pytest.raises(VocabularyMismatch, match=r"\('<\|im_start\|>', student 1, teacher missing\)"):
        check(student, teacher)


def test_same_tokens_with_padded_config_vocab_and_extra_teacher_tokens_pass(student, tmp_path):
    # a teacher model whose embedding has more rows (padded config vocab) and one token more
    teacher = tmp_path / "teacher"
    tiny_hf_config(vocab_size=160).save_pretrained(teacher)
    vocab = {**tiny_vocab(), "<|teacher_only|>": len(tiny_vocab())}
    tokenizer_with_vocab(vocab, SPECIAL_TOKENS).save_pretrained(teacher)
    assert check(student, teacher) == f"checked {teacher}"


def test_url_only_teacher_reads_model_info_or_skips_with_a_warning(student, tmp_path, caplog):
    same = tmp_path / "served"
    make_tiny_tokenizer().save_pretrained(same)
    asked = []

    def info():
        asked.append(1)
        return {"model_path": str(same), "tokenizer_path": None}

    assert check(student, None, model_info=info, teacher_url="http://t:1") == f"checked {same}"
    assert asked == [1]
    # a hub id or a path on the server's machine: nothing readable here, the check is skipped loudly
    with caplog.at_level(logging.WARNING, logger="scope_megatron.rollout.vocab"):
        result = check(student, None, model_info=lambda: {"model_path": "Org/Teacher-7B"})
    assert result.startswith("skipped:") and "teacher.tokenizer" in result
    assert any("teacher vocabulary check skipped" in r.getMessage() for r in caplog.records)
    # the server could not be asked at all
    assert check(student, None, model_info=lambda: None).startswith("skipped:")


def test_teacher_tokenizer_field_wins_and_must_load(student, tmp_path):
    vocab = tiny_vocab()
    vocab["0"], vocab["1"] = vocab["1"], vocab["0"]
    bad = tmp_path / "bad"
    tokenizer_with_vocab(vocab, SPECIAL_TOKENS).save_pretrained(bad)
    good = tmp_path / "good"
    make_tiny_tokenizer().save_pretrained(good)
    with pytest.raises(VocabularyMismatch) as info:  # teacher.tokenizer is used, not the model dir
        check(student, good, tokenizer_dir=str(bad))
    assert info.value.field == "teacher.tokenizer"
    with pytest.raises(VocabularyMismatch, match="cannot be loaded"):
        check(student, good, tokenizer_dir=str(tmp_path / "nothing"))


# ------------------------------------------------------------------ teacher top-k ids beyond the student vocab
def test_mask_topk_row_replaces_out_of_vocab_ids_by_unused_ids_with_minus_inf():
    ids, lps = [5, 130, 0, 129, 7], [-0.1, -2.0, -3.0, -4.0, -5.0]
    assert mask_topk_row(ids, lps, vocab_size=128) == 2
    assert ids == [5, 1, 0, 2, 7] and len(set(ids)) == 5  # distinct, inside the student's vocabulary
    assert lps == [-0.1, float("-inf"), -3.0, float("-inf"), -5.0]
    untouched_ids, untouched = [3, 4], [-1.0, -2.0]
    assert mask_topk_row(untouched_ids, untouched, vocab_size=128) == 0 and untouched_ids == [3, 4]


@pytest.mark.parametrize("direction,tail", list(itertools.product(["forward", "reverse"], [False, True])))
def test_masked_entries_drop_out_of_the_topk_kl_exactly(direction, tail):
    """vocab_parallel_topk_kl on rows with masked entries == topk_kl on the rows without them
    (value and gradient); a row with every entry masked gives 0 and no NaN gradient."""
    torch.manual_seed(0)
    vocab, k, n = 24, 5, 4
    logits = torch.randn(n, vocab, dtype=torch.float64, requires_grad=True)
    teacher_vocab = vocab + 8  # the teacher's padded vocabulary is larger
    teacher_lp = torch.randn(n, teacher_vocab, dtype=torch.float64).log_softmax(-1)
    rows_ids, rows_lp = [], []
    raw = [torch.randperm(teacher_vocab)[:k].tolist() for _ in range(n)]
    raw[1][:2] = [vocab + 1, vocab + 5]   # two entries outside the student vocabulary
    raw[3] = list(range(vocab, vocab + k))  # all of them
    for i, r in enumerate(raw):
        ids, lps = list(r), [teacher_lp[i, t].item() for t in r]
        mask_topk_row(ids, lps, vocab)
        rows_ids.append(ids)
        rows_lp.append(lps)
    targets = torch.zeros(n, dtype=torch.long)
    out = vocab_parallel_topk_kl(logits, targets, torch.tensor(rows_ids), torch.tensor(rows_lp, dtype=torch.float64),
                                 vocab_size=vocab, direction=direction, tail=tail)
    out.topk_kl.sum().backward()
    assert torch.isfinite(logits.grad).all()
    grad = logits.grad.clone()
    for i, r in enumerate(raw):
        kept = [t for t in r if t < vocab]
        row_logits = logits.detach()[i].clone().requires_grad_(True)
        if not kept:
            assert out.topk_kl[i].item() == 0.0
            assert torch.all(grad[i] == 0)
            continue
        student = row_logits.log_softmax(-1)[kept]
        ref = topk_kl(student[None], torch.tensor([[teacher_lp[i, t].item() for t in kept]], dtype=torch.float64),
                      direction=direction, tail=tail)[0]
        ref.backward()
        torch.testing.assert_close(out.topk_kl[i], ref)
        torch.testing.assert_close(grad[i], row_logits.grad)


def test_controller_masks_teacher_topk_ids_beyond_the_student_vocabulary(tmp_path):
    """A teacher with a larger (padded) embedding returns top-k ids the student lacks; the
    controller masks exactly those, keeps the others as the teacher sent them, and counts them."""
    from scope_megatron.rollout.client import BackgroundLoop
    from scope_megatron.rollout.data import PromptRecord
    from scope_megatron.rollout.embedded_server import start_embedded_server
    from scope_megatron.rollout.protocol import SamplingParams
    from scope_megatron.examples.tiny_models import tiny_vocab_size
    from scope_megatron.trainer.controller import RolloutController

    student_vocab, k = tiny_vocab_size(), 8
    student_dir = save_tiny_hf_model(tmp_path / "student", seed=5)
    teacher_dir = save_tiny_hf_model(tmp_path / "teacher", seed=6, vocab_size=student_vocab + 57)
    tokenizer = make_tiny_tokenizer()
    prompt = tokenizer("What is 1+1?", add_special_tokens=False)["input_ids"]
    record = PromptRecord(index=0, record_id="r0", problem="What is 1+1?", answer="2", prompt_text="", prompt_ids=prompt)
    loop = BackgroundLoop("test-topk-mask")
    try:
        with start_embedded_server(student_dir) as student, start_embedded_server(teacher_dir) as teacher:
            controller = RolloutController(
                student_url=student.url, teacher_url=teacher.url, group_size=2,
                sampling=SamplingParams(max_new_tokens=6, temperature=1.0, ignore_eos=True), seed=1, seeded=False,
                tokenizer=tokenizer, reward_pool=None, loop=loop, reward_function=lambda text, gold, trunc: 0.0,
                teacher_topk=k, student_vocab_size=student_vocab)
            received = {}  # response ids -> the top-k rows as the teacher's reply was parsed
            score = controller.teacher.score

            async def recording_score(prompt_ids, response_ids, top_logprobs_num=0):
                result = await score(prompt_ids, response_ids, top_logprobs_num=top_logprobs_num)
                received[tuple(response_ids)] = [list(row) for row in result.top_logprobs]
                return result
            controller.teacher.score = recording_score
            batch = controller.collect(1, [record])
            controller.close()
    finally:
        loop.close()
    sent = [received[tuple(t.response_ids)] for t in batch.trajectories]
    expected_masked = 0
    for traj, rows in zip(batch.trajectories, sent):
        assert len(traj.teacher_topk_ids) == len(rows) == len(traj.response_ids) > 0
        for ids, lps, row in zip(traj.teacher_topk_ids, traj.teacher_topk_logprobs, rows):
            assert all(0 <= i < student_vocab for i in ids) and len(set(ids)) == k
            kept = {i: lp for i, lp in zip(ids, lps) if lp != float("-inf")}
            assert kept == {i: lp for i, lp in row if i < student_vocab}
            expected_masked += sum(i >= student_vocab for i, _ in row)
    assert expected_masked > 0  # the teacher did send ids the student lacks
    assert batch.timings["teacher/topk_masked"] == expected_masked
