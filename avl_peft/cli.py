"""``avl-peft``: run studies from YAML, report them, list what is available. Thin: calls the library."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

from . import threads
from .errors import AvlPeftError


def _cmd_run(args: argparse.Namespace) -> int:
    from .safeio import default_out_dir
    from .study.config import expand, load_study
    from .study.run_study import plan, run_study
    from .study.search import trials as search_trials

    study = load_study(args.config, args.set, dry_run=args.dry_run)
    from .cl.distributed import init_from_env, rank

    init_from_env(study["seed"], study["training"]["device"])  # no-op unless launched by torchrun
    if rank() != 0:
        args.quiet = True
    # Without --out: runs/<config name>, made one safe folder name (a config named '...yaml' gives runs/__,
    # never runs/..).
    out = Path(args.out) if args.out else default_out_dir(args.config)
    if args.dry_run:
        runs = (
            plan(study, out, resume=True, force=args.force)
            if out.exists()
            else [(rid, cfg, "run") for rid, cfg in expand(study)]
        )
        print(f"{args.config}: valid, {len(runs)} run(s) -> {out}")
        for rid, cfg, action in runs:
            n_trials = len(search_trials(cfg)) if cfg.get("search") else 0  # chosen on validation first
            shared = n_trials and cfg["validation"]["per"] == "variant"  # trained once for all the variant's seeds
            extra = f"  (+ {n_trials} {'shared ' if shared else ''}validation trials)" if n_trials else ""
            print(f"  {'skip' if action == 'skip' else 'run '}  {rid}{extra}")
        return 0
    summary = run_study(
        study,
        out,
        resume=args.resume,
        force=args.force,
        since_ns=args.since_ns,
        progress=not args.quiet,
        executor=args.executor,
        workers=args.workers,
        ray_address=args.ray_address,
    )
    failed = [s for s in summary if s["status"] == "failed"]
    done = sum(s["status"] == "finished" for s in summary)
    skipped = sum(s["status"] == "skipped" for s in summary)
    if rank() == 0:
        # One line per run, and for those this process did not train, why: with two processes on one folder,
        # each says which runs the other one had (running, or finished meanwhile), so none is trained twice.
        for s in summary:
            why = {"skipped": s.get("reason", "already finished"), "failed": s.get("error", "")}.get(s["status"])
            print(f"  {s['status']:<8} {s['id']}" + (f": {why}" if why else ""))
        print(f"{done} run(s) finished, {skipped} skipped, {len(failed)} failed -> {out}")
        print(f"next: avl-peft report {out}")
    return 1 if failed else 0


def _started_ns() -> int:
    """When this process started: results another avl-peft process writes after that are its, not redone.

    The launch time, not the time planning begins (seconds of imports later), so that two commands started
    a second apart each leave to the other what it finished first.
    """
    try:
        import psutil  # an Avalanche dependency

        return int(psutil.Process().create_time() * 1e9)
    except Exception:  # no psutil, or a platform it cannot read: planning time is the next best thing
        return time.time_ns()


def _cmd_report(args: argparse.Namespace) -> int:
    from .study.report import build_report, format_table

    rows = build_report(args.dir, args.out)
    print(format_table(rows))
    print(f"\nwrote {Path(args.out or args.dir) / 'report.md'}, report.csv and plots/")
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from .pretrain import (
        check_output,
        config_hash,
        find_or_build,
        load_pretrain_config,
        output_dir,
        pretrain,
        read_card,
    )

    cfg = load_pretrain_config(args.config)
    if args.dry_run:
        out = Path(args.out) if args.out else output_dir(cfg)
        why = check_output(out, cfg) if out.exists() else "not built yet"
        state = "built, would be reused" if not why else f"would be trained ({why})"
        if args.force:
            state = "would be retrained (--force)"
        print(f"{args.config}: valid, config hash {config_hash(cfg)} -> {out}: {state}")
        return 0
    if args.out:
        out = pretrain(cfg, args.out, force=args.force, progress=not args.quiet)
    else:
        out = find_or_build(cfg, force=args.force, progress=not args.quiet)
    card = read_card(out)  # bounded, schema-checked, and the weights verified against it under the lock
    precision = card.get("precision", "?")
    filled = card.get("test_accuracy_filled")  # cards of recipe 1 have no fill-convention figure
    also = "" if filled is None else f", {filled:.3f} on them scaled to fill the canvas"
    print(
        f"{out}: held-out-family accuracy {card['test_accuracy']:.3f}{also} "
        f"({card['wall_time_s']:.0f} s to train, {precision})"
    )
    print(f"use it with  backbone.checkpoint: {out}   (or backbone.pretrain: {args.config})")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .study.export import export

    content = export(args.run_dir, out=args.out, format=args.format, experience=args.experience)
    names = ", ".join(content["experiences"])
    print(f"exported {names} of {args.run_dir} ({content['run']['method']}) as {args.format} -> {args.out}")
    print(f"card: {Path(args.out) / 'avl_peft_export.json'}; load with avl_peft.load_{args.format}('{args.out}')")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from .adapters import METHODS
    from .cl.heads import HEADS
    from .cl.scenarios import SCENARIOS
    from .cl.strategies import STRATEGIES

    registries = (
        ("methods", METHODS),
        ("scenarios", SCENARIOS),
        ("strategies", STRATEGIES),
        ("classifier heads (training.head)", HEADS),
    )
    for title, reg in registries:
        print(f"{title}:")
        for name, doc in reg.describe().items():
            entry = reg.get(name)
            tags = "; ".join(getattr(entry, "capabilities", lambda: [])())
            note = getattr(entry, "resume_note", "")  # strategies: why a run cannot resume exactly
            print(f"  {name:<15} {doc}" + (f"  [{tags}]" if tags else "") + (f" ({note})" if note else ""))
    return 0


def _cmd_budget(args: argparse.Namespace) -> int:
    from .adapters.budget import budget_table
    from .backbones import check_backbone_kwargs, meta_backbone
    from .errors import ConfigError
    from .safeio import parse_yaml
    from .validate import check_finite

    kwargs = {}
    for item in args.timm:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigError(f"--timm {item!r}: expected key=value with a timm argument name, e.g. --timm img_size=32")
        # The same strict reader as config files (no python tags, no alias bombs), and the same checks.
        kwargs[key] = check_finite(parse_yaml(raw, what=f"--timm {key}"), f"--timm {key}")
    check_backbone_kwargs(kwargs, where="--timm")
    model = meta_backbone(args.backbone, what="--timm", **kwargs)  # shapes only: no memory, no weights
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
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and list the runs, train nothing (a device missing here is a warning; data are not read)",
    )
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--executor", help="sequential, local or ray: where runs execute (default: config)")
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
    pt = sub.add_parser("pretrain", help="pretrain a backbone offline (glyphs) and cache it for backbone.pretrain")
    pt.add_argument("config", help="pretrain YAML, e.g. configs/pretrain_glyphs.yaml")
    pt.add_argument("--out", help="output folder (default: the cache, ~/.cache/avl-peft/pretrain/<name>-<hash>)")
    pt.add_argument("--force", action="store_true", help="retrain even if a valid output exists")
    pt.add_argument("--quiet", action="store_true", help="no progress bar")
    pt.add_argument(
        "--dry-run", action="store_true", help="validate the config and show the output folder, train nothing"
    )
    pt.set_defaults(func=_cmd_pretrain)
    ex = sub.add_parser("export", help="a run's adapters as a Hugging Face peft folder or merged timm weights")
    ex.add_argument("run_dir", help="the folder of one finished run (runs/<study>/<run id>)")
    ex.add_argument("--experience", default="last", help="index of the experience, 'last' (default) or 'all'")
    ex.add_argument("--format", choices=["peft", "timm"], default="peft", help="peft adapter or merged timm weights")
    ex.add_argument("--out", required=True, help="a new or empty folder to write")
    ex.set_defaults(func=_cmd_export)
    ls = sub.add_parser("list", help="methods, scenarios and strategies")
    ls.set_defaults(func=_cmd_list)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    # Warnings (a results file skipped by the report, ...) are messages for the user, not source locations.
    print(f"avl-peft: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    threads.configure()  # this process's thread budget (README: Threads); training.threads overrides per run
    # Run as a program: its launch time; called from Python with arguments (tests, notebooks): this call.
    args.since_ns = _started_ns() if argv is None else time.time_ns()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with warnings.catch_warnings():  # restores the caller's warning settings (main is also called in-process)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.showwarning = _show_warning
        return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> int:
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
