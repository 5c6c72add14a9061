"""Long streams: per-experience cost of every method x policy that keeps per-experience branches.

The path users take: plain Avalanche ``Naive`` with :class:`avl_peft.PEFTPlugin` (``checkpoint_dir`` set)
on an in-memory stream of ``--experiences`` experiences of two classes each (synthetic class prototypes
plus noise, 16 px), a depth-1, 48-wide ViT, one thread. Each variant runs in its own process, so peak
RSS is that variant's. Per experience it records:

- ``step_s``: median CPU time of one training iteration (forward + loss + backward + optimizer step;
  process CPU time, one thread, so load from other processes on the machine does not count);
- ``eval_s`` and ``eval_per_image_s`` (after the first experience and every ``--eval-every``-th):
  evaluation of every test experience seen so far (the CL protocol: its total grows with the stream by
  design, the per-image cost should not; evaluating it after every experience would make the run
  quadratic in the stream's length);
- ``rss_mb`` (current) and ``peak_rss_mb`` (the process' peak so far), ``cuda_peak_mb`` on CUDA;
- ``adapter_params``: every adapter tensor of the model (trainable and frozen, buffers included);
  ``trainable``: the parameters the optimizer steps;
- ``checkpoint_bytes`` (this experience's ``exp_<t>.pt``) and ``run_state_bytes`` (all of them);
- at a few experiences, ``resume_s``: a fresh model and plugin ``restore`` the directory, and
  ``resume_max_abs_diff``: the restored model's outputs against the live model's (must be 0).

Summary per variant: ``step_ratio`` = median step time of the last five experiences ÷ the first five's;
``peak_growth`` = peak RSS at the last experience ÷ at experience 10 − 1.

A step here takes milliseconds, and medians taken minutes apart move with the machine's load. So the
benchmark also times the *same* step A/B: it keeps a copy of the model as it trained in experiences 1, 2
and the last, then, after the stream, times ``--ab-rounds`` rounds of ``--ab-steps`` training steps of each
copy in turn on one fixed batch (forward, loss with the method's penalty, backward, AdamW step; CPU time).
Interleaving puts every copy under the same load, so ``ab_ratio_last_first`` (median step of the last
experience's model ÷ the first's) and ``ab_ratio_last_second`` (÷ the second's, the first with a folded
term) measure the model, not the machine.

    python benchmarks/long_stream.py                       # 100 experiences, every variant
    python benchmarks/long_stream.py --experiences 20 --variants lora-stack,sdlora --tag smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

VARIANTS = {
    "lora-stack": ("lora", {}),
    "pissa-stack": ("pissa", {}),
    "wegeft-stack": ("wegeft", {}),
    "loretta-stack": ("loretta", {}),
    "inflora": ("inflora", {}),
    "sdlora": ("sdlora", {}),
    "lora-orthogonal": ("lora", {"interference": "orthogonal"}),
    "lora-project": ("lora", {"interference": "project"}),
}
RESULTS = Path(__file__).parent / "results"


def hardware() -> dict:
    """The machine block every benchmark record carries."""
    try:
        from avl_peft.hardware import hardware_info
    except ImportError:  # older checkouts: enough to tell machines apart
        import platform

        return {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count()}
    return hardware_info()


def synthetic_stream(n_exp: int, per_class: int, test_per_class: int, size: int, seed: int = 0):
    """An Avalanche class-incremental benchmark: 2·n_exp classes, prototype + noise images."""
    from avalanche.benchmarks import nc_benchmark

    from avl_peft.cl.scenarios.in_memory import tensor_dataset

    g = torch.Generator().manual_seed(seed)
    n_classes = 2 * n_exp
    protos = torch.rand(n_classes, 3, size, size, generator=g)

    def draw(n: int):
        y = torch.arange(n_classes).repeat_interleave(n)
        x = protos[y] + 0.3 * torch.randn(len(y), 3, size, size, generator=g)
        return tensor_dataset(x, y)

    return nc_benchmark(
        draw(per_class),
        draw(test_per_class),
        n_experiences=n_exp,
        task_labels=False,
        shuffle=False,
        fixed_class_order=list(range(n_classes)),
    )


def build_model(n_classes: int, size: int, width: int, depth: int) -> torch.nn.Module:
    import avl_peft

    torch.manual_seed(0)
    return avl_peft.create_backbone(
        "vit_tiny_patch16_224",
        num_classes=n_classes,
        img_size=size,
        patch_size=4,
        depth=depth,
        embed_dim=width,
        num_heads=3,
    )


class Timer:
    """Avalanche plugin: CPU time of each training iteration."""

    def __init__(self):
        from avalanche.core import SupervisedPlugin

        outer = self

        class _Plugin(SupervisedPlugin):
            def before_training_iteration(self, strategy, **kw):
                outer.start = time.process_time()

            def after_update(self, strategy, **kw):
                outer.steps.append(time.process_time() - outer.start)

            def after_training_iteration(self, strategy, **kw):
                if outer.snapshot_as is not None:  # the model as it trains in this experience
                    outer.snapshots[outer.snapshot_as] = copy.deepcopy(strategy.model)
                    outer.snapshot_as = None

        self.plugin, self.steps, self.start = _Plugin(), [], 0.0
        self.snapshot_as, self.snapshots = None, {}


def adapter_numbers(model: torch.nn.Module) -> dict[str, int]:
    from avl_peft.adapters.stack import adapter_state_dict

    state = adapter_state_dict(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"adapter_params": int(sum(v.numel() for v in state.values())), "trainable": int(trainable)}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_variant(name: str, args) -> dict:
    """Train one variant over the whole stream (in this process) and return its per-experience record."""
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    from avl_peft import PEFTPlugin
    from avl_peft.threads import set_threads

    set_threads(1)
    method, options = VARIANTS[name]
    options = {"rank": args.rank, **options}
    bench = synthetic_stream(args.experiences, args.images, args.test_images, args.size)
    device = args.device
    model = build_model(2 * args.experiences, args.size, args.width, args.depth)
    ckpt = Path(tempfile.mkdtemp(prefix=f"long_stream_{name}_"))
    timer = Timer()
    peft = PEFTPlugin(method, policy="stack", checkpoint_dir=ckpt, model=model, **options)
    strategy = Naive(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=args.batch,
        train_epochs=args.epochs,
        eval_mb_size=64,
        device=device,
        plugins=[peft, timer.plugin],
        evaluator=EvaluationPlugin(),
    )
    probe = torch.stack([bench.test_stream[0].dataset[i][0] for i in range(4)]).to(device)
    resume_at = {1, 10, 50, args.experiences}
    rows = []
    last = len(bench.train_stream) - 1
    for t, exp in enumerate(bench.train_stream):
        timer.steps.clear()
        timer.snapshot_as = {0: "first", 1: "second", last: "last"}.get(t)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        strategy.train(exp)
        step = statistics.median(timer.steps)
        files = sorted(ckpt.glob("exp_*.pt"))
        row = {"experience": t + 1, "step_s": step}
        if t == 0 or (t + 1) % args.eval_every == 0:
            seen = bench.test_stream[: t + 1]
            t0 = time.process_time()
            strategy.eval(seen)
            row["eval_s"] = time.process_time() - t0
            row["eval_per_image_s"] = row["eval_s"] / sum(len(e.dataset) for e in seen)
        row |= {
            "rss_mb": rss_mb(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **adapter_numbers(model),
            "checkpoint_bytes": (ckpt / f"exp_{t}.pt").stat().st_size,
            "run_state_bytes": sum(f.stat().st_size for f in files),
        }
        if device == "cuda":
            row["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        if t + 1 in resume_at:
            row.update(resume(method, options, ckpt, model, probe, args))
        rows.append(row)
        if args.verbose:
            print(name, json.dumps(row), flush=True)
    shutil.rmtree(ckpt, ignore_errors=True)
    ab = ab_steps(timer.snapshots, bench, options, args)
    return {"variant": name, "method": method, "options": options, "experiences": rows, **summary(rows), **ab}


def ab_steps(models: dict[str, torch.nn.Module], bench, options: dict, args) -> dict:
    """Interleaved CPU time of one training step of each kept model on the same batch (see the docstring)."""
    from avl_peft.adapters.interference import interference_penalty

    data = bench.train_stream[0].dataset
    x = torch.stack([data[i][0] for i in range(args.batch)]).to(args.device)
    y = torch.tensor([int(data[i][1]) for i in range(args.batch)], device=args.device)
    optims = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}

    def step(k: str) -> None:
        loss = torch.nn.functional.cross_entropy(models[k](x), y)
        if options.get("interference") == "orthogonal":
            loss = loss + interference_penalty(models[k])
        loss.backward()
        optims[k].step()
        optims[k].zero_grad(set_to_none=True)

    for k in models:  # warm-up: allocator, optimizer state
        models[k].train()
        for _ in range(3):
            step(k)
    for _ in range(args.ab_rounds):
        for k in models:
            for _ in range(args.ab_steps):
                t0 = time.process_time()
                step(k)
                times[k].append(time.process_time() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"ab_step_s": med, "ab_rounds": args.ab_rounds, "ab_steps": args.ab_steps}
    if "first" in med and "last" in med:
        out["ab_ratio_last_first"] = med["last"] / med["first"]
    if "second" in med and "last" in med:
        out["ab_ratio_last_second"] = med["last"] / med["second"]
    return out


def resume(method: str, options: dict, ckpt: Path, live: torch.nn.Module, probe, args) -> dict:
    """Time a fresh model + plugin restoring every checkpoint; compare its outputs with the live model's."""
    from avl_peft import PEFTPlugin

    t0 = time.process_time()
    fresh = build_model(2 * args.experiences, args.size, args.width, args.depth).to(args.device)
    plugin = PEFTPlugin(method, policy="stack", checkpoint_dir=ckpt, **options)
    plugin.restore(fresh)
    seconds = time.process_time() - t0
    live.eval(), fresh.eval()
    with torch.no_grad():
        diff = (fresh(probe) - live(probe)).abs().max().item()
    return {"resume_s": seconds, "resume_max_abs_diff": diff}


