"""The embedded engine fails where SGLang 0.5.23 fails (each test names the SGLang source it follows).

A kind stand-in hides bugs: these pin the real server's stricter or stranger behaviour -- the
health probe while paused, seeds only in deterministic mode, unknown weight names as warnings,
partial updates on a wrong shape, unpadded flattened buckets, the torch group-name check, the
version set only after a whole update succeeded, the auth levels, clipped prompt ids -- and
that ``scope-megatron serve`` stops promptly on SIGTERM whatever state a killed trainer left.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from scope_megatron.parallel import free_port
from scope_megatron.rollout.dist_group import destroy_weight_update_group, init_weight_update_group
from scope_megatron.rollout.embedded_server import start_embedded_server, start_embedded_server_process
from scope_megatron.examples.tiny_models import save_tiny_hf_model
from tests.rollout_utils import assert_server_dies, wait_until_decoding

pytestmark = pytest.mark.timeout(180)
GROUP = "weight_update_group"
NORM = "model.norm.weight"
UP = "model.layers.0.mlp.up_proj.weight"
TORCHRUN_ENV = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
                "ROLE_RANK": "3", "MASTER_ADDR": "10.9.9.9", "MASTER_PORT": "29999", "TORCHELASTIC_RUN_ID": "x"}


def sampling(**kw):
    base = {"max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "ignore_eos": True}
    base.update(kw)
    return base


def generate(url, body, status=200, **kw):
    r = httpx.post(url + "/generate", json=body, timeout=120, **kw)
    assert r.status_code == status, r.text
    return r.json()


def weights(url, name, n=100):
    return httpx.post(url + "/get_weights_by_name", json={"name": name, "truncate_size": n}, timeout=30).json()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_hf_model(tmp_path_factory.mktemp("engine"), family="qwen3", seed=1)


@pytest.fixture(scope="module")
def state(model_dir):
    return load_file(str(model_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def det(model_dir):
    """A thread-mode engine with --enable-deterministic-inference, one request per batch, 1 s health probes."""
    old = os.environ.get("SGLANG_HEALTH_CHECK_TIMEOUT")
    os.environ["SGLANG_HEALTH_CHECK_TIMEOUT"] = "1"
    try:
        handle = start_embedded_server(model_dir, max_batch_size=1, enable_deterministic_inference=True)
    finally:
        if old is None:
            os.environ.pop("SGLANG_HEALTH_CHECK_TIMEOUT")
        else:
            os.environ["SGLANG_HEALTH_CHECK_TIMEOUT"] = old
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def proc(model_dir, tmp_path_factory):
    """``scope-megatron serve`` as a process (no deterministic flag), started from a torchrun-like env."""
    log = tmp_path_factory.mktemp("proc") / "engine.log"
    saved = {k: os.environ.get(k) for k in TORCHRUN_ENV}
    os.environ.update(TORCHRUN_ENV)
    try:
        handle = start_embedded_server_process(model_dir, port=free_port(), log_path=log,
                                               extra_args=["--log-level", "info"],
                                               env={"SGLANG_HEALTH_CHECK_TIMEOUT": "1", "OMP_NUM_THREADS": "1"})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield handle
    handle.stop(timeout=10)


class Trainer:
    """Group rank 0 in this process, the engine process as rank 1 (as SGLang's RL clients do)."""

    def __init__(self, url: str, group_name: str = GROUP):
        self.url, self.group_name, self.port = url, group_name, free_port()
        reply = self._with_engine("/init_weights_update_group", self.init_body(), lambda: init_weight_update_group(
            "127.0.0.1", self.port, 0, 2, group_name=group_name, backend="gloo", timeout_s=60))
        self.group, response = reply
        assert response.status_code == 200, response.text

    def init_body(self) -> dict:
        return {"master_address": "127.0.0.1", "master_port": self.port, "rank_offset": 1, "world_size": 2,
                "group_name": self.group_name, "backend": "gloo"}

    def _with_engine(self, path: str, body: dict, local):
        box: dict = {}
        t = threading.Thread(target=lambda: box.update(r=httpx.post(self.url + path, json=body, timeout=120)))
        t.start()
        value = local()
        t.join(120)
        return value, box["r"]

    def push(self, named: list[tuple[str, torch.Tensor]], flattened: bool = False, **extra) -> httpx.Response:
        """POST update_weights_from_distributed and broadcast the tensors, in order."""
        import torch.distributed as dist

        body = {"names": [n for n, _ in named], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in named],
                "shapes": [list(t.shape) for _, t in named], "group_name": self.group_name, **extra}
        if flattened:
            body["load_format"] = "flattened_bucket"

        def send():
            if flattened:
                flat = torch.cat([t.contiguous().view(-1).view(torch.uint8) for _, t in named])
                dist.broadcast(flat, src=0, group=self.group)
            else:
                for _, t in named:
                    dist.broadcast(t.contiguous(), src=0, group=self.group)
        return self._with_engine("/update_weights_from_distributed", body, send)[1]

    def close(self) -> None:
        try:
            httpx.post(self.url + "/destroy_weights_update_group", json={"group_name": self.group_name}, timeout=30)
        except httpx.HTTPError:  # the engine is gone (the SIGTERM test)
            pass
        destroy_weight_update_group(self.group)


