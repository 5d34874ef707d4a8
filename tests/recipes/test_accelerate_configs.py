"""accelerate_configs/: every YAML loads as an Accelerate config with the intended layout, and the CPU one,
launched the documented way, really gives 2 processes whose gradients are synced (not a silent single run)."""

import json
import re
import os
import socket
import subprocess
import sys

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from conftest import REPO

CONFIGS = REPO / "accelerate_configs"
# name: (distributed_type, num_processes, num_machines, zero_stage or None)
LAYOUT = {
    "single_gpu": ("NO", 1, 1, None),
    "ddp_8gpu": ("MULTI_GPU", 8, 1, None),
    "zero2_8gpu": ("DEEPSPEED", 8, 1, 2),
    "zero3_8gpu": ("DEEPSPEED", 8, 1, 3),
    "multi_node": ("DEEPSPEED", 16, 2, 2),
    "cpu": ("MULTI_GPU", 2, 1, None),  # MULTI_GPU + ACCELERATE_USE_CPU=1 is what starts 2 gloo processes
    "cpu_zero2": ("DEEPSPEED", 2, 1, 2),
    "cpu_zero3": ("DEEPSPEED", 2, 1, 3),
}


def test_no_unlisted_configs():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(LAYOUT)


@pytest.mark.parametrize("name", list(LAYOUT))
def test_config_layout(name):
    cfg = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    dist_type, procs, machines, stage = LAYOUT[name]
    assert (str(cfg.distributed_type).split(".")[-1], cfg.num_processes, cfg.num_machines) == (dist_type, procs,
                                                                                               machines)
    if stage is None:
        assert not cfg.deepspeed_config
        return
    ds = cfg.deepspeed_config
    assert ds["zero_stage"] == stage and ds["deepspeed_multinode_launcher"] == "standard"
    # ZeRO-3 builds the model partitioned and gathers full weights on save (a normal HF checkpoint)
    assert ds["zero3_init_flag"] is (stage == 3)
    assert ds.get("zero3_save_16bit_model", False) is (stage == 3)
    assert cfg.use_cpu is False  # Accelerate only enters its DeepSpeed branch with use_cpu false


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_cpu_config_starts_two_synced_processes():
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu.yaml"),
           "--main_process_port", str(_free_port()), str(REPO / "tests" / "ddp_probe_worker.py")]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    # both ranks write to one pipe, so their lines can run together: find each probe's JSON object, not each line
    probes = [json.loads(m) for m in re.findall(r"PROBE (\{[^{}]*\})", proc.stdout)]
    assert len(probes) == 2, proc.stdout
    for p in probes:
        assert p == dict(distributed_type="DistributedType.MULTI_CPU", num_processes=2, world_size=2,
                         backend="gloo", grads_equal=True)
