"""Colocated engines: in-memory weight pushes (/update_weights_from_tensor) and the release /
resume of the engine's memory, against SGLang 0.5.23's own decoder and transformers."""

from __future__ import annotations

import ast
import base64
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from scope_megatron.examples.tiny_models import save_tiny_hf_model
from scope_megatron.rollout.embedded_server import start_embedded_server, start_embedded_server_process
from scope_megatron.rollout.engine.weights import deserialize_tensor_payload
from scope_megatron.rollout.tensor_transport import (TensorWeightSender, flattened_bucket, serialize_for_sglang,
                                                      update_weights_from_tensor_body, use_file_system_sharing)
from tests.dist_utils import free_port
from tests.rollout_utils import assert_server_dies
from tests.sglang_parsers import REPO, STUBBED_MODULES, sglang_wheel

pytestmark = pytest.mark.timeout(240)
PROMPT = [1, 20, 30, 40, 50]
GREEDY = {"max_new_tokens": 8, "temperature": 0.0}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    old = save_tiny_hf_model(tmp_path_factory.mktemp("old"), seed=1)
    new = save_tiny_hf_model(tmp_path_factory.mktemp("new"), seed=2)
    return old, new


def state_of(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def generate(url: str, prompt=PROMPT, params=GREEDY) -> dict:
    res = httpx.post(url + "/generate", json={"input_ids": prompt, "sampling_params": params, "return_logprob": True},
                     timeout=60)
    res.raise_for_status()
    return res.json()


def output_logprobs(reply: dict) -> tuple[list[int], list[float]]:
    rows = reply["meta_info"]["output_token_logprobs"]
    return [r[1] for r in rows], [r[0] for r in rows]


def reference_logprobs(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits for ``ids`` ([len(ids), V])."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def weight(url: str, name: str) -> list[float]:
    res = httpx.post(url + "/get_weights_by_name", json={"name": name, "truncate_size": 10_000_000}, timeout=30)
    res.raise_for_status()
    return res.json()


def post(url: str, path: str, body: dict | None = None) -> httpx.Response:
    return httpx.post(url + path, json=body or {}, timeout=60)


def push(url: str, named: list[tuple[str, torch.Tensor]], flattened: bool, version: str | None = None,
         bucket_bytes: int = 4096) -> dict:
    with TensorWeightSender(url, bucket_bytes=bucket_bytes, flattened_bucket=flattened) as sender:
        return sender.send(named, weight_version=version)


# ---------------------------------------------------------------------------- SGLang's own decoder
SGLANG_DECODE = r'''
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests.sglang_parsers import _extract, _install_stubs
req = json.loads(Path(sys.argv[2]).read_text())
root = Path(req["root"])
_extract(req["wheel"], root, "sglang")
sys.path.insert(0, str(root))
try:
    import pybase64
except ImportError:  # a faster drop-in for the stdlib's base64 (same b64encode / b64decode signatures)
    import base64
    sys.modules["pybase64"] = base64
_install_stubs(tuple(req["stubs"]))
import torch
from safetensors.torch import save_file
from sglang.srt.utils.common import MultiprocessingSerializer, normalize_serialized_named_tensor_payloads
from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata
results = []
for case in req["cases"]:
    body = json.loads(Path(case["body"]).read_text())
    try:
        # tokenizer_control_mixin.py:576-578, then tp_worker.py:194-201 for TP rank 0
        raw = normalize_serialized_named_tensor_payloads(body["serialized_named_tensors"])
        obj = MultiprocessingSerializer.deserialize(raw[0])
        if body.get("load_format") == "flattened_bucket":
            # model_runner_components/weight_updater.py:383-409
            meta = [FlattenedTensorMetadata(name=m.name, shape=m.shape, dtype=m.dtype, start_idx=m.start_idx,
                                            end_idx=m.end_idx, numel=m.numel) for m in obj["metadata"]]
            named = FlattenedTensorBucket(flattened_tensor=obj["flattened_tensor"], metadata=meta).reconstruct_tensors()
        else:
            named = [(n, t.to("cpu")) for n, t in obj]
        save_file({n: t.contiguous() for n, t in named}, case["out"])
        results.append({"ok": True, "error": ""})
    except Exception as exc:
        results.append({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
print(json.dumps(results))
'''


def sglang_decode(bodies: list[dict], scratch: Path) -> list[dict]:
    """Decode each body as SGLang 0.5.23's server does (its own functions from the wheel, in a
    subprocess); ``{"ok", "error", "tensors"}`` per body."""
    wheel = sglang_wheel()
    if wheel is None:
        pytest.skip("sglang 0.5.23 wheel not found (scripts/setup.sh puts it in .venv/wheels)")
    cases = []
    for i, body in enumerate(bodies):
        path = scratch / f"body{i}.json"
        path.write_text(json.dumps(body))
        cases.append({"body": str(path), "out": str(scratch / f"out{i}.safetensors")})
    req = scratch / "decode.json"
    req.write_text(json.dumps({"wheel": str(wheel), "root": str(scratch.parent / "sglang_site"), "cases": cases,
                               "stubs": list(STUBBED_MODULES["sglang.launch_server"])}))
    proc = subprocess.run([sys.executable, "-c", SGLANG_DECODE, str(REPO), str(req)], capture_output=True, text=True,
                          timeout=200, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for res, case in zip(results, cases):
        res["tensors"] = load_file(case["out"]) if res["ok"] else None
    return results


def request_fields(wheel: Path, class_name: str) -> dict[str, str]:
    """The annotated fields of an io_struct request class, read from the wheel's source."""
    with zipfile.ZipFile(wheel) as zf:
        tree = ast.parse(zf.read("sglang/srt/managers/io_struct.py").decode())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    return {s.target.id: ast.unparse(s.annotation) for s in cls.body if isinstance(s, ast.AnnAssign)}


def test_payloads_decode_with_sglangs_own_functions(tmp_path):
    """Both payload forms, built by the sender, decode in another process with SGLang's
    MultiprocessingSerializer and FlattenedTensorBucket to the sent tensors, byte for byte (the
    tensors travel as shared-memory handles); a pickle naming a code global is refused by both
    decoders with the same message."""
    use_file_system_sharing()
    torch.manual_seed(0)
    named = [("a.weight", torch.randn(3, 5)), ("b.bias", torch.randn(7).to(torch.bfloat16)),
             ("c.weight", torch.randint(-9, 9, (2, 2), dtype=torch.int32)), ("d", torch.randn(4, dtype=torch.float64))]
    listed = update_weights_from_tensor_body(named, load_format=None, weight_version="v1")
    flat = update_weights_from_tensor_body(flattened_bucket(named), load_format="flattened_bucket")
    evil = {"serialized_named_tensors": [base64.b64encode(pickle.dumps(os.getcwd)).decode()]}
    results = sglang_decode([listed, flat, evil], tmp_path)
    for res in results[:2]:
        assert res["ok"], res["error"]
        assert sorted(res["tensors"]) == sorted(n for n, _ in named)
        for name, tensor in named:
            got = res["tensors"][name]
            assert got.dtype == tensor.dtype and got.shape == tensor.shape
            assert torch.equal(got, tensor)
    assert not results[2]["ok"]
    assert "Blocked unsafe global (posix.getcwd)" in results[2]["error"]
    with pytest.raises(RuntimeError, match=r"Blocked unsafe global \(posix.getcwd\)"):
        deserialize_tensor_payload(evil["serialized_named_tensors"][0])
    # the body's keys and their types are the request class's fields (io_struct.py:2027-2047)
    fields = request_fields(sglang_wheel(), "UpdateWeightsFromTensorReqInput")
    assert set(listed) <= set(fields)
    assert fields["serialized_named_tensors"] == "Annotated[List[bytes], Base64Bytes()]"
    assert set(request_fields(sglang_wheel(), "ReleaseMemoryOccupationReqInput")) == {"tags"}


# ---------------------------------------------------------------------------- in-memory pushes
def test_pushed_weights_are_the_engines_in_both_forms_across_processes(dirs, tmp_path):
    """A separate engine process serving the old weights gets the new ones by shared memory, as
    a flattened bucket and as a named-tensor list, in several requests each: its weights are
    byte-equal to the pushed ones and its log-probs are transformers' on the new weights."""
    old, new = dirs
    port = free_port()
    server = start_embedded_server_process(old, port, log_path=tmp_path / "engine.log")
    try:
        state = state_of(new)
        for flattened, version in ((True, "v-flat"), (False, "v-list")):
            before = weight(server.url, "model.layers.0.self_attn.q_proj.weight")
            assert before != state["model.layers.0.self_attn.q_proj.weight"].flatten().tolist()
            stats = push(server.url, list(state.items()), flattened, version)
            assert stats["tensors"] == len(state) and stats["requests"] > 1
            assert httpx.get(server.url + "/model_info").json()["weight_version"] == version
            for name in ("model.layers.0.self_attn.q_proj.weight", "model.norm.weight", "model.embed_tokens.weight"):
                assert weight(server.url, name) == state[name].flatten().tolist()
            ids, logprobs = output_logprobs(generate(server.url))
            ref = reference_logprobs(new, PROMPT + ids)
            expected = [ref[len(PROMPT) - 1 + j, t].item() for j, t in enumerate(ids)]
            assert logprobs == pytest.approx(expected, abs=1e-4)
            # back to the old weights for the second form
            push(server.url, list(state_of(old).items()), flattened=True)
            state_old = state_of(old)
            assert weight(server.url, "model.norm.weight") == state_old["model.norm.weight"].flatten().tolist()
    finally:
        server.stop()


@pytest.fixture
def engine_server(dirs):
    """An in-process engine on the old weights with the memory saver on; stopped after the test."""
    handles = []

    def start(**kwargs):
        handle = start_embedded_server(dirs[0], **{"enable_memory_saver": True, **kwargs})
        handles.append(handle)
        return handle

    yield start
    for h in handles:
        h.stop()


def test_update_outside_a_session_and_bad_fields_are_refused(engine_server, dirs):
    server = engine_server()
    use_file_system_sharing()
    body = update_weights_from_tensor_body(list(state_of(dirs[1]).items()))
    res = post(server.url, "/update_weights_from_tensor", body)
    # SGLang 0.5.23 scheduler_components/weight_updater.py:232-238
    assert res.status_code == 400 and res.json() == {
        "success": False,
        "message": "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()"}
    assert post(server.url, "/begin_weight_update").status_code == 200
    res = post(server.url, "/update_weights_from_tensor", {"serialized_named_tensors": ["not base64!"]})
    assert res.status_code == 400 and "Expected base64-encoded bytes" in res.text
    res = post(server.url, "/update_weights_from_tensor", {"load_format": None})
    assert res.status_code == 400 and "serialized_named_tensors" in res.text
    # the refusals loaded nothing
    assert weight(server.url, "model.norm.weight") == state_of(dirs[0])["model.norm.weight"].flatten().tolist()


def test_unknown_names_are_warnings_and_extra_rank_entries_unread(engine_server, dirs, caplog):
    """As SGLang's load_weights, a name the model lacks is skipped with a warning; a TP=1 engine
    reads entry 0 only (tp_worker.py:194-201), so a second entry is never decoded."""
    server = engine_server()
    use_file_system_sharing()
    norm = torch.full_like(state_of(dirs[0])["model.norm.weight"], 0.5)
    body = update_weights_from_tensor_body([("model.norm.weight", norm), ("model.no_such.weight", torch.ones(3))],
                                           weight_version="v2")
    body["serialized_named_tensors"].append(base64.b64encode(pickle.dumps(os.getcwd)).decode())
    assert post(server.url, "/begin_weight_update").status_code == 200
    with caplog.at_level("WARNING"):
        res = post(server.url, "/update_weights_from_tensor", body)
    assert res.status_code == 200, res.text
    assert res.json() == {"success": True, "message": "Success Weight version updated to v2."}
    assert "Parameter model.no_such.weight not found in params_dict" in caplog.text
    assert weight(server.url, "model.norm.weight") == norm.tolist()


@pytest.mark.parametrize("case", ["no_entry", "blocked_global", "wrong_shape", "list_as_flattened", "unknown_format"])
def test_malformed_payloads_kill_the_server_as_on_sglang(engine_server, dirs, case):
    """None of SGLang's decode / load steps is guarded in the scheduler: the process dies."""
    server = engine_server()
    use_file_system_sharing()
    good = [("model.norm.weight", state_of(dirs[1])["model.norm.weight"])]
    body = {
        "no_entry": {"serialized_named_tensors": []},
        "blocked_global": {"serialized_named_tensors": [base64.b64encode(pickle.dumps(os.getcwd)).decode()]},
        "wrong_shape": update_weights_from_tensor_body([("model.norm.weight", torch.ones(3))]),
        "list_as_flattened": update_weights_from_tensor_body(good, load_format="flattened_bucket"),
        "unknown_format": update_weights_from_tensor_body(good, load_format="my.loader"),
    }[case]
    assert post(server.url, "/begin_weight_update").status_code == 200
    try:
        post(server.url, "/update_weights_from_tensor", body)
    except httpx.HTTPError:
        pass
    assert_server_dies(server.url)


# ---------------------------------------------------------------------------- release / resume
def test_release_resume_push_gives_the_same_generation(engine_server, dirs):
    """Release (every tag) frees the parameters; resume brings them back with undefined values
    (zeros here, as pages torch_memory_saver maps afresh), and after the trainer's push the
    greedy output and its log-probs equal those before the release."""
    server = engine_server()
    before = generate(server.url)
    res = post(server.url, "/release_memory_occupation", {})
    assert res.status_code == 200 and res.json() is None  # SGLang's handler returns nothing
    params = dict(server.engine.model.named_parameters())
    assert all(p.numel() == 0 for p in params.values())
    assert post(server.url, "/resume_memory_occupation", {"tags": None}).status_code == 200
    assert set(weight(server.url, "model.norm.weight")) == {0.0}
    push(server.url, list(state_of(dirs[0]).items()), flattened=True, version="after-resume")
    after = generate(server.url)
    assert output_logprobs(after) == output_logprobs(before)
    assert after["meta_info"]["weight_version"] == "after-resume"


def test_tags_release_only_their_memory_and_cpu_backup_restores_values(engine_server, dirs):
    """``kv_cache`` alone leaves the weights; with the CPU backup the weights come back as they
    were, so generation needs no push."""
    server = engine_server(enable_weights_cpu_backup=True)
    before = generate(server.url)
    assert post(server.url, "/release_memory_occupation", {"tags": ["kv_cache"]}).status_code == 200
    assert all(p.numel() > 0 for p in server.engine.model.parameters())
    assert post(server.url, "/release_memory_occupation", {"tags": ["weights", "cuda_graph"]}).status_code == 200
    assert all(p.numel() == 0 for p in server.engine.model.parameters())
    assert post(server.url, "/resume_memory_occupation", {"tags": ["kv_cache", "weights", "cuda_graph"]}).status_code == 200
    assert output_logprobs(generate(server.url)) == output_logprobs(before)


def test_without_the_memory_saver_release_frees_nothing(engine_server):
    """SGLang's no-op adapter: the tags are recorded, memory stays, generation goes on."""
    server = engine_server(enable_memory_saver=False)
    before = generate(server.url)
    assert post(server.url, "/release_memory_occupation", {}).status_code == 200
    assert output_logprobs(generate(server.url)) == output_logprobs(before)
    assert post(server.url, "/resume_memory_occupation", {}).status_code == 200


@pytest.mark.parametrize("case", ["generate_while_released", "release_while_busy", "resume_not_released"])
def test_misuse_of_released_memory_kills_the_server_as_on_sglang(engine_server, case):
    """A request reaching the model while its memory is released (kernels on unmapped pages), a
    release while requests run (weight_updater.py:337-341 asserts idle) and a resume of a tag that
    is not released (``offload_tags.remove``: KeyError) each raise in SGLang's scheduler."""
    import threading

    server = engine_server()
    if case == "generate_while_released":
        assert post(server.url, "/release_memory_occupation", {"tags": ["weights"]}).status_code == 200
        with pytest.raises(httpx.HTTPError):
            generate(server.url)
    elif case == "release_while_busy":
        from tests.rollout_utils import wait_until_decoding

        long = threading.Thread(target=lambda: _quietly(generate, server.url, params={"max_new_tokens": 4000,
                                                                                      "temperature": 1.0,
                                                                                      "ignore_eos": True}))
        long.start()
        wait_until_decoding(server.engine)
        _quietly(post, server.url, "/release_memory_occupation", {})
        long.join(60)
    else:
        _quietly(post, server.url, "/resume_memory_occupation", {"tags": ["weights"]})
    assert_server_dies(server.url)


def _quietly(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except httpx.HTTPError:
        return None


def test_client_release_resume_and_tensor_update(engine_server, dirs):
    """SGLangClient's colocated calls against the engine: release, resume, then a push."""
    import asyncio

    from scope_megatron.rollout.client import SGLangClient

    server = engine_server()
    use_file_system_sharing()
    state = state_of(dirs[1])
    payload = flattened_bucket(list(state.items()))

    async def go():
        async with SGLangClient(server.url) as client:
            await client.release_memory_occupation()
            await client.resume_memory_occupation(["kv_cache", "weights", "cuda_graph"])
            await client.begin_weight_update()
            message = await client.update_weights_from_tensor([serialize_for_sglang(payload)],
                                                              load_format="flattened_bucket", weight_version="c1")
            await client.end_weight_update()
            return message, await client.weight_version()

    message, version = asyncio.run(go())
    assert message == "Success Weight version updated to c1." and version == "c1"
    assert weight(server.url, "model.norm.weight") == state["model.norm.weight"].tolist()