@pytest.fixture(scope="module")
def trainer(proc):
    t = Trainer(proc.url)
    yield t
    t.close()


@pytest.fixture
def session(proc):
    assert httpx.post(proc.url + "/begin_weight_update", json={}, timeout=30).json()["success"] is True
    yield
    httpx.post(proc.url + "/end_weight_update", json={}, timeout=30)


# ---------------------------------------------------------------------------- health
def test_health_while_paused_blocks_then_503_and_stays_unhealthy_until_a_probe_passes(det):
    """SGLang 0.5.23 srt/entrypoints/http_server.py:721-799 with SGLANG_HEALTH_CHECK_TIMEOUT=1."""
    url = det.url
    t0 = time.monotonic()
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    assert time.monotonic() - t0 >= 1.0  # the probe is checked once a second
    httpx.post(url + "/pause_generation", json={"mode": "retract"}, timeout=30)
    try:
        t0 = time.monotonic()
        assert httpx.get(url + "/health", timeout=30).status_code == 503
        assert time.monotonic() - t0 >= 1.0
        assert httpx.get(url + "/health_generate", timeout=30).status_code == 503
        assert httpx.get(url + "/ready").status_code == 503
    finally:
        httpx.post(url + "/continue_generation", json={}, timeout=30)
    assert httpx.get(url + "/ready").status_code == 503  # UnHealthy survives the continue ...
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    assert httpx.get(url + "/ready").status_code == 200  # ... until a probe passes


# ---------------------------------------------------------------------------- seeds
def test_sampling_seed_is_ignored_without_deterministic_inference(proc):
    """SGLang 0.5.23 srt/sampling/sampling_batch_info.py:128,157-171: no seed tensor unless deterministic."""
    body = {"input_ids": [1, 20, 30, 40], "sampling_params": sampling(sampling_seed=7)}
    outs = {tuple(generate(proc.url, body)["output_ids"]) for _ in range(3)}
    assert len(outs) > 1
    info = httpx.get(proc.url + "/server_info").json()
    assert info["enable_deterministic_inference"] is False
    assert (info["tp_size"], info["pp_size"], info["dp_size"]) == (1, 1, 1)


def test_deterministic_n_samples_share_the_seed_and_unseeded_uses_42(det):
    """tokenizer_manager.py:2163-2183 copies the request n times (same seed); 42 when none is given."""
    info = httpx.get(det.url + "/server_info").json()
    assert info["enable_deterministic_inference"] is True
    res = generate(det.url, {"input_ids": [1, 20, 30, 40], "sampling_params": sampling(n=3, sampling_seed=5)})
    assert len({tuple(r["output_ids"]) for r in res}) == 1
    unseeded = generate(det.url, {"input_ids": [1, 20, 30, 40], "sampling_params": sampling()})
    seed42 = generate(det.url, {"input_ids": [1, 20, 30, 40], "sampling_params": sampling(sampling_seed=42)})
    assert unseeded["output_ids"] == seed42["output_ids"]


