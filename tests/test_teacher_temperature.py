"""Which temperature the engine's log-probs are at: prompt (teacher-scoring) rows at 1, output rows
at the request's temperature.

SGLang 0.5.23 computes input log-probs as ``log_softmax`` of the raw logits whatever the request's
temperature (layers/logprob_processor.py:657-781, ``InputLogprobProcessor._forward_by_chunk``,
which never reads ``sampling_info``) and output log-probs from ``logits / temperature``
(layers/sampler.py:275, 305-316). The embedded engine must do the same; the reference here is
plain torch over the HF model's logits.
"""

from __future__ import annotations

import httpx
import pytest
import torch

from scope_megatron.examples.tiny_models import save_tiny_hf_model
from scope_megatron.rollout.embedded_server import start_embedded_server

pytestmark = pytest.mark.timeout(120)
TOL = 2e-5
ROLLOUT_T = 0.6
PROMPT, RESPONSE = [1, 20, 30, 40], [50, 51, 52, 53, 54]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_hf_model(tmp_path_factory.mktemp("teacher"), family="qwen3", seed=3)


@pytest.fixture(scope="module")
def server(model_dir):
    handle = start_embedded_server(model_dir, random_seed=0, max_batch_size=4)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def hf_logits(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def logits(ids: list[int]) -> torch.Tensor:
        """[len(ids), V] logits, row i predicting token i + 1."""
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float()
    return logits


def post(server, body):
    r = httpx.post(server.url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def token_logprobs(logprobs: torch.Tensor, ids: list[int], start: int) -> list[float]:
    """``logprobs[start + j, ids[j]]`` for each j: the log-prob of ``ids[j]`` one row earlier."""
    return [logprobs[start + j, t].item() for j, t in enumerate(ids)]


def test_teacher_scoring_at_rollout_temperature_still_returns_temperature_one(server, hf_logits):
    # the teacher-scoring request with the rollout temperature instead of 1: SGLang ignores it
    # for prompt rows, so values (and top-k) stay log_softmax(logits)
    res = post(server, {"input_ids": PROMPT + RESPONSE, "return_logprob": True,
                        "sampling_params": {"max_new_tokens": 0, "temperature": ROLLOUT_T},
                        "logprob_start_len": len(PROMPT) - 1, "top_logprobs_num": 3})
    entries = res["meta_info"]["input_token_logprobs"][1:]
    assert [e[1] for e in entries] == RESPONSE
    logits = hf_logits(PROMPT + RESPONSE)
    at_one = torch.log_softmax(logits, dim=-1)
    at_rollout = torch.log_softmax(logits / ROLLOUT_T, dim=-1)
    got = [e[0] for e in entries]
    assert got == pytest.approx(token_logprobs(at_one, RESPONSE, len(PROMPT) - 1), abs=TOL)
    # the two temperatures are far apart on this model: the check above tells them apart
    scaled = token_logprobs(at_rollout, RESPONSE, len(PROMPT) - 1)
    assert max(abs(a - b) for a, b in zip(got, scaled)) > 100 * TOL
    for j, row in enumerate(res["meta_info"]["input_top_logprobs"][1:]):
        vals, idx = at_one[len(PROMPT) - 1 + j].topk(3)
        assert [e[1] for e in row] == idx.tolist()
        assert [e[0] for e in row] == pytest.approx(vals.tolist(), abs=TOL)


def test_one_request_scales_output_rows_but_not_prompt_rows(server, hf_logits):
    res = post(server, {"input_ids": PROMPT + RESPONSE, "return_logprob": True,
                        "sampling_params": {"max_new_tokens": 3, "temperature": ROLLOUT_T, "ignore_eos": True},
                        "logprob_start_len": len(PROMPT) - 1})
    out = res["output_ids"]
    assert len(out) == 3
    logits = hf_logits(PROMPT + RESPONSE + out)
    prompt_rows = [e[0] for e in res["meta_info"]["input_token_logprobs"][1:]]
    output_rows = [e[0] for e in res["meta_info"]["output_token_logprobs"]]
    assert prompt_rows == pytest.approx(
        token_logprobs(torch.log_softmax(logits, dim=-1), RESPONSE, len(PROMPT) - 1), abs=TOL)
    assert output_rows == pytest.approx(
        token_logprobs(torch.log_softmax(logits / ROLLOUT_T, dim=-1), out, len(PROMPT + RESPONSE) - 1), abs=TOL)
