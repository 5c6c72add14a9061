"""Adapter cost against the frozen-backbone limit, for every method, layout, precision and (optionally)
compiled; HF peft's LoRA; merged evaluation; statistics heads; PiSSA initialisation; the pipeline.

    python benchmarks/speed.py                                   # CPU: ViT-Tiny and ViT-S layouts, fp32 + bf16
    python benchmarks/speed.py --device cuda                     # GPU: ViT-B/16 at 224 px, fp32 + bf16, images/s
    python benchmarks/speed.py --layouts tiny --precisions fp32 --compile --rounds 5   # a subset

The same script runs on CPU and CUDA; what the hardware cannot do is skipped and said so. Results go to
benchmarks/results/<machine>-<date>-<model>-<size>px-<device>.json (one file per layout); the README there
summarises them.

- train step: forward + backward + AdamW step on a batch of 32 (rank 8, default targets), per variant,
  relative to the **frozen-backbone limit** — no adapter, activation gradients still flow through every
  block down to the patch embedding, no backbone weight gradient (the head trains, as in every method):
  the least any in-backbone method can pay. Every round times every variant once, in a shuffled order,
  and the ratio is taken *within* the round (variant / limit), so load drifting between rounds cancels;
  the median and quartiles of the per-round ratios are reported, and the ratio of the fastest rounds
  (contention only slows a step down). Raw per-round times are kept. On CPU with one thread the timer is the
  process CPU time (time spent descheduled by other jobs on a shared machine does not count); otherwise
  wall time (CUDA synchronised). Both are recorded.
- stacked methods (InfLoRA, SD-LoRA, ``interference: project``) are timed in their second experience:
  one frozen branch per layer, A designed / the branch confined by the first experience's input basis.
- ``--precisions``: fp32 and bf16 autocast (the limit is timed in the same precision); in bf16 also
  ``lora_plain``: LoRA through plain autocast ops instead of the fused node (what autocast ran before).
- ``--compile``: the limit and ``--compile-methods`` again under ``torch.compile`` (compile time recorded).
- eval (no grad): each method unmerged and merged, relative to the plain backbone; statistics heads
  (prototype, RanPAC): update and scoring cost per batch relative to the backbone's eval forward.
- memory: bytes saved for backward (distinct tensors, parameters excluded) plus weights, gradients and
  AdamW state; on CUDA also ``torch.cuda.max_memory_allocated`` of one fp32 step (``cuda_peak_mb``, which
  includes every resident model) and that peak less what was allocated before the step
  (``cuda_step_extra_mb``).
- the machine's load (``os.getloadavg``) before, during (per round) and after.

The process runs under avl-peft's CPU policy (``avl_peft.threads.configure``, as the CLI): threads from
``OMP_NUM_THREADS`` or the cores given, freed memory kept for reuse (recorded as ``malloc_retained``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import os
import platform
import random
import socket
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import avl_peft
from avl_peft import threads
from avl_peft.adapters import _lowrank, begin_experience, collect_inputs, end_experience, stack
from avl_peft.hardware import hardware_info

METHODS = ["lora", "pissa", "wegeft", "loretta", "inflora", "sdlora", "lora_project"]
MERGEABLE = ["lora", "pissa", "wegeft", "loretta", "inflora", "sdlora", "lora_project"]
LAYOUTS = {  # name -> (timm model, image size, patch size); 32 px / patch 4 keeps 65 tokens, CPU-sized
    "tiny": ("vit_tiny_patch16_224", 32, 4),  # width 192, 12 blocks
    "wide": ("vit_small_patch16_224", 32, 4),  # width 384, 12 blocks
    "vitb224": ("vit_base_patch16_224", 224, 16),  # width 768, 197 tokens: the GPU study's layout
    "toy": ("test_vit", 32, 8),  # timm's test model (width 64, 6 blocks): smoke tests of the scripts
}
PEFT_TARGETS = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def backbone(layout: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    model, size, patch = LAYOUTS[layout]
    return avl_peft.create_backbone(model, num_classes=100, img_size=size, patch_size=patch).to(device)


def frozen_limit(model: nn.Module) -> nn.Module:
    """No trainable backbone weight, but gradients flow from the loss down to the patch embedding."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.head.parameters():
        p.requires_grad_(True)
    model.patch_embed.register_forward_hook(lambda m, i, out: out.requires_grad_())
    return model


