"""A checkpoint written without Transformer Engine loads into a model whose norms carry TE's ``_extra_state``
(and the reverse), while a genuinely missing weight still fails with a clear error.

With TE importable megatron builds the final norm (any spec) and the q/k norms as ``TENorm``, a
``te.pytorch.RMSNorm`` with ``get_extra_state`` (megatron-core 0.19
``transformer/transformer_block.py:53-56, 250-254``, ``extensions/transformer_engine.py:796-852``);
megatron then requests a ``ShardedObject`` ``*._extra_state`` for it (``transformer/utils.py:162-166``).
There is no TE here, so exactly those modules get a TE-like extra state: their class is swapped for
an ``RMSNorm`` subclass with ``get_extra_state``/``set_extra_state``, as TE's ops-based modules have.
Reference: the logits of the model that wrote the checkpoint.
"""

from __future__ import annotations

import io

import pytest
import torch

from tests.dist_utils import run_ranks


class TELikeRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm plus an extra state serialised as bytes in a tensor, the way TE modules save theirs."""

    def get_extra_state(self) -> torch.Tensor:
        buf = io.BytesIO()
        torch.save({"recipe": None, "fp8_meta": {}}, buf)
        return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        self.loaded_extra_state = state


def _te_like_norms(model: torch.nn.Module) -> list[str]:
    """Give the modules TE would build as TENorm (final norm, q/k norms) a TE-like extra state."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.RMSNorm) and name.rsplit(".", 1)[-1] in (
                "final_layernorm", "q_layernorm", "k_layernorm"):
            module.__class__ = TELikeRMSNorm
            names.append(name)
    return names


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).unsqueeze(0), None).detach().clone()


