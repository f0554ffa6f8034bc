"""The client's /generate payloads and the embedded engine's replies against SGLang 0.5.23's own schema.

``sglang/api/v1/api_types.py`` (generated, imports only msgspec) is what SGLang's server runs for
its 400 contract check. It is read from the sglang 0.5.23 wheel by file path (never vendored):
set ``SGLANG_WHEEL`` or put the wheel under /tmp/sglang_wheel (``pip download --no-deps
sglang==0.5.23 -d /tmp/sglang_wheel``). Skipped when the wheel or msgspec is absent.
"""

from __future__ import annotations

import asyncio
import glob
import importlib.util
import os
import zipfile

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from scope_megatron.rollout.client import SGLangClient, SGLangHTTPError
from scope_megatron.rollout.embedded_server import start_embedded_server
from scope_megatron.rollout.protocol import SAMPLING_PARAM_KEYS, SamplingParams
from scope_megatron.examples.tiny_models import save_tiny_hf_model
from tests.test_rollout_client import FakeServer

pytestmark = pytest.mark.timeout(120)


def _wheel() -> str | None:
    repo_wheels = os.path.join(os.path.dirname(__file__), os.pardir, ".venv", "wheels")  # scripts/setup.sh puts it here
    candidates = [os.environ.get("SGLANG_WHEEL", "")] + sorted(glob.glob(f"{repo_wheels}/sglang-0.5.23-*.whl")) + \
        sorted(glob.glob("/tmp/sglang_wheel/sglang-0.5.23-*.whl")) + sorted(glob.glob("/tmp/sglang-0.5.23-*.whl"))
    return next((c for c in candidates if c and os.path.exists(c)), None)


@pytest.fixture(scope="module")
def api_types(tmp_path_factory):
    pytest.importorskip("msgspec")
    wheel = _wheel()
    if wheel is None:
        pytest.skip("sglang 0.5.23 wheel not found (set SGLANG_WHEEL)")
    out = tmp_path_factory.mktemp("sglang_api")
    with zipfile.ZipFile(wheel) as zf:
        path = zf.extract("sglang/api/v1/api_types.py", out)
    spec = importlib.util.spec_from_file_location("sglang_api_types_0_5_23", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_our_sampling_key_list_is_sglangs(api_types):
    assert tuple(SAMPLING_PARAM_KEYS) == tuple(api_types._FIELDS_SamplingParams)


def test_client_payloads_and_engine_replies_pass_sglangs_contract(api_types, tmp_path):
    """A proxy checks every /generate body the client sends with GenerateRequest (SGLang's 400
    check) and every reply the embedded engine gives with GenerateResponse."""
    seen = {"requests": 0, "responses": 0}
    model = save_tiny_hf_model(tmp_path / "m", seed=1)
    with start_embedded_server(model) as engine:
        app = FastAPI()

        @app.post("/generate")
        async def proxy(request: Request):
            body = await request.json()
            try:
                api_types.GenerateRequest.from_json_value(body)
            except api_types.JsonContractError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            seen["requests"] += 1
            async with httpx.AsyncClient() as http:
                reply = await http.post(engine.url + "/generate", json=body, timeout=60)
            data = reply.json()
            if reply.status_code == 200:
                for item in data if isinstance(data, list) else [data]:
                    decoded = api_types.GenerateResponse.from_json_value(item)
                    assert decoded.meta_info.finish_reason is not None
                    seen["responses"] += 1
            return JSONResponse(data, status_code=reply.status_code)

        with FakeServer(app) as fake:
            async def go():
                params = SamplingParams(max_new_tokens=4, temperature=0.6, top_p=0.95, top_k=20, min_p=0.0,
                                        stop_token_ids=(2,), sampling_seed=1, repetition_penalty=1.08)
                async with SGLangClient(fake.url) as client:
                    await client.generate([1, 5, 6], params, top_logprobs_num=2)
                    await client.generate_group([1, 5, 6], 2, params)
                    await client.generate_batch([[1, 5], [1, 6, 7]], params.replace(n=2, sampling_seed=None))
                    await client.score([1, 5, 6], [7, 8], top_logprobs_num=3)
                    await client.score_batch([([1, 5], [7]), ([1, 6, 7], [8, 9])])
                    with pytest.raises(SGLangHTTPError, match="unknown field `max_tokens`"):
                        await client._json("POST", "/generate", {"input_ids": [1], "sampling_params": {"max_tokens": 1}})
            asyncio.run(go())
    assert seen["requests"] == 6 and seen["responses"] == 1 + 2 + 4 + 1 + 2


@pytest.mark.parametrize("sampling", [{"max_tokens": 8}, {"temperature": "1"}, {"top_k": 1.5}, {"ignore_eos": 1}])
def test_engine_rejects_what_sglang_rejects_with_the_same_text(api_types, tmp_path_factory, sampling):
    model = save_tiny_hf_model(tmp_path_factory.mktemp("m"), seed=1)
    body = {"input_ids": [1, 2], "sampling_params": sampling}
    with pytest.raises(api_types.JsonContractError) as theirs:
        api_types.GenerateRequest.from_json_value(body)
    with start_embedded_server(model) as engine:
        reply = httpx.post(engine.url + "/generate", json=body)
    assert reply.status_code == 400
    ours = reply.json()["error"]
    if "unknown field" in str(theirs.value):
        assert ours == str(theirs.value)
    else:  # same diagnosis, our text also names the field
        assert str(theirs.value).split(", expected")[0] in ours