def second_experience(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """A stacked method as it trains its second experience: one frozen branch, memory/basis from the first."""
    inputs = collect_inputs(model, [x], max_samples=512)
    begin_experience(model, inputs)
    with torch.no_grad():  # a trained first branch (non-zero), so the frozen path carries signal
        for name, p in model.named_parameters():
            if ".adapter." in name and p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    end_experience(model, inputs)
    stack(model)
    begin_experience(model, inputs)
    return model


def make_model(name: str, layout: str, args, x: torch.Tensor) -> nn.Module:
    base = backbone(layout, args.device)
    if name == "limit":
        return frozen_limit(base)
    if name == "full":
        return avl_peft.inject(base, "full")
    if name == "peft_lora":
        import peft

        r = args.rank
        config = peft.LoraConfig(r=r, lora_alpha=r, target_modules=PEFT_TARGETS, modules_to_save=["head"])
        return peft.get_peft_model(base, config)
    method, _, interference = name.partition("_")
    options = {"rank": args.rank, **({"interference": interference} if interference else {})}
    model = avl_peft.inject(base, method, **options)
    if avl_peft.adapters.METHODS.get(method).requires_stack or interference == "project":
        second_experience(model, x)
    return model


class Stepper:
    def __init__(self, model: nn.Module, device: str, precision: str, force_path: str | None = None):
        self.model = model.train()
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        self.device, self.dtype, self.force_path = device, DTYPES[precision], force_path

    def __call__(self, x, y) -> None:
        _lowrank.FORCE_PATH = self.force_path
        try:
            amp = torch.autocast(self.device, dtype=self.dtype) if self.dtype is not None else contextlib.nullcontext()
            with amp:
                out = self.model(x)
            nn.functional.cross_entropy(out.float(), y).backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        finally:
            _lowrank.FORCE_PATH = None


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, rounds: int, device: str, reference: str, warmup: int = 2, seed: int = 0) -> dict:
    """Every fn once per round in a shuffled order; per-round ratios to ``reference``; medians."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall, cpu, load = {k: [] for k in fns}, {k: [] for k in fns}, []
    rng = random.Random(seed)
    for _ in range(rounds):
        order = list(fns)
        rng.shuffle(order)
        for k in order:
            sync(device)
            w, c = time.perf_counter(), time.process_time()
            fns[k]()
            sync(device)
            wall[k].append(time.perf_counter() - w)
            cpu[k].append(time.process_time() - c)
        load.append(os.getloadavg()[0])
    timer = "cpu" if device == "cpu" and torch.get_num_threads() == 1 else "wall"
    basis = cpu if timer == "cpu" else wall
    out = {"timer": timer, "rounds": rounds, "load_1min_median": statistics.median(load), "variants": {}}
    for k in fns:
        ratios = sorted(a / b for a, b in zip(basis[k], basis[reference]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out["variants"][k] = {
            "ratio_median": statistics.median(ratios),
            "ratio_q1": q[0],
            "ratio_q3": q[2],
            # Contention only ever slows a step down: the fastest of the rounds is the least disturbed one.
            "ratio_of_minima": min(basis[k]) / min(basis[reference]),
            "wall_s_median": statistics.median(wall[k]),
            "cpu_s_median": statistics.median(cpu[k]),
            "wall_s": wall[k],
            "cpu_s": cpu[k],
        }
    return out


def saved_bytes(model: nn.Module, x, y) -> int:
    """Bytes of distinct tensors autograd keeps for backward (a tensor saved twice counts once)."""
    seen: dict[tuple[int, int], int] = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # counted in state_bytes

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[(ptr, t.storage_offset())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def state_bytes(model: nn.Module) -> int:
    params = {id(p): p for p in model.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return weights + 3 * trainable  # gradient + AdamW's two moments for every trainable parameter


def make_models(layout: str, args, x) -> dict[str, nn.Module]:
    names = ["limit", *args.methods, "full"] + (["peft_lora"] if has_peft() else [])
    return {n: make_model(n, layout, args, x) for n in names}


def train_steps(models: dict, layout: str, args, x, y) -> dict:
    out = {"precisions": {}, "memory": {}, "params": {}}
    for precision in args.precisions:
        steppers = {n: Stepper(m, args.device, precision) for n, m in models.items()}
        if precision != "fp32" and "lora" in models:
            steppers["lora_plain"] = Stepper(models["lora"], args.device, precision, force_path="plain")
        fns = {n: (lambda s=s: s(x, y)) for n, s in steppers.items()}
        result = interleaved(fns, args.rounds, args.device, "limit")
        for n in steppers:
            result["variants"][n]["images_per_s"] = args.batch / result["variants"][n]["wall_s_median"]
        out["precisions"][precision] = result
        print_ratios(f"{layout} {precision}", result)
    if args.compile:
        out["compiled"] = compiled_steps(layout, args, x, y)
    for n, m in models.items():
        out["memory"][n] = {
            "saved_for_backward_mb": saved_bytes(m.train(), x, y) / 2**20,
            "weights_grads_optimizer_mb": state_bytes(m) / 2**20,
        }
        if args.device == "cuda":
            # Every model stays resident, so the process peak also counts the others' weights: the step's
            # own share is the peak above what was allocated before it (activations, gradients, temporaries).
            sync(args.device)
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            Stepper(m, args.device, "fp32")(x, y)
            out["memory"][n]["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            out["memory"][n]["cuda_step_extra_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        if n != "peft_lora":
            out["params"][n] = avl_peft.parameter_counts(m)
    return out


def compiled_steps(layout: str, args, x, y) -> dict:
    """The limit and ``--compile-methods`` under torch.compile, interleaved with the eager limit (the
    reference) and eager ``--compile-methods``; the first compiled call (the compile) is timed apart."""
    out = {}
    for precision in args.precisions:
        steppers, compile_s = {}, {}
        for n in ["limit", *args.compile_methods]:
            steppers[n] = Stepper(make_model(n, layout, args, x), args.device, precision)
            model = make_model(n, layout, args, x)
            model.compile()
            steppers[f"{n}+compile"] = Stepper(model, args.device, precision)
            sync(args.device)
            t = time.perf_counter()
            steppers[f"{n}+compile"](x, y)
            sync(args.device)
            compile_s[n] = time.perf_counter() - t
        fns = {n: (lambda s=s: s(x, y)) for n, s in steppers.items()}
        result = interleaved(fns, args.rounds, args.device, "limit")
        for n in steppers:
            result["variants"][n]["images_per_s"] = args.batch / result["variants"][n]["wall_s_median"]
        result["first_step_s"] = compile_s
        out[precision] = result
        print_ratios(f"{layout} {precision} compiled (ratios to the eager limit)", result)
    return out


def eval_costs(models: dict, layout: str, args, x) -> dict:
    plain = backbone(layout, args.device).eval()
    evals = {"plain": plain}
    for m in MERGEABLE:
        if m in models:
            evals[m] = models[m].eval()
            evals[f"{m}_merged"] = avl_peft.merge(copy.deepcopy(models[m])).eval()

    def infer(model):
        with torch.inference_mode():
            model(x)

    return interleaved({k: (lambda m=m: infer(m)) for k, m in evals.items()}, args.rounds, args.device, "plain")


def head_costs(layout: str, args, x, y) -> dict:
    """Statistics heads: per batch, updating and scoring vs the backbone's eval forward (feature extraction)."""
    from avl_peft.cl.heads import build_head

    features_model = backbone(layout, args.device).eval()
    features_model.reset_classifier(0)
    with torch.inference_mode():
        f = features_model(x)
    heads = {n: build_head(n, f.shape[1], n_classes=100) for n in ("prototype", "ranpac")}
    for h in heads.values():
        h.to(args.device)
        h.update(f, y)
    solve = {}
    for n, h in heads.items():  # RanPAC solves its ridge system lazily, once per change of statistics
        t = time.perf_counter()
        h.logits(f)
        solve[n] = time.perf_counter() - t

    def forward():
        with torch.inference_mode():
            features_model(x)

    fns = {"forward": forward}
    for n, h in heads.items():
        fed = copy.deepcopy(h)  # updates invalidate RanPAC's solution: time them on a copy
        fns[f"{n}_update"] = lambda h=fed: h.update(f, y)
        fns[f"{n}_score"] = lambda h=h: (h.logits(f), sync(args.device))  # evaluation: statistics fixed
    result = interleaved(fns, args.rounds, args.device, "forward", warmup=1)
    result["first_solve_s"] = solve
    return result