# ---------------------------------------------------------------------------- log-probs
def test_prompt_ids_at_the_vocabulary_end_are_reported_as_zero(det, model_dir):
    """SGLang 0.5.23 srt/managers/scheduler_components/logprob_result_processor.py:52-55."""
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompt = [1, vocab - 1, 5, vocab - 2]
    res = generate(det.url, {"input_ids": prompt, "return_logprob": True, "logprob_start_len": 0,
                             "sampling_params": {"max_new_tokens": 0}})
    assert [e[1] for e in res["meta_info"]["input_token_logprobs"]] == [1, 0, 5, vocab - 2]


# ---------------------------------------------------------------------------- weight names and shapes
def test_misspelt_name_succeeds_over_http_but_changes_nothing(proc, trainer, session, state):
    """models/qwen3.py:749-760: an unknown name is ``Parameter X not found in params_dict`` and success,
    so only the trainer's post-sync probe can notice that the weights did not change."""
    before = weights(proc.url, NORM)
    probe = {"input_ids": [1, 20, 30, 40, 50], "return_logprob": True, "logprob_start_len": 0,
             "sampling_params": {"max_new_tokens": 0}}
    lp_before = generate(proc.url, probe)["meta_info"]["input_token_logprobs"]
    r = trainer.push([("model.norm.weigth", torch.full_like(state[NORM], 3.0))], weight_version="typo")
    assert r.status_code == 200 and r.json()["success"] is True, r.text
    assert weights(proc.url, NORM) == before
    assert generate(proc.url, probe)["meta_info"]["input_token_logprobs"] == lp_before
    assert "Parameter model.norm.weigth not found in params_dict" in proc.log_path.read_text()


def test_wrong_shape_fails_after_a_partial_update(proc, trainer, session, state):
    """model_runner_components/weight_updater.py:322-339: the earlier names stay written."""
    version = httpx.get(proc.url + "/model_info").json()["weight_version"]
    new_norm = torch.full_like(state[NORM], 0.5)
    r = trainer.push([(NORM, new_norm), (UP, torch.zeros(3, 5))], weight_version="bad")
    assert r.status_code == 400 and r.json()["success"] is False
    assert "partially updated" in r.json()["message"]
    assert weights(proc.url, NORM) == pytest.approx(new_norm.tolist())
    assert httpx.get(proc.url + "/model_info").json()["weight_version"] == version
    trainer.push([(NORM, state[NORM])])  # restore for the other tests


def test_unaligned_flattened_bucket_is_refused_before_any_broadcast(proc, trainer, session, state):
    """srt/weight_sync/tensor_bucket.py:98-101: no padding; the refusal comes before the receive."""
    body = {"names": ["a", NORM], "dtypes": ["bfloat16", "float32"], "shapes": [[3], list(state[NORM].shape)],
            "group_name": GROUP, "load_format": "flattened_bucket"}
    r = httpx.post(proc.url + "/update_weights_from_distributed", json=body, timeout=30)
    assert r.status_code == 400 and "Unaligned received tensor" in r.json()["message"]
    # the group is still in step: an aligned bucket loads
    assert trainer.push([(NORM, state[NORM])], flattened=True).status_code == 200


def test_second_group_of_the_same_name_is_refused_by_torch(proc, trainer):
    """weight_updater.py:99-144 there: torch's name check after the rendezvous, reported as a 400."""
    r = httpx.post(proc.url + "/init_weights_update_group", json=trainer.init_body(), timeout=60)
    assert r.status_code == 400 and r.json()["success"] is False
    assert "The specified group name has already been created" in r.json()["message"]
    missing = httpx.post(proc.url + "/destroy_weights_update_group", json={"group_name": "nope"}, timeout=30)
    assert missing.status_code == 400 and missing.json()["message"] == "The group to be destroyed does not exist."


