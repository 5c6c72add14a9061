"""Hostile and bad input through the CLI: exit code 2, a message that says what to fix, no traceback, and
nothing written outside the output folder.

Every case calls ``avl_peft.cli.main`` in this process (fast); two processes on one output folder are in
test_concurrency.py.
"""

import dataclasses
import json
import os
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_study

from avl_peft.cli import main

TINY = make_tiny_study()


def run(tmp_path, capsys, study, *extra):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(study))
    code = main(["run", str(config), "--out", str(tmp_path / "out"), "--quiet", *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def with_(**sections):
    study = yaml.safe_load(yaml.safe_dump(TINY))
    for key, value in sections.items():
        study[key] = {**study.get(key, {}), **value}
    return study


def test_unknown_backbone_suggests_timm_names(tmp_path, capsys):
    code, err = run(tmp_path, capsys, with_(backbone={"name": "vit_tiny_patch16_22"}))
    assert code == 2 and "unknown timm model" in err and "vit_tiny_patch16_224" in err


def test_missing_checkpoint(tmp_path, capsys):
    code, err = run(tmp_path, capsys, with_(backbone={"checkpoint": str(tmp_path / "nope.pth")}))
    assert code == 2 and "backbone.checkpoint" in err and "does not exist" in err


def test_checkpoint_not_a_state_dict(tmp_path, capsys):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"\x00not a torch file at all")
    code, err = run(tmp_path, capsys, with_(backbone={"checkpoint": str(bad)}))
    assert code == 2 and "could not be read as a state dict" in err
    listed = tmp_path / "list.pth"
    torch.save([1, 2, 3], listed)
    code, err = run(tmp_path, capsys, with_(backbone={"checkpoint": str(listed)}), "--force")
    assert code == 2 and "does not hold a state dict" in err


def test_checkpoint_for_another_architecture(tmp_path, capsys):
    import timm

    other = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, embed_dim=48, num_heads=2)
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    code, err = run(tmp_path, capsys, with_(backbone={"checkpoint": str(path)}))
    assert code == 2 and "another architecture" in err and "blocks.1" in err


def test_good_checkpoint_loads_with_another_head(tmp_path, capsys):
    import timm

    same = timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, embed_dim=48, num_heads=2, num_classes=1000
    )
    path = tmp_path / "same.pth"
    torch.save(same.state_dict(), path)
    code, err = run(tmp_path, capsys, with_(backbone={"checkpoint": str(path)}))
    assert code == 0, err


@pytest.mark.parametrize("rank", [0, -4, 10**6])
def test_bad_ranks(tmp_path, capsys, rank):
    code, err = run(tmp_path, capsys, with_(method={"options": {"rank": rank}}))
    assert code == 2 and "rank" in err
    if rank > 0:
        assert "too large for layer 'backbone.blocks.0.attn.qkv'" in err