def pissa_init_times(args) -> dict[str, float]:
    torch.manual_seed(0)
    model = avl_peft.create_backbone("vit_base_patch16_224", num_classes=10).to(args.device)
    out = {}
    for label, niter in (("exact", None), (f"svd_niter={args.svd_niter}", args.svd_niter)):
        m = copy.deepcopy(model)
        sync(args.device)
        t = time.perf_counter()
        avl_peft.inject(m, "pissa", rank=args.rank, svd_niter=niter)
        sync(args.device)
        out[label] = time.perf_counter() - t
    return out


def end_to_end() -> dict[str, float]:
    """The quickstart's pipeline (Avalanche loop, data loading, callbacks, metrics, logging) against the
    pure model step for the same images: one LoRA experience of the offline digits scenario.

    ``pipeline``: the loop with the linear head and no upstream probe — the overhead of the machinery.
    ``instrumented``: the quickstart as configured, which also measures upstream accuracy before and after
    the experience and computes the prototype head's class means — measurements, reported apart.
    """
    import tempfile

    from avl_peft.study.config import expand, load_study
    from avl_peft.study.experiment import build

    config = Path(__file__).parent.parent / "configs" / "quickstart.yaml"
    common = ["training.pretrain=false", "variants=[{method.name: lora}]", "training.epochs=2"]
    plain = [*common, "training.head=linear", "upstream.dataset=null"]
    with tempfile.TemporaryDirectory() as tmp:
        strategies = {}
        for name, overrides in (("pipeline", plain), ("instrumented", common)):
            _, cfg = expand(load_study(config, overrides))[0]
            parts = build(cfg, Path(tmp) / name)
            parts.strategy.train(parts.benchmark.train_stream[0])  # warm-up: injection, optimizer, allocations
            strategies[name] = (parts.strategy, parts.benchmark.train_stream[0])
        strategy, experience = strategies["pipeline"]
        n = len(experience.dataset) * strategy.train_epochs
        # The same model, optimizer and batch size on pre-stacked tensors: nothing but the model step.
        ds = experience.dataset
        xs = torch.stack([ds[i][0] for i in range(len(ds))])
        ys = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
        model, opt = strategy.model.train(), strategy.optimizer
        classes = sorted(int(c) for c in experience.classes_in_this_experience)
        bs = cfg["training"]["batch_size"]

        def pure():
            for _ in range(strategy.train_epochs):
                perm = torch.randperm(len(xs))
                for i in range(0, len(xs), bs):
                    idx = perm[i : i + bs]
                    loss = nn.functional.cross_entropy(model(xs[idx])[:, classes], ys[idx].apply_(classes.index))
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

        pure()
        fns = {"model": pure, **{name: (lambda s=s, e=e: s.train(e)) for name, (s, e) in strategies.items()}}
        result = interleaved(fns, 5, "cpu", "model", warmup=0)
    v = result["variants"]
    per = "cpu_s_median" if result["timer"] == "cpu" else "wall_s_median"
    return {
        "pipeline_s_per_image": v["pipeline"][per] / n,
        "instrumented_s_per_image": v["instrumented"][per] / n,
        "model_s_per_image": v["model"][per] / n,
        "overhead": v["pipeline"]["ratio_median"] - 1,
        "overhead_instrumented": v["instrumented"]["ratio_median"] - 1,
        "timer": result["timer"],
    }


