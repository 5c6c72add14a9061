"""Time ``avl_peft.export`` of a ViT-B/16-sized adapter on CPU (issue: under 10 s).

A run folder is made without training (that would take hours on CPU and changes nothing about the export's
cost): ``vit_base_patch16_224`` with random init (no download), LoRA rank 8 on every default target
(attn.qkv, attn.proj, mlp.fc1, mlp.fc2 of the 12 blocks) with random factors, a 10-class head, saved as
``exp_0.pt`` with a ``results.json`` as a finished run writes it. Then ``export(..., format=peft)`` and
``format=timm`` are timed end to end (fresh model, base identity, restore, conversion, writes), each
``--repeats`` times into fresh folders; the median and all times go to
``benchmarks/results/export-<machine>-<date>.json`` with the hardware block and the machine's load.

    python benchmarks/export_speed.py [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import avl_peft
from avl_peft import atomic
from avl_peft.cl.backbone import create_continual_model
from avl_peft.cl.checkpoints import save_checkpoint
from avl_peft.cl.training import seed_everything
from avl_peft.hardware import hardware_info
from avl_peft.study.config import expand, validate_study
from avl_peft.study.experiment import versions


def make_run(folder: Path) -> dict:
    data = {
        "backbone": {"name": "vit_base_patch16_224"},
        "scenario": {"name": "synthetic", "n_experiences": 1},
        "method": {"name": "lora", "options": {"rank": 8}},
    }
    ((_, cfg),) = expand(validate_study(data))
    seed_everything(cfg["seed"])
    model = create_continual_model("vit_base_patch16_224", initial_classes=10)
    avl_peft.inject(model, "lora", rank=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.head.active_units[:] = 1
    save_checkpoint(model, folder / "checkpoints" / "exp_0.pt", 0, method="lora", policy="continue")
    results = {
        "schema": 2,
        "status": "finished",
        "run": {"id": "vit_base-lora-r8"},
        "config": cfg,
        "versions": versions(),
        "backbone_weights": {"source": "random_init", "name": "vit_base_patch16_224"},
        "classes_order": list(range(10)),
        "accuracy_matrix": {"class_incremental": [[0.0]], "task_aware": [[0.0]]},
    }
    atomic.write_json(folder / "results.json", results)
    return {"adapter_params": avl_peft.parameter_counts(model)["adapter"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    record = {"what": "avl_peft.export of a ViT-B/16 LoRA rank-8 run (one experience), CPU", "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        start = time.perf_counter()
        record.update(make_run(run))
        record["make_run_s"] = time.perf_counter() - start
        for fmt in ("peft", "timm"):
            times, loads = [], []
            for i in range(args.repeats):
                out = Path(tmp) / f"{fmt}{i}"
                start = time.perf_counter()
                avl_peft.export(run, out=out, format=fmt, experience="last")
                times.append(time.perf_counter() - start)
                loads.append(os.getloadavg()[0])
                size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
            record[fmt] = {"median_s": statistics.median(times), "times_s": times, "load_1min": loads, "bytes": size}
            print(
                f"{fmt}: median {statistics.median(times):.2f} s over {args.repeats} ({size / 2**20:.1f} MiB written)"
            )
    record["hardware"] = hardware_info()
    record["date"] = datetime.date.today().isoformat()
    name = f"export-{os.uname().nodename.split('.')[0][:20] or 'machine'}-{record['date']}.json"
    out = Path(__file__).parent / "results" / name
    atomic.write_json(out, record)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
