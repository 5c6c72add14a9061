"""Glyph pretraining: strict config, bit-identical reruns, cache reuse and repair, loading back."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import avl_peft
from avl_peft import pretrain as pretraining
from avl_peft.cl.scenarios.glyphs import GlyphDataset
from avl_peft.errors import ConfigError, DataError
from avl_peft.pretrain import (
    config_hash,
    find_or_build,
    load_pretrain_config,
    load_pretrained,
    output_dir,
    pretrain,
)

ROOT = Path(__file__).resolve().parents[1]

# A few hundred images, nine steps, a one-block ViT: seconds on one thread.
TINY = {
    "name": "tiny",
    "seed": 0,
    "backbone": {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 4, "depth": 1}},
    "data": {"train_per_class": 6, "test_per_class": 2},
    "training": {"epochs": 1, "batch_size": 32, "lr": 0.001, "warmup": 0.2, "threads": 1},
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One tiny pretrain output shared by the tests that only read it or copy it."""
    return pretrain(TINY, tmp_path_factory.mktemp("built") / "out", progress=False)


@pytest.fixture
def count_trainings(monkeypatch):
    calls = []
    real = pretraining.outputs._train

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pretraining.outputs, "_train", counted)
    return calls


def test_unknown_key_names_the_path_and_suggests():
    with pytest.raises(ConfigError, match=r"training\.lrr.*Did you mean 'lr'"):
        load_pretrain_config({"training": {"lrr": 0.1}})
    with pytest.raises(ConfigError, match=r"'seeds'.*Did you mean 'seed'"):
        load_pretrain_config({"seeds": 1})
    with pytest.raises(ConfigError, match=r"data\.train_per_clas\b.*Did you mean 'train_per_class'"):
        load_pretrain_config({"data": {"train_per_clas": 10}})


def test_types_and_ranges_are_checked():
    with pytest.raises(ConfigError, match=r"training\.batch_size: must be an integer"):
        load_pretrain_config({"training": {"batch_size": "big"}})
    with pytest.raises(ConfigError, match=r"training\.lr: must be in \(0, 10\]"):
        load_pretrain_config({"training": {"lr": -1}})
    with pytest.raises(ConfigError, match=r"training\.precision: must be one of auto, bf16, fp32"):
        load_pretrain_config({"training": {"precision": "fp16"}})
    with pytest.raises(ConfigError, match=r"data\.dataset: must be one of glyphs"):
        load_pretrain_config({"data": {"dataset": "mnist"}})
    with pytest.raises(ConfigError, match=r"backbone\.kwargs\.img_size .* differ"):
        load_pretrain_config({"backbone": {"kwargs": {"img_size": 64}}})
    with pytest.raises(ConfigError, match=r"training: must be a mapping"):
        load_pretrain_config({"training": 3})
    # YAML 1.1 reads 1e-3 as a string; a plainly numeric string is accepted for a number
    assert load_pretrain_config({"training": {"lr": "1e-3"}})["training"]["lr"] == 0.001


def test_defaults_and_shipped_config():
    cfg = load_pretrain_config({})
    assert cfg["backbone"] == {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 4, "depth": 4}}
    shipped = load_pretrain_config(ROOT / "configs" / "pretrain_glyphs.yaml")
    assert shipped["data"]["dataset"] == "glyphs" and shipped["backbone"] == cfg["backbone"]
    with pytest.raises(ConfigError, match="does not exist"):
        load_pretrain_config(ROOT / "configs" / "no_such.yaml")


def test_config_hash_is_stable_and_sensitive():
    assert config_hash(TINY) == config_hash(load_pretrain_config(TINY))
    assert len(config_hash(TINY)) == 16
    other = {**TINY, "seed": 1}
    assert config_hash(other) != config_hash(TINY)
    assert output_dir(TINY, "/c") == Path("/c") / f"tiny-{config_hash(TINY)}"


def test_threads_null_follows_the_thread_policy_and_keys_the_cache_as_resolved(monkeypatch, tmp_path):
    policy = {**TINY, "training": {**TINY["training"], "threads": None}}
    assert load_pretrain_config({})["training"]["threads"] is None  # the default: the machine's cores
    for n in (1, 3):
        monkeypatch.setenv("OMP_NUM_THREADS", str(n))  # the user's setting for the process wins
        assert pretraining.config.resolved_threads(load_pretrain_config(policy)) == n
        assert config_hash(policy) == config_hash({**TINY, "training": {**TINY["training"], "threads": n}})
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(pretraining.config, "default_threads", lambda workers=1: 2)  # a 2-core machine
    assert config_hash(policy) != config_hash(TINY)  # 2 threads, not TINY's 1: other rounding, other cache
    card = json.loads((pretrain(policy, tmp_path / "out", progress=False) / "card.json").read_text())
    assert card["threads"] == 2 and card["hardware"]["threads"] == 2 and card["config"]["training"]["threads"] is None


