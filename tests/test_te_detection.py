"""Transformer Engine detection cannot crash the build, and the final norm is the RMSNorm the model needs.

Simulated environments, each in a fresh Python process (megatron reads them at import time):

- a ``transformer_engine`` package that fails to import the way a wheel built for another torch /
  CUDA does (an ``ImportError`` from its library). megatron-core then sets ``HAVE_TE = False``
  (``extensions/transformer_engine.py:69-85``) while the package is still found on ``sys.path``;
- one whose import raises something else (OSError), which megatron does not catch at all.
  megatron-core 0.19 even crashes on the ImportError: ``tensor_parallel/random.py:84-91`` only
  catches ``ModuleNotFoundError``, so ``import megatron.core`` fails; the probe hides such a TE;
- a machine with apex but no TE: megatron's default final norm is then apex's ``FusedLayerNorm``,
  which refuses RMSNorm (``transformer/transformer_block.py:58-59``, ``fusions/fused_layer_norm.py:66-68``).

CUDA is reported present inside the probe (``torch.cuda.is_available`` patched after the imports)
so that ``auto`` would pick TE if detection believed in it; nothing touches a device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TE_ERROR = ("/usr/lib/python3/site-packages/transformer_engine/libtransformer_engine.so: "
            "undefined symbol: _ZN3c104cuda9SetDeviceEab")

RESOLVE = r"""
import json, logging, torch
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append((record.levelname, record.getMessage()))
logging.getLogger("scope_megatron").addHandler(Keep())
logging.getLogger("scope_megatron").setLevel(logging.INFO)
from scope_megatron.model import builder
torch.cuda.is_available = lambda: True
out = {}
status = builder.transformer_engine_status()
out["status"] = {"usable": status.usable, "installed": status.installed, "error": status.error}
for impl in ("auto", "te"):
    try:
        out[impl] = builder.resolve_layer_impl(impl)
    except Exception as err:
        out[impl] = f"{type(err).__name__}: {err}"
out["records"] = records
print(json.dumps(out))
"""


def _fake_package(root: Path, name: str, init: str) -> Path:
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(init)
    return root


def _run(code: str, pythonpath: Path | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in (str(pythonpath or ""), str(REPO)) if p))
    return subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=240)


def _json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_te_that_fails_to_import_is_reported_auto_falls_back_te_refuses(tmp_path):
    root = _fake_package(tmp_path / "site", "transformer_engine", f"raise ImportError({TE_ERROR!r})\n")
    out = _json(_run(RESOLVE, root))
    assert out["status"] == {"usable": False, "installed": True, "error": f"ImportError: {TE_ERROR}"}
    assert out["auto"] == "local_sdpa"
    warnings = [msg for level, msg in out["records"] if level == "WARNING"]
    assert any(TE_ERROR in msg and "falls back" in msg for msg in warnings), out["records"]
    assert out["te"].startswith("ValueError: layer_impl='te' needs Transformer Engine") and TE_ERROR in out["te"]


def test_te_whose_import_raises_oserror_is_hidden_and_auto_falls_back(tmp_path):
    """Not an ImportError (a missing cuDNN library): megatron would not catch it at all."""
    root = _fake_package(tmp_path / "site", "transformer_engine", "raise OSError('libcudnn.so.9: cannot open')\n")
    out = _json(_run(RESOLVE, root))
    assert out["status"]["error"] == "OSError: libcudnn.so.9: cannot open" and out["auto"] == "local_sdpa"
    assert "libcudnn.so.9" in out["te"] and out["te"].startswith("ValueError")


def test_no_te_installed_picks_local_sdpa_quietly():
    out = _json(_run(RESOLVE, None))
    assert out["status"] == {"usable": False, "installed": False, "error": None}
    assert out["auto"] == "local_sdpa" and not [r for r in out["records"] if r[0] == "WARNING"]
    assert out["te"] == "ValueError: layer_impl='te' needs Transformer Engine: Transformer Engine is not installed"


# the order of the trainer's set-up: parallel state first (scope_megatron/trainer/loop.py setup), then the model
BUILD_AS_THE_TRAINER = r"""
import json, torch
from scope_megatron.parallel import init_parallel
init_parallel(1, 1)
from scope_megatron.model.arch import arch_from_hf_config
from scope_megatron.model.builder import build_gpt_model
from scope_megatron.examples.tiny_models import tiny_hf_config
arch = arch_from_hf_config(tiny_hf_config("qwen3").to_dict())
out = {}
for impl in IMPLS:
    model = build_gpt_model(arch, impl=impl)
    norm = model.decoder.final_layernorm
    out[impl] = [type(norm).__name__, norm.eps]
    out["layers"] = type(model.decoder.layers[0].self_attention.core_attention).__name__
print(json.dumps(out))
"""

BUILD = r"""
import json, torch
from megatron.core.transformer import transformer_block
from scope_megatron.parallel import init_parallel
from scope_megatron.model.arch import arch_from_hf_config
from scope_megatron.model.builder import build_gpt_model
from scope_megatron.examples.tiny_models import tiny_hf_config
init_parallel(1, 1)
arch = arch_from_hf_config(tiny_hf_config("qwen3").to_dict())
out = {"megatron_default_final_norm": transformer_block.LayerNormImpl.__name__}
for impl in ("local_sdpa", "local"):
    model = build_gpt_model(arch, impl=impl)
    norm = model.decoder.final_layernorm
    out[impl] = [type(norm).__name__, norm.eps]
print(json.dumps(out))
"""


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the probe builds on CPU")
def test_model_builds_with_a_broken_te_installed(tmp_path):
    """The process a user runs (parallel set-up, then the model) survives a TE that does not import."""
    root = _fake_package(tmp_path / "site", "transformer_engine", f"raise ImportError({TE_ERROR!r})\n")
    code = BUILD_AS_THE_TRAINER.replace("IMPLS", '("auto",)')
    out = _json(_run(code, root))
    assert out["auto"][0] == "RMSNorm" and out["layers"] == "SDPAttention"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the probe builds on CPU")
def test_final_norm_is_rmsnorm_with_apex_but_no_te(tmp_path):
    root = _fake_package(tmp_path / "site", "apex", "")  # `import apex` succeeds; nothing else in it
    out = _json(_run(BUILD, root))
    assert out["megatron_default_final_norm"] == "FusedLayerNorm"  # what megatron would have built
    from scope_megatron.model.arch import arch_from_hf_config
    from scope_megatron.examples.tiny_models import tiny_hf_config

    eps = arch_from_hf_config(tiny_hf_config("qwen3").to_dict()).rms_norm_eps
    assert out["local_sdpa"] == ["RMSNorm", eps] and out["local"] == ["RMSNorm", eps]
