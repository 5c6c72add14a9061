"""Study configs: validation before anything trains, grid expansion, and every shipped config."""

from pathlib import Path

import pytest
import torch

from avl_peft.cli import main
from avl_peft.errors import ConfigError
from avl_peft.study.config import apply_set, expand, validate_study

REPO = Path(__file__).parent.parent
ALL_CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
PRETRAIN_CONFIGS = [p for p in ALL_CONFIGS if p.name.startswith("pretrain_")]  # `avl-peft pretrain` configs
# study configs, the recorded benchmark studies included (a run folder's copy, runs/**/study.yaml, is not one)
CONFIGS = [p for p in ALL_CONFIGS if p not in PRETRAIN_CONFIGS] + sorted(
    p for p in (REPO / "benchmarks").glob("*/*.yaml") if p.parent.name != "runs"
)
TINY = {"backbone": {"kwargs": {"img_size": 32, "patch_size": 4, "depth": 2}}, "scenario": {"name": "synthetic"}}


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.name}" for p in CONFIGS])
def test_every_shipped_config_validates(path, capsys, monkeypatch):
    """`--dry-run` checks every shipped study here, offline and without its datasets (the dry-run reads no
    data); a study written for a GPU validates on a machine without one, with a warning naming the device."""
    import torch
    import yaml

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["run", str(path), "--dry-run", "--out", "/nonexistent-out-dir"]) == 0
    out = capsys.readouterr()
    assert "valid" in out.out
    if yaml.safe_load(path.read_text())["training"].get("device", "cpu").startswith("cuda"):
        if not torch.cuda.is_available():
            assert "warning: training.device: 'cuda' requested but CUDA is not available here" in out.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_real_run_still_refuses_a_missing_device():
    with pytest.raises(ConfigError, match="CUDA is not available here; use cpu"):
        validate_study({**TINY, "training": {"device": "cuda"}})


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS, ids=[p.name for p in PRETRAIN_CONFIGS])
def test_every_shipped_pretrain_config_validates(path, capsys, tmp_path):
    from avl_peft.pretrain import load_pretrain_config

    assert load_pretrain_config(path)["data"]["dataset"] == "glyphs"
    assert main(["pretrain", str(path), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    assert "valid, config hash" in capsys.readouterr().out and not (tmp_path / "out").exists()  # nothing trained


def test_each_command_names_the_other_for_the_wrong_kind_of_config(capsys):
    assert main(["run", str(PRETRAIN_CONFIGS[0]), "--dry-run"]) == 2
    assert "is a pretrain config (it has a data: section), not a study; build the backbone with `avl-peft pretrain" in (
        capsys.readouterr().err
    )
    assert main(["pretrain", str(REPO / "configs" / "quickstart.yaml"), "--dry-run"]) == 2
    assert "is a study config (it has scenario/method/strategy); run it with `avl-peft run" in capsys.readouterr().err


def test_quickstart_compares_all_methods():
    from avl_peft.study.config import load_study

    runs = expand(load_study(Path(__file__).parent.parent / "configs" / "quickstart.yaml"))
    assert {cfg["method"]["name"] for _, cfg in runs} == {"lora", "pissa", "wegeft", "loretta", "full", "head"}
    # a backbone with pretrained knowledge (built offline from configs/pretrain_glyphs.yaml) and its retention
    assert all(cfg["backbone"]["pretrain"].endswith("pretrain_glyphs.yaml") for _, cfg in runs)
    assert all(cfg["upstream"]["dataset"] == "glyphs" for _, cfg in runs)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"trainig": {}}, r"unknown key 'trainig' at the top level.*Did you mean 'training'"),
        ({"training": {"lr": -1}}, r"training\.lr: must be > 0"),
        ({"training": {"lr": "fast"}}, r"training\.lr: must be a number"),
        ({"training": {"epochs": 0}}, r"training\.epochs: must be >= 1"),
        ({"training": {"epochs": 2.5}}, r"training\.epochs: must be an integer"),
        ({"training": {"batch_size": True}}, r"training\.batch_size: must be an integer"),
        ({"training": {"optimizer": "adamm"}}, r"training\.optimizer.*Did you mean 'adam"),
        ({"training": {"train_mask": "everything"}}, r"train_mask.*current, seen"),
        ({"training": {"device": "gpu0"}}, r"training\.device.*cpu, cuda"),
        ({"training": {"lr_rate": 0.1}}, r"unknown key 'lr_rate' in 'training'"),
        ({"method": {"name": "lorra"}}, r"unknown method 'lorra'.*Did you mean 'lora'"),
        ({"method": {"options": {"rank": 0}}}, r"rank must be a positive integer"),
        ({"method": {"options": {"rnak": 4}}}, r"no option 'rnak'.*Did you mean 'rank'"),
        ({"method": {"name": "head", "options": {"rank": 4}}}, r"takes no options"),
        ({"method": {"policy": "freeze"}}, r"method\.policy.*continue, merge"),
        ({"method": {"targets": "qkv"}}, r"method\.targets: must be a list"),
        ({"strategy": {"name": "replayy"}}, r"unknown strategy 'replayy'.*Did you mean 'replay'"),
        ({"strategy": {"name": "replay", "options": {"memsize": 10}}}, r"no option 'memsize'.*mem_size"),
        ({"scenario": {"name": "cifar"}}, r"unknown scenario 'cifar'"),
        ({"seed": -1}, r"seed: must be >= 0"),
        ({"grid": {"training.lrr": [0.1]}}, r"unknown key 'training\.lrr'"),
        ({"grid": {"seed": 3}}, r"grid\.seed: must be a non-empty list"),
        ({"grid": {"seed": []}}, r"grid\.seed: must be a non-empty list"),
        ({"variants": [{"method.optons.rank": 2}]}, r"unknown key 'method\.optons\.rank'"),
        ({"backbone": {"pretrained": True, "checkpoint": "w.pth"}}, r"either pretrained.*or checkpoint"),
        ({"training": {"pretrain": True}, "scenario": {"name": "synthetic", "n_experiences": 1}}, r"at least 2"),
        ({"training": "fast"}, r"training: must be a mapping"),
        ({"grid": {"method.options.rank": [4, -2]}}, r"rank must be a positive integer"),
    ],
)
def test_malformed_config_names_the_key(config, message):
    with pytest.raises(ConfigError, match=message):
        validate_study(config)


