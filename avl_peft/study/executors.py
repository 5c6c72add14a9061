"""Where the runs of a study execute: in this process, in a local process pool, or as Ray tasks.

Every executor takes the runs to do and returns one summary per run; each run writes its own folder
(``<out>/<run-id>/``) under its own lock, so executors can be mixed, interrupted and resumed freely.

- ``sequential``: one run after the other in this process (default; progress bars per run).
- ``local``: ``workers`` processes on this machine (spawned, not forked: torch and threads). With CUDA,
  worker i is pinned to GPU i mod n, so one multi-GPU machine runs n studies' runs side by side.
- ``ray``: one Ray task per run with its own ``num_cpus``/``num_gpus`` request, scheduled by Ray across a
  cluster (``ray_address``; without one Ray starts locally). The output folder must be reachable from
  every node (shared storage) — the same layout as a local study, so ``report`` and ``--resume`` work
  unchanged.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .. import threads
from ..errors import ConfigError
from ..registry import Registry
from .attempt import record_failure, run_one
from .config.executor import EXECUTOR_NAMES, ExecutorOptions

EXECUTORS: Registry[Callable[..., list[dict[str, Any]]]] = Registry("executor")


@EXECUTORS.register("sequential", "one run after another in this process")
def sequential(
    todo,
    out_dir: Path,
    *,
    resume: bool,
    force: bool,
    progress: bool,
    options: ExecutorOptions,
    planned: dict | None = None,
) -> list[dict]:
    out = []
    bar = tqdm(todo, desc="study", unit="run", disable=not progress)
    for rid, cfg in bar:
        bar.set_postfix_str(rid)
        out.append(
            run_one(
                rid,
                cfg,
                out_dir,
                resume=resume,
                force=force,
                progress=progress,
                raise_user_errors=True,
                planned=(planned or {}).get(rid),
            )
        )
    return out


def _die_with(parent: int) -> None:
    """Linux: this worker gets SIGTERM when the study's process dies (``kill`` of the CLI alone, an OOM kill),
    instead of training on unseen for the rest of its run. Finished experiences are on disk (``--resume``)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl here: the worker stops when it next reports instead
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _pool_init(gpu_queue: Any, workers: int, parent: int | None = None) -> None:
    if parent is not None:
        _die_with(parent)
    if gpu_queue is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_queue.get())
    threads.configure(workers)  # the workers split this machine's cores (avl_peft.threads)


def _pool_run(rid: str, cfg: dict, out_dir: str, resume: bool, force: bool, planned: dict | None = None) -> dict:
    if not threads.configured():  # a Ray worker: a process of ours (Ray sets its OMP_NUM_THREADS)
        threads.configure()
    return run_one(
        rid, cfg, out_dir, resume=resume, force=force, progress=False, raise_user_errors=False, planned=planned
    )


@EXECUTORS.register("local", "a pool of worker processes on this machine (workers; one GPU each with CUDA)")
def local(
    todo,
    out_dir: Path,
    *,
    resume: bool,
    force: bool,
    progress: bool,
    options: ExecutorOptions,
    planned: dict | None = None,
):
    import torch

    workers = options.workers
    ctx = mp.get_context("spawn")
    gpu_queue = None
    if torch.cuda.is_available() and any(c["training"]["device"] != "cpu" for _, c in todo):
        gpu_queue = ctx.Manager().Queue()
        for i in range(workers):
            gpu_queue.put(i % torch.cuda.device_count())
    out = []
    init = (gpu_queue, workers, os.getpid())
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_pool_init, initargs=init) as pool:
        futures = {
            pool.submit(_pool_run, rid, cfg, str(out_dir), resume, force, (planned or {}).get(rid)): (rid, cfg)
            for rid, cfg in todo
        }
        for future in tqdm(as_completed(futures), total=len(futures), desc="study", unit="run", disable=not progress):
            rid, cfg = futures[future]
            out.append(_collect(future.result, rid, cfg, out_dir))
    return out


def _collect(get: Callable[[], dict], rid: str, cfg: dict, out_dir: Path) -> dict:
    """A worker's summary; if the worker itself died (OOM kill, segfault) record the run as failed."""
    try:
        return get()
    except Exception as e:
        return record_failure(Path(out_dir) / rid, rid, cfg, f"worker died: {type(e).__name__}: {e}", repr(e))


@EXECUTORS.register("ray", "one Ray task per run, across a cluster (ray_address, num_cpus, num_gpus)")
def ray_executor(
    todo,
    out_dir: Path,
    *,
    resume: bool,
    force: bool,
    progress: bool,
    options: ExecutorOptions,
    planned: dict | None = None,
) -> list[dict]:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "the ray executor needs Ray: pip install 'avl-peft[ray]' (or pip install 'ray[default]')"
        ) from None
    if not ray.is_initialized():
        ray.init(address=options.ray_address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    task = ray.remote(_pool_run).options(num_cpus=options.num_cpus, num_gpus=options.num_gpus, max_retries=0)
    folder = str(Path(out_dir).resolve())
    refs = {task.remote(rid, cfg, folder, resume, force, (planned or {}).get(rid)): (rid, cfg) for rid, cfg in todo}
    out = []
    pending = list(refs)
    with tqdm(total=len(refs), desc="study (ray)", unit="run", disable=not progress) as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            rid, cfg = refs[ready[0]]
            out.append(_collect(lambda r=ready[0]: ray.get(r), rid, cfg, out_dir))
            bar.update(1)
    return out


# The config describes executors by name (config/executor.py, below this module); the two lists must agree.
if set(EXECUTORS.names()) != set(EXECUTOR_NAMES):
    raise RuntimeError(f"executors registered {sorted(EXECUTORS.names())} but the config knows {EXECUTOR_NAMES}")
