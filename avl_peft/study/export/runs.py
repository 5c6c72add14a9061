"""Reading a finished run folder for export: checks first, then the model as experience t left it.

A run folder (:mod:`avl_peft.study.experiment`) keeps ``results.json`` (its config, versions and where the
backbone weights came from) and ``checkpoints/exp_<t>.pt`` per experience; the run states are removed when
it finishes. The model of experience t is rebuilt as :meth:`PEFTPlugin.restore` rebuilds it — checkpoints
0 … t in order, merging in between under ``policy: merge`` — from a fresh backbone built as the run built
it. Everything is refused with a DataError/ConfigError naming the file before a tensor is loaded: a
missing or unfinished ``results.json``, another avl-peft version, a symlink anywhere below the run folder
that is read, a checkpoint larger than the model could make, a gap in the checkpoints, weights that do
not match the sha256 the run recorded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ... import __version__
from ...adapters import METHODS
from ...cl.backbone import create_continual_model
from ...cl.checkpoints import checkpoint_files
from ...cl.plugin import PEFTPlugin
from ...cl.strategies import STRATEGIES
from ...cl.training import seed_everything
from ...errors import ConfigError, DataError
from ...safeio import file_sha256
from .. import results as results_file

# A checkpoint holds at most the whole model (a base session, full fine-tuning) plus adapters and head
# buffers: twice the model's bytes and a margin is more than any real one and bounds a planted huge file.
_CHECKPOINT_MARGIN = 64 << 20


@dataclasses.dataclass
class RunFolder:
    """A checked run folder: its results, config and per-experience checkpoints."""

    path: Path
    results: dict[str, Any]
    config: dict[str, Any]
    n_experiences: int
    weights_file: Path | None

    @property
    def method(self) -> str:
        return self.config["method"]["name"]

    @property
    def options(self) -> dict[str, Any]:
        budget = self.results.get("budget")  # an equal-budget run trained with the options it chose
        return dict(budget["options"]) if budget else dict(self.config["method"]["options"])

    def config_hash(self) -> str:
        """16 hex digits of sha256 over the run's config as results.json records it (canonical JSON)."""
        import json

        blob = json.dumps(self.config, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def regular_file(path: Path, root: Path, what: str) -> Path:
    """``path`` (inside ``root``) if it and every folder between are real, not symlinks; DataError otherwise."""
    current = root
    for part in path.relative_to(root).parts:
        current = current / part
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            raise DataError(f"{what} '{current}' does not exist: the run folder is incomplete") from None
        if stat.S_ISLNK(info.st_mode):
            raise DataError(f"{what} '{current}' is a symbolic link; export reads only the run folder's own files")
    if not stat.S_ISREG(os.lstat(path).st_mode):
        raise DataError(f"{what} '{path}' is not a regular file")
    return path


def open_run(run_dir: str | os.PathLike) -> RunFolder:
    """Check that ``run_dir`` is a finished run of this avl-peft version whose checkpoints are all there."""
    root = Path(run_dir)
    if not root.is_dir():
        raise DataError(f"run folder '{root}' does not exist or is not a folder; give the folder of one run")
    res = results_file.read(regular_file(root / results_file.FILENAME, root, "results file"))
    if res["status"] != "finished":
        raise DataError(
            f"run '{root}' did not finish (status {res['status']}: {res.get('error', '')}); nothing to export"
        )
    written = (res.get("versions") or {}).get("avl_peft")
    if written != __version__:
        raise DataError(
            f"run '{root}' was written by avl-peft {written}, this is {__version__}: its checkpoints may not fit "
            f"this version's adapters; export it with avl-peft {written}"
        )
    cfg = res.get("config")
    try:
        n = len(res["accuracy_matrix"]["class_incremental"])
        method, bb, training = cfg["method"], cfg["backbone"], cfg["training"]
        METHODS.get(method["name"])
        spec = STRATEGIES.get(cfg["strategy"]["name"])
        task_incremental = training["task_incremental"]
        _ = (method["policy"], method["options"], bb["name"], bb["kwargs"], training["pretrain"], cfg["seed"])
    except (KeyError, TypeError) as e:
        raise DataError(f"{root / results_file.FILENAME} lacks {e} (not a run of this version?)") from None
    if task_incremental:
        raise ConfigError(f"run '{root}' is task-incremental (one head per task); export supports one class head")
    if spec.owns_model:
        raise ConfigError(f"run '{root}' used strategy '{spec.name}', whose prompted model is not a timm backbone")
    ckdir = root / "checkpoints"
    found = checkpoint_files(ckdir) if ckdir.is_dir() and not ckdir.is_symlink() else {}
    missing = [t for t in range(n) if t not in found]
    if missing:
        raise DataError(f"run '{root}' has no {ckdir.name}/exp_{missing[0]}.pt: the run folder is incomplete")
    return RunFolder(root, res, cfg, n, _weights_file(root, res))


def _weights_file(root: Path, res: dict[str, Any]) -> Path | None:
    """The backbone weights the run started from, checked against the sha256 its pretrain card gave."""
    weights = res.get("backbone_weights") or {"source": "random_init"}
    if weights.get("source") not in ("pretrain", "checkpoint"):
        return None
    path = Path(str(weights.get("file")))
    if not path.is_file():
        raise DataError(f"run '{root}' started from backbone weights '{path}', which no longer exist")
    if weights.get("model_sha256") and file_sha256(path) != weights["model_sha256"]:
        raise DataError(f"backbone weights '{path}' do not match the sha256 run '{root}' recorded; they changed")
    return path


def fresh_model(run: RunFolder) -> nn.Module:
    """The run's model before its first experience: backbone and head built as the run built them."""
    bb = run.config["backbone"]
    seed_everything(run.config["seed"])  # a random-init backbone is reproduced from the run's seed
    return create_continual_model(
        bb["name"], head="incremental", pretrained=bool(bb.get("pretrained")), checkpoint=run.weights_file,
        **bb["kwargs"],
    )  # fmt: skip


def check_checkpoints(run: RunFolder, t: int, model: nn.Module) -> None:
    """``exp_0.pt`` … ``exp_<t>.pt`` are regular files (no links) no larger than ``model`` can make."""
    limit = 2 * sum(v.numel() * v.element_size() for v in model.state_dict().values()) + _CHECKPOINT_MARGIN
    for i in range(t + 1):
        path = regular_file(run.path / "checkpoints" / f"exp_{i}.pt", run.path, "checkpoint")
        size = path.stat().st_size
        if size > limit:
            raise DataError(f"checkpoint '{path}' is {size:,} bytes, more than this model's checkpoints can hold")


def model_at(
    run: RunFolder, t: int, model: nn.Module, visit: Callable[[int, nn.Module], None] | None = None
) -> nn.Module:
    """``model`` (from :func:`fresh_model`) as experience ``t`` finished training, in eval mode."""
    check_checkpoints(run, t, model)
    ckdir = run.path / "checkpoints"
    method, training = run.config["method"], run.config["training"]
    plugin = PEFTPlugin(
        method["name"],
        policy=method["policy"],
        pretrain=training["pretrain"],
        targets=method["targets"],
        trainable=method.get("trainable"),
        checkpoint_dir=ckdir,
        **run.options,
    )
    try:
        plugin.restore(model, through=t, visit=visit)
    except (ConfigError, DataError):
        raise
    except Exception as e:  # a corrupt or foreign checkpoint: torch.load's pickle, shape or EOF errors
        raise DataError(f"the checkpoints in '{ckdir}' could not be restored ({type(e).__name__}: {e})") from None
    return model.eval()
