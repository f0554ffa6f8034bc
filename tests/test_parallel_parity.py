"""Megatron logits equal HF transformers' logits at TP in {1,2} x PP in {1,2}, for every family;
checkpoints saved at one layout load at another; export from any layout is bit-identical to HF."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import MODEL_CASES
from tests.dist_utils import run_ranks

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]  # (tp, pp) in a 4-rank world (DP fills the rest)
LENGTHS = [(2, 9), (3, 31)]  # (batch, seq) micro-batches of different shapes
# sequence parallelism (TP2 + SP, with and without PP2): the sequence dimension must divide by TP
SP_LAYOUTS = [(2, 1), (2, 2)]
SP_LENGTHS = [(2, 10), (3, 32)]


def _token_batches(vocab: int, lengths=LENGTHS) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, shape, generator=gen) for shape in lengths]


def _gather_full_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    parts = [torch.empty_like(logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)[..., :vocab].clone()


def _parity_worker(rank: int, world: int, cases: dict, resave_root: str) -> dict:
    from pathlib import Path

    from safetensors.torch import load_file

    from scope_megatron.batch import MicroBatch
    from scope_megatron.megatron_step import run_forward
    from scope_megatron.model import checkpoint
    from scope_megatron.model.builder import build_gpt_model
    from scope_megatron.model.hf_io import export_hf_tensors
    from scope_megatron.parallel import init_parallel

    results: dict = {"logits": {}, "export_max_diff": {}, "reshard_max_diff": {}, "sp_logits": {}}
    for name, (hf_dir, ckpt) in cases.items():
        hf_weights = load_file(str(Path(hf_dir) / "model.safetensors"))
        for tp, pp in LAYOUTS:
            layout = init_parallel(tp, pp)
            arch, _ = checkpoint.read_meta(ckpt)
            model = build_gpt_model(arch, perform_initialization=False)
            checkpoint.load_model(model, ckpt)  # saved at TP1 PP1 by the conversion tool
            model.eval()
            batches = [MicroBatch(t) for t in _token_batches(arch.vocab_size)]
            out = run_forward(model, batches, output_fn=lambda lg, mb: _gather_full_vocab(lg, arch.vocab_size))
            if layout.is_last_stage and layout.tp_rank == 0 and layout.dp_rank == 0:
                results["logits"][(name, tp, pp)] = out
            # export from this layout: bit-identical to the HF weights
            diff = 0.0
            for hf_name, tensor in export_hf_tensors(model, arch):
                diff = max(diff, (tensor - hf_weights[hf_name]).abs().max().item())
            results["export_max_diff"][(name, tp, pp)] = diff
            if (tp, pp) == (2, 2):
                # save at TP2 x PP2, load back at TP1 x PP1 (DP4) below
                resaved = Path(resave_root) / name
                with checkpoint.atomic_output_dir(resaved) as tmp:
                    checkpoint.save_model(model, tmp)
                    checkpoint.write_meta(tmp, arch, hf_dir, torch.float32)
        results["sp_logits"].update(_sequence_parallel_logits(name, ckpt))
        init_parallel(1, 1)
        model = build_gpt_model(arch, perform_initialization=False)
        checkpoint.load_model(model, Path(resave_root) / name)
        diff = 0.0
        for hf_name, tensor in export_hf_tensors(model, arch):
            diff = max(diff, (tensor - hf_weights[hf_name]).abs().max().item())
        results["reshard_max_diff"][name] = diff
    return results


def _sequence_parallel_logits(name: str, ckpt: str) -> dict:
    """Full-vocabulary logits of the SP_LENGTHS batches at each of SP_LAYOUTS with sequence parallelism."""
    from scope_megatron.batch import MicroBatch
    from scope_megatron.megatron_step import run_forward
    from scope_megatron.model import checkpoint
    from scope_megatron.model.builder import ModelOptions, build_gpt_model
    from scope_megatron.parallel import init_parallel

    out = {}
    for tp, pp in SP_LAYOUTS:
        layout = init_parallel(tp, pp)
        arch, _ = checkpoint.read_meta(ckpt)
        model = build_gpt_model(arch, perform_initialization=False, options=ModelOptions(sequence_parallel=True))
        assert model.config.sequence_parallel
        checkpoint.load_model(model, ckpt)
        model.eval()
        batches = [MicroBatch(t) for t in _token_batches(arch.vocab_size, SP_LENGTHS)]
        logits = run_forward(model, batches, output_fn=lambda lg, mb: _gather_full_vocab(lg, arch.vocab_size))
        if layout.is_last_stage and layout.tp_rank == 0 and layout.dp_rank == 0:
            out[(name, tp, pp)] = logits
    return out


@pytest.fixture(scope="module")
def parity_results(converted_models, tmp_path_factory):
    cases = {name: (str(h), str(c)) for name, (h, c) in converted_models.items()}
    resave_root = tmp_path_factory.mktemp("resaved")
    per_rank = run_ranks(_parity_worker, world_size=4, args=(cases, str(resave_root)), timeout=600)
    merged = {"logits": {}, "export_max_diff": {}, "reshard_max_diff": {}, "sp_logits": {}}
    for res in per_rank:
        for key in merged:
            for k, v in res[key].items():
                merged[key][k] = max(merged[key].get(k, 0.0), v) if key not in ("logits", "sp_logits") else v
    return merged


def _hf_logits(hf_dir, lengths=LENGTHS) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(t).logits for t in _token_batches(model.config.vocab_size, lengths)]


@pytest.mark.parametrize("case", [c[0] for c in MODEL_CASES])
def test_megatron_logits_equal_hf_at_every_layout(case, converted_models, parity_results):
    reference = _hf_logits(converted_models[case][0])
    for tp, pp in LAYOUTS:
        ours = parity_results["logits"][(case, tp, pp)]
        assert len(ours) == len(reference)
        for mine, ref in zip(ours, reference):
            assert mine.shape == ref.shape  # padded vocab columns stripped
            diff = (mine - ref).abs().max().item()
            assert diff < 1e-5, f"{case} TP{tp} PP{pp}: max |logit diff| {diff}"


def test_export_from_every_layout_is_bit_identical(parity_results):
    assert len(parity_results["export_max_diff"]) == len(MODEL_CASES) * len(LAYOUTS)
    assert all(v == 0.0 for v in parity_results["export_max_diff"].values()), parity_results["export_max_diff"]


def test_checkpoint_saved_at_tp2pp2_loads_at_tp1(parity_results):
    assert set(parity_results["reshard_max_diff"]) == {c[0] for c in MODEL_CASES}
    assert all(v == 0.0 for v in parity_results["reshard_max_diff"].values()), parity_results["reshard_max_diff"]


@pytest.mark.parametrize("case", [c[0] for c in MODEL_CASES])
def test_sequence_parallel_logits_equal_hf(case, converted_models, parity_results):
    reference = _hf_logits(converted_models[case][0], SP_LENGTHS)
    for tp, pp in SP_LAYOUTS:
        ours = parity_results["sp_logits"][(case, tp, pp)]
        assert len(ours) == len(reference)
        for mine, ref in zip(ours, reference):
            assert mine.shape == ref.shape  # the whole sequence comes back, not this rank's SP slice
            diff = (mine - ref).abs().max().item()
            assert diff < 1e-5, f"{case} TP{tp} PP{pp} + SP: max |logit diff| {diff}"
