"""One continual-learning run, end to end: model, scenario, strategy + plugins, train/eval, results.

``run_experiment(cfg, run_dir)`` takes one resolved run config (:mod:`.config.schema`) and writes ``run_dir/``:
``config.yaml``, ``results.json`` (:mod:`.results`), TensorBoard events in ``tb/`` and adapter/head
checkpoints per experience in ``checkpoints/``. :func:`build` wires the parts and returns them as a
:class:`RunParts` for tests and custom loops.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from .. import atomic, threads
from ..adapters.inject import parameter_counts
from ..backbones import data_config
from ..cl import distributed
from ..cl.backbone import create_continual_model
from ..cl.checkpoints import checkpoint_files, rebuild_model
from ..cl.evaluation import AccuracyMatrixPlugin, make_evaluator
from ..cl.heads import StatisticsHeadPlugin, build_head, head_options
from ..cl.loss import TrainMaskLoss
from ..cl.plugin import PEFTPlugin
from ..cl.precision import CompilePlugin, InferenceModeEval, PrecisionPlugin, check_precision, loader_options
from ..cl.scenarios import build_scenario
from ..cl.scenarios.validation import carve_validation
from ..cl.strategies import STRATEGIES, strategy_options
from ..cl.strategies.state import StateContext, tag_experience
from ..cl.training import (
    BatchProgress,
    DivergenceGuard,
    check_base_session,
    make_optimizer,
    resolve_device,
    seed_everything,
)
from ..errors import ConfigError
from ..hardware import hardware_info, peak_memory_mb, reset_peak_memory, resolve_precision
from ..instruments.metrics import summarize_both
from ..instruments.tracker import SubspaceTracker
from . import results
from . import resume as run_state
from .parts import RunParts
from .records import heads_block, resolve_budget, resolve_checkpoint, scaling_block, versions, weights_provenance
from .upstream import build_upstream


def probe_batch(benchmark: Any, size: int) -> torch.Tensor:
    """A fixed probe batch for feature drift: the first images of every test experience, in turn."""
    streams = list(benchmark.test_stream)
    per = max(1, -(-size // len(streams)))
    images = []
    for experience in streams:
        ds = experience.dataset
        images += [ds[i][0] for i in range(min(per, len(ds)))]
    return torch.stack(images[:size])


def build(
    cfg: dict,
    run_dir: Path | None,
    *,
    progress: bool = False,
    process_settings: bool = False,
    validation: dict | None = None,
) -> RunParts:
    """Everything a run needs, wired together (exposed for tests and for custom loops).

    ``process_settings``: apply avl-peft's process-wide policy (threads, allocator; :mod:`avl_peft.threads`)
    and let ``training.compile`` reset Dynamo; the CLI's processes have it already. ``validation`` (a run's
    ``validation`` section): train on the training data minus a carved validation split and test on that
    split (:func:`~avl_peft.cl.scenarios.validation.carve_validation`), for the trials of a search
    (:mod:`.search`); the test set is then never read.
    """
    training, method = cfg["training"], cfg["method"]
    if process_settings and not threads.configured():
        threads.configure()
    threads.for_run(training["threads"])
    seed_everything(cfg["seed"])
    device = resolve_device(training["device"])
    reset_peak_memory(device)  # runs of a study share a process: each records its own peak
    resolved_precision = resolve_precision(training["precision"], device)  # auto: bf16 only where native
    check_precision(resolved_precision, device)
    bb = cfg["backbone"]
    task_incremental = training["task_incremental"]
    checkpoint = resolve_checkpoint(bb)

    def new_model() -> torch.nn.Module:
        return create_continual_model(
            bb["name"],
            head="multi" if task_incremental else "incremental",
            pretrained=bb["pretrained"],
            checkpoint=checkpoint,
            **bb["kwargs"],
        )

    model = new_model()
    budget = resolve_budget(cfg, model)
    options = budget["options"] if budget is not None else method["options"]
    sc = cfg["scenario"]
    benchmark = build_scenario(
        sc["name"],
        n_experiences=sc["n_experiences"],
        seed=cfg["seed"],
        root=sc["root"],
        task_labels=task_incremental,
        **data_config(model.backbone),
        **sc["options"],
    )
    if validation is not None:
        seed = cfg["seed"] if validation["seed"] is None else validation["seed"]
        benchmark, _ = carve_validation(
            benchmark, fraction=validation["fraction"], seed=seed, experiences=validation["experiences"]
        )
    n_exp = len(benchmark.train_stream)
    check_base_session(training["pretrain"], n_exp)  # the scenario's real count (the config may leave it null)
    criterion = TrainMaskLoss(training["train_mask"])
    matrix = AccuracyMatrixPlugin(n_exp)
    peft = PEFTPlugin(
        method["name"],
        policy=method["policy"],
        pretrain=training["pretrain"],
        targets=method["targets"],
        checkpoint_dir=run_dir / "checkpoints" if run_dir is not None else None,
        init_from=method.get("init_from"),
        **options,
    )
    spec = STRATEGIES.get(cfg["strategy"]["name"])
    if not spec.owns_model:
        peft.check(model)  # targets, rank and trainable against this backbone, before anything trains
    precision = PrecisionPlugin(resolved_precision)
    plugins = [peft, matrix, criterion, DivergenceGuard(), precision, InferenceModeEval()]
    if training["compile"]:
        plugins.append(CompilePlugin(reset=threads.configured()))  # after peft: compiles the injected model
    batch_size = training["batch_size"]
    world = distributed.world_size()
    if world > 1:  # torchrun: same global batch, each process takes its share and gradients are averaged
        if batch_size % world:
            raise ConfigError(f"training.batch_size {batch_size} must divide by the {world} torchrun processes")
        batch_size //= world
        plugins.append(distributed.GradientAverage())
    stateful: dict[str, Any] = {"peft": peft, "criterion": criterion}
    linear_matrix = None
    head = build_head(training["head"], model.backbone.num_features, seed=cfg["seed"], **training["head_options"])
    head_opts = head_options(training["head"], **training["head_options"])
    if head is not None or head_opts.uses_moments:  # class statistics and/or alignment of the linear head
        stateful["classifier"] = StatisticsHeadPlugin(
            head,
            feature_fn=spec.features,
            options=head_opts,
            feature_dim=model.backbone.num_features,
            seed=cfg["seed"],
        )
        plugins.append(stateful["classifier"])
    if head is not None:  # a statistics head replaces the linear one for evaluation; both are recorded
        linear_matrix = AccuracyMatrixPlugin(n_exp, output="linear_output")
        plugins.append(linear_matrix)
    # A strategy that owns its model (L2P) keeps the backbone frozen and has no `backbone` to probe: skipped.
    upstream = None if spec.owns_model else build_upstream(cfg, model, checkpoint)
    if upstream is not None:
        stateful["upstream"] = upstream
        plugins.append(upstream)
    tracker = None
    sub = cfg.get("subspace") or {}
    if sub.get("enabled") and spec.trains_weights:  # prompt-only strategies make no weight update to measure
        tracker = SubspaceTracker(
            probe_batch(benchmark, sub["probe_size"]),
            k=sub["k"],
            exact=sub["exact"],
            targets=method["targets"],
            base_session=training["pretrain"],
        )
        plugins.append(tracker)
    if progress:
        plugins.append(BatchProgress(method["name"]))
    # Avalanche allows loggers only in the main process of a torchrun group.
    log_dir = str(run_dir / "tb") if run_dir is not None and distributed.rank() == 0 else None
    evaluator = make_evaluator(log_dir)
    optimizer = make_optimizer(
        model.parameters(), training["optimizer"], training["lr"], training["weight_decay"], training["momentum"]
    )
    strategy = spec.build(
        model,
        optimizer,
        criterion,
        train_mb_size=batch_size,
        train_epochs=training["epochs"],
        eval_mb_size=training["eval_batch_size"],
        device=device,
        plugins=plugins,
        evaluator=evaluator,
        eval_every=-1,
        **strategy_options(spec.name, cfg["strategy"]["options"]),
    )
    if tracker is not None:
        stateful["tracker"] = tracker
    if linear_matrix is not None:
        stateful["linear_matrix"] = linear_matrix
    if precision.precision == "fp16":
        stateful["precision"] = precision  # the loss scale
    context = StateContext(
        dataset=lambda e: tag_experience(benchmark.train_stream[e], e).dataset,
        rebuild_model=lambda injected, lineage, state: rebuild_model(
            new_model(), injected, state, lineage=lineage, experiences=benchmark.test_stream, strict=False
        ).to(device),
        device=device,
    )
    return RunParts(
        model,
        benchmark,
        strategy,
        matrix,
        peft,
        evaluator,
        device,
        tracker,
        budget,
        stateful,
        spec,
        context,
        weights=weights_provenance(bb, checkpoint),
        precision=resolved_precision,
    )


def _clear_checkpoints(run_dir: Path, start: int) -> None:
    """Remove ``exp_<t>.pt`` for t >= start: left by an interrupted attempt, they are retrained now."""
    for t, path in checkpoint_files(run_dir / "checkpoints").items():
        if t >= start:
            path.unlink()


def run_experiment(
    cfg: dict,
    run_dir: str | os.PathLike,
    *,
    run_id: str = "run",
    progress: bool = True,
    resume: bool = False,
    process_settings: bool = False,
    validation: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """Train and evaluate one run; write its folder; return the results dict.

    With ``resume``, continue from the newest intact ``state_<t>.pt`` in ``run_dir`` (see
    :mod:`.resume`); otherwise start from scratch (old states are removed). ``process_settings`` opts a
    library caller into the CLI's process-wide settings (see :func:`build`); off, only ``training.threads``
    (when set) changes the process. ``validation``: a search trial (see :func:`build`); ``extra``: blocks
    added to results.json (a search's), written with it, atomically.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    spec = STRATEGIES.get(cfg["strategy"]["name"])
    resumable = spec.resumable
    if resume and not resumable and list(run_dir.glob("state_*.pt")):
        tqdm.write(
            f"resume {run_id}: strategy '{spec.name}' cannot resume exactly ({spec.resume_note}); restarting this "
            "run from experience 0"
        )
    if not (resume and resumable):
        run_state.clear_states(run_dir)
    parts = build(cfg, run_dir, progress=progress, process_settings=process_settings, validation=validation)
    strategy, benchmark, matrix = parts.strategy, parts.benchmark, parts.matrix
    training = cfg["training"]
    done = {"train_s": 0.0, "eval_s": 0.0, "images": 0, "counts": None}
    start_exp = 0
    if resume and resumable:
        state = run_state.load_run_state(run_dir)
        if state is not None:
            done = parts.load_state_dict(state, run_dir)
            run_state.set_rng_state(state["rng"])  # last: restoring the parts may draw random numbers
            start_exp = done["resumed_at_experience"] = state["experience"] + 1
    _clear_checkpoints(run_dir, start_exp)
    n_exp = len(benchmark.train_stream)
    bar = tqdm(total=n_exp, initial=start_exp, desc=run_id, unit="exp", disable=not progress)
    for t, experience in enumerate(benchmark.train_stream):
        if t < start_exp:
            continue
        base = training["pretrain"] and t == 0
        strategy.train_epochs = (training["pretrain_epochs"] or training["epochs"]) if base else training["epochs"]
        lr = (training["pretrain_lr"] or training["lr"]) if base else training["lr"]
        for group in strategy.optimizer.param_groups:
            group["lr"] = lr
        strategy.optimizer.defaults["lr"] = lr
        tag_experience(experience, t)  # sample ids: buffers are saved as ids (cl.strategies.state)
        start = time.perf_counter()
        strategy.train(experience, **loader_options(parts.device, training["num_workers"]))
        done["train_s"] += time.perf_counter() - start
        done["images"] += len(experience.dataset) * strategy.train_epochs
        if not base:  # as the experience trained (the plugin may have added the next one's adapter since)
            done["counts"] = parts.peft.trained_counts or parameter_counts(strategy.model)
        start = time.perf_counter()
        strategy.eval(benchmark.test_stream, **loader_options(parts.device, training["num_workers"]))
        done["eval_s"] += time.perf_counter() - start
        if t < n_exp - 1:
            run_state.save_run_state(run_dir, t, parts.state_dict(done))
        row = matrix.matrices["class_incremental"][t][: t + 1]
        bar.set_postfix(acc=f"{np.mean(row):.3f}")
        bar.update(1)
    bar.close()
    last = parts.evaluator.get_last_metrics()
    for logger in parts.evaluator.loggers:  # flush TensorBoard files before results.json marks the run done
        getattr(logger, "close", lambda: None)()
    tracker = parts.tracker
    out = {
        "schema": results.SCHEMA_VERSION,
        "status": "finished",
        "run": results.run_info(run_id, cfg, parts.budget["options"] if parts.budget else None),
        "config": cfg,
        "versions": versions(),
        "precision": parts.precision,
        "hardware": hardware_info(parts.device),
        "params": done["counts"] or parameter_counts(strategy.model),
        "budget": parts.budget,
        "scaling": scaling_block(cfg, parts.budget),
        "backbone_weights": parts.weights,
        "classes_order": [int(c) for c in getattr(benchmark, "classes_order", [])],
        "accuracy_matrix": matrix.matrices,
        "metrics": summarize_both(matrix.matrices),
        # Avalanche's own values; after a resume they cover only the experiences since the restart.
        "avalanche_metrics": {
            k: float(v) for k, v in last.items() if k.startswith(("StreamForgetting", "StreamBWT", "Top1_Acc_Stream"))
        },
        "subspace": [{k: v for k, v in r.items() if k != "layers"} for r in tracker.records] if tracker else [],
        "subspace_layers": [r.get("layers", {}) for r in tracker.records] if tracker else [],
        "timing": {
            "train_s": done["train_s"],
            "eval_s": done["eval_s"],
            "subspace_s": tracker.seconds if tracker else 0.0,
            "images_per_s": done["images"] / done["train_s"] if done["train_s"] > 0 else 0.0,
            "peak_memory_mb": peak_memory_mb(parts.device),
            "threads": torch.get_num_threads(),
        },
    }
    out["heads"] = heads_block(cfg, parts)
    if "upstream" in parts.stateful:
        plugin = parts.stateful["upstream"]
        out["upstream"] = {"dataset": cfg["upstream"]["dataset"], "head": cfg["upstream"]["head"], **plugin.summary()}
        out["timing"]["upstream_s"] = plugin.seconds
    if "resumed_at_experience" in done:
        out["resumed_at_experience"] = done["resumed_at_experience"]
    if validation is not None:
        out["validation"] = getattr(benchmark, "scenario_config", {}).get("validation")
    out.update(extra or {})
    results.write(run_dir, out)
    run_state.clear_states(run_dir)  # finished: results.json and the per-experience checkpoints remain
    return out
