"""One continual-learning run, end to end: model, scenario, strategy + plugins, train/eval, results.

``run_experiment(cfg, run_dir)`` takes one resolved run config (see :mod:`avl_peft.config`) and writes
``run_dir/``: ``config.yaml``, ``results.json`` (schema 1, SPEC §5), TensorBoard events in ``tb/`` and
adapter/head checkpoints per experience in ``checkpoints/``.
"""

from __future__ import annotations

import json
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
from tqdm.auto import tqdm

from .backbone import create_continual_model, data_config
from .errors import ConfigError
from .evaluation import AccuracyMatrixPlugin, make_evaluator
from .metrics import summarize_both
from .peft import parameter_counts
from .plugin import PEFTPlugin
from .scenarios import build_scenario
from .strategies import STRATEGIES, strategy_options

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


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def _divergence_guard():
    from avalanche.core import SupervisedPlugin

    class DivergenceGuard(SupervisedPlugin):
        def before_backward(self, strategy, **kw):
            if not torch.isfinite(strategy.loss).all():
                t = strategy.experience.current_experience
                raise TrainingDiverged(
                    f"training diverged: loss is {float(strategy.loss.detach())} at experience {t}, epoch "
                    f"{strategy.clock.train_exp_epochs}; lower training.lr or check the data"
                )

    return DivergenceGuard()


class _BatchProgress:
    """A per-experience progress bar (batches, with ETA) driven by Avalanche's iteration callbacks."""

    def __new__(cls, *args, **kwargs):
        from avalanche.core import SupervisedPlugin

        class Plugin(SupervisedPlugin):
            def __init__(self, label: str, enabled: bool):
                super().__init__()
                self.label, self.enabled, self.bar = label, enabled, None

            def before_training_exp(self, strategy, **kw):
                total = len(strategy.dataloader) * strategy.train_epochs if self.enabled else 0
                t = strategy.experience.current_experience
                self.bar = tqdm(total=total, desc=f"{self.label} exp {t}", leave=False, disable=not self.enabled)

            def after_training_iteration(self, strategy, **kw):
                self.bar.update(1)
                self.bar.set_postfix(loss=f"{float(strategy.loss.detach()):.3f}", refresh=False)

            def after_training_exp(self, strategy, **kw):
                self.bar.close()

        return Plugin(*args, **kwargs)


def build(cfg: dict, run_dir: Path | None, *, progress: bool = False) -> dict[str, Any]:
    """Everything a run needs, wired together (exposed for tests and for custom loops)."""
    seed_everything(cfg["seed"])
    training, method = cfg["training"], cfg["method"]
    device = resolve_device(training["device"])
    bb = cfg["backbone"]
    model = create_continual_model(
        bb["name"], head=training["head"], pretrained=bb["pretrained"], checkpoint=bb["checkpoint"], **bb["kwargs"]
    )
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
    from avalanche.training import MaskedCrossEntropy

    criterion = MaskedCrossEntropy(mask="new" if training["train_mask"] == "current" else "seen")
    matrix = AccuracyMatrixPlugin(n_exp)
    peft = PEFTPlugin(
        method["name"],
        policy=method["policy"],
        pretrain=training["pretrain"],
        targets=method["targets"],
        checkpoint_dir=run_dir / "checkpoints" if run_dir is not None else None,
        **method["options"],
    )
    plugins = [peft, matrix, criterion, _divergence_guard()]
    if progress:
        plugins.append(_BatchProgress(method["name"], True))
    evaluator = make_evaluator(str(run_dir / "tb") if run_dir is not None else None)
    name = cfg["strategy"]["name"]
    strategy = STRATEGIES.get(name)(
        model,
        _optimizer(model.parameters(), training),
        criterion,
        train_mb_size=training["batch_size"],
        train_epochs=training["epochs"],
        eval_mb_size=training["eval_batch_size"],
        device=device,
        plugins=plugins,
        evaluator=evaluator,
        eval_every=-1,
        **strategy_options(name, cfg["strategy"]["options"]),
    )
    return {"model": model, "benchmark": benchmark, "strategy": strategy, "matrix": matrix, "peft": peft,
            "evaluator": evaluator, "device": device}


def run_experiment(cfg: dict, run_dir: str | os.PathLike, *, run_id: str = "run", progress: bool = True) -> dict:
    """Train and evaluate one run; write its folder; return the results dict (schema 1)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    parts = build(cfg, run_dir, progress=progress)
    strategy, benchmark, matrix = parts["strategy"], parts["benchmark"], parts["matrix"]
    training = cfg["training"]
    train_s = eval_s = 0.0
    images = 0
    counts: dict[str, int] | None = None
    n_exp = len(benchmark.train_stream)
    bar = tqdm(total=n_exp, desc=run_id, unit="exp", disable=not progress)
    for t, experience in enumerate(benchmark.train_stream):
        base = training["pretrain"] and t == 0
        strategy.train_epochs = (training["pretrain_epochs"] or training["epochs"]) if base else training["epochs"]
        lr = (training["pretrain_lr"] or training["lr"]) if base else training["lr"]
        for group in strategy.optimizer.param_groups:
            group["lr"] = lr
        strategy.optimizer.defaults["lr"] = lr
        start = time.perf_counter()
        strategy.train(experience, num_workers=training["num_workers"])
        train_s += time.perf_counter() - start
        images += len(experience.dataset) * strategy.train_epochs
        if not base:
            counts = parameter_counts(strategy.model)
        start = time.perf_counter()
        strategy.eval(benchmark.test_stream, num_workers=training["num_workers"])
        eval_s += time.perf_counter() - start
        row = matrix.matrices["class_incremental"][t][: t + 1]
        bar.set_postfix(acc=f"{np.mean(row):.3f}")
        bar.update(1)
    bar.close()
    last = parts["evaluator"].get_last_metrics()
    for logger in parts["evaluator"].loggers:  # flush TensorBoard files before results.json marks the run done
        getattr(logger, "close", lambda: None)()
    results = {
        "schema": SCHEMA_VERSION,
        "status": "finished",
        "run": {
            "id": run_id,
            "method": cfg["method"]["name"],
            "strategy": cfg["strategy"]["name"],
            "seed": cfg["seed"],
            "policy": cfg["method"]["policy"],
            "options": cfg["method"]["options"],
        },
        "config": cfg,
        "versions": versions(),
        "params": counts or parameter_counts(strategy.model),
        "classes_order": [int(c) for c in getattr(benchmark, "classes_order", [])],
        "accuracy_matrix": matrix.matrices,
        "metrics": summarize_both(matrix.matrices),
        "avalanche_metrics": {
            k: float(v) for k, v in last.items() if k.startswith(("StreamForgetting", "StreamBWT", "Top1_Acc_Stream"))
        },
        "subspace": [],
        "timing": {
            "train_s": train_s,
            "eval_s": eval_s,
            "images_per_s": images / train_s if train_s > 0 else 0.0,
            "peak_memory_mb": _peak_memory_mb(parts["device"]),
        },
    }
    write_json_atomic(run_dir / "results.json", results)
    return results
