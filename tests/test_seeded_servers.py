"""``rollout.seeded`` against servers that ignore seeds.

SGLang 0.5.23 honours ``sampling_seed`` only with ``--enable-deterministic-inference``
(srt/sampling/sampling_batch_info.py builds the seed tensor only then), and reports the flag in
``/server_info``. The embedded engine follows it (seeds only with the flag). At connect the
trainer reads the flag from every student worker and refuses (``rollout.require_deterministic``,
default) or warns.
"""

from __future__ import annotations

import glob
import logging
import os
import zipfile

import pytest

from scope_megatron.parallel import free_port
from scope_megatron.rollout.client import BackgroundLoop
from scope_megatron.rollout.embedded_server import start_embedded_server, start_embedded_server_process
from scope_megatron.rollout.protocol import SamplingParams
from scope_megatron.examples.tiny_models import save_tiny_hf_model
from scope_megatron.trainer.controller import RolloutController, ServerSetupError
from tests.loop_utils import asset_overrides, run_train, tail

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_hf_model(tmp_path_factory.mktemp("m"), seed=3)


def controller(url: str, loop: BackgroundLoop, seeded: bool = True) -> RolloutController:
    return RolloutController(student_url=url, teacher_url=url, group_size=2, sampling=SamplingParams(), seed=1,
                             seeded=seeded, tokenizer=None, reward_pool=None, loop=loop)


@pytest.fixture(scope="module")
def sglang_flag() -> str | None:
    """The /server_info key SGLang 0.5.23 reports the flag under, checked in the wheel's source
    (None when the wheel is absent): a flat ServerArgs field, every resolved field is in
    /server_info, and without the flag the sampler gets no seeds."""
    repo_wheels = os.path.join(os.path.dirname(__file__), os.pardir, ".venv", "wheels")
    wheels = sorted(glob.glob(f"{repo_wheels}/sglang-0.5.23-*.whl"))
    if not wheels:
        return None
    with zipfile.ZipFile(wheels[0]) as zf:
        fields = zf.read("sglang/srt/arg_groups/fields/exec_.py").decode()
        common = zf.read("sglang/srt/utils/common.py").decode()
        batch_info = zf.read("sglang/srt/sampling/sampling_batch_info.py").decode()
    assert "    enable_deterministic_inference: A[" in fields
    build = common[common.index("def build_server_info"):][:600]
    assert "server_args.resolved_dict()" in build
    seeds = batch_info[batch_info.index("sampling_seed = ("):][:700]
    assert "if enable_deterministic" in seeds and "else None" in seeds
    return "enable_deterministic_inference"


def test_student_without_deterministic_inference_is_refused_or_warned(model_dir, sglang_flag, caplog):
    import httpx

    loop = BackgroundLoop("test-seeded")
    try:
        with start_embedded_server(model_dir) as plain, \
                start_embedded_server(model_dir, enable_deterministic_inference=True) as seeded:
            if sglang_flag is not None:  # the engines report it where SGLang does
                assert httpx.get(plain.url + "/server_info").json()[sglang_flag] is False
                assert httpx.get(seeded.url + "/server_info").json()[sglang_flag] is True
            with pytest.raises(ServerSetupError) as info:
                controller(plain.url, loop).check_student_servers([seeded.url, plain.url])
            text = str(info.value)
            assert info.value.field == "rollout.seeded"
            assert plain.url in text and seeded.url not in text
            for hint in ("--enable-deterministic-inference", "SEEDED=1", "rollout.seeded=false",
                         "rollout.require_deterministic=false"):
                assert hint in text
            with caplog.at_level(logging.WARNING, logger="scope_megatron.trainer.controller"):
                found = controller(plain.url, loop).check_student_servers([plain.url], require_deterministic=False)
            assert found == {plain.url: False}
            assert any("--enable-deterministic-inference" in r.getMessage() for r in caplog.records)
            assert controller(seeded.url, loop).check_student_servers([seeded.url]) == {seeded.url: True}
            assert controller(plain.url, loop, seeded=False).check_student_servers([plain.url]) == {}
    finally:
        loop.close()


def test_training_against_a_seed_ignoring_student_server_stops_before_any_rollout(tmp_path):
    """As a user runs it: `python -m scope_megatron.train` with rollout.student_urls pointing at a
    server started without the flag exits 2 with the remedy, before the first step."""
    from scope_megatron.examples.tiny import prepare

    assets = prepare(tmp_path / "tiny")
    port = free_port()
    server = start_embedded_server_process(assets["student"], port, log_path=tmp_path / "student.log")
    try:
        run_dir = tmp_path / "run"
        proc = run_train(*asset_overrides(assets, run_dir), f"rollout.student_urls=[{server.url}]", "steps=1",
                         timeout=200)
    finally:
        server.stop()
    assert proc.returncode == 2, tail(proc)
    assert "--enable-deterministic-inference" in proc.stderr and server.url in proc.stderr, tail(proc)
    assert not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text().strip()
