"""The GPU path end to end, in one script and one JSON: what a machine with one CUDA GPU does with avl-peft.

    python benchmarks/gpu_check.py                 # CUDA: about 6-8 minutes on one GPU and 16 cores
    python benchmarks/gpu_check.py --smoke         # every part at toy size on CPU (tests/test_gpu_check.py)

Writes ``benchmarks/results/gpu_check-<machine>-<date>.json`` (``--out``) with five parts, each under its
own time budget and its own try/except (an error is recorded in its part and the next part runs):

1. ``hardware``: ``avl_peft.hardware.hardware_info`` for the device and its one-line description.
2. ``quickstart``: ``configs/quickstart.yaml`` through the CLI (``avl-peft run ... --force``) on the device
   with ``precision: auto`` (results.json must say bf16 on compute capability 8.0+), then again with
   ``training.compile=true`` (LoRA only, ``--compile-variants all`` for every method: each compiles its own
   graphs). Per run: precision, train/eval/upstream seconds, images/s, peak memory, ACC, finiteness. The glyph
   pretrain runs on the CPU; by default in a fresh ``AVL_PEFT_CACHE`` inside the scratch folder, so its
   time is measured (``--reuse-cache``: the user's cache, whatever it holds).
3. ``speed``: ``benchmarks/speed.py`` at ViT-B/16 224 px for every method with fewer rounds (images/s, ratio
   to the frozen-backbone limit, memory); its JSON is folded in.
4. ``loader``: the loading path a study uses (the scenario's dataset and transforms, the strategy's own
   DataLoader, ``loader_options``) at the backbone's 224 px: images/s of the loader alone per worker count,
   of the model step alone on a batch already on the device, and of ``strategy.train`` (both together), for
   the quickstart's in-memory digits and for ImageNet-R's JPEG path (a generated folder of 200 classes, the
   settings of ``configs/sota_imagenet_r.yaml``: batch 64, 8 workers). ``starved`` says whether the loader
   with the config's workers delivers fewer images/s than the step consumes.
5. ``stacked``: 20 experiences of LoRA with ``policy: stack`` (a frozen branch per experience) at ViT-B/16
   224 px: peak memory of each experience's training and evaluation (the peak reset in between) and the
   memory still allocated after it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's avl_peft, as for the other benchmarks

from avl_peft import hardware, threads  # noqa: E402
from avl_peft.cl.precision import PRECISIONS, loader_options  # noqa: E402
from avl_peft.safeio import load_yaml  # noqa: E402

# Per mode: the backbone of parts 4-5, the sizes, and every part's budget in seconds (8 minutes in all).
SIZES = {
    "full": {
        "backbone": {"name": "vit_base_patch16_224", "kwargs": {}},
        "budgets": {"hardware": 10, "quickstart": 280, "speed": 90, "loader": 60, "stacked": 40},
        "compile_reserve": 90,  # of the quickstart's budget, kept for the compiled run
        "quickstart_set": [],
        "speed_args": ["--layouts", "vitb224", "--rounds", "5", "--skip-end-to-end"],
        "jpeg": {"per_class": 10, "size": (400, 320)},
        "stacked": {"n_classes": 40, "n_train_per_class": 16, "n_test_per_class": 4},
        "step_iters": 20,
        "workers": None,  # 0, the config's, and the cores
    },
    "smoke": {
        "backbone": {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1}},
        "budgets": {"hardware": 10, "quickstart": 120, "speed": 60, "loader": 60, "stacked": 60},
        "compile_reserve": 40,
        "quickstart_set": [
            "backbone.pretrain=null",
            "upstream.dataset=null",
            "backbone.kwargs={img_size: 16, patch_size: 8, depth: 1}",
            "scenario.n_experiences=2",
            "training.epochs=1",
            "variants=[{method.name: lora}]",
        ],
        "speed_args": [
            *("--layouts", "toy", "--rounds", "2", "--precisions", "fp32", "--methods", "lora"),
            *("--skip-pissa-init", "--skip-end-to-end", "--skip-heads", "--skip-eval"),
        ],
        "jpeg": {"per_class": 2, "size": (48, 40)},
        "stacked": {"n_classes": 40, "n_train_per_class": 2, "n_test_per_class": 1},
        "step_iters": 3,
        "workers": [0, 1],
    },
}


def numbers(obj: Any):
    """Every number in a nested JSON value (None skipped)."""
    if isinstance(obj, dict):
        for v in obj.values():
            yield from numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield float(obj)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def current_memory_mb(device: torch.device) -> float:
    """Tensors allocated on the GPU now; on CPU the process's resident memory."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# --- 1. hardware -----------------------------------------------------------------------------------


