"""Adapter cost against the frozen-backbone limit, HF peft's LoRA, and merged evaluation.

    python benchmarks/speed.py [--model NAME --img-size N --patch-size P --device cpu|cuda --bf16]

Measured in one process with interleaved repetitions (every variant once per round, rounds repeated) and
medians, so drift in machine load hits every variant alike. Results go to
benchmarks/results/<machine>-<date>.json; benchmarks/README.md summarises them.

- train step: forward + backward + AdamW step on a batch of 32, relative to the **frozen-backbone
  limit**: no adapter, activation gradients still flow through every block down to the patch embedding,
  but no backbone weight gradient is computed (the head trains, as in every method) — the least any
  in-backbone method can pay.
- HF peft LoRA on the same timm model, same rank and targets; ours/peft ratio.
- eval throughput (no grad) unmerged and after merge, relative to the plain backbone.
- PiSSA initialisation on ViT-B/16 (all default targets): exact SVD and svd_niter.
- memory: bytes saved for backward per step (activation memory) plus parameters/gradients/optimizer
  state; on CUDA also torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import socket
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import avl_peft

METHODS = ["lora", "pissa", "wegeft", "loretta"]
PEFT_TARGETS = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"


def backbone(args) -> nn.Module:
    torch.manual_seed(0)
    kw = {"img_size": args.img_size, "patch_size": args.patch_size} if args.img_size else {}
    return avl_peft.create_backbone(args.model, num_classes=100, **kw).to(args.device)


def frozen_limit(model: nn.Module) -> nn.Module:
    """No trainable backbone weight, but gradients flow from the loss down to the patch embedding."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.head.parameters():
        p.requires_grad_(True)
    model.patch_embed.register_forward_hook(lambda m, i, out: out.requires_grad_())
    return model


def peft_lora(model: nn.Module, rank: int) -> nn.Module:
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=PEFT_TARGETS, modules_to_save=["head"])
    return peft.get_peft_model(model, config)


def make_variants(args) -> dict[str, nn.Module]:
    variants = {"limit": frozen_limit(backbone(args))}
    for m in METHODS:
        variants[m] = avl_peft.inject(backbone(args), m, rank=args.rank)
    variants["full"] = avl_peft.inject(backbone(args), "full")
    try:
        variants["peft_lora"] = peft_lora(backbone(args), args.rank)
    except ImportError:
        print("peft not installed: skipping the HF peft comparison (pip install peft)")
    return variants


