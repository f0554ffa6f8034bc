"""Weight updates into the embedded engine: from disk, and over a gloo broadcast group from a trainer process."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
import torch
from safetensors.torch import load_file

from scope_megatron.rollout.client import SGLangClient
from scope_megatron.rollout.embedded_server import start_embedded_server
from scope_megatron.rollout.weight_transfer import WeightTransfer, flatten_bucket, iter_buckets
from scope_megatron.tiny_models import save_tiny_hf_model
from tests.dist_utils import run_ranks
from tests.rollout_utils import wait_until_decoding

pytestmark = pytest.mark.timeout(180)
PROMPT, RESPONSE = [1, 20, 30, 40, 50], [60, 61, 62, 63, 64, 65]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    old = save_tiny_hf_model(tmp_path_factory.mktemp("old"), seed=1)
    new = save_tiny_hf_model(tmp_path_factory.mktemp("new"), seed=2)
    return old, new


def reference_logprobs(model_dir, ids, temperature=1.0, cast=None):
    """log_softmax of transformers' logits for ``ids`` (weights optionally round-tripped through ``cast``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if cast is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(cast).float())
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float() / temperature, dim=-1)


def response_logprobs(ref, prompt, response):
    return [ref[len(prompt) - 1 + j, t].item() for j, t in enumerate(response)]


def score(url):
    async def go():
        async with SGLangClient(url) as client:
            return (await client.score(PROMPT, RESPONSE)).token_logprobs, await client.weight_version()
    return asyncio.run(go())


def new_state(new_dir):
    return load_file(str(new_dir / "model.safetensors"))


def test_bucketing_and_flattened_layout():
    tensors = [("a", torch.zeros(10, dtype=torch.float32)), ("b", torch.zeros(3, dtype=torch.bfloat16)),
               ("c", torch.zeros(100, dtype=torch.float32)), ("d", torch.zeros(2, dtype=torch.float32))]
    buckets = list(iter_buckets(tensors, bucket_bytes=48))
    assert [[n for n, _ in b] for b in buckets] == [["a", "b"], ["c"], ["d"]]  # c (400 B) travels alone
    with pytest.raises(ValueError, match="twice"):
        list(iter_buckets([("a", torch.zeros(1)), ("a", torch.zeros(1))], 100))
    x, y = torch.arange(3, dtype=torch.bfloat16), torch.arange(5, dtype=torch.float32)
    buf = flatten_bucket([x, y])
    assert buf.dtype == torch.uint8 and buf.numel() == 8 + 20  # y aligned to 4 bytes after 6 bytes of x
    assert torch.equal(buf[:6].view(torch.bfloat16), x) and torch.equal(buf[8:].view(torch.float32), y)


def test_update_from_disk_changes_logprobs_exactly_and_version(dirs, tmp_path):
    old, new = dirs
    with start_embedded_server(old) as server:
        before, version = score(server.url)
        assert version == "default"
        assert before == pytest.approx(response_logprobs(reference_logprobs(old, PROMPT + RESPONSE), PROMPT, RESPONSE),
                                       abs=2e-5)
        # a request in flight across the update: retracted, re-prefilled under the new weights
        box = {}
        body = {"input_ids": PROMPT, "return_logprob": True,
                "sampling_params": {"max_new_tokens": 400, "temperature": 0.8, "top_p": 1.0, "top_k": -1,
                                    "min_p": 0.0, "ignore_eos": True, "sampling_seed": 9}}
        thread = threading.Thread(target=lambda: box.update(r=httpx.post(server.url + "/generate", json=body,
                                                                         timeout=60).json()))
        thread.start()
        wait_until_decoding(server.engine)
        with WeightTransfer([server.url], transport="disk", disk_dir=tmp_path / "w", bucket_bytes=20_000) as wt:
            stats = wt.update(new_state(new).items(), weight_version=7)
            assert stats.num_buckets > 1 and stats.weight_version == "7"
            assert len(list((tmp_path / "w" / "weight_v7").glob("*.safetensors"))) == stats.num_buckets
            thread.join(60)
            after, version = score(server.url)
            assert version == "7"
            ref_new = reference_logprobs(new, PROMPT + RESPONSE)
            assert after == pytest.approx(response_logprobs(ref_new, PROMPT, RESPONSE), abs=2e-5)
            # spans: tokens before the update came from "default", the rest from "7"
            meta = box["r"]["meta_info"]
            spans = meta["weight_versions"]
            assert [s["version"] for s in spans] == ["default", "7"] and meta["num_retractions"] == 1
            k, out = spans[0]["end"], box["r"]["output_ids"]
            assert spans == [{"version": "default", "start": 0, "end": k}, {"version": "7", "start": k, "end": 400}]
            got = [e[0] for e in meta["output_token_logprobs"]]
            ref_old_t = response_logprobs(reference_logprobs(old, PROMPT + out, 0.8), PROMPT, out)
            ref_new_t = response_logprobs(reference_logprobs(new, PROMPT + out, 0.8), PROMPT, out)
            assert got[:k] == pytest.approx(ref_old_t[:k], abs=2e-5)
            assert got[k:] == pytest.approx(ref_new_t[k:], abs=2e-5)
            # the next update replaces the old directory (keep_disk_versions=1)
            wt.update(new_state(old).items(), weight_version=8)
            assert not (tmp_path / "w" / "weight_v7").exists()
        back, version = score(server.url)
        assert version == "8" and back == pytest.approx(before, abs=1e-6)