def window(rows: list[dict], key: str, first: bool, n: int = 5) -> float:
    part = [r for r in rows if key in r]
    part = part[:n] if first else part[-n:]
    return statistics.median(r[key] for r in part)


def summary(rows: list[dict]) -> dict:
    at10 = rows[min(9, len(rows) - 1)]
    return {
        "step_ratio": window(rows, "step_s", False) / window(rows, "step_s", True),
        "eval_per_image_ratio": window(rows, "eval_per_image_s", False) / window(rows, "eval_per_image_s", True),
        "peak_growth": rows[-1]["peak_rss_mb"] / at10["peak_rss_mb"] - 1,
        "adapter_params_first_last": [rows[0]["adapter_params"], rows[-1]["adapter_params"]],
        "checkpoint_bytes_first_last": [rows[0]["checkpoint_bytes"], rows[-1]["checkpoint_bytes"]],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiences", type=int, default=100)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--images", type=int, default=8, help="training images per class")
    p.add_argument("--test-images", type=int, default=4, help="test images per class")
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--width", type=int, default=48)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=10, help="evaluate the seen test stream every N experiences")
    p.add_argument("--ab-rounds", type=int, default=30, help="interleaved A/B rounds after the stream")
    p.add_argument("--ab-steps", type=int, default=10, help="training steps per model per A/B round")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tag", default="")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant, print its JSON
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_variant(args.one, args)), flush=True)
        return
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    keys = (
        "experiences",
        "images",
        "test_images",
        "size",
        "width",
        "depth",
        "rank",
        "batch",
        "epochs",
        "eval_every",
        "ab_rounds",
        "ab_steps",
        "device",
    )
    passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in keys] + ["--verbose"] * args.verbose
    results = []
    for name in names:
        started = time.time()
        out = subprocess.run(
            [sys.executable, __file__, *passthrough, "--one", name], capture_output=True, text=True, check=False
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if args.verbose:
            print(out.stdout, end="", flush=True)
        if out.returncode or not lines:
            sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
        record = json.loads(lines[-1][len("RESULT ") :])
        record["wall_s"] = time.time() - started
        results.append(record)
        print(
            f"{name:16s} step x{record['step_ratio']:.2f} (A/B x{record.get('ab_ratio_last_first', float('nan')):.2f}, "
            f"vs exp 2 x{record.get('ab_ratio_last_second', float('nan')):.2f})  "
            f"peak RSS {record['peak_growth'] * 100:+.1f}%  "
            f"adapter params {record['adapter_params_first_last']}  ckpt bytes {record['checkpoint_bytes_first_last']}"
            f"  ({record['wall_s']:.0f} s)",
            flush=True,
        )
    cfg = {k: v for k, v in vars(args).items() if k not in ("one", "verbose")}
    record = {"date": date.today().isoformat(), "config": cfg, "hardware": hardware(), "load": os.getloadavg()}
    record["variants"] = results
    RESULTS.mkdir(exist_ok=True)
    tag = f"-{args.tag}" if args.tag else ""
    path = RESULTS / f"long_stream-{date.today().isoformat()}-{args.experiences}exp-{args.device}{tag}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