def test_session_messages_are_sglangs(proc):
    """scheduler_components/weight_updater.py:306-332."""
    url = proc.url
    first = httpx.post(url + "/begin_weight_update", json={}, timeout=30).json()
    assert first == {"success": True, "message": "Success"}
    second = httpx.post(url + "/begin_weight_update", json={}, timeout=30)
    assert second.status_code == 400
    assert second.json()["message"] == "a weight-update session is already open; call end_weight_update() first"
    assert httpx.post(url + "/end_weight_update", json={}, timeout=30).json()["success"] is True
    again = httpx.post(url + "/end_weight_update", json={}, timeout=30)
    assert again.status_code == 400
    assert again.json()["message"] == "no weight-update session is open; call begin_weight_update() first"


def test_disk_update_of_a_misspelt_name_succeeds_and_a_wrong_shape_kills_the_server(model_dir, state, tmp_path):
    """model_runner_components/weight_updater.py:172-252: partial files load, unknown names warn; a
    wrong shape fails, the roll-back re-reads the same new path and the scheduler dies."""
    typo, bad = tmp_path / "typo", tmp_path / "bad"
    typo.mkdir()
    bad.mkdir()
    save_file({"model.norm.weigth": torch.full_like(state[NORM], 2.0), UP: state[UP] * 2}, str(typo / "a.safetensors"))
    save_file({UP: torch.zeros(3, 5)}, str(bad / "a.safetensors"))
    with start_embedded_server(model_dir) as server:
        before = weights(server.url, NORM)
        r = httpx.post(server.url + "/update_weights_from_disk", json={"model_path": str(typo), "weight_version": "t"},
                       timeout=60)
        assert r.status_code == 200 and r.json()["success"] is True, r.text
        assert weights(server.url, NORM) == before  # the misspelt one changed nothing
        assert weights(server.url, UP, 10) == pytest.approx((state[UP] * 2).flatten()[:10].tolist())  # a subset loads
        r = httpx.post(server.url + "/update_weights_from_disk", json={"model_path": str(bad)}, timeout=60)
        assert r.status_code >= 500
        assert_server_dies(server.url)


# ---------------------------------------------------------------------------- update locking and versions
def test_unpaused_update_waits_for_queued_requests(det, model_dir, tmp_path):
    """tokenizer_control_mixin.py:507-515 + tokenizer_manager.py:941-951: the update's writer lock waits
    for every admitted request (they hold the reader lock until they finish), queued ones included."""
    save_file(load_file(str(model_dir / "model.safetensors")), str(tmp_path / "model.safetensors"))
    box: dict = {}
    long_body = {"input_ids": [1, 20, 30], "sampling_params": sampling(max_new_tokens=150)}
    queued_body = {"input_ids": [1, 21, 31], "sampling_params": sampling(max_new_tokens=5)}
    running = threading.Thread(target=lambda: box.update(a=generate(det.url, long_body)))
    running.start()
    wait_until_decoding(det.engine)
    queued = threading.Thread(target=lambda: box.update(b=generate(det.url, queued_body)))
    queued.start()
    deadline = time.monotonic() + 30
    while not det.engine._waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    r = httpx.post(det.url + "/update_weights_from_disk", json={"model_path": str(tmp_path), "weight_version": "w1"},
                   timeout=120)
    running.join(60)
    queued.join(60)
    assert r.status_code == 200 and r.json()["success"] is True, r.text
    # the queued request ran entirely before the update: every token under the old version
    assert [s["version"] for s in box["b"]["meta_info"]["weight_versions"]] == ["default"]
    httpx.post(det.url + "/update_weight_version", json={"new_version": "default"}, timeout=30)