def test_disk_update_with_missing_or_wrong_weights_fails_and_keeps_old(dirs, tmp_path):
    old, new = dirs
    state = new_state(new)
    with start_embedded_server(old) as server:
        before, _ = score(server.url)
        partial = dict(list(state.items())[:3])
        with WeightTransfer([server.url], transport="disk", disk_dir=tmp_path / "w") as wt:
            with pytest.raises(Exception, match="lacks weight"):
                wt.update(partial.items(), weight_version=1)
            bad = dict(state)
            bad["model.norm.weight"] = torch.zeros(3)
            with pytest.raises(Exception, match="model.norm.weight"):
                wt.update(bad.items(), weight_version=1)
        after, version = score(server.url)
        assert version == "default" and after == before
        assert httpx.get(server.url + "/ready").status_code == 200  # generation was continued


def test_distributed_update_needs_a_session(dirs):
    old, _ = dirs
    with start_embedded_server(old) as server:
        r = httpx.post(server.url + "/update_weights_from_distributed",
                       json={"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[64]]})
        assert r.status_code == 400 and r.json()["success"] is False
        assert "between begin_weight_update() and end_weight_update()" in r.json()["message"]
        assert httpx.post(server.url + "/begin_weight_update", json={}).json()["success"] is True
        second = httpx.post(server.url + "/begin_weight_update", json={})
        assert second.status_code == 400 and second.json()["success"] is False
        assert httpx.post(server.url + "/end_weight_update", json={}).json()["success"] is True


def _trainer(rank: int, world_size: int, url: str, new_dir: str) -> dict:
    """Trainer ranks with their own default (gloo) group; rank 0 pushes weights to the engine."""
    import torch.distributed as dist

    out: dict = {}
    if rank == 0:
        state = load_file(f"{new_dir}/model.safetensors")
        with WeightTransfer([url], transport="distributed", backend="gloo", bucket_bytes=30_000) as wt:
            stats = wt.update(((n, t.to(torch.bfloat16)) for n, t in state.items()), weight_version=1)
            out["bf16"] = score(url)
            out["buckets"] = stats.num_buckets
            wt.flattened_bucket = True
            wt.update(state.items(), weight_version=2)
            out["fp32_flat"] = score(url)
    # the trainer's default group still works and was not disturbed
    x = torch.ones(1) * (rank + 1)
    dist.all_reduce(x)
    out["all_reduce"] = x.item()
    return out


def test_distributed_update_from_trainer_process(dirs):
    old, new = dirs
    with start_embedded_server(old) as server:
        results = run_ranks(_trainer, world_size=2, args=(server.url, str(new)), timeout=150)
    assert results[0]["all_reduce"] == results[1]["all_reduce"] == 3.0
    assert results[0]["buckets"] > 1
    (bf16_lps, v1), (fp32_lps, v2) = results[0]["bf16"], results[0]["fp32_flat"]
    assert (v1, v2) == ("1", "2")
    ref_bf16 = reference_logprobs(new, PROMPT + RESPONSE, cast=torch.bfloat16)
    assert bf16_lps == pytest.approx(response_logprobs(ref_bf16, PROMPT, RESPONSE), abs=2e-5)
    ref = reference_logprobs(new, PROMPT + RESPONSE)
    assert fp32_lps == pytest.approx(response_logprobs(ref, PROMPT, RESPONSE), abs=2e-5)
    assert bf16_lps != pytest.approx(fp32_lps, abs=1e-6)  # the bf16 path really sent bf16


def test_engine_direct_weight_check_after_update(dirs, tmp_path):
    """``/get_weights_by_name`` shows the new values bit-exactly after a disk update."""
    old, new = dirs
    state = new_state(new)
    with start_embedded_server(old) as server:
        with WeightTransfer([server.url], transport="disk", disk_dir=tmp_path / "w") as wt:
            wt.update(state.items(), weight_version="s1")
        got = httpx.post(server.url + "/get_weights_by_name", json={"name": "model.layers.0.mlp.up_proj.weight",
                                                                    "truncate_size": 50}).json()
        assert got == state["model.layers.0.mlp.up_proj.weight"].flatten()[:50].tolist()
