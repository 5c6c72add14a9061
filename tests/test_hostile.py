"""Hostile and bad input through the CLI: exit code 2, a message that says what to fix, no traceback."""

import pytest
import torch
import yaml

from avl_peft.cli import main

TINY = {
    "backbone": {"kwargs": {"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 48, "num_heads": 2}},
    "scenario": {"name": "synthetic", "n_experiences": 2},
    "training": {"epochs": 1, "batch_size": 16},
    "method": {"name": "lora", "options": {"rank": 2}},
    "subspace": {"enabled": False},
}


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
