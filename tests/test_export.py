"""Export to Hugging Face peft and plain timm weights, the loaders' checks, and ``method.init_from``.

Exactness (avl_peft/study/export/peft_format.py): the peft-loaded model's logits equal avl-peft's within
1e-5 (fp32) for every method under continue, stack and merge — quick tests build the adapters directly
(random factors, so every ΔW is non-zero), slow ones go through real runs and the CLI. The timm export
equals the merged model within 1e-5. Hostile or foreign run folders end in exit code 2 and write nothing.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import timm
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

import avl_peft
from avl_peft.adapters import METHODS, stack
from avl_peft.adapters.stack import adapted_layers
from avl_peft.cl.backbone import create_continual_model
from avl_peft.cli import main
from avl_peft.errors import ConfigError, DataError
from avl_peft.study import experiment as study
from avl_peft.study.config import expand, validate_study
from avl_peft.study.export import runs
from avl_peft.study.export.card import head_tensors
from avl_peft.study.export.peft_format import FactorCollector, adapter_files

KWARGS = {"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}
ADAPTERS = [m for m in avl_peft.methods() if METHODS.get(m).adds_adapter]


def continual(seed=0):
    torch.manual_seed(seed)
    model = create_continual_model("vit_tiny_patch16_224", **KWARGS, initial_classes=4)
    model.head.active_units[:3] = 1  # class 3 not trained yet: masked to -1000
    return model.eval()


def randomize(model, seed):
    """Every trainable adapter tensor random (a trained state, not the zero-update init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            for p in layer.adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def peft_logits(model, collector, x, width=4):
    """Write the collected LoRA and the head as peft files, load them on a plain timm model, run ``x``."""
    base = timm.create_model("vit_tiny_patch16_224", num_classes=width, **KWARGS).eval()
    base.load_state_dict(continual().backbone.state_dict(), strict=False)  # the original weights
    config, weights = adapter_files(collector.lora(), head_tensors(model, width), "head", {"timm_name": "vit"})
    folder = Path(os.environ["PYTEST_TMP"]) / "adapter"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, str(folder)).eval()(x)


@pytest.fixture(autouse=True)
def _tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTEST_TMP", str(tmp_path))


COMBINATIONS = [
    (m, p)
    for m in ADAPTERS
    for p in ("continue", "stack", "merge")
    if p == "stack" or not METHODS.get(m).requires_stack
]


@pytest.mark.parametrize("method, policy", COMBINATIONS)
def test_every_method_as_a_peft_lora_gives_the_same_logits(method, policy):
    options = {"rank": 2} | ({"tt_rank": 2} if method == "loretta" else {})
    model = continual()
    avl_peft.inject(model, method, **options)
    randomize(model, 1)
    collector = FactorCollector(accumulate=policy == "merge")
    if policy == "stack":  # two branches per layer: one LoRA of the summed rank
        stack(model)
        randomize(model, 2)
    elif policy == "merge":  # experience 0's update folded into W, a fresh adapter on the merged weights
        collector(0, model)
        avl_peft.merge(model)
        avl_peft.inject(model, method, **options)
        randomize(model, 2)
    collector(1, model)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
    got = peft_logits(model, collector, x)
    assert torch.equal(got[:, 3], torch.full((3,), -1000.0))  # the masked class, as Avalanche masks it
    assert (got - want).abs().max() < 1e-5


def test_pissa_exports_rank_2r_over_the_original_weights():
    model = continual()
    avl_peft.inject(model, "pissa", rank=2, targets=["attn.qkv"])
    collector = FactorCollector(accumulate=False)
    collector(0, model)
    ((name, (b, a)),) = collector.lora().items()
    assert name == "blocks.0.attn.qkv" and a.shape == (4, 32) and b.shape == (96, 4)
    assert (b @ a).abs().max() < 1e-5  # update minus starting factors: zero before training


# ------------------------------------------------------------------------------------------------
# Through a run folder: one tiny lora run (3 experiences) for the module
# ------------------------------------------------------------------------------------------------


