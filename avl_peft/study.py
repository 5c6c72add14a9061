"""One continual-learning run, end to end: model, scenario, strategy + plugins, train/eval, results.

``run_experiment(cfg, run_dir)`` takes one resolved run config (see :mod:`avl_peft.config`) and writes
``run_dir/``: ``config.yaml``, ``results.json`` (schema 1, SPEC §5), TensorBoard events in ``tb/`` and
adapter/head checkpoints per experience in ``checkpoints/``.
"""

from __future__ import annotations

import os
import platform
import random
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from avalanche.core import SupervisedPlugin
from tqdm.auto import tqdm

from . import atomic, distributed
from .backbone import create_continual_model, data_config
from .errors import ConfigError
from .evaluation import AccuracyMatrixPlugin, make_evaluator
from .metrics import summarize_both
from .peft import parameter_counts
from .plugin import PEFTPlugin
from .scenarios import build_scenario
from .strategies import STRATEGIES, TrainMaskLoss, strategy_options

SCHEMA_VERSION = 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"training.device: '{name}' requested but CUDA is not available here; use cpu")
    return torch.device(name)


def versions() -> dict[str, str]:
    import avalanche
    import timm

    from . import __version__

    return {
        "avl_peft": __version__,
        "torch": torch.__version__,
        "avalanche": getattr(avalanche, "__version__", "unknown"),
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def run_info(run_id: str, cfg: dict, options: dict | None = None) -> dict[str, Any]:
    """The ``run`` block of results.json: what distinguishes this run within its study."""
    return {
        "id": run_id,
        "method": cfg["method"]["name"],
        "strategy": cfg["strategy"]["name"],
        "seed": cfg["seed"],
        "policy": cfg["method"]["policy"],
        "options": options if options is not None else cfg["method"]["options"],
    }


def _optimizer(params, training: dict) -> torch.optim.Optimizer:
    name, lr, wd = training["optimizer"], training["lr"], training["weight_decay"]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=training["momentum"], weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; whole process


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: this run stops and is recorded as failed."""


class DivergenceGuard(SupervisedPlugin, supports_distributed=True):
    """Stops the run with :class:`TrainingDiverged` as soon as the loss is NaN or infinite."""

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if not torch.isfinite(strategy.loss).all():
            t = strategy.experience.current_experience
            raise TrainingDiverged(
                f"training diverged: loss is {float(strategy.loss.detach())} at experience {t}, epoch "
                f"{strategy.clock.train_exp_epochs}; lower training.lr or check the data"
            )


class BatchProgress(SupervisedPlugin, supports_distributed=True):
    """A per-experience progress bar (batches, with ETA) driven by Avalanche's iteration callbacks."""

    def __init__(self, label: str):
        super().__init__()
        self.label, self.bar = label, None

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        total = len(strategy.dataloader) * strategy.train_epochs
        t = strategy.experience.current_experience
        self.bar = tqdm(total=total, desc=f"{self.label} exp {t}", leave=False)

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{float(strategy.loss.detach()):.3f}", refresh=False)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.bar.close()


def probe_batch(benchmark: Any, size: int) -> torch.Tensor:
    """A fixed probe batch for feature drift: the first images of every test experience, in turn."""
    streams = list(benchmark.test_stream)
    per = max(1, -(-size // len(streams)))
    images = []
    for experience in streams:
        ds = experience.dataset
        images += [ds[i][0] for i in range(min(per, len(ds)))]
    return torch.stack(images[:size])


def resolve_budget(cfg: dict, model: torch.nn.Module) -> dict[str, Any] | None:
    """With ``budget: N``, the method's options chosen so its adapter has at most N parameters."""
    from .adapters import METHODS
    from .adapters.baselines import Baseline
    from .budget import select_for_budget

    method = cfg["method"]
    if cfg.get("budget") is None or issubclass(METHODS.get(method["name"]), Baseline):
        return None
    chosen = select_for_budget(
        method["name"], cfg["budget"], backbone_model=model, targets=method["targets"], **method["options"]
    )
    return {
        "budget": cfg["budget"],
        "options": {k: v for k, v in chosen.items() if k != "adapter_params"},
        "adapter_params": chosen["adapter_params"],
    }


def build(cfg: dict, run_dir: Path | None, *, progress: bool = False) -> dict[str, Any]:
    """Everything a run needs, wired together (exposed for tests and for custom loops)."""
    seed_everything(cfg["seed"])
    training, method = cfg["training"], cfg["method"]
    device = resolve_device(training["device"])
    bb = cfg["backbone"]
    model = create_continual_model(
        bb["name"], head=training["head"], pretrained=bb["pretrained"], checkpoint=bb["checkpoint"], **bb["kwargs"]
    )
    budget = resolve_budget(cfg, model)
    options = budget["options"] if budget is not None else method["options"]
    dc = data_config(model.backbone)
    sc = cfg["scenario"]
    benchmark = build_scenario(
        sc["name"],
        n_experiences=sc["n_experiences"],
        seed=cfg["seed"],
        root=sc["root"],
        task_labels=training["head"] == "multi",
        **dc,
        **sc["options"],
    )
    n_exp = len(benchmark.train_stream)
    if training["pretrain"] and n_exp < 2:
        raise ConfigError("training.pretrain needs at least 2 experiences (the base session plus one more)")
    criterion = TrainMaskLoss(training["train_mask"])
    matrix = AccuracyMatrixPlugin(n_exp)
    peft = PEFTPlugin(
        method["name"],
        policy=method["policy"],
        pretrain=training["pretrain"],
        targets=method["targets"],
        checkpoint_dir=run_dir / "checkpoints" if run_dir is not None else None,
        **options,
    )
    plugins = [peft, matrix, criterion, DivergenceGuard()]
    batch_size = training["batch_size"]
    world = distributed.world_size()
    if world > 1:  # torchrun: same global batch, each process takes its share and gradients are averaged
        if batch_size % world:
            raise ConfigError(f"training.batch_size {batch_size} must divide by the {world} torchrun processes")
        batch_size //= world
        plugins.append(distributed.GradientAverage())
    tracker = None
    sub = cfg.get("subspace") or {}
    if sub.get("enabled") and cfg["strategy"]["name"] != "l2p":  # l2p trains prompts: no weight update
        from .subspace import SubspaceTracker

        tracker = SubspaceTracker(probe_batch(benchmark, sub["probe_size"]), k=sub["k"], exact=sub["exact"])
        plugins.append(tracker)
    if progress:
        plugins.append(BatchProgress(method["name"]))
    # Avalanche allows loggers only in the main process of a torchrun group.
    log_dir = str(run_dir / "tb") if run_dir is not None and distributed.rank() == 0 else None
    evaluator = make_evaluator(log_dir)
    name = cfg["strategy"]["name"]
    strategy = STRATEGIES.get(name)(
        model,
        _optimizer(model.parameters(), training),
        criterion,
        train_mb_size=batch_size,
        train_epochs=training["epochs"],
        eval_mb_size=training["eval_batch_size"],
        device=device,
        plugins=plugins,
        evaluator=evaluator,
        eval_every=-1,
        **strategy_options(name, cfg["strategy"]["options"]),
    )
    return {
        "model": model,
        "benchmark": benchmark,
        "strategy": strategy,
        "matrix": matrix,
        "peft": peft,
        "evaluator": evaluator,
        "device": device,
        "tracker": tracker,
        "budget": budget,
    }


def _save_run_state(run_dir: Path, t: int, parts: dict, progress_state: dict) -> None:
    from . import runstate

    strategy, tracker = parts["strategy"], parts["tracker"]
    payload = {
        "experience": t,
        "model": {k: v.detach().cpu() for k, v in strategy.model.state_dict().items()},
        "injected": getattr(strategy.model, "peft_config", None),
        "optimizer": runstate.optimizer_state(strategy),
        "rng": runstate.rng_state(),
        "matrix": {
            "matrices": parts["matrix"].matrices,
            "seen": sorted(parts["matrix"].seen),
            "trained": parts["matrix"].trained,
        },
        "peft_experiences_done": parts["peft"].experiences_done,
        "tracker": tracker.state_dict() if tracker is not None else None,
        "progress": progress_state,
    }
    runstate.save_state(run_dir, t, payload)


def _restore_run_state(run_dir: Path, parts: dict) -> tuple[int, dict] | None:
    """Load the newest intact state into a freshly built run; the next experience index and progress."""
    from . import runstate

    state, notes = runstate.load_latest_state(run_dir)
    for note in notes:
        tqdm.write(f"resume {run_dir.name}: {note}")
    if state is None:
        return None
    strategy = parts["strategy"]
    model = strategy.model
    runstate.rebuild_structure(model, state["injected"], parts["benchmark"].test_stream)
    model.load_state_dict(state["model"])
    model.to(parts["device"])
    runstate.load_optimizer_state(strategy, state["optimizer"])
    m = parts["matrix"]
    m.matrices, m.seen, m.trained = (
        state["matrix"]["matrices"],
        set(state["matrix"]["seen"]),
        state["matrix"]["trained"],
    )
    parts["peft"].experiences_done = state["peft_experiences_done"]
    if parts["tracker"] is not None and state["tracker"] is not None:
        parts["tracker"].load_state_dict(state["tracker"])
    runstate.set_rng_state(state["rng"])
    return state["experience"] + 1, state["progress"]


def run_experiment(
    cfg: dict, run_dir: str | os.PathLike, *, run_id: str = "run", progress: bool = True, resume: bool = False
) -> dict:
    """Train and evaluate one run; write its folder; return the results dict (schema 1).

    With ``resume``, continue from the newest intact ``state_<t>.pt`` in ``run_dir`` (see
    :mod:`avl_peft.runstate`); otherwise start from scratch (old states are removed).
    """
    from . import runstate

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    resumable = cfg["strategy"]["name"] in runstate.RESUMABLE_STRATEGIES
    if not (resume and resumable):
        runstate.clear_states(run_dir)
    parts = build(cfg, run_dir, progress=progress)
    strategy, benchmark, matrix = parts["strategy"], parts["benchmark"], parts["matrix"]
    training = cfg["training"]
    done = {"train_s": 0.0, "eval_s": 0.0, "images": 0, "counts": None}
    start_exp = 0
    if resume and resumable:
        restored = _restore_run_state(run_dir, parts)
        if restored is not None:
            start_exp, done = restored
            done["resumed_at_experience"] = start_exp
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
        start = time.perf_counter()
        strategy.train(experience, num_workers=training["num_workers"])
        done["train_s"] += time.perf_counter() - start
        done["images"] += len(experience.dataset) * strategy.train_epochs
        if not base:
            done["counts"] = parameter_counts(strategy.model)
        start = time.perf_counter()
        strategy.eval(benchmark.test_stream, num_workers=training["num_workers"])
        done["eval_s"] += time.perf_counter() - start
        if t < n_exp - 1:
            _save_run_state(run_dir, t, parts, done)
        row = matrix.matrices["class_incremental"][t][: t + 1]
        bar.set_postfix(acc=f"{np.mean(row):.3f}")
        bar.update(1)
    bar.close()
    last = parts["evaluator"].get_last_metrics()
    for logger in parts["evaluator"].loggers:  # flush TensorBoard files before results.json marks the run done
        getattr(logger, "close", lambda: None)()
    tracker = parts["tracker"]
    results = {
        "schema": SCHEMA_VERSION,
        "status": "finished",
        "run": run_info(run_id, cfg, parts["budget"]["options"] if parts["budget"] else None),
        "config": cfg,
        "versions": versions(),
        "params": done["counts"] or parameter_counts(strategy.model),
        "budget": parts["budget"],
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
            "peak_memory_mb": _peak_memory_mb(parts["device"]),
        },
    }
    if "resumed_at_experience" in done:
        results["resumed_at_experience"] = done["resumed_at_experience"]
    atomic.write_json(run_dir / "results.json", results)
    runstate.clear_states(run_dir)  # finished: results.json and the per-experience checkpoints remain
    return results