def part_hardware(ctx: argparse.Namespace) -> dict:
    info = hardware.hardware_info(ctx.device)
    return {"info": info, "describe": hardware.describe(info)}


# --- 2. the quickstart through the CLI -------------------------------------------------------------


def summarize_runs(out: Path) -> dict:
    runs = {}
    for path in sorted(out.glob("*/results.json")):
        r = json.loads(path.read_text())
        if r.get("status") != "finished":
            runs[path.parent.name] = {"status": r.get("status"), "error": r.get("error")}
            continue
        t = r["timing"]
        linear = (r.get("heads") or {}).get("linear") or {}
        runs[path.parent.name] = {
            "status": "finished",
            "precision": r["precision"],
            "compile": r["config"]["training"]["compile"],
            **{k: t.get(k) for k in ("train_s", "eval_s", "upstream_s", "images_per_s", "peak_memory_mb")},
            "acc": r["metrics"]["acc"],
            "linear_acc": (linear.get("metrics") or {}).get("acc"),
            "upstream_retention": (r.get("upstream") or {}).get("retention"),
            "finite": all(math.isfinite(v) for v in numbers([r["accuracy_matrix"], r["metrics"], t])),
        }
    return runs


def part_quickstart(ctx: argparse.Namespace) -> dict:
    cache = ctx.work / "cache" if not ctx.reuse_cache else None
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)  # fresh even when --work is reused: the pretrain is timed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if cache is not None:
        env["AVL_PEFT_CACHE"] = str(cache)
    if ctx.smoke:
        env["TORCH_COMPILE_DISABLE"] = "1"  # the plumbing only: inductor's first compile takes minutes on 2 cores
    expected = "bf16" if hardware.bf16_native(ctx.device) else "fp32"
    out: dict[str, Any] = {"cache": "fresh, in the scratch folder" if cache else "reused (AVL_PEFT_CACHE or ~/.cache)"}
    names = [m for m in ctx.compile_variants.split(",") if m]
    compile_set = [] if names == ["all"] else ["variants=[" + ", ".join(f"{{method.name: {m}}}" for m in names) + "]"]
    for label, extra in (("auto", []), ("compile", ["training.compile=true", *compile_set])):
        reserve = ctx.size["compile_reserve"] * ctx.budget_scale if label == "auto" else 0
        remaining = ctx.deadline - time.monotonic() - reserve
        if remaining < 10:
            out[label] = {"error": "skipped: the part's time budget was spent"}
            continue
        folder = ctx.work / f"quickstart-{label}"
        shutil.rmtree(folder, ignore_errors=True)  # only this call's runs are summarised
        sets = [f"training.device={ctx.device.type}", "training.precision=auto", *ctx.size["quickstart_set"], *extra]
        cmd = [sys.executable, "-m", "avl_peft", "run", str(ROOT / "configs" / "quickstart.yaml")]
        cmd += ["--out", str(folder), "--force", "--quiet"] + [a for s in sets for a in ("--set", s)]
        print(f"  quickstart {label}: {' '.join(cmd[2:])}", flush=True)
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=remaining, cwd=ROOT)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
        except subprocess.TimeoutExpired as exc:
            rc, tail = "timeout", str(exc)[-2000:]
        runs = summarize_runs(folder)
        out[label] = {
            "wall_s": time.perf_counter() - start,
            "returncode": rc,
            "runs": runs,
            "precision_expected": expected,
            "precision_ok": bool(runs) and all(r.get("precision") == expected for r in runs.values()),
            "all_finite": bool(runs) and all(r.get("finite") for r in runs.values()),
        }
        if rc != 0:
            why = "timed out" if rc == "timeout" else f"exit {rc}"
            out[label].update(error=f"avl-peft run: {why}", output_tail=tail)
    from avl_peft.pretrain.outputs import default_cache_dir

    cards = sorted((cache or default_cache_dir()).rglob("card.json"), key=lambda p: p.stat().st_mtime)
    if cards:  # the newest build (with a reused cache, possibly not the one the quickstart used)
        card = json.loads(cards[-1].read_text())
        keys = ("wall_time_s", "test_accuracy", "precision", "threads", "created")
        out["pretrain"] = {**{k: card.get(k) for k in keys}, "hardware": hardware.describe(card.get("hardware") or {})}
    return out