def _worker(rank: int, world: int, root: str) -> dict:
    from pathlib import Path

    from megatron.core import dist_checkpointing

    from scope_megatron.model import checkpoint
    from scope_megatron.model.builder import build_gpt_model
    from scope_megatron.parallel import init_parallel
    from scope_megatron.examples.tiny_models import tiny_hf_config
    from scope_megatron.model.arch import arch_from_hf_config

    init_parallel(1, 1)
    arch = arch_from_hf_config(tiny_hf_config("qwen3").to_dict())
    assert arch.qk_layernorm
    tokens = torch.randint(0, arch.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    out: dict = {}

    # 1. saved without extra state (as on CPU), loaded into the TE-like model
    torch.manual_seed(1)
    plain = build_gpt_model(arch)
    plain_dir = Path(root) / "plain"
    checkpoint.save_model(plain, plain_dir)
    torch.manual_seed(2)
    te_like = build_gpt_model(arch)
    out["te_like_modules"] = _te_like_norms(te_like)
    requested = [k for k in te_like.sharded_state_dict() if k.endswith("_extra_state")]
    out["requested_norm_extra_state"] = [k for k in requested if "layernorm" in k]
    checkpoint.load_model(te_like, plain_dir)
    out["te_like_equal"] = torch.equal(_logits(te_like, tokens), _logits(plain, tokens))

    # 2. the reverse: saved with extra state, loaded into a model without
    torch.manual_seed(3)
    te_writer = build_gpt_model(arch)
    _te_like_norms(te_writer)
    te_dir = Path(root) / "te"
    checkpoint.save_model(te_writer, te_dir)
    torch.manual_seed(4)
    plain_reader = build_gpt_model(arch)
    checkpoint.load_model(plain_reader, te_dir)
    out["reverse_equal"] = torch.equal(_logits(plain_reader, tokens), _logits(te_writer, tokens))

    # 3. a checkpoint that lacks one real weight still fails, naming it
    torch.manual_seed(5)
    victim = "decoder.layers.self_attention.linear_proj.weight"
    sharded = {k: v for k, v in plain.sharded_state_dict().items() if v.key != victim}
    assert len(sharded) == len(plain.sharded_state_dict()) - arch.num_layers  # one slice per layer
    broken_dir = Path(root) / "broken"
    broken_dir.mkdir()
    (broken_dir / "model").mkdir()
    dist_checkpointing.save(sharded, str(broken_dir / "model"))
    try:
        checkpoint.load_model(build_gpt_model(arch), broken_dir)
        out["broken"] = None
    except checkpoint.CheckpointMismatchError as err:
        out["broken"] = str(err)

    # 4. a checkpoint holding a weight the model does not have also fails
    extra = plain.sharded_state_dict()
    src = extra["decoder.final_layernorm.weight"]
    from dataclasses import replace

    extra["stray"] = replace(src, key="decoder.stray.weight")
    stray_dir = Path(root) / "stray"
    (stray_dir / "model").mkdir(parents=True)
    dist_checkpointing.save(extra, str(stray_dir / "model"))
    try:
        checkpoint.load_model(build_gpt_model(arch), stray_dir)
        out["stray"] = None
    except checkpoint.CheckpointMismatchError as err:
        out["stray"] = str(err)

    # 5. a damaged data file: torch DCP's failure (a BaseException) comes back as one clear error
    import shutil

    damaged_dir = Path(root) / "damaged"
    shutil.copytree(plain_dir, damaged_dir)
    data_files = sorted((damaged_dir / "model").glob("*.distcp"))
    for f in data_files:
        f.write_bytes(f.read_bytes()[:100])
    try:
        checkpoint.load_model(build_gpt_model(arch), damaged_dir)
        out["damaged"] = None
    except checkpoint.CheckpointReadError as err:
        out["damaged"] = str(err)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("extra_state")
    return run_ranks(_worker, world_size=1, args=(str(root),), timeout=240)[0]


def test_cpu_checkpoint_loads_into_te_like_norms(results):
    assert sorted(results["te_like_modules"]) == sorted(
        [f"decoder.layers.{i}.self_attention.{n}" for i in (0, 1) for n in ("q_layernorm", "k_layernorm")]
        + ["decoder.final_layernorm"])
    assert "decoder.final_layernorm._extra_state" in results["requested_norm_extra_state"]
    assert results["te_like_equal"]


def test_te_like_checkpoint_loads_into_plain_model(results):
    assert results["reverse_equal"]


def test_missing_weight_still_fails_clearly(results):
    assert results["broken"] is not None
    assert "not in the checkpoint: decoder.layers.self_attention.linear_proj.weight" in results["broken"]
    assert "_extra_state" not in results["broken"]


def test_weight_only_in_checkpoint_fails(results):
    assert results["stray"] is not None
    assert "in the checkpoint but not in the model: decoder.stray.weight" in results["stray"]


def test_damaged_checkpoint_is_a_clear_error(results):
    assert results["damaged"] is not None and results["damaged"].startswith("checkpoint ")
    assert "could not be read: rank 0: " in results["damaged"] and "Traceback" not in results["damaged"]


def _write_checkpoints(rank: int, world: int, hf_dir: str, root: str) -> None:
    """From an HF model: a checkpoint whose norms saved TE-like _extra_state, and a damaged plain one."""
    from pathlib import Path

    from scope_megatron.model import checkpoint
    from scope_megatron.model.arch import arch_from_hf_config, load_hf_config
    from scope_megatron.model.builder import build_gpt_model
    from scope_megatron.model.hf_io import HFWeightReader, load_hf_into_model
    from scope_megatron.parallel import init_parallel

    init_parallel(1, 1)
    arch = arch_from_hf_config(load_hf_config(hf_dir))
    for name, te_like in (("te_ckpt", True), ("damaged", False)):
        model = build_gpt_model(arch, perform_initialization=False)
        load_hf_into_model(model, arch, HFWeightReader(hf_dir, arch))
        if te_like:
            assert _te_like_norms(model)
        out = Path(root) / name
        out.mkdir()
        checkpoint.save_model(model, out)
        checkpoint.write_meta(out, arch, hf_dir, torch.float32)
    for f in (Path(root) / "damaged" / "model").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])


def test_conversion_tools_read_te_made_checkpoints_and_report_damage(tmp_path):
    """megatron_to_hf, run as a user runs it, exports a checkpoint whose norms saved _extra_state bit for
    bit, and a damaged checkpoint is one clear line with exit code 2 (not a BaseException traceback)."""
    from safetensors.torch import load_file

    from scope_megatron.examples.tiny_models import save_tiny_hf_model
    from tests.conftest import run_module

    hf_dir = save_tiny_hf_model(tmp_path / "hf", "qwen3", seed=7)
    run_ranks(_write_checkpoints, world_size=1, args=(str(hf_dir), str(tmp_path)), timeout=240)
    out = tmp_path / "exported"
    proc = run_module("checkpoints_tools.megatron_to_hf", "--ckpt", str(tmp_path / "te_ckpt"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    original, exported = load_file(str(hf_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(original) == sorted(exported) and all(torch.equal(exported[n], t) for n, t in original.items())

    proc = run_module("checkpoints_tools.megatron_to_hf", "--ckpt", str(tmp_path / "damaged"), "--out",
                      str(tmp_path / "x"))
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "megatron_to_hf: error: checkpoint " in proc.stderr and "could not be read: rank 0: " in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()