def run_cfg(method="lora", policy="continue", **extra):
    method = extra.pop("name", method)
    options = {} if not METHODS.get(method).adds_adapter else {"rank": 2}
    data = {
        "backbone": {"name": "vit_tiny_patch16_224", "kwargs": KWARGS},
        "scenario": {"name": "synthetic", "n_experiences": 3},
        "training": {"epochs": 1, "batch_size": 16, "lr": 1e-2} | extra.pop("training", {}),
        "method": {"name": method, "options": options | extra.pop("options", {}), "policy": policy, **extra},
        "subspace": {"enabled": False},
    }
    ((_, cfg),) = expand(validate_study(data))
    return cfg


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "run"
    study.run_experiment(run_cfg(), path, progress=False)
    return path


def reference(run_dir, t, merged=False):
    run = runs.open_run(run_dir)
    model = runs.model_at(run, t, runs.fresh_model(run))
    return avl_peft.merge(model) if merged else model


X = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def check_export(run_dir, out, fmt, experiences):
    loader = avl_peft.load_peft if fmt == "peft" else avl_peft.load_timm
    for t in experiences:
        model = loader(out, experience=t)
        with torch.no_grad():
            want, got = reference(run_dir, t, merged=fmt == "timm")(X), model(X)
        assert (got[:, : want.shape[1]] - want).abs().max() < 1e-5, (fmt, t)


def test_cli_exports_every_experience_as_named_peft_adapters(lora_run, tmp_path, capsys):
    out = tmp_path / "peft"
    assert main(["export", str(lora_run), "--experience", "all", "--format", "peft", "--out", str(out)]) == 0
    assert "exp_0, exp_1, exp_2" in capsys.readouterr().out
    card = json.loads((out / "avl_peft_export.json").read_text())
    assert sorted(os.listdir(out)) == ["avl_peft_export.json", "exp_0", "exp_1", "exp_2"]
    assert card["base"]["timm_name"] == "vit_tiny_patch16_224" and card["base"]["kwargs"] == KWARGS
    assert card["run"]["method"] == "lora" and len(card["run"]["config_hash"]) == 16
    assert card["normalisation"]["img_size"] == 16 and card["classes"] == list(range(6))
    model = avl_peft.load_peft(out)  # every experience as a named adapter, the last active
    assert set(model.peft_config) == {"exp_0", "exp_1", "exp_2"} and model.active_adapter == "exp_2"
    for t in (2, 0):
        model.set_adapter(f"exp_{t}")
        with torch.no_grad():
            want, got = reference(lora_run, t)(X), model(X)
        assert (got[:, : want.shape[1]] - want).abs().max() < 1e-5, t


def test_python_export_of_one_experience_loads_with_plain_peft(lora_run, tmp_path):
    out = tmp_path / "one"
    card = avl_peft.export(lora_run, out=out, format="peft", experience=1)
    assert (out / "adapter_config.json").is_file() and list(card["experiences"]) == ["exp_1"]
    base = timm.create_model("vit_tiny_patch16_224", num_classes=card["base"]["num_classes"], **KWARGS)
    torch.manual_seed(0)  # the run's seed: its random-init backbone, built as the run built it (1-way head)
    built = timm.create_model("vit_tiny_patch16_224", num_classes=1, **KWARGS)
    base.load_state_dict({k: v for k, v in built.state_dict().items() if not k.startswith("head.")}, strict=False)
    with torch.no_grad():
        got = PeftModel.from_pretrained(base, str(out)).eval()(X)
        want = reference(lora_run, 1)(X)
    assert (got[:, : want.shape[1]] - want).abs().max() < 1e-5


def test_timm_export_equals_the_merged_model_and_loads_with_timm(lora_run, tmp_path):
    out = tmp_path / "timm"
    card = avl_peft.export(lora_run, out=out, format="timm", experience="last")
    check_export(lora_run, out, "timm", [2])
    n = card["base"]["num_classes"]
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=True,
        num_classes=n,
        pretrained_cfg_overlay={"file": str(out / "model.safetensors"), "num_classes": n},
        **KWARGS,
    ).eval()
    with torch.no_grad():
        assert (model(X) - reference(lora_run, 2, merged=True)(X)).abs().max() < 1e-5


