"""Where the trainer runs: its process environment, rank 0's weight-group address, the collective
timeout, and which devices embedded engines may use."""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys

import pytest

from scope_megatron.config import ConfigError, check_embedded_devices, load_config
from scope_megatron.parallel import free_port, resolve_master_address
from tests.loop_utils import REPO, TINY_CONFIG, loop_env

KNOBS = ("NCCL_CUMEM_ENABLE", "NCCL_NVLS_ENABLE", "CUDA_DEVICE_MAX_CONNECTIONS", "PYTORCH_CUDA_ALLOC_CONF",
         "PYTORCH_ALLOC_CONF")

# runs the real entry point, then reports the environment the process ended up with and
# whether torch (hence CUDA / NCCL) was imported before main() ran
_ENTRY = """
import json, os, sys
import scope_megatron.train as train
torch_before_main = "torch" in sys.modules
rc = train.main(["--config", sys.argv[1], "--print-config"])
print(json.dumps({"rc": rc, "torch_before_main": torch_before_main,
                  "env": {k: os.environ.get(k) for k in sys.argv[2:]}}))
"""


def _entry(extra_env: dict[str, str]) -> tuple[dict, str]:
    env = {k: v for k, v in loop_env().items() if k not in KNOBS}
    env.update(extra_env)
    proc = subprocess.run([sys.executable, "-c", _ENTRY, str(TINY_CONFIG), *KNOBS], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_train_entry_sets_the_runtime_environment_before_torch():
    out, err = _entry({})
    assert out["rc"] == 0
    assert not out["torch_before_main"]  # so the values are in place before CUDA / NCCL initialise
    assert out["env"] == {"NCCL_CUMEM_ENABLE": "0", "NCCL_NVLS_ENABLE": "0", "CUDA_DEVICE_MAX_CONNECTIONS": "1",
                          "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "PYTORCH_ALLOC_CONF": None}
    line = [ln for ln in err.splitlines() if "runtime environment:" in ln]
    assert len(line) == 1, err[-2000:]
    assert "NCCL_CUMEM_ENABLE=0, NCCL_NVLS_ENABLE=0, CUDA_DEVICE_MAX_CONNECTIONS=1, " \
           "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in line[0]


def test_a_users_own_values_win():
    out, err = _entry({"NCCL_CUMEM_ENABLE": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "8",
                       "PYTORCH_ALLOC_CONF": "backend:cudaMallocAsync"})
    assert out["env"] == {"NCCL_CUMEM_ENABLE": "1", "NCCL_NVLS_ENABLE": "0", "CUDA_DEVICE_MAX_CONNECTIONS": "8",
                          "PYTORCH_CUDA_ALLOC_CONF": None, "PYTORCH_ALLOC_CONF": "backend:cudaMallocAsync"}
    assert "NCCL_CUMEM_ENABLE=1 (user)" in err and "PYTORCH_ALLOC_CONF=backend:cudaMallocAsync (user)" in err


# ------------------------------------------------------------------ sync.master_address
def _config(*overrides: str):
    return load_config(TINY_CONFIG, list(overrides))


def test_master_address_defaults_to_auto_and_loopback_for_local_engines():
    assert _config().sync.master_address == "auto"
    assert resolve_master_address("auto", ["http://127.0.0.1:30000"]) == "127.0.0.1"
    assert resolve_master_address("auto", ["http://localhost:30000", "http://10.0.0.9:30000"]) == "127.0.0.1"


def _own_non_loopback_ipv4() -> str | None:
    import psutil

    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                return a.address
    return None


def test_master_address_auto_is_the_local_address_routing_to_the_engine():
    own = _own_non_loopback_ipv4()
    if own is None:
        pytest.skip("this machine has no non-loopback IPv4 interface")
    # an engine on this host's own network address: the route to it leaves from that address
    address = resolve_master_address("auto", [f"http://{own}:30000"])
    assert address == own
    free_port(address)  # and rank 0 can bind it


def test_an_explicit_master_address_is_kept():
    assert _config("sync.master_address=node7.cluster").sync.master_address == "node7.cluster"
    assert resolve_master_address("node7.cluster", ["http://127.0.0.1:1"]) == "node7.cluster"
    assert resolve_master_address("10.1.2.3", []) == "10.1.2.3"
    assert _config("sync.master_address=::1").sync.master_address == "::1"


@pytest.mark.parametrize("value", ["node0:29500", "tcp://node0", "10.0.0.1:1234", "", " node0"])
def test_a_bad_master_address_is_a_config_error(value):
    with pytest.raises(ConfigError) as err:
        _config(f"sync.master_address={value!r}")
    assert "sync.master_address" in str(err.value)


# ------------------------------------------------------------------ collective timeout
_TIMEOUT = """
import sys, torch, torch.distributed as dist
from scope_megatron.parallel import init_parallel
from megatron.core import parallel_state as ps
init_parallel(1, 1, timeout_minutes=float(sys.argv[1]))
cpu = torch.device("cpu")
print(dist.distributed_c10d._get_default_group()._get_backend(cpu).options._timeout.total_seconds(),
      ps.get_data_parallel_group()._get_backend(cpu).options._timeout.total_seconds())
"""


def test_the_collective_timeout_is_configurable():
    assert _config().parallel.distributed_timeout_minutes == 60
    with pytest.raises(ConfigError, match="parallel.distributed_timeout_minutes"):
        _config("parallel.distributed_timeout_minutes=0")
    proc = subprocess.run([sys.executable, "-c", _TIMEOUT, "45"], cwd=REPO, env=loop_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    default_group, megatron_group = map(float, proc.stdout.split()[-2:])
    assert default_group == megatron_group == 45 * 60


# ------------------------------------------------------------------ embedded engines on GPUs
def test_embedded_engines_on_cpu_are_unchanged():
    check_embedded_devices(_config(), cuda_device_count=0, local_world_size=4)


def test_an_unset_embedded_device_on_gpu_is_refused_naming_the_field():
    with pytest.raises(ConfigError) as err:
        check_embedded_devices(_config(), cuda_device_count=8, local_world_size=4)
    message = str(err.value)
    assert "rollout.embedded_device" in message and "cuda:4" in message and "cuda:0..cuda:3" in message
    with pytest.raises(ConfigError, match="teacher.embedded_device"):
        check_embedded_devices(_config("rollout.embedded_device=cuda:4"), cuda_device_count=8, local_world_size=4)
    with pytest.raises(ConfigError, match="rollout.embedded_device"):  # one GPU: still only when asked
        check_embedded_devices(_config(), cuda_device_count=1, local_world_size=1)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_a_training_gpu_is_refused_with_several_ranks(device):
    with pytest.raises(ConfigError, match="is a training GPU"):
        check_embedded_devices(_config(f"rollout.embedded_device={device}", "teacher.embedded_device=cuda:5"),
                               cuda_device_count=8, local_world_size=4)


def test_explicit_placements_are_accepted():
    ok = _config("rollout.embedded_device=cuda:4", "teacher.embedded_device=cuda:5")
    check_embedded_devices(ok, cuda_device_count=8, local_world_size=4)
    check_embedded_devices(_config("rollout.embedded_device=cpu", "teacher.embedded_device=cpu"), 8, 4)
    # one trainer rank: sharing its GPU is allowed when asked for
    check_embedded_devices(_config("rollout.embedded_device=cuda:0", "teacher.embedded_device=cuda:0"), 1, 1)
    # engines served by SGLang need no embedded device
    check_embedded_devices(_config("rollout.student_urls=[http://s:1]", "teacher.urls=[http://t:1]"), 8, 8)
    with pytest.raises(ConfigError, match="not visible"):
        check_embedded_devices(_config("rollout.embedded_device=cuda:8", "teacher.embedded_device=cpu"), 8, 4)


def test_every_embedded_teacher_needs_a_device():
    routed = ["rollout.embedded_device=cuda:4", "teacher.embedded_device=cuda:5", "teacher.routes={b: second}",
              "teacher.others.second.model=/m"]
    with pytest.raises(ConfigError, match="teacher.others.second.embedded_device") as err:
        check_embedded_devices(_config(*routed), cuda_device_count=8, local_world_size=4)
    assert "teacher 'second'" in str(err.value) and "teacher.others.second.urls" in str(err.value)
    check_embedded_devices(_config(*routed, "teacher.others.second.embedded_device=cuda:6"), 8, 4)


@pytest.mark.gpu
def test_the_embedded_device_check_runs_before_anything_starts(tmp_path):
    """On a GPU machine the trainer refuses an unset embedded device with exit 2 (config error)."""
    if not __import__("torch").cuda.is_available():
        pytest.skip("needs CUDA: on CPU embedded engines are unchanged")
    proc = subprocess.run([sys.executable, "-m", "scope_megatron.train", "--config", str(TINY_CONFIG),
                           f"run_dir={tmp_path}"], cwd=REPO, env={**loop_env(), "CUDA_VISIBLE_DEVICES": "0"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "rollout.embedded_device" in proc.stderr, proc.stderr[-3000:]
