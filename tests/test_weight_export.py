"""Weight export to global rank 0 (hf_io.export_hf_tensors_to_rank0): rank 0's stream is
bit-identical to the HF weights the model was loaded from, in HF order, at TP x PP x DP layouts;
only the first data-parallel replica communicates, and only rank 0 receives. Every replica
exporting to its own root at once (hf_io.export_hf_tensors_to_replica_root) gives each root the
same stream."""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_ranks

pytestmark = pytest.mark.timeout(300)
LAYOUTS = [(2, 2), (1, 2), (2, 1)]  # (tp, pp) in a 4-rank world: DP 1, 2, 2
RECEIVING = ("recv", "irecv", "broadcast", "all_gather", "gather", "all_reduce", "reduce_scatter",
             "all_gather_into_tensor", "scatter")
SENDING = ("send", "isend")


def _worker(rank: int, world: int, cases: dict) -> dict:
    from pathlib import Path

    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from safetensors.torch import load_file

    from scope_megatron.model import hf_io
    from scope_megatron.model.arch import arch_from_hf_config, load_hf_config
    from scope_megatron.model.builder import build_gpt_model
    from scope_megatron.parallel import init_parallel

    calls: list[str] = []
    real = {name: getattr(dist, name) for name in RECEIVING + SENDING}

    def counting(name):
        def call(*args, **kwargs):
            calls.append(name)
            return real[name](*args, **kwargs)
        return call

    out: dict = {}
    for case, hf_dir in cases.items():
        arch = arch_from_hf_config(load_hf_config(hf_dir))
        hf_names = list(load_file(str(Path(hf_dir) / "model.safetensors")))
        for tp, pp in LAYOUTS:
            init_parallel(tp, pp)
            model = build_gpt_model(arch, params_dtype=torch.float32, perform_initialization=False)
            hf_io.load_hf_into_model(model, arch, hf_io.HFWeightReader(hf_dir, arch))
            reference = [name for name, _ in hf_io.export_hf_tensors(model, arch)]  # HF order, every rank
            calls.clear()
            for name in RECEIVING + SENDING:
                setattr(dist, name, counting(name))
            try:
                streamed = [(name, tensor.clone()) for name, tensor in hf_io.export_hf_tensors_to_rank0(model, arch)]
            finally:
                for name, fn in real.items():
                    setattr(dist, name, fn)
            key = (case, tp, pp)
            if rank == 0:
                weights = load_file(str(Path(hf_dir) / "model.safetensors"))
                out[key] = {"names": [n for n, _ in streamed], "reference_order": reference,
                            "hf_names": sorted(hf_names),
                            "mismatch": [n for n, t in streamed
                                         if t.dtype != weights[n].dtype or not torch.equal(t, weights[n])]}
            else:
                out[key] = {"streamed": len(streamed), "dp_rank": ps.get_data_parallel_rank(),
                            "received": [c for c in calls if c in RECEIVING and c != "all_gather"],
                            "all_gathers": calls.count("all_gather"), "calls": len(calls)}
            if ps.get_data_parallel_world_size() > 1:  # every replica exports to its own root at once
                mine = ps.get_data_parallel_rank(with_context_parallel=True)
                own = [(n, t.clone()) for n, t in hf_io.export_hf_tensors_to_replica_root(model, arch, replica=mine)]
                weights = load_file(str(Path(hf_dir) / "model.safetensors"))
                out[key]["own_replica"] = {
                    "replica": mine, "root": ps.get_tensor_model_parallel_rank() == 0
                    and ps.get_pipeline_model_parallel_rank() == 0, "names": [n for n, _ in own],
                    "mismatch": [n for n, t in own if t.dtype != weights[n].dtype or not torch.equal(t, weights[n])]}
    return out


@pytest.fixture(scope="module")
def export_results(tmp_path_factory):
    from scope_megatron.examples.tiny_models import save_tiny_hf_model

    cases = {name: str(save_tiny_hf_model(tmp_path_factory.mktemp(name), family="qwen3", seed=3,
                                          with_tokenizer=False, tie_word_embeddings=tied))
             for name, tied in (("untied", False), ("tied", True))}
    return run_ranks(_worker, world_size=4, args=(cases,), timeout=280)