def test_version_is_kept_when_the_post_update_flush_fails(det, model_dir, tmp_path):
    """tokenizer_control_mixin.py:525-531: /model_info's version changes only when the whole call
    succeeded; the scheduler's (the spans) changed with the load (weight_updater.py:234-238)."""
    save_file(load_file(str(model_dir / "model.safetensors")), str(tmp_path / "model.safetensors"))
    box: dict = {}
    body = {"input_ids": [1, 22, 32], "sampling_params": sampling(max_new_tokens=200)}
    t = threading.Thread(target=lambda: box.update(r=generate(det.url, body)))
    t.start()
    wait_until_decoding(det.engine)
    httpx.post(det.url + "/pause_generation", json={"mode": "in_place"}, timeout=30)
    try:
        r = httpx.post(det.url + "/update_weights_from_disk", json={"model_path": str(tmp_path), "weight_version": "v9"},
                       timeout=60)
        assert r.status_code == 400 and "cache was not flushed" in r.json()["message"]
        assert httpx.get(det.url + "/model_info").json()["weight_version"] == "default"
    finally:
        httpx.post(det.url + "/continue_generation", json={}, timeout=30)
    t.join(60)
    assert [s["version"] for s in box["r"]["meta_info"]["weight_versions"]] == ["default", "v9"]
    httpx.post(det.url + "/update_weight_version", json={"new_version": "default"}, timeout=30)


# ---------------------------------------------------------------------------- auth
def test_auth_levels_follow_sglang(model_dir):
    """srt/utils/auth.py:133-151."""
    body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 1}}
    with start_embedded_server(model_dir, admin_api_key="adm") as only_admin:
        assert httpx.post(only_admin.url + "/generate", json=body, timeout=60).status_code == 200  # open
        assert httpx.post(only_admin.url + "/flush_cache", timeout=30).status_code == 401
    with start_embedded_server(model_dir, api_key="key", admin_api_key="adm") as both:
        admin = {"Authorization": "Bearer adm"}
        user = {"Authorization": "Bearer key"}
        assert httpx.post(both.url + "/generate", json=body, headers=admin, timeout=60).status_code == 401
        assert httpx.post(both.url + "/generate", json=body, headers=user, timeout=60).status_code == 200
        get = {"name": NORM, "truncate_size": 2}
        assert httpx.post(both.url + "/get_weights_by_name", json=get, headers=user, timeout=30).status_code == 401
        assert httpx.post(both.url + "/get_weights_by_name", json=get, headers=admin, timeout=30).status_code == 200
        assert httpx.get(both.url + "/health_generate", timeout=30).status_code == 200  # probes by prefix


# ---------------------------------------------------------------------------- process
def test_child_does_not_inherit_the_torchrun_environment(proc):
    environ = open(f"/proc/{proc.process.pid}/environ", "rb").read().split(b"\0")
    names = {e.split(b"=", 1)[0].decode() for e in environ if e}
    assert not names & set(TORCHRUN_ENV)


def test_sigterm_stops_a_paused_server_with_session_group_and_broadcast_in_flight(proc, trainer):
    """A killed trainer leaves the engine paused, in a session, in the group, with a receive pending."""
    url = proc.url
    assert httpx.post(url + "/pause_generation", json={"mode": "retract"}, timeout=30).status_code == 200
    assert httpx.post(url + "/begin_weight_update", json={}, timeout=30).json()["success"] is True
    held = threading.Thread(target=lambda: httpx.post(url + "/generate", json={
        "input_ids": [1, 2], "sampling_params": sampling()}, timeout=60), daemon=True)
    held.start()
    body = {"names": [NORM], "dtypes": ["float32"], "shapes": [[64]], "group_name": GROUP}
    receiving = threading.Thread(target=lambda: httpx.post(url + "/update_weights_from_distributed", json=body,
                                                           timeout=60), daemon=True)
    receiving.start()  # nothing is ever broadcast: the engine waits in the receive
    time.sleep(1.5)
    t0 = time.monotonic()
    proc.process.popen.send_signal(signal.SIGTERM)
    try:
        proc.process.popen.wait(timeout=15)
    except Exception:
        proc.process.popen.kill()
        raise
    assert time.monotonic() - t0 < 5.0
