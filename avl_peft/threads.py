"""One thread policy for every process avl-peft trains in.

Why: torch's default is one thread per physical core of the machine, whatever the process was given. In
a container, under ``taskset``, next to other jobs, or in each worker of a local process pool, that
oversubscribes the cores, and BLAS/OpenMP regions then wait on descheduled threads — measured on a 2-core
machine with other work running: a 576×192 ``torch.linalg.svd`` took 1.4 s with two threads, 0.023 s with
one.

The policy, in order of precedence:

1. ``training.threads`` of a run (:func:`for_run`) — the user's explicit setting for that run;
2. ``OMP_NUM_THREADS`` in the environment — the user's setting for the process (Ray and torchrun set it
   per worker too);
3. otherwise the cores this process is given — its CPU affinity (``os.sched_getaffinity``), capped by a
   cgroup CPU quota — divided by the number of processes sharing them (:func:`configure` with
   ``workers``: the local executor's pool), at least 1.

The number applies to torch's intra-op pool (``torch.set_num_threads``, which also sets its OpenMP and
MKL threads) and, through threadpoolctl where installed, to the BLAS/OpenMP libraries other packages
loaded (numpy's OpenBLAS, scikit-learn's). The CLI calls :func:`configure` at start-up, each pool worker
calls it with the pool size, a library call of ``run_experiment`` only when it passes
``process_settings=True``; every run calls :func:`for_run` before it builds anything.

:func:`configure` also keeps freed memory in the process (:func:`retain_freed_memory`): with glibc's
defaults every training step hands the activation memory back to the kernel and faults it in again
(zeroed) in the next — measured on ViT-Tiny (batch 32, one core): 19,080 minor page faults and 24 ms of
kernel time per LoRA step, 4,648 and 8 ms for the frozen backbone; none of either once freed memory stays.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

_share: int | None = None  # this process's default, set by configure()


def available_cores() -> int:
    """The CPUs this process may run on: its affinity set, capped by a cgroup v2 CPU quota if any."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, quota) if quota is not None else cores)


def _cgroup_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """Whole CPUs of a cgroup v2 quota ("200000 100000" → 2), or None without one."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.floor(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def user_threads() -> int | None:
    """``OMP_NUM_THREADS`` when it holds a positive integer (its first entry for nested lists), else None."""
    raw = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else None


def default_threads(workers: int = 1) -> int:
    """The policy's number for a process that shares its cores with ``workers - 1`` others."""
    return user_threads() or max(1, available_cores() // max(1, workers))


def configure(workers: int = 1) -> int:
    """Set this process's threads by the policy and remember them as its default; return the number."""
    global _share
    retain_freed_memory()
    _share = default_threads(workers)
    set_threads(_share)
    return _share


def configured() -> bool:
    """Whether this process set its policy (:func:`configure`: the CLI, a pool worker, an opted-in run)."""
    return _share is not None


def for_run(threads: int | None = None) -> int:
    """The threads one run uses: ``threads`` (``training.threads``) if given, else the process default.

    A library caller whose process never ran :func:`configure` keeps its own thread setting (nothing is
    changed unless ``threads`` is given): process-wide settings are the CLI's, or opted into
    (``run_experiment(..., process_settings=True)``).
    """
    n = threads if threads is not None else _share
    if n is None:
        import torch

        return torch.get_num_threads()
    set_threads(n)
    return n


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "LD_PRELOAD")


def retain_freed_memory(trim_bytes: int = 1 << 30, mmap_bytes: int = 32 << 20) -> bool:
    """Keep freed heap memory for reuse instead of returning it to the kernel after every step (glibc).

    Blocks up to ``mmap_bytes`` come from the heap (not a fresh mapping each time) and the heap is only
    trimmed when more than ``trim_bytes`` are free at its top, so a training loop's per-step activations
    reuse the same pages. The process's resident memory stays at its peak, which a training process
    reaches every step anyway. Skipped when the user tunes malloc (``MALLOC_*_`` variables, or another
    allocator through ``LD_PRELOAD``) and on non-glibc systems; returns whether it applied.
    """
    if any(os.environ.get(v) for v in _MALLOC_ENV):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_TRIM_THRESHOLD, trim_bytes) and libc.mallopt(M_MMAP_THRESHOLD, mmap_bytes))
    except (OSError, AttributeError):  # not glibc
        return False


def set_threads(n: int) -> None:
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: torch's own pools are set either way
        return
    threadpool_limits(limits=n)