# --- 3. speed.py -----------------------------------------------------------------------------------


def part_speed(ctx: argparse.Namespace) -> dict:
    folder = ctx.work / "speed"
    shutil.rmtree(folder, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--device", ctx.device.type, "--out", str(folder)]
    cmd += [*ctx.size["speed_args"], "--tag", "gpucheck"]
    print(f"  {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, ctx.deadline - time.monotonic()))
    if proc.returncode != 0:
        raise RuntimeError(f"speed.py exited {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}")
    (path,) = folder.glob("*.json")
    record = json.loads(path.read_text())
    train = record["train"]
    methods = {}
    for precision, result in train["precisions"].items():
        for name, v in result["variants"].items():
            methods.setdefault(name, {})[precision] = {
                "images_per_s": v["images_per_s"],
                "ratio_to_limit": v["ratio_median"],
                "ratio_q1_q3": [v["ratio_q1"], v["ratio_q3"]],
            }
    for name, memory in train["memory"].items():
        methods.setdefault(name, {})["memory_mb"] = memory
    return {"model": record["model"], "img_size": record["img_size"], "methods": methods, "record": record}


# --- 4. the data loader against the step ------------------------------------------------------------


def run_config(ctx: argparse.Namespace, scenario: dict, training: dict, method: dict | None = None) -> dict:
    from avl_peft.study.config import expand, validate_study

    data = {
        "name": "gpu_check",
        "seed": 0,
        "backbone": {**ctx.size["backbone"], "pretrained": False},  # offline: random weights time the same
        "scenario": scenario,
        "training": {"device": ctx.device.type, "precision": "auto", "head": "linear", **training},
        "method": method or {"name": "lora", "options": {"rank": 8}},
        "subspace": {"enabled": False},
    }
    ((_, cfg),) = expand(validate_study(data))
    return cfg


def fake_imagenet_r(root: Path, per_class: int, size: tuple[int, int]) -> Path:
    """200 class folders of smooth random JPEGs (ImageNet-R's layout), so its decode+resize path can be timed."""
    from PIL import Image

    folder = root / "imagenet-r"

    def write(c: int) -> None:
        rng = np.random.default_rng(c)
        (folder / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
            coarse.resize(size, Image.Resampling.BICUBIC).save(folder / f"n{c:08d}" / f"{i}.jpg", quality=90)

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(write, range(200)))
    return root


def time_loader(strategy: Any, experience: Any, device: torch.device, workers: int) -> dict:
    """The strategy's own training DataLoader for ``experience``, batches moved to the device, two epochs."""
    strategy.experience = experience
    strategy.train_dataset_adaptation()
    strategy.make_train_dataloader(**loader_options(device, workers))
    epochs = []
    for _ in range(2):  # the first pays the worker start-up; persistent workers (CUDA) skip it in the second
        start, n, first = time.perf_counter(), 0, None
        for batch in strategy.dataloader:
            x = batch[0].to(device, non_blocking=True)
            n += len(x)
            if first is None:
                sync(device)
                first = time.perf_counter() - start
        sync(device)
        epochs.append((n, time.perf_counter() - start, first))
    strategy.dataloader = []  # ends persistent workers
    (n1, s1, first), (n2, s2, _) = epochs
    return {"images_per_s": n2 / s2, "first_epoch_images_per_s": n1 / s1, "first_batch_s": first, "images": n2}


def time_step(parts: Any, batch: tuple, iters: int) -> float:
    """Images/s of forward + backward + optimizer step alone, the batch already on the device."""
    model, optimizer, device = parts.strategy.model.train(), parts.strategy.optimizer, parts.device
    x, y = batch[0].to(device), batch[1].to(device)
    dtype = PRECISIONS[parts.precision]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(x)
        torch.nn.functional.cross_entropy(out.float(), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return iters * len(x) / (time.perf_counter() - start)


def loader_case(ctx: argparse.Namespace, config: str, scenario: dict) -> dict:
    from avl_peft.study.experiment import build

    training = load_yaml(ROOT / "configs" / config, what="config").get("training", {})
    batch, workers = training.get("batch_size", 32), training.get("num_workers", 0)
    if ctx.smoke:
        workers = min(workers, 1)
    cfg = run_config(ctx, scenario, {"batch_size": batch, "num_workers": workers, "epochs": 2})
    parts = build(cfg, None)
    strategy, device = parts.strategy, parts.device
    first, second = parts.benchmark.train_stream[0], parts.benchmark.train_stream[1]
    out: dict[str, Any] = {"config": config, "batch_size": batch, "num_workers": workers, "precision": parts.precision}
    out["img_size"] = cfg["backbone"]["kwargs"].get("img_size", 224)
    strategy.train(first, **loader_options(device, workers))  # warm-up: adapters injected, optimizer built
    start = time.perf_counter()
    strategy.train(second, **loader_options(device, workers))
    out["train_images_per_s"] = len(second.dataset) * strategy.train_epochs / (time.perf_counter() - start)
    strategy.experience = second
    strategy.train_dataset_adaptation()
    strategy.make_train_dataloader(**loader_options(device, 0))
    out["step_images_per_s"] = time_step(parts, next(iter(strategy.dataloader)), ctx.size["step_iters"])
    counts = ctx.size["workers"] or sorted({0, workers, min(16, threads.available_cores())})
    out["loader"] = {}
    for n in counts:
        if time.monotonic() > ctx.deadline:
            out["loader"][str(n)] = {"error": "skipped: the part's time budget was spent"}
            continue
        out["loader"][str(n)] = time_loader(strategy, second, device, n)
    configured = out["loader"].get(str(workers), {}).get("images_per_s")
    out["starved"] = configured is not None and configured < out["step_images_per_s"]
    out["train_over_step"] = out["train_images_per_s"] / out["step_images_per_s"]
    return out


def part_loader(ctx: argparse.Namespace) -> dict:
    digits = {"name": "digits", "n_experiences": 2}
    out = {"digits": loader_case(ctx, "quickstart.yaml", digits)}
    jpeg = ctx.size["jpeg"]
    root = fake_imagenet_r(ctx.work / "data", jpeg["per_class"], tuple(jpeg["size"]))
    imagenet_r = {"name": "imagenet_r", "n_experiences": 2, "root": str(root)}
    out["imagenet_r"] = loader_case(ctx, "sota_imagenet_r.yaml", imagenet_r)
    out["imagenet_r"]["jpeg"] = jpeg
    return out


# --- 5. memory of a 20-experience stacked run --------------------------------------------------------


def part_stacked(ctx: argparse.Namespace) -> dict:
    from avl_peft.adapters.inject import parameter_counts
    from avl_peft.study.experiment import build

    scenario = {"name": "synthetic", "n_experiences": 20, "options": ctx.size["stacked"]}
    method = {"name": "lora", "policy": "stack", "options": {"rank": 8}}
    cfg = run_config(ctx, scenario, {"batch_size": 32, "epochs": 1}, method)
    parts = build(cfg, None)
    strategy, device, options = parts.strategy, parts.device, loader_options(parts.device, 0)
    rows = []
    for t, experience in enumerate(parts.benchmark.train_stream):
        if time.monotonic() > ctx.deadline:
            break
        hardware.reset_peak_memory(device)
        start = time.perf_counter()
        strategy.train(experience, **options)
        train_s, train_peak = time.perf_counter() - start, hardware.peak_memory_mb(device)
        hardware.reset_peak_memory(device)
        start = time.perf_counter()
        strategy.eval(parts.benchmark.test_stream, **options)
        rows.append(
            {
                "experience": t,
                "train_peak_mb": train_peak,
                "eval_peak_mb": hardware.peak_memory_mb(device),
                "allocated_after_mb": current_memory_mb(device),
                "params": parameter_counts(strategy.model),
                "train_s": train_s,
                "eval_s": time.perf_counter() - start,
            }
        )
    if not rows:
        raise RuntimeError("no experience finished within the part's time budget (try --budget-scale 2)")
    last = parts.matrix.matrices["class_incremental"][len(rows) - 1][: len(rows)]
    peaks = [r["train_peak_mb"] for r in rows]
    return {
        "model": cfg["backbone"]["name"],
        "precision": parts.precision,
        "experiences_done": len(rows),
        "per_experience": rows,
        "train_peak_growth_mb_per_experience": (peaks[-1] - peaks[0]) / max(1, len(peaks) - 1),
        "acc_after_last": float(np.mean(last)),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS",
    }


PARTS = {
    "hardware": part_hardware,
    "quickstart": part_quickstart,
    "speed": part_speed,
    "loader": part_loader,
    "stacked": part_stacked,
}


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--smoke", action="store_true", help="every part at toy size on CPU, in about a minute")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--compile-variants", default="lora", help="quickstart methods run compiled (comma list) or all")
    ap.add_argument("--reuse-cache", action="store_true", help="the user's pretrain cache instead of a fresh one")
    ap.add_argument("--work", default=None, help="scratch folder (runs, data, cache; default: a new temp folder)")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time budget")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ctx = ap.parse_args(argv)
    unknown = [p for p in ctx.parts.split(",") if p and p not in PARTS]
    if unknown:
        ap.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    ctx.device = torch.device(ctx.device or ("cpu" if ctx.smoke or not torch.cuda.is_available() else "cuda"))
    ctx.size = SIZES["smoke" if ctx.smoke else "full"]
    ctx.work = Path(ctx.work or tempfile.mkdtemp(prefix="gpu_check-"))
    ctx.work.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "machine": socket.gethostname(),
        "date": dt.date.today().isoformat(),
        "device": str(ctx.device),
        "mode": "smoke" if ctx.smoke else "full",
        "work": str(ctx.work),
        "parts": {},
    }
    begin = time.perf_counter()
    for name in [p for p in ctx.parts.split(",") if p]:
        budget = ctx.size["budgets"].get(name, 60) * ctx.budget_scale
        ctx.deadline = time.monotonic() + budget
        print(f"[{time.perf_counter() - begin:6.1f} s] {name} (budget {budget} s)", flush=True)
        start = time.perf_counter()
        try:
            result = PARTS[name](ctx)
        except Exception as exc:  # one failing part must not lose the others
            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
            print(f"  {name} failed: {result['error'][:300]}", flush=True)
        finally:
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
        seconds = time.perf_counter() - start
        record["parts"][name] = {**result, "seconds": seconds, "budget_s": budget, "over_budget": seconds > budget}
    record["total_s"] = time.perf_counter() - begin
    out = Path(ctx.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_check-{record['machine']}-{record['date']}{'-smoke' if ctx.smoke else ''}.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    print(f"[{record['total_s']:6.1f} s] wrote {path}", flush=True)
    return path


if __name__ == "__main__":
    threads.configure()  # the CLI's process policy (threads, freed memory kept), as speed.py
    main()
