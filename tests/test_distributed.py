"""torchrun data parallelism: 2 CPU processes (gloo) against the single-process run."""

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml
from conftest import make_tiny_study

from avl_peft.study.config import validate_study
from avl_peft.study.run_study import run_study

# Full-batch steps (batch = an experience's 40 images, 20 per process) and test sets that split evenly:
# the 2-process run then computes the same averaged gradients as the single-process one, so results must
# agree up to floating-point summation order.
STUDY = make_tiny_study(
    scenario={"n_experiences": 3, "options": {"n_train_per_class": 20, "n_test_per_class": 10}},
    training={"epochs": 3, "batch_size": 40, "lr": 0.01},
    subspace={"enabled": True, "probe_size": 4},
)


def free_port() -> int:
    """A port nothing listens on now (the OS picks it), so parallel test runs do not collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_cpu_processes_match_single_process(tmp_path):
    single = tmp_path / "single"
    run_study(validate_study(STUDY), single, progress=False)
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(STUDY))
    ddp = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "avl_peft",
        "run",
        str(config),
        "--out",
        str(ddp),
        "--quiet",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run(s) finished") == 1, "only rank 0 reports and writes"
    a = json.loads((single / "lora-rank2-naive-s0" / "results.json").read_text())
    b = json.loads((ddp / "lora-rank2-naive-s0" / "results.json").read_text())
    for kind in ("class_incremental", "task_aware"):
        for ra, rb in zip(a["accuracy_matrix"][kind], b["accuracy_matrix"][kind]):
            assert all(abs(x - y) <= 1e-6 for x, y in zip(ra, rb)), (kind, ra, rb)
    assert abs(a["subspace"][-1]["relative_norm"] - b["subspace"][-1]["relative_norm"]) < 1e-4
    assert sorted(p.name for p in ddp.iterdir() if p.is_dir()) == ["lora-rank2-naive-s0"]