def test_a_mismatched_or_tampered_base_is_refused_naming_it(lora_run, tmp_path):
    out = tmp_path / "peft"
    card = avl_peft.export(lora_run, out=out, format="peft")
    wrong = timm.create_model("vit_tiny_patch16_224", num_classes=card["base"]["num_classes"], **KWARGS)
    with pytest.raises(ConfigError, match=r"not the base this export was made on.*first differing tensor: \S+"):
        avl_peft.load_peft(out, base=wrong)
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", num_classes=1, **KWARGS)
    base.reset_classifier(card["base"]["num_classes"])
    with torch.no_grad():
        base.blocks[0].mlp.fc2.weight[0, 0] += 1e-3
    with pytest.raises(ConfigError, match=r"first differing tensor: blocks\.0\.mlp\.fc2\.weight"):
        avl_peft.load_peft(out, base=base)
    weights = out / "adapter_model.safetensors"
    tensors = load_file(weights)
    next(iter(tensors.values()))[0] += 1.0
    save_file(tensors, weights)
    with pytest.raises(DataError, match=r"adapter_model\.safetensors' do not match the sha256"):
        avl_peft.load_peft(out)
    timm_out = tmp_path / "timm"
    avl_peft.export(lora_run, out=timm_out, format="timm")
    with open(timm_out / "model.safetensors", "r+b") as handle:
        handle.seek(-4, os.SEEK_END)
        handle.write(b"\x00\x00\x80\x7f")
    with pytest.raises(DataError, match=r"model\.safetensors' do not match the sha256"):
        avl_peft.load_timm(timm_out)


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def hostile_cases(run, tmp_path):
    def version(d):
        res = json.loads((d / "results.json").read_text())
        res["versions"]["avl_peft"] = "0.0.1"
        (d / "results.json").write_text(json.dumps(res))

    def unfinished(d):
        (d / "results.json").unlink()

    def gap(d):
        (d / "checkpoints" / "exp_1.pt").unlink()

    def linked_checkpoint(d):
        (d / "checkpoints" / "exp_0.pt").unlink()
        (d / "checkpoints" / "exp_0.pt").symlink_to(run / "checkpoints" / "exp_0.pt")

    def linked_folder(d):
        shutil.rmtree(d / "checkpoints")
        (d / "checkpoints").symlink_to(run / "checkpoints")

    def huge(d):
        with open(d / "checkpoints" / "exp_1.pt", "wb") as handle:
            handle.truncate(200 << 20)  # sparse: 200 MB on paper, nothing on disk

    def garbage(d):
        (d / "checkpoints" / "exp_0.pt").write_bytes(b"PK\x03\x04 not a checkpoint")

    return {
        "another avl-peft": (version, "written by avl-peft 0.0.1"),
        "no results.json": (unfinished, "results.json' does not exist"),
        "a missing checkpoint": (gap, "no checkpoints/exp_1.pt: the run folder is incomplete"),
        "a symlinked checkpoint": (linked_checkpoint, "exp_0.pt' is a symbolic link"),
        "a symlinked folder": (linked_folder, "is incomplete"),
        "a huge checkpoint": (huge, "more than this model's checkpoints can hold"),
        "a corrupt checkpoint": (garbage, "could not be restored|not an avl-peft checkpoint"),
    }


