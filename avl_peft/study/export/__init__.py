"""Export what a run learned to Hugging Face peft and to plain timm weights; load such exports back.

``export(run_dir, out=..., format="peft"|"timm", experience="last"|"all"|t)`` reads a finished run folder
(:mod:`.runs`), rebuilds the model of each requested experience and writes it in ``format``
(:mod:`.peft_format`, :mod:`.timm_format`) with a card (:mod:`.card`). Nothing is written outside ``out``
(no-follow atomic writes below it), nothing at all when a check fails, and the card is written last.
:func:`load_peft` and :func:`load_timm` load an export after checking the base's identity and the files'
sha256; :func:`check_base` is the base check alone, for loading with peft directly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ...errors import ConfigError, DataError
from ...safeio import safe_write_path
from .card import active_classes as _active
from .card import base_block, card, head_tensors, write_card
from .peft_format import CONFIG, FactorCollector, adapter_files, check_base, check_exportable, load_peft, write_adapter
from .peft_format import WEIGHTS as PEFT_WEIGHTS
from .runs import RunFolder, check_checkpoints, fresh_model, model_at, open_run
from .timm_format import WEIGHTS, load_timm, merged_state, write_weights

FORMATS = ("peft", "timm")
PEFT_FILES = (PEFT_WEIGHTS, CONFIG)

__all__ = ["FORMATS", "check_base", "export", "load_peft", "load_timm"]


def _experiences(run: RunFolder, experience: int | str) -> list[int]:
    last = run.n_experiences - 1
    if experience == "last":
        return [last]
    if experience == "all":
        return list(range(run.n_experiences))
    try:
        t = int(experience)
    except (TypeError, ValueError):
        raise ConfigError(f"experience must be an index, 'last' or 'all', got {experience!r}") from None
    if not 0 <= t <= last:
        raise ConfigError(f"experience {t} is not one of run '{run.path}' (0 … {last}); or use 'last' / 'all'")
    return [t]


def _check_out(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"--out '{out}' exists and is not a folder; give a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out '{out}' is not empty; give a new or empty folder (an export never mixes with files)")
    safe_write_path(out, "x")  # no symlinked component below out (there is none yet, but the check is cheap)


def export(
    run_dir: str | os.PathLike, *, out: str | os.PathLike, format: str = "peft", experience: int | str = "last"
) -> dict[str, Any]:
    """Write experience ``experience`` (an index, ``"last"`` or ``"all"``) of a run folder to ``out``.

    ``format="peft"``: a folder ``PeftModel.from_pretrained(base, out)`` loads (one subfolder ``exp_<t>`` per
    experience with ``"all"``); ``"timm"``: merged weights timm loads as pretrained weights. Returns the card.
    Raises ConfigError/DataError (naming the file) for a run folder that is incomplete, of another version or
    hostile, and for a method the format cannot hold (``full``/``head`` or a base session in peft format).
    """
    if format not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    out = Path(out)
    run = open_run(run_dir)
    wanted = _experiences(run, experience)
    if format == "peft":
        check_exportable(run)
    _check_out(out)
    fresh = fresh_model(run)
    check_checkpoints(run, max(wanted), fresh)  # every file is checked before anything is written
    width = _head_width(run)
    base = base_block(run, fresh, width)
    content = card(run, base, format, fresh)
    classifier = base["classifier"][0]
    pending = []  # peft adapters are small: all are made before the first is written
    created = not out.exists()
    written: list[Path] = []
    try:
        for t in wanted:
            model = fresh_model(run) if t != wanted[0] else fresh
            name = f"exp_{t}"
            sub = name if len(wanted) > 1 else ""
            collector = FactorCollector(accumulate=run.config["method"]["policy"] == "merge")
            model = model_at(run, t, model, visit=collector if format == "peft" else None)
            head = head_tensors(model, width)
            info = {"experience": t, "active_classes": _active(model)}
            if format == "peft":
                pending.append((name, sub, info, *adapter_files(collector.lora(), head, classifier, base)))
            else:  # a whole model per experience: written as it is made, removed again if a later one fails
                written.append(out / sub / WEIGHTS if sub else out / WEIGHTS)
                content["experiences"][name] = info | write_weights(
                    out, sub, merged_state(model, head, classifier), base
                )
        for name, sub, info, config, weights in pending:
            written += [out / sub / f for f in PEFT_FILES] if sub else [out / f for f in PEFT_FILES]
            content["experiences"][name] = info | write_adapter(out, sub, config, weights)
        write_card(out, content)  # last: a folder without its card is no export
    except BaseException:
        _remove(written, out, created)
        raise
    return content


def _remove(files: list[Path], out: Path, created: bool) -> None:
    """Undo a failed export: the files it wrote, then its (now empty) folders; nothing else is touched."""
    for path in files:
        if path.is_file() and not path.is_symlink():
            path.unlink()
    for folder in sorted({p.parent for p in files}, key=lambda p: len(p.parts), reverse=True):
        if folder != out and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _head_width(run: RunFolder) -> int:
    """The class head's size after the last experience: every export of a run shares one base."""
    import torch

    from .runs import regular_file

    path = regular_file(run.path / "checkpoints" / f"exp_{run.n_experiences - 1}.pt", run.path, "checkpoint")
    # mmap: only the head's bytes are read, whatever the file's size (it is bounded again before restoring)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["model"]["head.classifier.weight"].shape[0])
    except Exception as e:  # not a checkpoint: a zip/pickle error, or no class head in it
        raise DataError(
            f"checkpoint '{path}' is not an avl-peft checkpoint with a class head ({type(e).__name__})"
        ) from None
