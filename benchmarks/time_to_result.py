"""Wall time to a result on this machine: README command 1's quickstart (run + report; the glyph pretrain
inside it reported apart), the test suite and the quick test loop — with the machine's load and hardware
recorded, per CPU class, so the README's figures can come from here.

    python benchmarks/time_to_result.py                       # all three, as the README runs them
    python benchmarks/time_to_result.py --cpu-class avx2      # the same with the ISA capped to AVX2
    python benchmarks/time_to_result.py --only quickstart     # one of quickstart, suite, quick
    python benchmarks/time_to_result.py --set training.epochs=1 --pytest-args tests/test_threads.py  # a reduced try

Each step runs as a child process exactly as a user would type it (``avl-peft run configs/quickstart.yaml
--force --out DIR && avl-peft report DIR``, the first pretrain included: an empty ``AVL_PEFT_CACHE``
unless ``--reuse-pretrain``; ``python -m pytest -q`` with and without ``-m "not slow"``),
with this interpreter and the environment as it is (``OMP_NUM_THREADS`` included, recorded; ``--threads N``
sets it). The installation itself (``pip install -e ".[dev]"``) is not timed: it depends on the network
and the package cache, not on avl-peft.

The load is the 1-minute load average (``os.getloadavg``), sampled every ``--sample-s`` seconds while each
step runs; the step itself adds up to one per core, so a step whose median load exceeds 1.5 per core ran beside
other work and is flagged ``"busy": true``. Output:
``benchmarks/results/time_to_result-<machine>-<date>-<class>.json`` (``--out`` for another folder).

CPU classes: ``native`` runs as the machine is; ``avx2`` caps every child process to AVX2
(``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``), which on an AVX-512/AMX machine reproduces an
AVX2-only CPU's speed and its fp32 resolution of ``precision: auto`` (``benchmarks/precision_probe.py`` shows
the cap reproduces the emulated-bf16 slowdown). The record's ``hardware`` block is read in a child process under
the same caps.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("quickstart", "suite", "quick")
CPU_CLASSES = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


class LoadSampler:
    """Samples the 1-minute load average in the background while a step runs."""

    def __init__(self, every_s: float):
        self.every_s, self.samples = every_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self.every_s)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])


def cli() -> list[str]:
    """``avl-peft`` as installed next to this interpreter, else ``python -m avl_peft`` (same code)."""
    script = Path(sys.executable).with_name("avl-peft")
    return [str(script)] if script.exists() else [sys.executable, "-m", "avl_peft"]


def timed(commands: list[list[str]], env: dict, cores: int, sample_s: float) -> dict:
    """Run commands one after another (stopping at the first failure) and time them together."""
    outputs, codes = [], []
    with LoadSampler(sample_s) as load:
        start = time.perf_counter()
        for command in commands:
            proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
            outputs.append(proc.stdout + proc.stderr)
            codes.append(proc.returncode)
            if proc.returncode != 0:
                break
        wall = time.perf_counter() - start
    median_load = statistics.median(load.samples)
    return {
        "commands": [" ".join(c) for c in commands],
        "wall_s": wall,
        "returncodes": codes,
        "ok": all(c == 0 for c in codes) and len(codes) == len(commands),
        "load_1min": {"median": median_load, "max": max(load.samples), "samples": len(load.samples)},
        # the step itself keeps up to `cores` runnable threads: only load beyond that is other work
        "busy": median_load > 1.5 * cores,
        "tail": outputs[-1][-2000:] if outputs else "",
    }


def hardware(env: dict) -> dict:
    """avl_peft.hardware.hardware_info() as a child process with ``env`` (ISA caps included) sees it."""
    code = "import json; from avl_peft.hardware import hardware_info; print(json.dumps(hardware_info()))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def quickstart(args, env: dict, cores: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="avl-peft-ttr") as tmp:
        out = Path(args.keep) if args.keep else Path(tmp) / "quickstart"
        if not args.reuse_pretrain:  # a new user's first run: the pretrained backbone is built inside the timing
            env = {**env, "AVL_PEFT_CACHE": str(Path(tmp) / "cache")}
        sets = [x for s in args.set for x in ("--set", s)]
        run = [*cli(), "run", str(ROOT / "configs" / "quickstart.yaml"), "--force", "--quiet", "--out", str(out), *sets]
        result = timed([run, [*cli(), "report", str(out)]], env, cores, args.sample_s)
        runs = {}
        for path in sorted(out.glob("*/results.json")):
            data = json.loads(path.read_text())
            timing = data.get("timing", {})
            runs[path.parent.name] = {
                "status": data.get("status"),
                "train_s": timing.get("train_s"),
                "eval_s": timing.get("eval_s"),
                "threads": timing.get("threads"),
            }
        result["runs"] = runs
        result["report"] = (out / "report.md").read_text() if (out / "report.md").exists() else None
        cards = sorted(Path(env["AVL_PEFT_CACHE"]).glob("pretrain/*/card.json")) if not args.reuse_pretrain else []
        if cards:  # the first pretrain, built inside this step: its own time, accuracy and precision
            card = json.loads(cards[0].read_text())
            result["pretrain"] = {
                "wall_s": card.get("wall_time_s"),
                "test_accuracy": card.get("test_accuracy"),
                "precision": card.get("precision"),
                "threads": card.get("threads"),
            }
    result["overrides"] = list(args.set)
    result["first_pretrain_included"] = not args.reuse_pretrain
    return result


def pytest(args, env: dict, cores: int, quick: bool) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.pytest_args]
    if quick:
        command += ["-m", "not slow"]
    result = timed([command], env, cores, args.sample_s)
    # "N passed, M failed, K deselected in 123.45s" -> counts (pytest's own summary line)
    summary = re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", result["tail"])
    result["counts"] = {kind: int(n) for n, kind in summary}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=STEPS, help="run only these steps (repeatable)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="quickstart override (reduced try)")
    ap.add_argument("--pytest-args", nargs="*", default=[], help="test paths/options (reduced try; default: all)")
    ap.add_argument("--threads", type=int, help="set OMP_NUM_THREADS for every step (default: environment as is)")
    ap.add_argument("--cpu-class", choices=sorted(CPU_CLASSES), default="native", help="avx2: cap the ISA (see above)")
    ap.add_argument("--sample-s", type=float, default=5.0, help="load sampling interval")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--keep", help="write the quickstart's runs and report to this folder (default: a temporary one)")
    ap.add_argument(
        "--reuse-pretrain",
        action="store_true",
        help="reuse the cached pretrained backbone (default: build it inside the timing, as on a new machine)",
    )
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **CPU_CLASSES[args.cpu_class]}
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    record = {
        "machine": socket.gethostname(),
        "date": dt.date.today().isoformat(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cores": cores,
        "omp_num_threads": env.get("OMP_NUM_THREADS"),
        "cpu_class": args.cpu_class,
        "hardware": hardware(env),
        "reduced": bool(args.set or args.pytest_args),
        "load_1min_before": os.getloadavg()[0],
        "git": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "steps": {},
    }
    for step in args.only or STEPS:
        print(f"{step} ...", flush=True)
        if step == "quickstart":
            result = quickstart(args, env, cores)
        else:
            result = pytest(args, env, cores, quick=step == "quick")
        result["git"], result["measured_at"] = record["git"], dt.datetime.now().isoformat(timespec="seconds")
        record["steps"][step] = result
        flag = " (machine busy: other work beside the step)" if result["busy"] else ""
        if "pretrain" in result:
            pre = result["pretrain"]
            print(f"  pretrain: {pre['wall_s']} s, held-out accuracy {pre['test_accuracy']:.4f}, {pre['precision']}")
        print(
            f"{step}: {result['wall_s']:.1f} s, {'ok' if result['ok'] else 'FAILED'}, "
            f"load median {result['load_1min']['median']:.2f} on {cores} cores{flag}"
        )
    record["load_1min_after"] = os.getloadavg()[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-reduced" if record["reduced"] else ""
    path = out / f"time_to_result-{record['machine']}-{record['date']}-{args.cpu_class}{suffix}.json"
    if path.exists():  # steps measured earlier that day (e.g. --only quickstart, then --only suite) are kept
        earlier = json.loads(path.read_text())
        for step, result in earlier.get("steps", {}).items():
            record["steps"].setdefault(step, result)
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")
    if shutil.which("uptime"):
        print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