def test_export_refuses_incomplete_foreign_and_hostile_run_folders(lora_run, tmp_path, capsys):
    for i, (label, (damage, message)) in enumerate(hostile_cases(lora_run, tmp_path).items()):
        run_dir = copy_run(lora_run, tmp_path / f"run{i}")
        damage(run_dir)
        before = sorted(p for p in tmp_path.rglob("*"))
        out = tmp_path / f"out{i}"
        code = main(["export", str(run_dir), "--experience", "all", "--format", "timm", "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, label
        assert __import__("re").search(message, err), (label, err)
        assert sorted(p for p in tmp_path.rglob("*")) == before, f"{label}: something was written"
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(lora_run), "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err and os.listdir(out) == ["keep.txt"]
    assert main(["export", str(lora_run), "--experience", "7", "--out", str(tmp_path / "o")]) == 2
    assert "experience 7 is not one of run" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("method, training, message", [
    ("head", {}, "adds no adapter .*--format timm"),
    ("lora", {"pretrain": True}, "began with a base session .*--format timm"),
])  # fmt: skip
def test_peft_format_refuses_runs_that_are_not_a_low_rank_update_of_the_base(method, training, message, tmp_path):
    run = tmp_path / "run"
    study.run_experiment(run_cfg(method, training=training), run, progress=False)
    with pytest.raises(ConfigError, match=message):
        avl_peft.export(run, out=tmp_path / "o", format="peft")
    assert not (tmp_path / "o").exists()
    avl_peft.export(run, out=tmp_path / "t", format="timm", experience="all")
    check_export(run, tmp_path / "t", "timm", [0, 2])


# ------------------------------------------------------------------------------------------------
# Import: method.init_from
# ------------------------------------------------------------------------------------------------


def test_init_from_starts_the_first_adapter_from_a_peft_lora(lora_run, tmp_path):
    out = tmp_path / "adapter"
    avl_peft.export(lora_run, out=out, format="peft", experience=1)
    # Another alpha: the pair is rescaled so the update is the same.
    parts = study.build(run_cfg(options={"alpha": 4}, init_from=str(out)), None, progress=False)
    parts.peft._prepare(parts.model)
    want = avl_peft.delta_weights(reference(lora_run, 1))
    got = avl_peft.delta_weights(parts.model)
    assert set(got) == set(want) and all((got[k] - want[k]).abs().max() < 1e-6 for k in got)
    bad = {
        "rank 3": (dict(options={"rank": 3}), ConfigError, "has rank 2 but the run has rank 3; set method"),
        "targets": (dict(targets=["attn.qkv"]), ConfigError, "not targeted here: blocks.0.attn.proj"),
        "method": (dict(name="pissa"), ConfigError, "'pissa' cannot start from a peft LoRA"),
    }
    for label, (change, error, message) in bad.items():
        with pytest.raises(error, match=message):
            study.build(run_cfg(**change, init_from=str(out)), None, progress=False), label
    (out / "adapter_model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(DataError, match="header claims"):
        study.build(run_cfg(init_from=str(out)), None, progress=False)


# ------------------------------------------------------------------------------------------------
# Every method and policy through a real run and the CLI (slow: one tiny run each)
# ------------------------------------------------------------------------------------------------

RUNS = [("lora", "merge"), ("lora", "stack"), ("pissa", "continue"), ("pissa", "merge"), ("wegeft", "merge")]
RUNS += [("wegeft", "continue"), ("loretta", "stack"), ("sdlora", "stack"), ("inflora", "stack"), ("full", "continue")]


@pytest.mark.slow
@pytest.mark.parametrize("method, policy", RUNS)
def test_run_exports_equal_the_runs_models(method, policy, tmp_path):
    run = tmp_path / "run"
    study.run_experiment(run_cfg(method, policy), run, progress=False)
    formats = ["timm"] if method == "full" else ["peft", "timm"]
    for fmt in formats:
        out = tmp_path / fmt
        assert main(["export", str(run), "--experience", "all", "--format", fmt, "--out", str(out)]) == 0
        check_export(run, out, fmt, [0, 1, 2])


def test_safetensors_headers_are_checked_before_any_tensor_is_built(tmp_path):
    from avl_peft.safeio import check_safetensors, read_safetensors

    good = tmp_path / "good.safetensors"
    save_file({"a": torch.ones(2, 3), "b": torch.zeros(4)}, good)
    assert check_safetensors(good, what="w", max_bytes=1 << 20) == good.stat().st_size
    data = good.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])

    def variant(name, change):
        h = json.loads(json.dumps(header))
        change(h)
        text = json.dumps(h).encode()
        path = tmp_path / name
        path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])
        return path

    cases = {
        variant("overlap", lambda h: h["b"].update(data_offsets=[0, 16])): "overlap or leave a gap",
        variant("shape", lambda h: h["a"].update(shape=[3, 3])): "has 24 bytes for shape",
        variant("dtype", lambda h: h["a"].update(dtype="X9")): "malformed entry",
        variant("past", lambda h: h["b"].update(data_offsets=[24, 4000])): "malformed entry",
    }
    for path, message in cases.items():
        with pytest.raises(DataError, match=message):
            read_safetensors(path, what="w", max_bytes=1 << 20)
    long = tmp_path / "long"
    long.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(DataError, match="header claims"):
        check_safetensors(long, what="w", max_bytes=1 << 20)
    with pytest.raises(DataError, match="more than the 10 allowed"):
        check_safetensors(good, what="w", max_bytes=10)
