"""Weight updates into the embedded engine: from disk, and over a gloo broadcast group from a trainer process."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from safetensors.torch import load_file

from scope_megatron.rollout.client import SGLangClient, SGLangError
from scope_megatron.rollout.dist_group import tcp_init_method
from scope_megatron.rollout.embedded_server import start_embedded_server, start_embedded_server_process
from scope_megatron.rollout.weight_transfer import WeightTransfer, flatten_bucket, iter_buckets
from scope_megatron.examples.tiny_models import save_tiny_hf_model
from tests.dist_utils import free_port, run_ranks
from tests.rollout_utils import assert_server_dies, wait_until_decoding

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
    # SGLang 0.5.23 srt/weight_sync/tensor_bucket.py:98-101 lays the buffer out back to back and
    # refuses a tensor at an offset that is not a multiple of its item size: y after 6 bytes of x
    with pytest.raises(ValueError, match="byte 6, not a multiple of its item size 4"):
        flatten_bucket([x, y])
    buf = flatten_bucket([y, x])  # aligned: no padding anywhere
    assert buf.dtype == torch.uint8 and buf.numel() == 20 + 6
    assert torch.equal(buf[:20].view(torch.float32), y) and torch.equal(buf[20:].view(torch.bfloat16), x)


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


def test_disk_update_of_some_weights_loads_them_and_a_wrong_shape_kills_the_server(dirs, tmp_path):
    """As SGLang 0.5.23: the files may hold any subset of the weights
    (model_runner_components/weight_updater.py:172-252); a wrong shape fails the load and its
    roll-back, which re-reads the same new files, so the scheduler (the server) dies."""
    old, new = dirs
    state = new_state(new)
    with start_embedded_server(old) as server:
        partial = dict(list(state.items())[:3])
        with WeightTransfer([server.url], transport="disk", disk_dir=tmp_path / "w") as wt:
            wt.update(partial.items(), weight_version=1)
            name = next(iter(partial))
            got = httpx.post(server.url + "/get_weights_by_name", json={"name": name, "truncate_size": 20}).json()
            assert got == partial[name].flatten()[:20].tolist() and score(server.url)[1] == "1"
            bad = dict(state)
            bad["model.norm.weight"] = torch.zeros(3)
            with pytest.raises(Exception):
                wt.update(bad.items(), weight_version=2)
        assert_server_dies(server.url)


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


# A trainer that dies in the middle of an update: it formed the group ``argv[2]`` with the engine
# at ``argv[1]``, paused it, opened a session and is then SIGKILLed (nothing is cleaned up).
DEAD_TRAINER = """
import os, signal, sys, threading
import httpx
from scope_megatron.parallel import free_port
from scope_megatron.rollout.dist_group import init_weight_update_group
url, name = sys.argv[1], sys.argv[2]
port = free_port()
body = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
        "group_name": name, "backend": "gloo"}
box = {}
post = threading.Thread(target=lambda: box.update(r=httpx.post(url + "/init_weights_update_group", json=body,
                                                                timeout=60)))