class Stepper:
    def __init__(self, model: nn.Module, args):
        self.model = model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.args = args

    def __call__(self, x, y) -> None:
        with torch.autocast(self.args.device, dtype=torch.bfloat16, enabled=self.args.bf16):
            loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def interleaved(fns: dict, rounds: int, device: str, warmup: int = 2) -> dict[str, float]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def saved_bytes(model: nn.Module, x, y, args) -> int:
    """Bytes of distinct tensors autograd keeps for backward (a tensor saved twice counts once)."""
    seen: dict[tuple[int, int], int] = {}

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # counted in state_bytes

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[(ptr, t.storage_offset())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
            loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def state_bytes(model: nn.Module) -> int:
    params = {id(p): p for p in model.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    return weights + 3 * trainable  # gradient + AdamW's two moments for every trainable parameter


def pissa_init_times(args) -> dict[str, float]:
    torch.manual_seed(0)
    model = avl_peft.create_backbone("vit_base_patch16_224", num_classes=10).to(args.device)
    out = {}
    for label, niter in (("exact", None), (f"svd_niter={args.svd_niter}", args.svd_niter)):
        m = copy.deepcopy(model)
        t = timed(lambda m=m, n=niter: avl_peft.inject(m, "pissa", rank=args.rank, svd_niter=n), args.device)
        out[label] = t
    return out


def end_to_end(args) -> dict[str, float]:
    """The quickstart's pipeline (Avalanche loop, data loading, callbacks, metrics, logging) against the
    pure model step for the same images: one LoRA experience of the offline digits scenario."""
    import tempfile

    from avl_peft.study.experiment import build
    from avl_peft.study.grid import expand, load_study

    config = Path(__file__).parent.parent / "configs" / "quickstart.yaml"
    study = load_study(config, ["training.pretrain=false", "variants=[{method.name: lora}]", "training.epochs=2"])
    _, cfg = expand(study)[0]
    with tempfile.TemporaryDirectory() as tmp:
        parts = build(cfg, Path(tmp))
        strategy, experience = parts.strategy, parts.benchmark.train_stream[0]
        strategy.train(experience)  # warm-up: injection, optimizer, first-iteration allocations
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
        times = interleaved({"pipeline": lambda: strategy.train(experience), "model": pure}, 5, "cpu", warmup=0)
        pipeline, model_only = times["pipeline"] / n, times["model"] / n
    return {"pipeline_s_per_image": pipeline, "model_s_per_image": model_only, "overhead": pipeline / model_only - 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--img-size", type=int, default=32, help="0: the model's own size")
    ap.add_argument("--patch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--svd-niter", type=int, default=4)
    ap.add_argument("--skip-pissa-init", action="store_true")
    ap.add_argument("--skip-end-to-end", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    variants = make_variants(args)
    size = args.img_size or 224
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, size, size, generator=g).to(args.device)
    y = torch.randint(0, 100, (args.batch,), generator=g).to(args.device)

    steppers = {k: Stepper(m, args) for k, m in variants.items()}
    train = interleaved({k: (lambda s=s: s(x, y)) for k, s in steppers.items()}, args.rounds, args.device)
    limit = train["limit"]

    # Evaluation: plain backbone, each method unmerged and merged.
    plain = backbone(args).eval()
    evals = {"plain": plain}
    for m in METHODS:
        evals[f"{m}"] = variants[m].eval()
        merged = avl_peft.merge(copy.deepcopy(variants[m]))
        evals[f"{m}_merged"] = merged.eval()

    def infer(model):
        with torch.no_grad(), torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
            model(x)

    ev = interleaved({k: (lambda m=m: infer(m)) for k, m in evals.items()}, args.rounds, args.device)

    memory = {}
    for k, m in variants.items():
        memory[k] = {
            "saved_for_backward_mb": saved_bytes(m.train(), x, y, args) / 2**20,
            "weights_grads_optimizer_mb": state_bytes(m) / 2**20,
        }
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            steppers[k](x, y)
            memory[k]["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20

    results = {
        "machine": socket.gethostname(),
        "date": dt.date.today().isoformat(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "args": vars(args),
        "train_step_s": train,
        "train_ratio_to_limit": {k: v / limit for k, v in train.items()},
        "ours_over_peft_lora": train["lora"] / train["peft_lora"] if "peft_lora" in train else None,
        "eval_s": ev,
        "eval_ratio_to_plain": {k: v / ev["plain"] for k, v in ev.items()},
        "memory": memory,
        "params": {k: avl_peft.parameter_counts(m) for k, m in variants.items() if k != "peft_lora"},
    }
    if not args.skip_pissa_init:
        results["pissa_init_vit_b16_s"] = pissa_init_times(args)
    if not args.skip_end_to_end and args.device == "cpu":
        results["end_to_end"] = end_to_end(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{args.model}-{size}px-{args.device}{'-bf16' if args.bf16 else ''}"
    path = out / f"{results['machine']}-{results['date']}-{tag}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"train step / frozen-backbone limit (median of {args.rounds}, batch {args.batch}):")
    for k, v in results["train_ratio_to_limit"].items():
        print(f"  {k:<10} {train[k] * 1000:8.1f} ms  {v:5.2f}x")
    if results["ours_over_peft_lora"]:
        print(f"ours/peft LoRA: {results['ours_over_peft_lora']:.3f}")
    print("eval time / plain backbone:")
    for k, v in results["eval_ratio_to_plain"].items():
        print(f"  {k:<16} {v:5.3f}")
    if "end_to_end" in results:
        e = results["end_to_end"]
        print(f"quickstart pipeline vs pure model step: +{e['overhead'] * 100:.1f}% per image")
    if "pissa_init_vit_b16_s" in results:
        print("PiSSA init on ViT-B/16:", {k: round(v, 2) for k, v in results["pissa_init_vit_b16_s"].items()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
