"""``avl-peft``: run studies from YAML, report them, list what is available. Thin: calls the library."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from .errors import AvlPeftError


def _cmd_run(args: argparse.Namespace) -> int:
    from .study.grid import expand, load_study
    from .study.runner import plan, run_study

    study = load_study(args.config, args.set)
    from .cl.distributed import init_from_env, rank

    init_from_env(study["seed"], study["training"]["device"])  # no-op unless launched by torchrun
    if rank() != 0:
        args.quiet = True
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    if args.dry_run:
        runs = (
            plan(study, out, resume=True, force=args.force)
            if out.exists()
            else [(rid, cfg, "run") for rid, cfg in expand(study)]
        )
        print(f"{args.config}: valid, {len(runs)} run(s) -> {out}")
        for rid, _, action in runs:
            print(f"  {'skip' if action == 'skip' else 'run '}  {rid}")
        return 0
    summary = run_study(
        study,
        out,
        resume=args.resume,
        force=args.force,
        progress=not args.quiet,
        executor=args.executor,
        workers=args.workers,
        ray_address=args.ray_address,
    )
    failed = [s for s in summary if s["status"] == "failed"]
    done = sum(s["status"] == "finished" for s in summary)
    skipped = sum(s["status"] == "skipped" for s in summary)
    if rank() == 0:
        print(f"{done} run(s) finished, {skipped} skipped, {len(failed)} failed -> {out}")
        print(f"next: avl-peft report {out}")
    return 1 if failed else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .study.report import build_report, format_table

    rows = build_report(args.dir, args.out)
    print(format_table(rows))
    print(f"\nwrote {Path(args.out or args.dir) / 'report.md'}, report.csv and plots/")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from .adapters import METHODS
    from .cl.scenarios import SCENARIOS
    from .cl.strategies import STRATEGIES

    for title, reg in (("methods", METHODS), ("scenarios", SCENARIOS), ("strategies", STRATEGIES)):
        print(f"{title}:")
        for name, doc in reg.describe().items():
            print(f"  {name:<15} {doc}")
            entry = reg.get(name)
            if hasattr(entry, "capabilities"):  # strategies: memory, exact resume (or why not), own model
                flags = ", ".join(entry.capabilities())
                note = f" ({entry.resume_note})" if entry.resume_note else ""
                print(f"  {'':<15}   [{flags}]{note}")
    return 0


def _cmd_budget(args: argparse.Namespace) -> int:
    import torch
    import yaml

    from .adapters.budget import budget_table
    from .cl.backbone import create_backbone
    from .errors import ConfigError

    kwargs = {}
    for item in args.timm:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--timm {item!r}: expected key=value, e.g. --timm img_size=32")
        kwargs[key] = yaml.safe_load(raw)
    with torch.device("meta"):  # shapes only: no memory, no weights, instant even for ViT-L
        model = create_backbone(args.backbone, num_classes=1, **kwargs)
    rows = budget_table(model, args.budget, targets=args.targets)
    print(
        f"adapter parameters <= {args.budget:,} on {args.backbone}"
        f" (targets: {', '.join(args.targets) if args.targets else 'attn.qkv, attn.proj, mlp.fc1, mlp.fc2'})"
    )
    print(f"{'method':<10} {'options':<24} {'adapter params':>15}")
    for row in rows:
        if row.get("error"):
            print(f"{row['method']:<10} {'-':<24} {'-':>15}   {row['error']}")
        else:
            opts = ", ".join(f"{k}={v}" for k, v in row["options"].items())
            print(f"{row['method']:<10} {opts:<24} {row['adapter_params']:>15,}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="avl-peft", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a study described by a YAML file")
    r.add_argument("config", help="study YAML")
    r.add_argument("--out", help="output folder (default: runs/<config name>)")
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set training.lr=0.001 (repeatable)",
    )
    r.add_argument("--resume", action="store_true", help="skip finished runs, redo interrupted ones")
    r.add_argument("--force", action="store_true", help="redo runs that already have results")
    r.add_argument("--dry-run", action="store_true", help="validate and list the runs, train nothing")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--executor", choices=["sequential", "local", "ray"], help="where runs execute (default: config)")
    r.add_argument("--workers", type=int, help="processes for --executor local")
    r.add_argument("--ray-address", help="Ray cluster address for --executor ray (default: start Ray locally)")
    r.set_defaults(func=_cmd_run)
    rep = sub.add_parser("report", help="comparison table and plots from a folder of runs")
    rep.add_argument("dir", help="folder holding run folders with results.json")
    rep.add_argument("--out", help="where to write report.md/.csv and plots (default: DIR)")
    rep.set_defaults(func=_cmd_report)
    b = sub.add_parser("budget", help="per method, the rank whose adapter fits a parameter budget")
    b.add_argument("budget", type=int, help="maximum number of adapter parameters")
    b.add_argument("--backbone", default="vit_base_patch16_224", help="timm model name")
    b.add_argument("--targets", nargs="+", default=None, help="module-name suffixes or regexes")
    b.add_argument(
        "--timm",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="timm.create_model argument, e.g. --timm img_size=32 (repeatable)",
    )
    b.set_defaults(func=_cmd_budget)
    ls = sub.add_parser("list", help="methods, scenarios and strategies")
    ls.set_defaults(func=_cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return args.func(args)
    except AvlPeftError as e:
        print(f"avl-peft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("avl-peft: interrupted; finished runs are kept, rerun with --resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
