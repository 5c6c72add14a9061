"""The thread policy (avl_peft/threads.py): cores given, split by pool workers, user settings win."""

import pytest
import torch

from avl_peft import threads
from avl_peft.study import executors


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "_share", None)
    yield
    torch.set_num_threads(before)
    threads.set_threads(before)


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def test_cores_given_and_cgroup_quota(monkeypatch, tmp_path):
    read_quota = threads._cgroup_quota
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {3, 5, 7})
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    assert threads.available_cores() == 3
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 2)
    assert threads.available_cores() == 2
    quota = tmp_path / "cpu.max"
    for text, expected in [("150000 100000\n", 1), ("400000 100000", 4), ("max 100000", None), ("garbage", None)]:
        quota.write_text(text)
        assert read_quota(quota) == expected, text
    assert read_quota(tmp_path / "missing") is None


@pytest.mark.parametrize("value, expected", [("3", 3), ("2,1", 2), ("0", None), ("", None), ("many", None)])
def test_user_setting_is_read_from_omp_num_threads(monkeypatch, value, expected):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert threads.user_threads() == expected


def test_default_uses_the_cores_given_and_pool_workers_split_them(four_cores):
    assert threads.configure() == 4 and torch.get_num_threads() == 4
    assert threads.configure(workers=2) == 2 and torch.get_num_threads() == 2
    assert threads.configure(workers=3) == 1
    assert threads.configure(workers=8) == 1  # never zero


def test_user_settings_win(four_cores, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.configure(workers=2) == 3  # OMP_NUM_THREADS over the split
    assert threads.for_run(None) == 3
    assert threads.for_run(1) == 1 and torch.get_num_threads() == 1  # training.threads over everything
    assert threads.for_run(None) == 3  # the next run without a setting gets the process default back


def test_blas_outside_torch_follows(four_cores):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import numpy  # noqa: F401  (loads numpy's BLAS)

    threads.configure(workers=2)
    pools = [p for p in threadpoolctl.threadpool_info() if p["user_api"] in ("blas", "openmp")]
    assert pools and all(p["num_threads"] == 2 for p in pools)


def test_local_pool_workers_split_the_cores(four_cores):
    executors._pool_init(None, 2)  # what each of 2 spawned workers runs first
    assert torch.get_num_threads() == 2


def test_a_run_applies_training_threads(monkeypatch):
    from avl_peft.study.config import expand, validate_study
    from avl_peft.study.experiment import build

    data = {
        "backbone": {"kwargs": {"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}},
        "scenario": {"name": "synthetic", "n_experiences": 2},
        "training": {"threads": 2},
        "subspace": {"enabled": False},
    }
    ((_, cfg),) = expand(validate_study(data))
    build(cfg, None)
    assert torch.get_num_threads() == 2


def test_a_library_run_changes_no_process_setting_unless_it_opts_in(monkeypatch, four_cores):
    """run_experiment/build called from a script leave the allocator and the thread count alone; the CLI's
    processes (threads.configure) and process_settings=True apply the policy."""
    from avl_peft.study.config import expand, validate_study
    from avl_peft.study.experiment import build

    data = {
        "backbone": {"kwargs": {"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}},
        "scenario": {"name": "synthetic", "n_experiences": 2},
        "subspace": {"enabled": False},
    }
    ((_, cfg),) = expand(validate_study(data))
    allocator = []
    monkeypatch.setattr(threads, "retain_freed_memory", lambda: allocator.append("mallopt"))
    torch.set_num_threads(1)
    build(cfg, None)
    assert allocator == [] and torch.get_num_threads() == 1 and not threads.configured()
    build(cfg, None, process_settings=True)
    assert allocator == ["mallopt"] and torch.get_num_threads() == 4 and threads.configured()


FAULTS = """
import importlib.util, resource, sys
spec = importlib.util.spec_from_file_location("threads", sys.argv[1])
threads = importlib.util.module_from_spec(spec)
spec.loader.exec_module(threads)
applied = threads.retain_freed_memory() if sys.argv[2] == "retain" else False
def step():  # a training step's activations: blocks kept alive together, zero-filled (touched), then freed
    blocks = [bytearray(6 << 20) for _ in range(8)]
    del blocks
step()  # the first step faults either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_freed_memory_is_reused_not_faulted_in_again(monkeypatch):
    """glibc only: by default the heap is trimmed after each step (48 MiB freed at its top), so every step
    faults its 12,288 pages in again; with the policy they are reused."""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the allocator policy applies to glibc")
    env = {k: v for k, v in threads.os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}

    def faults(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS, threads.__file__, mode], env=env, capture_output=True)
        applied, count = out.stdout.decode().split()
        return applied == "True", int(count)

    (_, default), (applied, retained) = faults("default"), faults("retain")
    assert applied
    assert default > 10 * 10_000 and retained < 1000
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert not threads.retain_freed_memory()  # the user's malloc settings win