def test_grid_expansion_and_baselines_drop_rank():
    study = validate_study(
        {**TINY, "grid": {"method.name": ["lora", "head"], "method.options.rank": [2, 4], "seed": [0, 1]}}
    )
    ids = [rid for rid, _ in expand(study)]
    assert len(ids) == len(set(ids)) == 2 * 2 + 2  # lora × 2 ranks × 2 seeds, head × 2 seeds
    assert "lora-rank2-naive-s1" in ids and "head-naive-s0" in ids


def test_set_overrides():
    data = apply_set(TINY, ["training.lr=0.01", "grid.seed=[0, 1]", "method.options.rank=2"])
    runs = expand(validate_study(data))
    assert [cfg["training"]["lr"] for _, cfg in runs] == [0.01, 0.01]
    assert runs[0][1]["method"]["options"] == {"rank": 2}
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_set(TINY, ["training.lr"])
    with pytest.raises(ConfigError, match="unknown key 'training.lrr'"):
        apply_set(TINY, ["training.lrr=1"])


def test_cli_exit_code_2_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  lr: [oops\n")
    assert main(["run", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML" in err and "Traceback" not in err
    bad.write_text("method: {name: lorra}\n")
    assert main(["run", str(bad), "--dry-run"]) == 2
    assert "Did you mean 'lora'" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_typo_in_options_is_reported_even_when_grid_changes_method():
    with pytest.raises(ConfigError, match="no option 'rnak'"):
        validate_study({**TINY, "method": {"options": {"rnak": 4}}, "grid": {"method.name": ["lora", "full"]}})