post.start()
init_weight_update_group("127.0.0.1", port, 0, 2, name, "gloo", timeout_s=60)
post.join()
assert box["r"].status_code == 200, box["r"].text
httpx.post(url + "/pause_generation", json={"mode": "retract"}, timeout=30).raise_for_status()
assert httpx.post(url + "/begin_weight_update", json={}, timeout=30).json()["success"]
os.kill(os.getpid(), signal.SIGKILL)
"""


def leave_stale_update(url: str, group_name: str) -> None:
    proc = subprocess.run([sys.executable, "-c", DEAD_TRAINER, url, group_name], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert httpx.get(url + "/ready").status_code == 503  # still paused


@pytest.fixture(scope="module")
def engine_process(dirs, tmp_path_factory):
    """One engine process (``scope-megatron serve``) for the tests below; each leaves it clean."""
    handle = start_embedded_server_process(dirs[0], port=free_port(),
                                           log_path=tmp_path_factory.mktemp("engine") / "engine.log",
                                           extra_args=["--log-level", "warning"], ready_timeout=300)
    try:
        yield handle
    finally:
        handle.stop()


def test_update_recovers_a_worker_left_paused_with_a_session_and_a_group(dirs, engine_process, tmp_path):
    """A server that outlived a killed trainer: the next trainer cleans it up and updates it."""
    _, new = dirs
    url = engine_process.url
    leave_stale_update(url, "weight_update_group")
    stale = httpx.post(url + "/begin_weight_update", json={})
    assert stale.status_code == 400  # the dead trainer's session is still open
    t0 = time.monotonic()
    with WeightTransfer([url], transport="distributed", backend="gloo", bucket_bytes=30_000,
                        group_timeout_s=30, request_timeout_s=60) as wt:
        stats = wt.update(new_state(new).items(), weight_version=1)
        assert stats.num_buckets > 1
        assert wt.group_name.startswith("weight_update_group_") and wt.group_name != "weight_update_group"
        lps, version = score(url)
    assert time.monotonic() - t0 < 60
    assert version == "1"
    assert lps == pytest.approx(response_logprobs(reference_logprobs(new, PROMPT + RESPONSE), PROMPT, RESPONSE),
                                abs=2e-5)
    assert httpx.get(url + "/ready").status_code == 200  # generation was continued


def test_recorded_group_of_a_dead_trainer_is_destroyed(dirs, engine_process, tmp_path):
    """``group_record``: the next process destroys the group the dead one had formed."""
    url = engine_process.url
    record = tmp_path / "weight_update_group.json"
    leave_stale_update(url, "weight_update_group_deadbeef")
    record.write_text(json.dumps({"group_name": "weight_update_group_deadbeef", "engines": [url]}))
    wt = WeightTransfer([url], backend="gloo", group_record=record)
    try:
        done = wt.recover()[0]
    finally:
        wt.close()
    assert "destroy_weights_update_group(weight_update_group_deadbeef): done" in done, done
    assert done[:2] == ["pause_generation: done", "end_weight_update: done"] and done[-1] == "continue_generation: done"
    assert "destroy_weights_update_group(weight_update_group): nothing to do" in done
    assert not record.exists()
    # the engine is back to a clean state: a new session opens, the name is free again
    assert httpx.post(url + "/begin_weight_update", json={}).json()["success"] is True
    assert httpx.post(url + "/end_weight_update", json={}).json()["success"] is True
    assert httpx.post(url + "/destroy_weights_update_group",
                      json={"group_name": "weight_update_group_deadbeef"}).status_code == 400


def test_failed_update_destroys_the_group_and_the_next_update_succeeds(dirs, engine_process):
    """An engine refusing a bucket: the group goes on both sides, the next update builds a new one."""
    old, new = dirs
    url = engine_process.url
    state = new_state(new)
    bad = dict(state)
    bad["model.norm.weight"] = torch.zeros(3)  # wrong shape: refused by the engine
    with WeightTransfer([url], backend="gloo", group_timeout_s=30, request_timeout_s=60) as wt:
        with pytest.raises(Exception, match=r"Attempted to load weight \(torch.Size\(\[3\]\)\)|model.norm.weight"):
            wt.update(bad.items(), weight_version=1)
        assert wt._group is None
        first = wt.group_name
        wt.update(state.items(), weight_version=2)
        assert wt.group_name != first
        lps, version = score(url)
    assert version == "2"
    assert lps == pytest.approx(response_logprobs(reference_logprobs(new, PROMPT + RESPONSE), PROMPT, RESPONSE),
                                abs=2e-5)
    # the failed group is gone on the engine too
    gone = httpx.post(url + "/destroy_weights_update_group", json={"group_name": first})
    assert gone.status_code == 400 and "does not exist" in gone.json()["message"]


def test_ipv6_master_address(dirs, engine_process):
    assert tcp_init_method("::1", 1234) == "tcp://[::1]:1234"
    assert tcp_init_method("[fe80::1]", 5) == "tcp://[fe80::1]:5"
    assert tcp_init_method("10.0.0.2", 5) == "tcp://10.0.0.2:5"
    assert tcp_init_method("node-3.cluster", 5) == "tcp://node-3.cluster:5"
    _, new = dirs
    with WeightTransfer([engine_process.url], backend="gloo", master_address="::1", group_timeout_s=30,
                        request_timeout_s=60) as wt:
        wt.update(new_state(new).items(), weight_version="v6")
        assert score(engine_process.url)[1] == "v6"


def recording_worker(calls: list[str], server_info: dict | None = None, refuse: dict[str, int] | None = None):
    """A fake SGLang worker answering every control call like 0.5.23 does (``{"success", "message"}``)
    and recording the paths it saw, in order; ``refuse`` maps a path to the HTTP status it answers."""
    app = FastAPI()
    state = {"version": "default"}
    info = {"tp_size": 1, "pp_size": 1, "dp_size": 1, **(server_info or {})}

    @app.get("/server_info")
    async def server_info():
        calls.append("/server_info")
        return info

    @app.get("/model_info")
    async def model_info():
        calls.append("/model_info")
        return {"weight_version": state["version"]}

    @app.post("/{path:path}")
    async def control(path: str, request: Request):
        calls.append("/" + path)
        body = await request.json()
        status = (refuse or {}).get("/" + path)
        if status is not None:
            return JSONResponse({"success": False, "message": f"refused {path}"}, status_code=status)
        if path == "update_weights_from_disk":
            state["version"] = body.get("weight_version") or state["version"]
        return {"success": True, "message": "Success"}

    return app


@pytest.mark.parametrize("layout,needle", [({"pp_size": 2}, "pp_size=2"), ({"dp_size": 2}, "dp_size=2")])
def test_pipeline_or_data_parallel_servers_are_refused(layout, needle):
    from tests.test_rollout_client import FakeServer

    calls: list[str] = []
    with FakeServer(recording_worker(calls, server_info={"tp_size": 2, **layout})) as fake:
        t0 = time.monotonic()
        with WeightTransfer([fake.url], backend="gloo", group_timeout_s=20) as wt:
            with pytest.raises(ValueError, match=needle) as info:
                wt.connect()
        assert time.monotonic() - t0 < 10
    assert "--tp-size" in str(info.value) and "router" in str(info.value)
    assert "/init_weights_update_group" not in calls  # refused before any group is formed


def test_a_worker_refusing_the_group_fails_the_trainer_in_seconds(dirs, engine_process):
    """One worker answers 400 to init_weights_update_group; the trainer fails at once (not after
    group_timeout_s), and the other worker, the embedded engine, is left without a group."""
    from tests.test_rollout_client import FakeServer

    calls: list[str] = []
    with FakeServer(recording_worker(calls, refuse={"/init_weights_update_group": 400})) as fake:
        t0 = time.monotonic()
        with WeightTransfer([engine_process.url, fake.url], backend="gloo", group_timeout_s=60) as wt:
            with pytest.raises(SGLangError, match=rf"engine {fake.url} refused to join .*refused init_weights"):
                wt.connect()
        assert time.monotonic() - t0 < 10
    assert "/init_weights_update_group" in calls and "/destroy_weights_update_group" in calls


def test_disk_updates_open_no_session():
    from tests.test_rollout_client import FakeServer

    calls: list[str] = []
    with FakeServer(recording_worker(calls)) as fake:
        with WeightTransfer([fake.url], transport="disk", disk_dir=Path(os.environ.get("TMPDIR", "/tmp")) /
                            f"disk-{os.getpid()}-{time.monotonic_ns()}") as wt:
            wt.update([("model.norm.weight", torch.ones(4))], weight_version=3)
            wt.update([("model.norm.weight", torch.ones(4))], weight_version=4)
            shutil.rmtree(wt.disk_dir, ignore_errors=True)
    assert calls == ["/pause_generation", "/update_weights_from_disk", "/continue_generation", "/model_info"] * 2


def test_pause_failure_on_one_engine_still_continues_the_others(dirs, engine_process, tmp_path):
    from tests.test_rollout_client import FakeServer

    _, new = dirs
    calls: list[str] = []
    with FakeServer(recording_worker(calls, refuse={"/pause_generation": 500})) as fake:
        with WeightTransfer([engine_process.url, fake.url], transport="disk", disk_dir=tmp_path / "w") as wt:
            with pytest.raises(SGLangError, match=rf"{fake.url}/?\S* .*refused pause_generation"):
                wt.update(new_state(new).items(), weight_version=9)
    assert httpx.get(engine_process.url + "/ready").status_code == 200  # the engine that paused was continued
    assert score(engine_process.url)[1] != "9"