def profile_steps(models: dict, layout: str, args, x, y) -> dict[str, dict[str, float]]:
    """torch.profiler over ``--profile-steps`` fp32 steps of the limit and each ``--profile`` method: self CPU
    time per operator (ms per step), written as a table beside the results; the difference to the limit's
    column is where a method's extra cost goes."""
    from torch.profiler import ProfilerActivity, profile

    per_op: dict[str, dict[str, float]] = {}
    for name in ["limit", *args.profile]:
        step = Stepper(models[name], args.device, "fp32")
        step(x, y)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.profile_steps):
                step(x, y)
        for event in prof.key_averages():
            per_op.setdefault(event.key, {})[name] = event.self_cpu_time_total / 1e3 / args.profile_steps
    columns = ["limit", *args.profile]
    totals = {c: sum(v.get(c, 0.0) for v in per_op.values()) for c in columns}
    order = sorted(per_op, key=lambda k: -max(per_op[k].get(c, 0.0) - per_op[k].get("limit", 0.0) for c in columns))
    title = f"self CPU ms per step, {layout} fp32, batch {args.batch}, {args.profile_steps} steps"
    lines = [f"{title}; rows ordered by the largest extra over the limit"]
    lines.append(f"{'operator':<44}" + "".join(f"{c:>14}" for c in columns))
    lines.append(f"{'(total)':<44}" + "".join(f"{totals[c]:>14.1f}" for c in columns))
    for key in order[:25]:
        lines.append(f"{key[:43]:<44}" + "".join(f"{per_op[key].get(c, 0.0):>14.2f}" for c in columns))
    table = "\n".join(lines)
    print(table)
    out = Path(args.out) / f"profile-{LAYOUTS[layout][0]}-{LAYOUTS[layout][1]}px-{args.device}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    return {key: per_op[key] for key in order[:25]}


