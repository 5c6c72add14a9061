"""Upstream retention in runs, with known answers: a frozen backbone keeps it exactly; full fine-tuning with a
large learning rate on unrelated data loses it; a class-count mismatch exits 2 with a message."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import avl_peft
from avl_peft.cli import main
from avl_peft.study.config import expand, validate_study
from avl_peft.study.experiment import run_experiment

KWARGS = {"img_size": 16, "patch_size": 4, "depth": 1}


@pytest.fixture(scope="module")
def upstream_checkpoint(tmp_path_factory):
    """A tiny ViT trained to know the 6-class synthetic task well, saved with its classifier."""
    from avl_peft.cl.scenarios import build_scenario

    torch.manual_seed(0)
    model = avl_peft.create_backbone("vit_tiny_patch16_224", num_classes=6, **KWARGS)
    bench = build_scenario("synthetic", n_experiences=1, img_size=16, seed=0)
    data = bench.train_stream[0].dataset
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([int(data[i][1]) for i in range(len(data))])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("ckpt") / "synthetic.pth"
    torch.save(model.state_dict(), path)
    return path


def _cfg(method, checkpoint, *, head="checkpoint", lr=1e-2, dataset="synthetic", **extra):
    data = {
        "backbone": {"name": "vit_tiny_patch16_224", "kwargs": KWARGS, "checkpoint": str(checkpoint)},
        "scenario": {"name": "digits", "n_experiences": 2},
        "training": {"epochs": 2, "batch_size": 32, "lr": lr},
        "method": {"name": method, "options": {} if method in ("full", "head") else {"rank": 2}},
        "upstream": {"dataset": dataset, "head": head, "per_class": 10, **extra},
        "subspace": {"enabled": False},
    }
    ((_, cfg),) = expand(validate_study(data))
    return cfg


@pytest.mark.parametrize("head", ["checkpoint", "knn"])
def test_frozen_backbone_keeps_upstream_accuracy_exactly(upstream_checkpoint, tmp_path, head):
    out = run_experiment(_cfg("head", upstream_checkpoint, head=head), tmp_path, progress=False)
    up = out["upstream"]
    assert len(up["acc"]) == 3  # before training, after each of the 2 experiences
    assert up["acc"][0] > 0.3  # the checkpoint knows its task (chance: 1/6)
    assert up["retention"] == 1.0 and up["forgetting"] == 0.0
    assert out["timing"]["upstream_s"] > 0
    assert json.loads((tmp_path / "results.json").read_text())["upstream"] == up


def test_full_fine_tuning_with_a_large_step_loses_upstream_accuracy(upstream_checkpoint, tmp_path):
    out = run_experiment(_cfg("full", upstream_checkpoint, lr=0.05), tmp_path, progress=False)
    up = out["upstream"]
    assert up["acc"][0] > 0.5 and up["retention"] < 0.8 and up["forgetting"] > 0.1, up


def test_upstream_config_errors_are_named(upstream_checkpoint, tmp_path):
    from avl_peft.errors import ConfigError

    with pytest.raises(ConfigError, match="upstream.dataset: unknown dataset 'glyph'"):
        _cfg("lora", upstream_checkpoint, dataset="glyph")
    with pytest.raises(ConfigError, match="does not exist"):
        _cfg("lora", upstream_checkpoint, dataset=f"imagefolder:{tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="upstream.head: checkpoint reads the pretrained classifier"):
        validate_study({"scenario": {"name": "digits"}, "upstream": {"dataset": "digits"}})
    with pytest.raises(ConfigError, match="Did you mean 'head'"):
        validate_study({"scenario": {"name": "digits"}, "upstream": {"dataset": "digits", "haed": "knn"}})


def test_imagefolder_class_count_mismatch_exits_2(upstream_checkpoint, tmp_path, capsys):
    folder = tmp_path / "probe"
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):  # 3 classes; the checkpoint's classifier has 6
        (folder / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")
    cfg = _cfg("lora", upstream_checkpoint, dataset=f"imagefolder:{folder}")
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in cfg.items()}))
    code = main(["run", str(config), "--out", str(tmp_path / "runs"), "--quiet"])
    assert code == 2
    assert "3 classes but the checkpoint's classifier has 6" in capsys.readouterr().err
