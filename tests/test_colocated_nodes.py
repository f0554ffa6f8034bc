"""``placement: colocated`` on two nodes, each with its own student server on its training devices.

Two "nodes" on this machine: ``launch/train_multinode.sh`` run twice (NNODES=2, one rank each,
static rendezvous), and one student server per node started with the memory saver, as
``launch/slurm/scope.sbatch`` with COLOCATE=1 does. Each node's engine gets its weights in
memory from the model replica on its own node (rank 1 feeds the second engine); rollouts are
spread over both engines by prompt group (no router). Against a separate-layout run of the same
two engines (weights over the gloo broadcast group):

- the same losses and gradient norms, step for step;
- after every sync the probe check passes on both engines, and each node handed its engine the
  whole model;
- a config that cannot feed every node (an embedded student, a server count that is not the
  node count) is refused at startup, naming the field.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from scope_megatron.config import load_config
from scope_megatron.parallel import free_port
from scope_megatron.rollout.embedded_server import start_embedded_server_process
from tests.loop_utils import REPO, TINY_CONFIG, asset_overrides, loop_env, read_metrics, train_cmd

pytestmark = pytest.mark.timeout(600)
STEPS = 2
MULTINODE_SH = REPO / "launch" / "train_multinode.sh"
SAME = ("loss/total", "loss/mle", "loss/kl", "train/grad_norm", "reward/accuracy", "kl/sampled_k1",
        "objective/ppl/student_mean", "train/loss_tokens")


@pytest.fixture(scope="module")
def engines(assets, tmp_path_factory):
    """Two student servers (memory saver, deterministic sampling, one request at a time) and a teacher."""
    logs = tmp_path_factory.mktemp("engine-logs")
    seed = str(load_config(TINY_CONFIG).seed)
    common = ["--dtype", "float32", "--max-batch-size", "1", "--random-seed", seed, "--log-level", "warning"]
    student = [*common, "--enable-memory-saver", "--enable-deterministic-inference", "--weight-version", "0"]
    handles = []
    try:
        for name, model, args in (("student-0", assets["student"], student), ("student-1", assets["student"], student),
                                  ("teacher", assets["teacher"], common)):
            handles.append(start_embedded_server_process(model, extra_args=args, log_path=logs / f"{name}.log",
                                                         ready_timeout=180))
        yield {"students": [h.url for h in handles[:2]], "teacher": handles[2].url}
    finally:
        for h in handles:
            h.stop()


def _overrides(assets, run_dir, engines) -> list[str]:
    return [*asset_overrides(assets, run_dir), f"steps={STEPS}", "checkpoint.every=0", "checkpoint.save_at_end=false",
            f"rollout.student_urls=[{','.join(engines['students'])}]", f"teacher.urls=[{engines['teacher']}]"]


@pytest.fixture(scope="module")
def runs(assets, engines, tmp_path_factory):
    root = tmp_path_factory.mktemp("nodes")
    port = str(free_port())
    env = {**loop_env(), "PYTHON": sys.executable, "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
           "NPROC": "1"}
    cmd = ["bash", str(MULTINODE_SH), str(TINY_CONFIG), *_overrides(assets, root / "colocated", engines),
           "placement=colocated"]
    nodes = [subprocess.Popen(cmd, cwd=REPO, env={**env, "NODE_RANK": str(k)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    logs = {}
    for k, p in enumerate(nodes):
        _, logs[f"node{k}"] = p.communicate(timeout=480)
        assert p.returncode == 0, f"node {k}: rc={p.returncode}\n{logs[f'node{k}'][-4000:]}"
    separate = subprocess.run(train_cmd(*_overrides(assets, root / "separate", engines), nproc=2), cwd=REPO,
                              env=loop_env(), capture_output=True, text=True, timeout=480)
    assert separate.returncode == 0, separate.stderr[-4000:]
    return {"colocated": root / "colocated", "separate": root / "separate", "log": logs["node0"]}


def test_two_nodes_each_feed_their_engine_and_train_as_the_separate_layout(runs, engines):
    colocated, separate = read_metrics(runs["colocated"]), read_metrics(runs["separate"])
    assert sorted(colocated) == sorted(separate) == list(range(1, STEPS + 1))
    for step in colocated:
        for key in SAME:
            assert colocated[step][key] == pytest.approx(separate[step][key], rel=1e-6, abs=1e-7), (step, key)
        assert "memory/engines_released_gib" in colocated[step] and "memory/trainer_loaded_gib" not in separate[step]
    # every sync (at start and after each step): both nodes handed their engine the whole model
    lines = [line for line in runs["log"].splitlines() if "in memory on 2 nodes" in line]
    assert len(lines) == STEPS + 1, runs["log"][-3000:]
    for line in lines:
        node0, node1 = line.split("own replica: ")[1].split(", ")
        assert node0.split(" MiB")[0].split()[-1] == node1.split(" MiB")[0].split()[-1] != "0.0", line
        assert node0.startswith("node 0 ") and node1.startswith("node 1 "), line
    assert "(tensor)" not in runs["log"]  # rank 0 does not push the other node's engine itself
    probes = [json.loads(line) for line in (runs["colocated"] / "sync_probe.jsonl").read_text().splitlines()]
    assert sorted({p["engine"] for p in probes}) == sorted(engines["students"])
    assert len(probes) == 2 * (STEPS + 1)
    assert all(p["mean_abs_diff"] <= p["tolerance"] for p in probes), probes


@pytest.mark.parametrize("extra, field", [
    (["rollout.student_urls=[]"], "rollout.student_urls"),  # the embedded engine runs on one node only
    (["rollout.student_urls=[http://127.0.0.1:1]"], "rollout.student_urls"),  # one server for two nodes
])
def test_configs_that_cannot_feed_every_node_are_refused_naming_the_field(assets, tmp_path, extra, field):
    port = str(free_port())
    env = {**loop_env(), "PYTHON": sys.executable, "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
           "NPROC": "1"}
    cmd = ["bash", str(MULTINODE_SH), str(TINY_CONFIG), *asset_overrides(assets, tmp_path / "run"),
           "placement=colocated", *extra]
    nodes = [subprocess.Popen(cmd, cwd=REPO, env={**env, "NODE_RANK": str(k)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    errs = [p.communicate(timeout=240)[1] for p in nodes]
    assert [p.returncode for p in nodes] != [0, 0], errs[0][-3000:]
    assert field in errs[0] and "placement=colocated on 2 nodes" in errs[0], errs[0][-3000:]


@pytest.mark.parametrize("overrides, world, per_node, field", [
    (["parallel.pp=2"], 4, 2, "parallel.pp"),            # stage 1 of each replica sits on the other node
    (["parallel.tp=4"], 8, 2, "parallel.tp"),            # a TP group wider than a node
    (["parallel.tp=2", "parallel.cp=2", "parallel.max_tokens_per_microbatch=64"], 8, 2, "parallel.tp"),
    ([], 3, 2, "placement"),                             # 3 ranks are no whole nodes of 2
])
def test_layouts_without_a_whole_replica_per_node_are_refused(overrides, world, per_node, field):
    from scope_megatron.config import ConfigError, check_colocated_nodes

    urls = ",".join(f"http://node{k}:30000" for k in range(max(world // per_node, 1)))
    cfg = load_config(TINY_CONFIG, ["placement=colocated", f"rollout.student_urls=[{urls}]", *overrides])
    with pytest.raises(ConfigError) as info:
        check_colocated_nodes(cfg, world, per_node)
    assert info.value.field == field, str(info.value)
    # the same layout on one node, or with whole replicas per node, passes
    check_colocated_nodes(cfg, per_node, per_node)
    good = load_config(TINY_CONFIG, ["placement=colocated", "rollout.student_urls=[http://a:1,http://b:1]",
                                     "parallel.tp=2"])
    check_colocated_nodes(good, 4, 2)