def has_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        print("peft not installed: skipping the HF peft comparison (pip install peft)")
        return False
    return True


def print_ratios(title: str, result: dict) -> None:
    print(f"{title}: step / limit, median of {result['rounds']} per-round ratios ({result['timer']} time)")
    for k, v in result["variants"].items():
        print(
            f"  {k:<14} {v['ratio_median']:5.3f} [{v['ratio_q1']:.3f}-{v['ratio_q3']:.3f}]"
            f" min {v['ratio_of_minima']:.3f}"
            f"  {v['wall_s_median'] * 1000:8.1f} ms wall  {v.get('images_per_s', 0):8.1f} img/s"
        )


def supported_precisions(requested: list[str], device: str) -> list[str]:
    keep = []
    for p in requested:
        if p == "fp16" and device != "cuda":
            print("fp16: CUDA only, skipped")
        elif p == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
            print("bf16: this GPU has no bf16, skipped")
        else:
            keep.append(p)
    return keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--layouts", default=None, help="tiny, wide, vitb224 (default: CPU tiny,wide; CUDA vitb224)")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16, fp16 (unsupported: skipped)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd limit and --compile-methods")
    ap.add_argument("--compile-methods", default="lora")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--svd-niter", type=int, default=4)
    ap.add_argument("--skip-train", action="store_true", help="evaluation, heads etc. only")
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--skip-heads", action="store_true")
    ap.add_argument("--skip-pissa-init", action="store_true")
    ap.add_argument("--skip-end-to-end", action="store_true")
    ap.add_argument("--profile", default="", help="comma list of methods to profile against the limit (fp32)")
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--tag", default="", help="suffix of the result file names (e.g. bf16)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    args.layouts = (args.layouts or ("vitb224" if args.device == "cuda" else "tiny,wide")).split(",")
    args.precisions = supported_precisions(args.precisions.split(","), args.device)
    args.methods = [m for m in args.methods.split(",") if m]
    args.compile_methods = [m for m in args.compile_methods.split(",") if m]
    args.profile = [m for m in args.profile.split(",") if m]
    if any(m not in args.methods for m in args.profile):
        ap.error(f"--profile: every method must also be in --methods ({', '.join(args.methods)})")
    threads.configure()  # the process policy the CLI applies (threads, freed memory kept: avl_peft/threads.py)
    machine = {
        "machine": socket.gethostname(),
        "date": dt.date.today().isoformat(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cuda_device": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "malloc_retained": threads.retain_freed_memory(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "hardware": hardware_info(args.device),  # CPU model, ISA, bf16/AMX native, GPU and compute capability
    }
    for i, layout in enumerate(args.layouts):
        load_before = os.getloadavg()
        g = torch.Generator().manual_seed(0)
        size = LAYOUTS[layout][1]
        x = torch.randn(args.batch, 3, size, size, generator=g).to(args.device)
        y = torch.randint(0, 100, (args.batch,), generator=g).to(args.device)
        models = make_models(layout, args, x)
        results = {**machine, "layout": layout, "model": LAYOUTS[layout][0], "img_size": size}
        results["args"] = {k: v for k, v in vars(args).items()}
        steps = results["train"] = train_steps(models, layout, args, x, y) if not args.skip_train else {}
        if "lora" in steps.get("precisions", {}).get("fp32", {}).get("variants", {}) and "peft_lora" in models:
            v = steps["precisions"]["fp32"]["variants"]
            results["ours_over_peft_lora"] = v["lora"]["ratio_median"] / v["peft_lora"]["ratio_median"]
        if args.profile:
            results["profile"] = profile_steps(models, layout, args, x, y)
        if not args.skip_eval:
            results["eval"] = eval_costs(models, layout, args, x)
        if not args.skip_heads:
            results["heads"] = head_costs(layout, args, x, y)
        if i == 0 and not args.skip_pissa_init:
            results["pissa_init_vit_b16_s"] = pissa_init_times(args)
        if i == 0 and not args.skip_end_to_end and args.device == "cpu":
            results["end_to_end"] = end_to_end()
        results["load_1min"] = {"before": load_before[0], "after": os.getloadavg()[0]}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tag = f"-{args.tag}" if args.tag else ""
        path = out / f"{machine['machine']}-{machine['date']}-{LAYOUTS[layout][0]}-{size}px-{args.device}{tag}.json"
        path.write_text(json.dumps(results, indent=2))
        print(f"wrote {path} (load {load_before[0]:.2f} -> {results['load_1min']['after']:.2f})")


if __name__ == "__main__":
    main()
