"""The embedded engine against transformers itself, through its HTTP protocol (SGLang 0.5.23 shapes)."""

from __future__ import annotations

import threading

import httpx
import pytest
import torch

from tests.rollout_utils import wait_until_decoding
from scope_megatron.rollout.embedded_server import start_embedded_server
from scope_megatron.examples.tiny_models import make_tiny_tokenizer, save_tiny_hf_model

pytestmark = pytest.mark.timeout(120)
TOL = 2e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_hf_model(tmp_path_factory.mktemp("student"), family="qwen3", seed=1)


@pytest.fixture(scope="module")
def server(model_dir):
    # seeded tests: sampling_seed is honoured only in deterministic mode, as in SGLang
    handle = start_embedded_server(model_dir, random_seed=0, max_batch_size=8, enable_deterministic_inference=True)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def reference(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def logits(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float()
    return logits


def post(server, body, status=200, **kw):
    r = httpx.post(server.url + "/generate", json=body, timeout=60, **kw)
    assert r.status_code == status, r.text
    return r.json()


def sampling(**kw):
    base = {"max_new_tokens": 6, "temperature": 0.7, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "ignore_eos": True}
    base.update(kw)
    return base


PROMPTS = [[1, 20, 30, 40, 50, 60], [1, 33, 44], [1, 70, 71, 72, 73, 74, 75, 76, 77]]


def test_generated_logprobs_equal_transformers_at_sampling_temperature(server, reference):
    res = post(server, {"input_ids": PROMPTS, "sampling_params": sampling(sampling_seed=5), "return_logprob": True})
    assert isinstance(res, list) and len(res) == len(PROMPTS)
    for prompt, item in zip(PROMPTS, res):
        out = item["output_ids"]
        meta = item["meta_info"]
        assert len(out) == 6 and meta["completion_tokens"] == 6 and meta["prompt_tokens"] == len(prompt)
        assert meta["finish_reason"] == {"type": "length", "length": 6}
        assert meta["input_token_logprobs"] == []  # logprob_start_len -1: output tokens only
        entries = meta["output_token_logprobs"]
        assert len(entries) == len(out) == meta["output_token_logprobs_length"]
        assert all(len(e) == 3 and e[2] is None for e in entries)
        assert [e[1] for e in entries] == out
        ref = torch.log_softmax(reference(prompt + out) / 0.7, dim=-1)
        expected = [ref[len(prompt) - 1 + j, t].item() for j, t in enumerate(out)]
        assert [e[0] for e in entries] == pytest.approx(expected, abs=TOL)


def test_teacher_scoring_entries_and_values(server, reference):
    prompt, response = [1, 20, 30, 40], [50, 51, 52, 53, 54]
    res = post(server, {"input_ids": prompt + response, "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
                        "return_logprob": True, "logprob_start_len": len(prompt) - 1, "top_logprobs_num": 3})
    meta = res["meta_info"]
    assert res["output_ids"] == [] and meta["completion_tokens"] == 0
    assert meta["finish_reason"] == {"type": "length", "length": 0}
    entries = meta["input_token_logprobs"]
    assert len(entries) == len(response) + 1
    assert entries[0] == [None, prompt[-1], None]
    assert [e[1] for e in entries[1:]] == response
    ref = torch.log_softmax(reference(prompt + response), dim=-1)  # prompt log-probs: temperature 1
    expected = [ref[len(prompt) - 1 + j, t].item() for j, t in enumerate(response)]
    assert [e[0] for e in entries[1:]] == pytest.approx(expected, abs=TOL)
    top = meta["input_top_logprobs"]
    assert len(top) == len(response) + 1 and top[0] is None
    for j, row in enumerate(top[1:]):
        vals, idx = ref[len(prompt) - 1 + j].topk(3)
        assert [e[1] for e in row] == idx.tolist()
        assert [e[0] for e in row] == pytest.approx(vals.tolist(), abs=TOL)


def test_logprob_start_zero_gives_one_entry_per_prompt_token(server, reference):
    prompt = PROMPTS[0]
    res = post(server, {"input_ids": prompt, "sampling_params": sampling(max_new_tokens=2),
                        "return_logprob": True, "logprob_start_len": 0, "return_text_in_logprobs": True})
    entries = res["meta_info"]["input_token_logprobs"]
    assert len(entries) == len(prompt) and entries[0][0] is None
    tok = make_tiny_tokenizer()
    assert [e[2] for e in entries] == [tok.decode([t]) for t in prompt]
    ref = torch.log_softmax(reference(prompt), dim=-1)
    assert [e[0] for e in entries[1:]] == pytest.approx([ref[j - 1, prompt[j]].item() for j in range(1, len(prompt))],
                                                        abs=TOL)


def test_greedy_matches_argmax_and_stop_token_runs_through(server, reference):
    prompt = PROMPTS[1]
    greedy = post(server, {"input_ids": prompt, "sampling_params": sampling(temperature=0.0, max_new_tokens=5),
                           "return_logprob": True})
    ids = list(prompt)
    for _ in range(5):
        ids.append(int(reference(ids)[-1].argmax()))
    assert greedy["output_ids"] == ids[len(prompt):]
    raw = torch.log_softmax(reference(ids), dim=-1)  # greedy: plain log_softmax
    expected = [raw[len(prompt) - 1 + j, t].item() for j, t in enumerate(greedy["output_ids"])]
    assert [e[0] for e in greedy["meta_info"]["output_token_logprobs"]] == pytest.approx(expected, abs=TOL)
    stop_at = greedy["output_ids"][2]
    first = greedy["output_ids"].index(stop_at)
    stopped = post(server, {"input_ids": prompt, "sampling_params": sampling(
        temperature=0.0, max_new_tokens=5, stop_token_ids=[stop_at])})
    assert stopped["output_ids"] == greedy["output_ids"][:first + 1]  # includes the stop token
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_at}


def test_seeded_sampling_is_reproducible_and_batch_independent(server):
    body = {"input_ids": PROMPTS[0], "sampling_params": sampling(sampling_seed=11, max_new_tokens=8)}
    alone = post(server, body)["output_ids"]
    batched = post(server, {"input_ids": [PROMPTS[2], PROMPTS[0]],
                            "sampling_params": [sampling(sampling_seed=3, max_new_tokens=8),
                                                sampling(sampling_seed=11, max_new_tokens=8)]})
    assert batched[1]["output_ids"] == alone
    other_seed = post(server, {"input_ids": PROMPTS[0], "sampling_params": sampling(sampling_seed=12, max_new_tokens=8)})
    assert other_seed["output_ids"] != alone


def test_top_k_one_and_top_p_truncation_keep_full_vocab_logprobs(server, reference):
    prompt = PROMPTS[0]
    res = post(server, {"input_ids": prompt, "sampling_params": sampling(temperature=0.9, top_k=1, max_new_tokens=4),
                        "return_logprob": True})
    out = res["output_ids"]
    ref = reference(prompt + out)
    assert out == [int(ref[len(prompt) - 1 + j].argmax()) for j in range(4)]
    # log-probs are log_softmax(logits / T) over the whole vocabulary, not renormalised
    expected = torch.log_softmax(ref / 0.9, dim=-1)
    assert [e[0] for e in res["meta_info"]["output_token_logprobs"]] == pytest.approx(
        [expected[len(prompt) - 1 + j, t].item() for j, t in enumerate(out)], abs=TOL)


def test_n_groups_samples_per_prompt(server):
    res = post(server, {"input_ids": [PROMPTS[0], PROMPTS[1]], "sampling_params": sampling(n=3, sampling_seed=1)})
    assert len(res) == 6
    for k, item in enumerate(res):
        assert item["meta_info"]["prompt_tokens"] == len(PROMPTS[k // 3])
    # SGLang copies the request n times with the same seed: deterministic mode gives n equal samples
    assert len({tuple(r["output_ids"]) for r in res[:3]}) == 1
    single = post(server, {"input_ids": PROMPTS[0], "sampling_params": sampling(sampling_seed=1)})
    assert res[0]["output_ids"] == single["output_ids"]


def test_text_input_and_output(server):
    tok = make_tiny_tokenizer()
    res = post(server, {"text": "1+1=", "sampling_params": sampling(max_new_tokens=4), "return_prompt_token_ids": True})
    assert res["prompt_token_ids"] == tok.encode("1+1=")
    assert res["text"] == tok.decode(res["output_ids"], skip_special_tokens=True)


@pytest.mark.parametrize("params, needle", [
    ({"max_tokens": 8}, "unknown field `max_tokens`"),
    ({"temperature": "1"}, "sampling_params.temperature"),
    ({"max_new_tokens": 1.5}, "sampling_params.max_new_tokens"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"regex": "a+"}, "regex"),
])
def test_bad_sampling_params_get_400_with_error_text(server, params, needle):
    body = post(server, {"input_ids": [1, 2], "sampling_params": params}, status=400)
    assert set(body) == {"error"} and isinstance(body["error"], str) and needle in body["error"]


def test_bad_request_fields_get_400(server):
    assert "logprob_start_len" in post(server, {"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 5,
                                                "sampling_params": {"max_new_tokens": 0}}, status=400)["error"]
    assert "input_ids" in post(server, {"input_ids": [1, 10_000]}, status=400)["error"]
    assert "exactly one" in post(server, {"sampling_params": {}}, status=400)["error"]


def test_info_endpoints(server):
    info = httpx.get(server.url + "/model_info").json()
    assert info["weight_version"] == "default" and info["is_generation"] is True
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/health_generate", timeout=30).status_code == 200
    assert httpx.get(server.url + "/server_info").json()["tp_size"] == 1


def test_pause_modes_and_ready(server):
    url = server.url
    long_body = {"input_ids": PROMPTS[0], "sampling_params": sampling(max_new_tokens=400, sampling_seed=4),
                 "return_logprob": True}
    reference_run = post(server, long_body)
    # retract: the request goes back to the queue and resumes after continue with the same result
    box = {}
    t = threading.Thread(target=lambda: box.update(res=post(server, long_body)))
    t.start()
    wait_until_decoding(server.engine)
    assert httpx.post(url + "/pause_generation", json={"mode": "retract"}, timeout=30).json()["status"] == "ok"
    assert httpx.get(url + "/ready").status_code == 503
    assert "Cache flushed" in httpx.post(url + "/flush_cache").text  # retract frees KV: flush allowed
    httpx.post(url + "/continue_generation", json={})
    t.join(60)
    assert httpx.get(url + "/ready").status_code == 200
    res = box["res"]
    assert res["output_ids"] == reference_run["output_ids"]
    assert res["meta_info"]["num_retractions"] == 1
    # abort: the running request returns its partial output with an abort finish reason
    t = threading.Thread(target=lambda: box.update(res=post(server, long_body)))
    t.start()
    wait_until_decoding(server.engine)
    httpx.post(url + "/pause_generation", json={"mode": "abort"}, timeout=30)
    t.join(60)
    reason = box["res"]["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and reason["message"] == "Aborted"
    assert 0 < len(box["res"]["output_ids"]) < 400
    httpx.post(url + "/continue_generation", json={})
    # in_place: flush refused while the frozen request holds KV
    t = threading.Thread(target=lambda: box.update(res=post(server, long_body)))
    t.start()
    wait_until_decoding(server.engine)
    httpx.post(url + "/pause_generation", json={"mode": "in_place"}, timeout=30)
    r = httpx.post(url + "/flush_cache")
    assert r.status_code == 400 and "failed" in r.text.lower()
    httpx.post(url + "/continue_generation", json={})
    t.join(60)
    assert box["res"]["output_ids"] == reference_run["output_ids"]


def test_api_key(model_dir):
    with start_embedded_server(model_dir, api_key="sekret") as handle:
        body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 1}}
        r = httpx.post(handle.url + "/generate", json=body)
        assert r.status_code == 401 and r.json() == {"error": "Unauthorized"}
        assert httpx.post(handle.url + "/generate", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.post(handle.url + "/generate", json=body,
                          headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert httpx.get(handle.url + "/health").status_code == 200  # probes stay open
        assert httpx.post(handle.url + "/pause_generation", json={}).status_code == 401