def test_config_hash_includes_the_font_list(monkeypatch):
    before = config_hash(TINY)
    real = pretraining.config.font_manifest
    monkeypatch.setattr(pretraining.config, "font_manifest", lambda pool: [*real(pool), ["Extra.ttf", "Extra", "", 1]])
    assert config_hash(TINY) != before  # another machine's fonts: another cache entry


def test_tiny_pretrain_is_bit_identical(tmp_path, built):
    a, b = built, pretrain(TINY, tmp_path / "b", progress=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    card_a, card_b = (json.loads((d / "card.json").read_text()) for d in (a, b))
    assert card_a["model_sha256"] == card_b["model_sha256"]
    assert card_a["test_accuracy"] == card_b["test_accuracy"]


def test_card_describes_the_weights(built):
    out = built
    card = json.loads((out / "card.json").read_text())
    assert card["backbone"] == TINY["backbone"]
    assert card["classes"][:3] == ["A", "B", "C"] and card["classes"][26] == "a" and card["num_classes"] == 52
    assert card["model_sha256"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert card["config_hash"] == config_hash(TINY) and card["config"] == load_pretrain_config(TINY)
    assert card["seed"] == 0 and card["steps"] == 9 and card["samples_seen"] == 288
    assert not set(card["train_fonts"]) & set(card["test_fonts"]) and len(card["test_fonts"]) >= 1
    assert card["data_config"]["img_size"] == 32 and len(card["data_config"]["mean"]) == 3
    assert set(card["versions"]) >= {"torch", "timm", "avl_peft"} and card["wall_time_s"] > 0
    assert 0 <= card["test_accuracy"] <= 1
    # held-out families, in both layout conventions
    assert 0 <= card["test_accuracy_typographic"] <= 1 and 0 <= card["test_accuracy_filled"] <= 1
    assert card["font_pool"] == "matplotlib" and card["test_families"]
    assert not set(card["train_families"]) & set(card["test_families"])


def test_output_loads_back_with_the_recorded_accuracy(built):
    out = built
    card = json.loads((out / "card.json").read_text())
    torch.manual_seed(123)  # the checkpoint, not the seed, must decide every weight
    model = avl_peft.create_backbone(
        card["backbone"]["name"], checkpoint=out / "model.safetensors", num_classes=52, **card["backbone"]["kwargs"]
    ).eval()
    data = card["config"]["data"]
    test = GlyphDataset("test", data["test_per_class"], seed=card["seed"], jitter=data["jitter"])
    assert [f.name for f in test.fonts] == card["test_fonts"]
    images, labels = test.as_tensors()
    mean = torch.tensor(card["data_config"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(card["data_config"]["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        predicted = model((images.expand(-1, 3, -1, -1) - mean) / std).argmax(1)
    assert int((predicted == labels).sum()) == round(card["test_accuracy"] * len(labels))
    same, same_card = load_pretrained(out)
    assert same_card == card
    assert all(torch.equal(p, q) for p, q in zip(same.state_dict().values(), model.state_dict().values()))


def test_cache_is_reused_without_retraining(tmp_path, built, count_trainings, monkeypatch):
    monkeypatch.setenv("AVL_PEFT_CACHE", str(tmp_path / "cache"))
    where = output_dir(TINY)
    assert where == tmp_path / "cache" / "pretrain" / f"tiny-{config_hash(TINY)}"
    shutil.copytree(built, where)  # as if an earlier run had built it
    stamp = (where / "model.safetensors").stat().st_mtime_ns
    assert find_or_build(TINY, progress=False) == where
    assert find_or_build(TINY, progress=False) == where
    assert len(count_trainings) == 0 and (where / "model.safetensors").stat().st_mtime_ns == stamp
    find_or_build(TINY, force=True, progress=False)
    assert len(count_trainings) == 1
    assert (where / "model.safetensors").read_bytes() == (built / "model.safetensors").read_bytes()


def test_pretrained_model_takes_the_cached_backbone_as_a_study_does(tmp_path, built, count_trainings):
    where = output_dir(TINY, tmp_path / "cache")
    shutil.copytree(built, where)
    model = avl_peft.pretrained_model(TINY, cache_dir=tmp_path / "cache", progress=False)
    assert len(count_trainings) == 0  # a complete output in the cache is reused, as `avl-peft run` does
    pretrained, _ = load_pretrained(built)
    own = model.backbone.state_dict()
    assert own.keys() == {k for k in pretrained.state_dict() if not k.startswith("head.")}
    assert all(torch.equal(own[k], v) for k, v in pretrained.state_dict().items() if k in own)
    assert type(model.head).__name__ == "IncrementalClassifier"  # the continual head, not the 52 letters


@pytest.mark.parametrize(
    "damage, note",
    [
        (
            lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
            "not a safetensors file",
        ),
        (lambda d: (d / "card.json").unlink(), "no card.json"),
        (lambda d: (d / "card.json").write_text('{"format": "avl-peft-pre'), "unreadable"),
    ],
    ids=["truncated-weights", "missing-card", "bad-json"],
)
def test_damaged_cache_is_rebuilt_with_a_note(tmp_path, built, count_trainings, capsys, damage, note):
    out = output_dir(TINY, tmp_path)
    shutil.copytree(built, out)
    good = (out / "model.safetensors").read_bytes()
    damage(out)
    with pytest.raises(DataError, match="not a complete pretrain output"):
        load_pretrained(out)
    capsys.readouterr()
    assert find_or_build(TINY, cache_dir=tmp_path, progress=False) == out
    assert note in capsys.readouterr().err
    assert len(count_trainings) == 1
    assert (out / "model.safetensors").read_bytes() == good  # rebuilt bit for bit
    assert pretraining.check_output(out, TINY) == ""


def test_other_config_in_folder_is_refused_unless_forced(tmp_path, built, count_trainings):
    out = shutil.copytree(built, tmp_path / "out")
    assert "another config" in pretraining.check_output(out, {**TINY, "seed": 1})
    with pytest.raises(
        ConfigError, match=rf"holds the weights of another pretrain config: 'tiny' \(hash {config_hash(TINY)}\)"
    ):
        pretrain({**TINY, "seed": 1}, out, progress=False)
    assert not count_trainings
    pretrain({**TINY, "seed": 1}, out, force=True, progress=False)
    assert len(count_trainings) == 1
    assert json.loads((out / "card.json").read_text())["seed"] == 1


def test_unwritable_output_folder_is_a_config_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="not writable"):
        pretrain(TINY, blocker / "out", progress=False)


def _study(checkpoint, depth=1):
    from avl_peft.study.config import validate_study

    kwargs = {**TINY["backbone"]["kwargs"], "depth": depth}
    return validate_study(
        {
            "backbone": {"name": "vit_tiny_patch16_224", "kwargs": kwargs, "checkpoint": str(checkpoint)},
            "scenario": {"name": "digits", "n_experiences": 2},
        }
    )


def test_checkpoint_folder_must_be_a_complete_output_of_this_backbone(tmp_path, built):
    out = shutil.copytree(built, tmp_path / "out")
    _study(out)  # complete, same backbone: accepted
    with pytest.raises(ConfigError, match=r"this run's backbone is vit_tiny_patch16_224 with .*'depth': 2"):
        _study(out, depth=2)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # an interrupted copy
    with pytest.raises(ConfigError, match=r"backbone.checkpoint: .*not a safetensors file.*--force"):
        _study(out)


def test_results_record_which_weights_a_run_started_from(built, tmp_path):
    from avl_peft.study.records import weights_provenance

    bb = {"name": "vit_tiny_patch16_224", "pretrained": False}
    card = json.loads((built / "card.json").read_text())
    got = weights_provenance(bb, built / "model.safetensors")
    assert got["source"] == "pretrain" and got["config_hash"] == config_hash(TINY)
    assert got["model_sha256"] == hashlib.sha256((built / "model.safetensors").read_bytes()).hexdigest()
    assert got["test_accuracy"] == card["test_accuracy"]
    assert weights_provenance(bb, None)["source"] == "random_init"
    assert weights_provenance({**bb, "pretrained": True}, None)["source"] == "timm_pretrained"
    plain = tmp_path / "w.pth"
    assert weights_provenance(bb, plain) == {"source": "checkpoint", "file": str(plain)}


@pytest.mark.slow
def test_planted_links_in_the_output_folder_are_replaced_not_written_through(tmp_path, capsys):
    """Links planted where pretrain writes (card, weights, a probe-like name) and a pipe: the targets stay."""
    out = tmp_path / "out"
    out.mkdir()
    victims = {name: tmp_path / f"victim-{name}" for name in ("card.json", "model.safetensors", ".avl-peft-x")}
    for name, victim in victims.items():
        victim.write_text("keep me")
        (out / name).symlink_to(victim)
    pretrain(TINY, out, progress=False)
    assert all(victim.read_text() == "keep me" for victim in victims.values())
    for name in ("card.json", "model.safetensors"):
        assert (out / name).is_file() and not (out / name).is_symlink()
    assert pretraining.check_output(out, TINY) == ""
    assert not [p for p in out.iterdir() if p.name.startswith(".avl-peft-write-test-") or ".tmp" in p.name]


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])  # mean 0.5 / ImageNet's
def test_pretraining_normalises_with_the_backbones_data_config(name):
    """One data config: the card's (and the pretraining inputs') is avl_peft.backbones.data_config, the one a
    run normalises its scenario images with, grey glyphs replicated to RGB."""
    from torchvision.transforms import Normalize

    from avl_peft.backbones import data_config

    model = avl_peft.create_backbone(name, num_classes=52, img_size=16, patch_size=8, depth=1)
    dc, card = data_config(model), pretraining.card_data_config(model)
    assert card == {
        "img_size": 16,
        "in_chans": 3,
        "grey_to_rgb": True,
        "mean": list(dc["mean"]),
        "std": list(dc["std"]),
    }
    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = Normalize(dc["mean"], dc["std"])(images.expand(-1, 3, -1, -1))
    torch.testing.assert_close(pretraining.to_model_input(images, card), expected, rtol=0, atol=1e-6)
