"""Seconds per training step of the glyph pretrain's model in fp32 and bf16, per CPU class.

Why: bf16 autocast is fast only where the CPU multiplies bf16 natively (AMX, AVX512-BF16); elsewhere it is
emulated. This probe shows the cost on this machine, and — by capping the ISA of a child process
(``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``) — on the AVX2 class, so that the cap can be shown
to reproduce what a real AVX2-only CPU does before it is used to time anything else.

    python benchmarks/precision_probe.py                 # both classes, 1 thread, writes benchmarks/results/
    python benchmarks/precision_probe.py --steps 8 --threads 2

Each (class, precision) cell runs in a fresh process: the caps only take effect before torch loads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
AVX2_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def child(precision: str, steps: int, threads: int) -> dict:
    """Time ``steps`` pretrain steps (after 2 warm-up steps) in this process; return the cell."""
    import torch
    import torch.nn.functional as F

    from avl_peft.cl.scenarios.glyphs import GlyphDataset
    from avl_peft.hardware import hardware_info
    from avl_peft.pretrain import load_pretrain_config
    from avl_peft.pretrain.training import _create_model, data_config, to_model_input

    torch.set_num_threads(threads)
    cfg = load_pretrain_config(HERE.parent / "configs" / "pretrain_glyphs.yaml")
    torch.manual_seed(0)
    model = _create_model(cfg, patch_drop=cfg["training"]["patch_drop"]).train()
    dcfg = data_config(model, cfg["data"]["img_size"])
    data = GlyphDataset("train", 4, seed=0, img_size=cfg["data"]["img_size"], test_fraction=0.25, jitter=0.7)
    images, labels = data.render(list(range(cfg["training"]["batch_size"])))
    x = to_model_input(images, dcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return {
        "precision": precision,
        "step_s_median": statistics.median(times),
        "step_s": times,
        "hardware": hardware_info(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--classes", default="native,avx2", help="comma list of native, avx2")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.threads)))
        return
    cells = []
    for cls in args.classes.split(","):
        env = {**os.environ, **(AVX2_CAPS if cls == "avx2" else {})}
        for precision in ("fp32", "bf16"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    precision,
                    "--steps",
                    str(args.steps),
                    "--threads",
                    str(args.threads),
                ],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            cell = {"class": cls, **json.loads(out.strip().splitlines()[-1])}
            cells.append(cell)
            print(
                f"{cls:6s} {precision}: {cell['step_s_median']:.3f} s/step "
                f"({cell['hardware']['cpu_capability']}, bf16 native {cell['hardware']['bf16_native']})"
            )
    ratios = {}
    for cls in {c["class"] for c in cells}:
        by = {c["precision"]: c["step_s_median"] for c in cells if c["class"] == cls}
        ratios[cls] = by["bf16"] / by["fp32"]
        print(f"{cls}: bf16 / fp32 = {ratios[cls]:.2f}")
    out = args.out or HERE / "results" / f"precision_probe-{time.strftime('%Y-%m-%d')}.json"
    out.write_text(
        json.dumps(
            {
                "what": "pretrain step (ViT-Tiny layout, 32 px, batch 32)",
                "threads": args.threads,
                "bf16_over_fp32": ratios,
                "cells": cells,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