def test_output_folder_not_writable(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(TINY))
    assert main(["run", str(config), "--out", str(blocker / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not writable" in err and "Traceback" not in err


def test_budget_too_small_is_caught_before_training(tmp_path, capsys):
    code, err = run(tmp_path, capsys, {**TINY, "budget": 5})
    assert code == 2 and "budget" in err and "below the smallest lora adapter" in err
    assert not (tmp_path / "out").exists()


def test_report_on_empty_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "results.json" in capsys.readouterr().err


def test_checkpoint_resizes_position_embeddings_and_reads_safetensors(tmp_path):
    import timm
    from safetensors.torch import save_file

    import avl_peft

    kw = {"patch_size": 4, "depth": 1, "embed_dim": 48, "num_heads": 2}
    source = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=1000, **kw)  # 8×8 patches
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = avl_peft.create_backbone("vit_tiny_patch16_224", checkpoint=path, num_classes=5, img_size=16, **kw)
    assert model.pos_embed.shape[1] == 1 + 4 * 4  # resampled from 1 + 8·8 as timm does
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert model.head.weight.shape == (5, 48)  # the 1000-class head is dropped, a fresh one kept


# ------------------------------------------------------------------------------------------------------
# The hostile-input table: each case is an input, the exit code, a fragment of the message, and nothing
# written outside the output folder (a walk of the whole sandbox before and after).
# ------------------------------------------------------------------------------------------------------

SMALL = {**TINY, "scenario": {"name": "synthetic", "n_experiences": 2}}


@dataclasses.dataclass
class Sandbox:
    root: Path  # everything the test may touch; walked before and after
    cwd: Path  # the working directory during the call
    out: Path  # the output folder: the only place allowed to change
    victim: Path  # a file outside out that planted links point to

    def config(self, content: str | bytes | dict, name: str = "study.yaml") -> Path:
        path = self.root / "configs" / name
        path.parent.mkdir(exist_ok=True)
        if isinstance(content, dict):
            content = yaml.safe_dump(content)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    root = tmp_path / "sandbox"
    cwd = root / "a" / "b" / "cwd"  # deep enough that '../..' escapes still land inside the walked tree
    cwd.mkdir(parents=True)
    victim = root / "victim" / "precious.txt"
    victim.parent.mkdir()
    victim.write_text("keep me")
    monkeypatch.chdir(cwd)
    return Sandbox(root=root, cwd=cwd, out=root / "a" / "b" / "out", victim=victim)


def snapshot(root: Path, out: Path) -> dict[str, tuple]:
    """Every entry under root except inside out: kind, size, modification time and inode (links not followed)."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            path = Path(folder) / name
            if path == out or out in path.parents:
                continue
            info = path.lstat()
            # A folder's own times change when an entry is added (e.g. out itself): its entries are compared.
            changes = () if path.is_dir() and not path.is_symlink() else (info.st_size, info.st_mtime_ns)
            seen[str(path.relative_to(root))] = (info.st_mode, info.st_ino, *changes)
    return seen


def call(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own usage errors
        return e.code


def merged(**sections) -> dict:
    study = yaml.safe_load(yaml.safe_dump(SMALL))
    for key, value in sections.items():
        study[key] = {**study.get(key, {}), **value} if isinstance(value, dict) else value
    return study


def dry(content, *extra) -> Callable[[Sandbox], list[str]]:
    """A case: `run CONFIG --out OUT --dry-run` on this config content (dict, YAML text or bytes)."""
    return lambda sb: ["run", str(sb.config(content)), "--out", str(sb.out), "--dry-run", *extra]


def undry(content) -> Callable[[Sandbox], list[str]]:
    """A case: `run CONFIG --out OUT`, for what must stop a real run at validation."""
    return lambda sb: ["run", str(sb.config(content)), "--out", str(sb.out)]


def sets(*assignments: str) -> Callable[[Sandbox], list[str]]:
    return dry(SMALL, *(arg for a in assignments for arg in ("--set", a)))


def budget(*args: str) -> Callable[[Sandbox], list[str]]:
    return lambda sb: ["budget", "100000", "--backbone", "vit_tiny_patch16_224", *args]


BOMB = "\n".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)),
    ]
)
DEEP_LIST = "seed: " + "[" * 100_000 + "]" * 100_000
DEEP_MAP = "seed: " + "{a: " * 400 + "1" + "}" * 400


def run_dir(sb: Sandbox) -> Path:
    return sb.out / "lora-rank2-naive-s0"


def planted_results(text: str, *extra) -> Callable[[Sandbox], list[str]]:
    """A results.json planted in the run's folder, then `run --dry-run` (plus extra flags)."""

    def prepare(sb):
        run_dir(sb).mkdir(parents=True)
        (run_dir(sb) / "results.json").write_text(text)
        return ["run", str(sb.config(SMALL)), "--out", str(sb.out), "--dry-run", *extra]

    return prepare


def planted_link(relative: str, *, folder: bool) -> Callable[[Sandbox], list[str]]:
    def prepare(sb):
        link = sb.out / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(sb.victim.parent if folder else sb.victim, target_is_directory=folder)
        return ["run", str(sb.config(SMALL)), "--out", str(sb.out), "--dry-run"]

    return prepare


def finished_results(run_id: str, size: int = 2) -> dict:
    matrix = [[0.9 if i <= t else None for i in range(size)] for t in range(size)]
    return {
        "schema": 2,
        "status": "finished",
        "run": {"id": run_id, "method": "lora", "strategy": "naive", "seed": 0, "options": {"rank": 2}},
        "params": {"trainable": 100},
        "accuracy_matrix": {"class_incremental": matrix},
    }


def report_with(bad: str | Callable[[Path], None] | None, *, good: bool = True) -> Callable[[Sandbox], list[str]]:
    """`report OUT` on a folder with one good run and one bad results.json (text, or a function making it)."""

    def prepare(sb):
        if good:
            (sb.out / "good").mkdir(parents=True)
            (sb.out / "good" / "results.json").write_text(json.dumps(finished_results("good")))
        if bad is not None:
            (sb.out / "bad").mkdir(parents=True)
            path = sb.out / "bad" / "results.json"
            bad(path) if callable(bad) else path.write_text(bad)
        return ["report", str(sb.out)]

    return prepare


def sparse(size: int) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        with open(path, "wb") as f:
            f.truncate(size)

    return make


def fifo(path: Path) -> None:
    os.mkfifo(path)


def big_matrix(n: int) -> str:
    data = finished_results("huge")
    data["accuracy_matrix"]["class_incremental"] = [[0.5] * n for _ in range(n)]
    return json.dumps(data)


class _Payload:
    """Pickles to a call of os.system: loading it with plain pickle would create the file PWNED."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def evil_checkpoint(sb: Sandbox) -> list[str]:
    path = sb.root / "weights.pth"
    torch.save({"blocks.0.attn.qkv.weight": _Payload(sb.root / "PWNED")}, path)
    study = merged(backbone={**SMALL["backbone"], "checkpoint": str(path)})
    return ["run", str(sb.config(study)), "--out", str(sb.out), "--quiet"]


def evil_state(sb: Sandbox) -> list[str]:
    """A state_0.pt with a code-running pickle and a matching checksum, planted before `run --resume`."""
    import hashlib
    import io

    buffer = io.BytesIO()
    torch.save({"experience": 0, "model": _Payload(sb.root / "PWNED")}, buffer)
    run_dir(sb).mkdir(parents=True)
    (run_dir(sb) / "state_0.pt").write_bytes(buffer.getvalue())
    (run_dir(sb) / "state_0.sha256").write_text(hashlib.sha256(buffer.getvalue()).hexdigest())
    return ["run", str(sb.config(SMALL)), "--out", str(sb.out), "--quiet", "--resume"]


def planted_fifo(sb: Sandbox) -> list[str]:
    run_dir(sb).mkdir(parents=True)
    os.mkfifo(run_dir(sb) / "state_0.pt")  # a read would block forever
    return ["run", str(sb.config(SMALL)), "--out", str(sb.out), "--dry-run", "--resume"]


# --- pretrain configs, cards, weights and image folders: what a study names, checked by its dry-run

PRE_OK = {"backbone": {"name": "vit_tiny_patch16_224", "kwargs": dict(TINY["backbone"]["kwargs"])}}
PRE_OK["data"] = {"img_size": 16, "train_per_class": 2, "test_per_class": 1}
PRE_OK["training"] = {"batch_size": 8}


def pre(content, *, command: str = "run") -> Callable[[Sandbox], list[str]]:
    """A pretrain config (dict merged into PRE_OK, or raw YAML text), named by a study's backbone.pretrain
    and dry-run (``command="run"``), or given to ``avl-peft pretrain`` itself (nothing is trained: it fails)."""

    def prepare(sb):
        if isinstance(content, dict):
            raw = yaml.safe_load(yaml.safe_dump(PRE_OK))
            for key, value in content.items():
                raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
            text = yaml.safe_dump(raw)
        else:
            text = content
        path = sb.config(text, "pretrain.yaml")
        if command == "pretrain":
            return ["pretrain", str(path), "--out", str(sb.out), "--quiet"]
        study = merged(backbone={**SMALL["backbone"], "pretrain": str(path)}, upstream={"head": "knn"})
        return ["run", str(sb.config(study)), "--out", str(sb.out), "--dry-run"]

    return prepare


def pre_kwargs(**kwargs) -> Callable[[Sandbox], list[str]]:
    return pre({"backbone": {"name": "vit_tiny_patch16_224", "kwargs": {**TINY["backbone"]["kwargs"], **kwargs}}})


def weights_and_card(folder: Path, **card_changes) -> dict:
    """A complete pretrain output of TINY's backbone in ``folder`` (random weights, a card that matches them)."""
    import hashlib

    import timm
    from safetensors.torch import save

    from avl_peft.cl.scenarios.glyphs import CLASSES
    from avl_peft.pretrain import CARD_FORMAT

    model = timm.create_model("vit_tiny_patch16_224", num_classes=len(CLASSES), **TINY["backbone"]["kwargs"])
    blob = save({k: v.contiguous() for k, v in model.state_dict().items()})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(blob)
    card = {
        "format": CARD_FORMAT,
        "name": "owner",
        "backbone": {"name": "vit_tiny_patch16_224", "kwargs": dict(TINY["backbone"]["kwargs"])},
        "num_classes": len(CLASSES),
        "classes": list(CLASSES),
        "data_config": {"img_size": 16, "in_chans": 3, "mean": [0.5] * 3, "std": [0.5] * 3},
        "config_hash": "0123456789abcdef",
        "model_sha256": hashlib.sha256(blob).hexdigest(),
        "test_accuracy": 0.5,
        "wall_time_s": 1.0,
        **card_changes,
    }
    (folder / "card.json").write_text(json.dumps(card))
    return card


def card_case(damage: Callable[[Path], None]) -> Callable[[Sandbox], list[str]]:
    """A pretrain output folder (outside --out) damaged by ``damage``, named by backbone.checkpoint; dry-run."""

    def prepare(sb):
        folder = sb.root / "pretrained"
        weights_and_card(folder)
        damage(folder)
        study = merged(backbone={**SMALL["backbone"], "checkpoint": str(folder)})
        return ["run", str(sb.config(study)), "--out", str(sb.out), "--dry-run"]

    return prepare


def rewrite_card(**changes) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        card = json.loads((folder / "card.json").read_text())
        card.update(changes)
        (folder / "card.json").write_text(json.dumps({k: v for k, v in card.items() if v is not None}))

    return damage


def other_weights(folder: Path) -> None:
    """Weights of another architecture (depth 2) behind a card whose sha256 matches them."""
    import hashlib

    import timm
    from safetensors.torch import save

    kwargs = {**TINY["backbone"]["kwargs"], "embed_dim": 32}
    blob = save(
        {k: v.contiguous() for k, v in timm.create_model("vit_tiny_patch16_224", **kwargs).state_dict().items()}
    )
    (folder / "model.safetensors").write_bytes(blob)
    rewrite_card(model_sha256=hashlib.sha256(blob).hexdigest())(folder)


def huge_weights_link(folder: Path) -> None:
    """model.safetensors a link to a sparse 32 GiB file: refused from its size, never hashed (that takes minutes)."""
    big = folder.parent / "huge.bin"
    with open(big, "wb") as f:
        f.truncate(32 << 30)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(big)


def upstream_folder(make: Callable[[Path], None], **upstream) -> Callable[[Sandbox], list[str]]:
    """An upstream image folder (two classes of good 16x16 images, then ``make`` adds a bad one); dry-run."""

    def prepare(sb):
        root = sb.root / "upstream"
        for name in ("a", "b"):
            (root / name).mkdir(parents=True)
            (root / name / "0.png").write_bytes(_png(16, 16))
        make(root / "b")
        study = merged(upstream={"dataset": f"imagefolder:{root}", "head": "knn", "per_class": 2, **upstream})
        return ["run", str(sb.config(study)), "--out", str(sb.out), "--dry-run"]

    return prepare


POSTSCRIPT = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n"


def with_run(**changes) -> dict:
    data = finished_results("bad")
    data["run"].update(changes)
    return data


def report_many(sb: Sandbox) -> list[str]:
    """`report` over a good run and runs whose text would break matplotlib or a filename, or overflow a mean."""
    bad = {
        "mathtext-id": with_run(id="$\\frac{x"),
        "mathtext-method": with_run(method="$x^{"),
        "10k-char-id": with_run(id="x" * 10_000),
        "formula": with_run(id="=cmd|' /C calc'!A0", method="+SUM(1)", strategy="@x"),
        "trainable": {**finished_results("t"), "params": {"trainable": 1e308}},
    }
    argv = report_with(None)(sb)
    for name, data in bad.items():
        (sb.out / name).mkdir()
        (sb.out / name / "results.json").write_text(json.dumps(data))
    (sb.out / "link").mkdir()
    (sb.out / "link" / "results.json").symlink_to("/dev/zero")
    return argv


def pretrain_over_owner(sb: Sandbox) -> list[str]:
    """`pretrain` of one config on an --out that holds a complete output of another: refused, owner named."""
    weights_and_card(sb.out)
    return pre({})(sb)[:0] or ["pretrain", str(sb.config(yaml.safe_dump(PRE_OK), "pre.yaml")), "--out", str(sb.out)]


def pretrain_cache_entry_link(sb: Sandbox) -> list[str]:
    """The cache entry of a config planted as a link to a folder outside the cache: refused, nothing written."""
    from avl_peft.pretrain import output_dir

    config = sb.config(yaml.safe_dump(PRE_OK), "pre.yaml")
    os.environ["AVL_PEFT_CACHE"] = str(sb.out)  # the table's monkeypatch restores it
    entry = output_dir(config)
    entry.parent.mkdir(parents=True)
    entry.symlink_to(sb.victim.parent, target_is_directory=True)
    return ["pretrain", str(config), "--quiet"]


def pretrain_lock_link(sb: Sandbox) -> list[str]:
    sb.out.mkdir(parents=True)
    (sb.out / ".lock").symlink_to(sb.victim)
    return ["pretrain", str(sb.config(yaml.safe_dump(PRE_OK), "pre.yaml")), "--out", str(sb.out), "--quiet"]


@dataclasses.dataclass
class Case:
    id: str
    prepare: Callable[[Sandbox], list[str]]
    code: int
    fragment: str


CASES = [
    # --- the YAML file itself: size, nesting, aliases, keys, tags, encoding
    Case("alias-bomb", dry(BOMB), 2, "anchors and *aliases count"),
    Case("100k-deep-list", dry(DEEP_LIST), 2, "nesting deeper than 64 levels"),
    Case("400-deep-mapping", dry(DEEP_MAP), 2, "nesting deeper than 64 levels"),
    Case("duplicate-section", dry(yaml.safe_dump(SMALL) + "training: {lr: 0.1}\n"), 2, "duplicate key 'training'"),
    Case("duplicate-key", dry("training:\n  lr: 0.1\n  lr: 0.2\n"), 2, "duplicate key 'lr' on line 3"),
    Case("int-key-in-variant", dry("variants: [{1: 2}]\n"), 2, "key '1' on line 1 is read as the number 1"),
    Case("null-grid-key", dry("grid: {null: [1]}\n"), 2, "is read as null"),
    Case("tilde-top-key", dry("~: 1\n"), 2, "is read as null"),
    Case("boolean-key", dry("on: 1\n"), 2, "is read as the boolean true"),
    Case("complex-key", dry("? [a, b]\n: 1\n"), 2, "keys must be plain strings"),
    Case("python-apply-tag", dry("seed: !!python/object/apply:os.system ['touch PWNED']\n"), 2, "python/object/apply"),
    Case("python-name-tag", dry("seed: !!python/name:os.system\n"), 2, "could not determine a constructor"),
    Case("recursive-alias", dry("grid: &a {x: *a}\n"), 2, "recursive structures are not allowed"),
    Case("undefined-alias", dry("seed: *nope\n"), 2, "has no matching &nope anchor"),
    Case("unclosed-bracket", dry("training: {lr: 0.1\n"), 2, "is not valid YAML"),
    Case("not-utf8", dry(b"seed: \xff\xfe\n"), 2, "is not UTF-8 text"),
    Case("over-1-MiB", dry("# " + "x" * (1 << 20) + "\n"), 2, "more than the 1,048,576 allowed"),
    Case("two-documents", dry("seed: 1\n---\nseed: 2\n"), 2, "expected a single document"),
    Case("nul-character", dry("seed: 1\x00\n"), 2, "special characters are not allowed"),
    Case("top-level-list", dry("- 1\n- 2\n"), 2, "config: must be a mapping"),
    Case("top-level-scalar", dry("hello\n"), 2, "config: must be a mapping"),
    Case("5000-digit-int", dry("seed: " + "1" * 5000 + "\n"), 2, "quote it to keep it as text"),
    Case("bad-timestamp", dry("name: 2001-13-45\n"), 2, "quote it to keep it as text"),
    Case("bom-is-fine", dry("\ufeff" + yaml.safe_dump(SMALL)), 0, "valid, 1 run(s)"),
    Case("empty-file-is-refused", dry(""), 2, "is empty"),
    Case("config-missing", lambda sb: ["run", str(sb.root / "nope.yaml"), "--dry-run"], 2, "does not exist"),
    Case("config-is-folder", lambda sb: ["run", str(sb.root), "--dry-run"], 2, "is a folder"),
    Case("config-is-dev-zero", lambda sb: ["run", "/dev/zero", "--out", str(sb.out), "--dry-run"], 2, "not a regular"),
    Case(
        "config-is-fifo",
        lambda sb: (os.mkfifo(sb.root / "pipe.yaml"), ["run", str(sb.root / "pipe.yaml"), "--dry-run"])[1],
        2,
        "is not a regular file",
    ),
    # --- values: finite numbers only, bounds where a value is surely a typo, devices, constructors
    Case("lr-nan", dry(merged(training={"lr": float("nan")})), 2, "training.lr: must be a finite number"),
    Case("lr-inf", dry("training: {lr: .inf}\n"), 2, "training.lr: must be a finite number"),
    Case("lr-nan-text", dry("training: {lr: 'nan'}\n"), 2, "training.lr: must be a finite number"),
    Case("lr-1e999-text", dry("training: {lr: 1e999}\n"), 2, "training.lr: must be a finite number"),
    Case("weight-decay-inf", dry("training: {weight_decay: .inf}\n"), 2, "training.weight_decay: must be a finite"),
    Case("momentum-minus-inf", dry("training: {momentum: -.inf}\n"), 2, "training.momentum: must be a finite"),
    Case("alpha-nan", dry(merged(method={"options": {"rank": 2, "alpha": float("nan")}})), 2, "options.alpha: must"),
    Case("epochs-1e12", dry(merged(training={"epochs": 10**12})), 2, "training.epochs: must be <= 10000"),
    Case("batch-1e9", dry(merged(training={"batch_size": 10**9})), 2, "training.batch_size: must be <= 1000000"),
    Case("experiences-1e9", dry(merged(scenario={"n_experiences": 10**9})), 2, "n_experiences: must be <= 10000"),
    Case("seed-2^70", dry(merged(seed=2**70)), 2, "seed: must be <= 4294967295"),
    Case("budget-1e30", dry(merged(budget=10**30)), 2, "budget: must be <= 1000000000000"),
    Case("workers-1e6", dry(merged(executor={"workers": 10**6})), 2, "executor.workers: must be <= 1024"),
    Case("subspace-k-1e9", dry(merged(subspace={"k": 10**9})), 2, "subspace.k: must be <= 100000"),
    # a run refuses a device this machine lacks before anything trains (--dry-run only warns: a GPU study on a laptop)
    Case("device-mps", undry(merged(training={"device": "mps"})), 2, "'mps' requested but"),
    Case("device-cuda-99", undry(merged(training={"device": "cuda:99"})), 2, "training.device: 'cuda:99'"),
    Case("device-cuda-99-dry", dry(merged(training={"device": "cuda:99"})), 0, "warning: training.device: 'cuda:99'"),
    Case("device-gpu", dry(merged(training={"device": "gpu"})), 2, "'gpu' is not a device"),
    Case("timm-unknown-kwarg", dry(merged(backbone={"kwargs": {"foo": 1}})), 2, "'foo' is not an argument of timm"),
    Case("timm-kwarg-typo", dry(merged(backbone={"kwargs": {"dpeth": 1}})), 2, "Did you mean 'depth'"),
    Case("timm-depth-minus-1", dry(merged(backbone={"kwargs": {"depth": -1}})), 2, "kwargs.depth: must be > 0"),
    Case("timm-depth-1e12", dry(merged(backbone={"kwargs": {"depth": 10**12}})), 2, "and <= 256"),
    Case("timm-patch-0", dry(merged(backbone={"kwargs": {"patch_size": 0}})), 2, "kwargs.patch_size: must be > 0"),
    Case(
        "timm-heads-do-not-divide",
        dry(merged(backbone={"kwargs": {**TINY["backbone"]["kwargs"], "num_heads": 5}})),
        2,
        "timm cannot build 'vit_tiny_patch16_224' with",
    ),
    Case("timm-num-classes", dry(merged(backbone={"kwargs": {"num_classes": 3}})), 2, "'num_classes' cannot be set"),
    Case("timm-mlp-ratio-nan", dry("backbone: {kwargs: {mlp_ratio: .nan}}\n"), 2, "kwargs.mlp_ratio: must be a finite"),
    Case("scenario-unknown-option", dry(merged(scenario={"options": {"bogus": 1}})), 2, "has no option 'bogus'"),
    Case("scenario-option-typo", dry(merged(scenario={"options": {"nosie": 1}})), 2, "Did you mean 'noise'"),
    Case("scenario-option-inf", dry("scenario: {name: synthetic, options: {noise: .inf}}\n"), 2, "noise: must be a"),
    Case("scenario-option-seed", dry(merged(scenario={"options": {"seed": 1}})), 2, "'seed' is not a scenario option"),
    Case(
        "scenario-option-bound",  # values are checked at --dry-run too, by the same parse as build_scenario
        dry(merged(scenario={"options": {"noise": -1}})),
        2,
        "scenario 'synthetic'.noise: must be >= 0, got -1",
    ),
    Case(
        "strategy-option-inf",
        dry("strategy: {name: replay, options: {mem_size: .inf}}\ntraining: {train_mask: seen}\n"),
        2,
        "mem_size",
    ),
    Case("name-dot-dot", dry(merged(name="../../x")), 0, "valid, 1 run(s)"),
    Case("name-absolute", dry(merged(name="/tmp/x")), 0, "valid, 1 run(s)"),
    # --- --set: the same strict reader and checks
    Case("set-int-key-variant", sets("variants=[{1: 2}]"), 2, "--set variants: key '1'"),
    Case("set-null-grid-key", sets("grid={~: [1]}"), 2, "--set grid: key '~' on line 1 is read as null"),
    Case("set-lr-nan", sets("training.lr=.nan"), 2, "training.lr: must be a finite number"),
    Case("set-python-tag", sets("training.lr=!!python/object/apply:os.system [x]"), 2, "could not determine"),
    Case("set-deep", sets("training.lr=" + "[" * 10_000 + "]" * 10_000), 2, "--set training.lr: nesting deeper"),
    Case("set-alias-bomb", sets("grid={" + BOMB.replace("\n", ", ") + "}"), 2, "anchors and *aliases count"),
    Case("set-recursive", sets("training.lr=&a [*a]"), 2, "recursive structures are not allowed"),
    Case("set-duplicate", sets("method.options={rank: 2, rank: 3}"), 2, "duplicate key 'rank'"),
    Case("set-no-equals", sets("training.lr"), 2, "expected key=value"),
    Case("set-empty-axis", sets("grid.=[1]"), 2, "unknown key ''"),
    Case("set-unknown-key", sets("training.nonsense=1"), 2, "unknown key 'training.nonsense'"),
    Case("set-grid-on-list", lambda sb: dry("grid: [1]\n", "--set", "grid.seed=[0]")(sb), 2, "'grid' in the config"),
    # --- what is already in the output folder
    Case("results-200k-deep", planted_results("[" * 200_000 + "]" * 200_000), 0, "nests deeper than 100 levels"),
    Case("results-deep-resume", planted_results("[" * 200_000, "--resume"), 0, "will be run again"),
    Case("results-truncated", planted_results('{"schema": 2, "status": "fin'), 0, "is not valid JSON"),
    Case("results-not-object", planted_results("[1, 2]"), 0, "the top level is not a JSON object"),
    Case("run-folder-is-link", planted_link("lora-rank2-naive-s0", folder=True), 2, "is a symbolic link"),
    Case("checkpoints-is-link", planted_link("lora-rank2-naive-s0/checkpoints", folder=True), 2, "inside a run"),
    Case("lock-is-link", planted_link("lora-rank2-naive-s0/.lock", folder=False), 2, "inside a run folder"),
    Case(
        "out-is-a-file",
        lambda sb: (sb.out.write_text("x"), ["run", str(sb.config(SMALL)), "--out", str(sb.out / "o"), "--quiet"])[1],
        2,
        "is not writable",
    ),
    Case("pipe-in-run-folder", planted_fifo, 2, "is not a regular file (a pipe, socket or device)"),
    # --- files the run reads: never unpickled with code
    Case("checkpoint-pickle-payload", evil_checkpoint, 2, "could not be read as a state dict"),
    Case(
        "checkpoint-is-folder",
        dry(merged(backbone={"checkpoint": "/"})),
        2,
        "backbone.checkpoint: '/' is not a complete `avl-peft pretrain` output: no card.json",
    ),
    Case("state-pickle-payload", evil_state, 0, "state_0.pt: cannot be loaded"),
    # --- report: a bad results.json is skipped with a warning, never a traceback
    Case("report-200k-deep", report_with("[" * 200_000 + "]" * 200_000), 0, "nests deeper than 100 levels"),
    Case("report-1500x1500", report_with(big_matrix(1500)), 0, "more than the 500,000 a results file may have"),
    Case("report-truncated", report_with('{"schema": 2, "sta'), 0, "is not valid JSON"),
    Case("report-40-MB", report_with(sparse(40 << 20)), 0, "more than the 33,554,432 allowed"),
    Case("report-fifo", report_with(fifo), 0, "| lora"),  # not a regular file: not even opened
    Case("report-nan-matrix", report_with(big_matrix(2).replace("0.5", "NaN")), 0, "| lora"),
    Case("report-only-bad", report_with("[" * 200_000, good=False), 2, "none of the 1 results.json"),
    Case("report-missing-folder", lambda sb: ["report", str(sb.out / "nope")], 2, "does not exist"),
    # --- the pretrain config a study names (backbone.pretrain): the study path's reader and bounds
    Case("pretrain-alias-bomb", pre(BOMB), 2, "anchors and *aliases count"),
    Case("pretrain-deep", pre(DEEP_LIST.replace("seed", "name")), 2, "nesting deeper than 64 levels"),
    Case("pretrain-duplicate-key", pre("training:\n  lr: 0.1\n  lr: 0.2\n"), 2, "duplicate key 'lr' on line 3"),
    Case("pretrain-python-tag", pre("seed: !!python/object/apply:os.system [x]\n"), 2, "python/object/apply"),
    Case(
        "pretrain-fifo",
        lambda sb: (
            (os.mkfifo(sb.root / "p.yaml"), pre("")(sb))[1]
            and [
                "run",
                str(sb.config(merged(backbone={**SMALL["backbone"], "pretrain": str(sb.root / "p.yaml")}))),
                "--out",
                str(sb.out),
                "--dry-run",
            ]
        ),
        2,
        "is not a regular file",
    ),
    Case("pretrain-depth-minus-1", pre_kwargs(depth=-1), 2, "backbone.kwargs.depth: must be > 0"),
    Case("pretrain-patch-0", pre_kwargs(patch_size=0), 2, "backbone.kwargs.patch_size: must be > 0"),
    Case("pretrain-heads-5", pre_kwargs(num_heads=5), 2, "backbone.kwargs: timm cannot build"),
    Case("pretrain-unknown-kwarg", pre_kwargs(foo=1), 2, "'foo' is not an argument of timm"),
    Case(
        "pretrain-mlp-ratio-inf",
        pre_kwargs(mlp_ratio=float("inf")),
        2,
        "backbone.kwargs.mlp_ratio must be a finite number",
    ),
    Case("pretrain-unknown-model", pre({"backbone": {"name": "vit_nope"}}), 2, "unknown timm model"),
    Case("pretrain-warmup-nan", pre("training: {warmup: .nan}\n"), 2, "training.warmup: must be a finite number"),
    Case("pretrain-seed-2^70", pre({"seed": 2**70}), 2, "seed: must be <= 4294967295"),
    Case("pretrain-threads-1e6", pre({"training": {"threads": 10**6}}), 2, "training.threads: must be <= 256"),
    Case("pretrain-epochs-1e12", pre({"training": {"epochs": 10**12}}), 2, "training.epochs: must be <= 10000"),
    Case("pretrain-images-1e9", pre({"data": {"train_per_class": 10**9}}), 2, "data.train_per_class: must be <="),
    Case(
        "pretrain-test-set-GiBs",
        pre(
            {
                "data": {"test_per_class": 10_000, "img_size": 512},
                "backbone": {"kwargs": {**TINY["backbone"]["kwargs"], "img_size": 512}},
            }
        ),
        2,
        "GiB test set",
    ),
    Case(
        "pretrain-batch-over-images", pre({"training": {"batch_size": 1000}}), 2, "training.batch_size (1000) exceeds"
    ),
    Case("pretrain-cmd-alias-bomb", pre(BOMB, command="pretrain"), 2, "anchors and *aliases count"),
    Case(
        "pretrain-cmd-heads-5",
        lambda sb: (
            pre_kwargs(num_heads=5)(sb)
            and ["pretrain", str(sb.root / "configs" / "pretrain.yaml"), "--out", str(sb.out)]
        ),
        2,
        "timm cannot build",
    ),
    # --- pretrain outputs: planted links, and another config's folder (nothing is trained)
    Case("pretrain-lock-is-link", pretrain_lock_link, 2, "is a symbolic link or not a regular file"),
    Case("pretrain-cache-entry-is-link", pretrain_cache_entry_link, 2, "cache entry"),
    Case(
        "pretrain-other-config-owns-out",
        pretrain_over_owner,
        2,
        "holds the weights of another pretrain config: 'owner'",
    ),
    # --- card.json and weights behind backbone.checkpoint: bounded, schema-checked, header before hash
    Case("card-fields-missing", card_case(rewrite_card(classes=None)), 2, "field 'classes' is missing"),
    Case("card-wrong-type", card_case(rewrite_card(backbone="vit")), 2, "field 'backbone' is missing or not a dict"),
    Case("card-count-is-bool", card_case(rewrite_card(num_classes=True)), 2, "'num_classes' is missing or not an int"),
    Case(
        "card-img-size-is-bool",
        card_case(rewrite_card(data_config={"img_size": True, "mean": [0.5] * 3, "std": [0.5] * 3})),
        2,
        "integer img_size",
    ),
    Case(
        "card-std-zero",
        card_case(rewrite_card(data_config={"img_size": 16, "mean": [0.5], "std": [0]})),
        2,
        "positive std",
    ),
    Case("card-deep", card_case(lambda d: (d / "card.json").write_text("[" * 100_000)), 2, "nests deeper than 16"),
    Case("card-2-MB", card_case(lambda d: sparse(2 << 20)(d / "card.json")), 2, "more than the 1,048,576 allowed"),
    Case(
        "card-fifo",
        card_case(lambda d: ((d / "card.json").unlink(), os.mkfifo(d / "card.json"))),
        2,
        "is not a regular file",
    ),
    Case(
        "weights-truncated",
        card_case(lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-10])),
        2,
        "has a malformed entry in the header",
    ),
    Case(
        "weights-fifo",
        card_case(lambda d: ((d / "model.safetensors").unlink(), os.mkfifo(d / "model.safetensors"))),
        2,
        "is not a regular file",
    ),
    Case("weights-link-to-32-GiB", card_case(huge_weights_link), 2, "its header is not valid JSON"),
    Case("weights-of-another-backbone", card_case(other_weights), 2, "does not hold this backbone's tensor"),
    # --- image folders (upstream imagefolder:, listed and header-checked by the dry-run)
    Case(
        "image-postscript-png",
        upstream_folder(lambda d: (d / "1.png").write_bytes(POSTSCRIPT)),
        2,
        "is not a BMP, GIF, JPEG, PNG, TIFF image",
    ),
    Case(
        "image-bomb",
        upstream_folder(lambda d: (d / "1.png").write_bytes(_png(20000, 20000))),
        2,
        "1.png' is too large to decode safely",
    ),
    Case(
        "image-thin-strip",
        upstream_folder(lambda d: (d / "1.png").write_bytes(_png(1, 1_000_000))),
        2,
        "once its shorter side is resized",
    ),
    Case("image-fifo", upstream_folder(lambda d: os.mkfifo(d / "1.png")), 2, "but is not a regular file"),
    Case("image-garbage", upstream_folder(lambda d: (d / "1.jpg").write_bytes(b"\xff\xd8garbage")), 2, "1.jpg"),
    Case("upstream-per-class-1e9", upstream_folder(lambda d: None, per_class=10**9), 2, "per_class: must be <="),
    Case(
        "upstream-glyphs-GiBs",
        dry(merged(upstream={"dataset": "glyphs", "head": "knn", "per_class": 100_000})),
        2,
        "GiB in memory",
    ),
    # --- scenario counts and threads, checked by the dry-run instead of failing when the run starts
    Case("experiences-do-not-divide", dry(merged(scenario={"n_experiences": 4})), 2, "does not divide the 6 classes"),
    Case("first-exp-too-big", dry(merged(scenario={"options": {"first_exp_classes": 9}})), 2, "first_exp_classes"),
    Case("synthetic-classes-1e9", dry(merged(scenario={"options": {"n_classes": 10**9}})), 2, "n_classes: must be <="),
    Case("synthetic-GiBs", dry(merged(scenario={"options": {"n_train_per_class": 1_000_000}})), 2, "GiB in memory"),
    Case("threads-1000", dry(merged(training={"threads": 1000})), 2, "training.threads: must be <= 256"),
    # --- report: hostile text is drawn and written literally
    # --- budget: --timm values through the same reader and checks
    Case("budget-python-tag", budget("--timm", "depth=!!python/object/apply:os.system [x]"), 2, "could not"),
    Case("budget-depth-minus-1", budget("--timm", "depth=-1"), 2, "--timm depth: must be > 0"),
    Case("budget-unknown-kwarg", budget("--timm", "foo=1"), 2, "'foo' is not an argument of timm model"),
    Case("budget-nan", budget("--timm", "mlp_ratio=.nan"), 2, "--timm mlp_ratio must be a finite number"),
    Case("budget-no-key", budget("--timm", "=3"), 2, "expected key=value"),
    Case("budget-alias-bomb", budget("--timm", "img_size={" + BOMB.replace("\n", ", ") + "}"), 2, "aliases count"),
    Case("budget-heads", budget("--timm", "num_heads=5"), 2, "timm cannot build"),
    Case("budget-negative", lambda sb: ["budget", "--", "-5"], 2, "budget must be a positive integer"),
    Case("budget-unknown-model", budget("--backbone", "vit_nonexistent"), 2, "unknown timm model"),
    Case("budget-not-a-number", lambda sb: ["budget", "lots"], 2, ""),  # argparse: usage and exit 2
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_table(case, sandbox, capsys, monkeypatch):
    monkeypatch.setenv("AVL_PEFT_CACHE", str(sandbox.out / "cache"))  # a case may point it elsewhere in out
    argv = case.prepare(sandbox)
    before = snapshot(sandbox.root, sandbox.out)
    peak_before, start = _peak_rss(), time.perf_counter()
    code = call(argv)
    seconds, grown = time.perf_counter() - start, _peak_rss() - peak_before
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code == case.code, text[-2000:]
    assert seconds < 10, f"{case.id} took {seconds:.1f} s"
    # The process's peak resident memory: a row that allocated a GiB beyond the earlier peak raises it.
    assert grown < 1 << 30, f"{case.id} raised the peak memory by {grown / 2**20:.0f} MiB"
    assert case.fragment in text, text[-2000:]
    assert "Traceback" not in text
    assert snapshot(sandbox.root, sandbox.out) == before  # nothing written, removed or changed outside out
    assert sandbox.victim.read_text() == "keep me"
    assert not list(sandbox.root.rglob("PWNED")) and not (Path.cwd() / "PWNED").exists()


def _peak_rss() -> int:
    """Peak resident memory of this process so far, in bytes (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def test_resume_over_a_hostile_results_file_redoes_the_run(sandbox, capsys):
    argv = planted_results("[" * 200_000 + "]" * 200_000)(sandbox)
    argv.remove("--dry-run")
    assert call([*argv, "--resume", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "nests deeper than 100 levels" in captured.err and "will be run again" in captured.err
    assert "Traceback" not in captured.out + captured.err
    assert json.loads((run_dir(sandbox) / "results.json").read_text())["status"] == "finished"


def test_report_writes_hostile_text_literally(sandbox, capsys):
    """Mathtext, formulas and a 10,000-character id in results files: drawn and written as text, one warning
    line per bad file, nothing outside the output folder (one report: it renders plots, about a second)."""
    import csv

    argv = report_many(sandbox)
    before = snapshot(sandbox.root, sandbox.out)
    assert call(argv) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    warned = [line for line in captured.err.splitlines() if "trainable" in line]
    assert len(warned) == 1 and str(sandbox.out / "trainable" / "results.json") in warned[0]
    assert snapshot(sandbox.root, sandbox.out) == before
    with open(sandbox.out / "report.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    cells = [value for row in rows for value in row.values()]
    assert "'+SUM(1)" in cells and "'@x" in cells and "+SUM(1)" not in cells
    assert not any(cell.startswith(("=", "+", "@")) for cell in cells)
    names = [p.name for p in (sandbox.out / "plots").iterdir()]
    assert all(len(name) <= 255 for name in names) and len([n for n in names if n.startswith("acc_matrix_")]) == 5


def test_heatmaps_of_huge_matrices_have_a_capped_size(sandbox, capsys):
    from PIL import Image

    (sandbox.out / "huge").mkdir(parents=True)
    (sandbox.out / "huge" / "results.json").write_text(big_matrix(400))  # 160,000 values: within the limits
    assert call(["report", str(sandbox.out)]) == 0
    with Image.open(sandbox.out / "plots" / "acc_matrix_huge.png") as image:
        width, height = image.size
    assert width <= 1300 and height <= 1300  # 12 inches at 100 dpi, plus the colour bar; uncapped: ~22,150


# ------------------------------------------------------------------------------------------------------
# Real runs: hostile names, planted links and a config named '...yaml' write nothing outside --out
# ------------------------------------------------------------------------------------------------------


def test_hostile_names_and_planted_links_write_nothing_outside_out(sandbox, capsys):
    out = sandbox.out
    out.mkdir(parents=True)
    for name in ("study.yaml", "report.md", "report.csv"):  # links planted where avl-peft writes files
        (out / name).symlink_to(sandbox.victim)
    configs = [
        (sandbox.config(merged(name="../../x"), "dots.yaml"), []),
        (sandbox.config(merged(name=str(sandbox.root / "absolute")), "absolute.yaml"), ["--force"]),
    ]
    before = snapshot(sandbox.root, out)
    for config, flags in configs:
        assert call(["run", str(config), "--out", str(out), "--quiet", *flags]) == 0
    assert call(["report", str(out)]) == 0
    text = capsys.readouterr()
    assert "Traceback" not in text.out + text.err
    assert snapshot(sandbox.root, out) == before
    assert sandbox.victim.read_text() == "keep me"  # the links were replaced, never written through
    for name in ("study.yaml", "report.md", "report.csv"):
        assert (out / name).is_file() and not (out / name).is_symlink()
    assert json.loads((run_dir(sandbox) / "results.json").read_text())["status"] == "finished"


def test_config_named_dots_writes_under_runs_not_the_working_directory(sandbox, capsys):
    (sandbox.cwd / "...yaml").write_text(yaml.safe_dump(SMALL))
    runs = sandbox.cwd / "runs"
    before = snapshot(sandbox.root, runs)
    assert call(["run", "...yaml", "--quiet"]) == 0
    assert "-> runs/__" in capsys.readouterr().out
    assert snapshot(sandbox.root, runs) == before
    assert [p.name for p in runs.iterdir()] == ["__"]
    assert (runs / "__" / "lora-rank2-naive-s0" / "results.json").is_file()


def _png(width: int, height: int) -> bytes:
    """A grey PNG claiming width x height pixels; Pillow checks the size before decoding any data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"".join(b"\x00" + b"\x80" * width for _ in range(min(height, 28))))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (_png(20000, 20000), "is too large to decode safely"),  # a decompression bomb: 400 M pixels
        (b"\x89PNG\r\n\x1a\nnot really", "could not be read"),
        # every notMNIST image is kept decoded: a 28x28 letter's budget bounds the memory of many large ones
        (_png(200, 200), "200 x 200 pixels, more than the 16,384 allowed"),
    ],
    ids=["decompression-bomb", "garbage", "large-image-kept-decoded"],
)
def test_bad_image_in_notmnist_folder_is_named(sandbox, capsys, bad, message):
    data = sandbox.root / "data"
    for letter in "ABCDEFGHIJ":
        folder = data / "notMNIST" / letter
        folder.mkdir(parents=True)
        for i in range(2):
            (folder / f"{i}.png").write_bytes(_png(28, 28))
    (data / "notMNIST" / "C" / "1.png").write_bytes(bad)
    study = merged(
        scenario={
            "name": "five_datasets",
            "n_experiences": None,
            "root": str(data),
            "options": {"order": ["notmnist", "cifar10", "mnist", "fashion_mnist", "svhn"]},
        }
    )
    config = sandbox.config(study)
    before = snapshot(sandbox.root, sandbox.out)
    assert call(["run", str(config), "--out", str(sandbox.out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and f"{data / 'notMNIST' / 'C' / '1.png'}" in err and "Traceback" not in err
    assert snapshot(sandbox.root, sandbox.out) == before