def test_rank0_stream_is_the_hf_weights_in_hf_order(export_results):
    for key, got in export_results[0].items():
        assert got["names"] == got["reference_order"], key
        assert sorted(got["names"]) == got["hf_names"], key
        assert got["mismatch"] == [], key


def test_only_the_first_replica_communicates_and_only_rank0_receives(export_results):
    for rank, results in enumerate(export_results[1:], start=1):
        for key, got in results.items():
            assert got["streamed"] == 0, (rank, key)
            assert got["received"] == [], (rank, key)
            if got["dp_rank"] != 0:
                assert got["calls"] == 0, (rank, key)
            else:  # the one small coordinate exchange of the replica, then sends only
                assert got["all_gathers"] == 1, (rank, key)


def test_every_replica_exports_to_its_own_root_at_once(export_results):
    """Colocated engines on several nodes: each node's replica feeds its own engine."""
    for key in export_results[0]:
        if "own_replica" not in export_results[0][key]:
            continue  # DP 1
        reference = export_results[0][key]["reference_order"]
        roots = {}
        for rank, results in enumerate(export_results):
            got = results[key]["own_replica"]
            if got["root"]:
                roots[got["replica"]] = rank
                assert got["names"] == reference and got["mismatch"] == [], (rank, key)
            else:
                assert got["names"] == [], (rank, key)
        assert sorted(roots) == [0, 1] and roots[0] == 0 and roots[1] != 0, (key, roots)


def _overlap_worker(rank: int, world: int, hf_dir: str) -> dict:
    """One optimizer step (the same gradients on both DP ranks) with the distributed optimizer,
    with and without megatron's overlapped parameter all-gather."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from scope_megatron.model import hf_io
    from scope_megatron.model.arch import arch_from_hf_config, load_hf_config
    from scope_megatron.model.builder import build_gpt_model
    from scope_megatron.parallel import init_parallel
    from scope_megatron.trainer.weight_sync import finish_param_sync

    init_parallel(1, 1)  # DP 2
    arch = arch_from_hf_config(load_hf_config(hf_dir))
    out = {}
    for overlap in (False, True):
        model = build_gpt_model(arch, params_dtype=torch.float32, perform_initialization=False)
        hf_io.load_hf_into_model(model, arch, hf_io.HFWeightReader(hf_dir, arch))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True,
                                                   overlap_param_gather=overlap)
        ddp_model = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
        optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True,
                                                           params_dtype=torch.float32), [ddp_model])
        gen = torch.Generator().manual_seed(5)
        for _, p in sorted(model.named_parameters()):  # already reduced: the same on every DP rank
            p.main_grad.copy_(torch.randn(p.shape, generator=gen))
        optimizer.step()
        stale = sum(int(torch.equal(p, before[n])) for n, p in model.named_parameters())
        out[overlap] = {"unchanged_before_finish": stale, "finished": finish_param_sync(ddp_model),
                        "weights": {n: t.clone() for n, t in hf_io.export_hf_tensors_to_rank0(model, arch)},
                        "num_params": len(before)}
    return out


def test_finish_param_sync_completes_the_overlapped_gather(tmp_path):
    from scope_megatron.examples.tiny_models import save_tiny_hf_model

    hf_dir = str(save_tiny_hf_model(tmp_path / "hf", family="qwen3", seed=4, with_tokenizer=False))
    plain, overlapped = run_ranks(_overlap_worker, world_size=2, args=(hf_dir,), timeout=200)[0].values()
    assert not plain["finished"] and plain["unchanged_before_finish"] == 0
    assert overlapped["finished"]
    # before finishing, the parameters whose shard the other DP rank updated are still the old ones
    assert 0 < overlapped["unchanged_before_finish"] < overlapped["num_params"]
    assert plain["weights"].keys() == overlapped["weights"].keys()
    for name, tensor in plain["weights"].items():
        assert torch.equal(overlapped["weights"][name], tensor), name
