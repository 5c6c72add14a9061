"""Upstream retention helpers: k-NN, embedding, the probe, image folders, the summary."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from PIL import Image

from avl_peft.cl.scenarios.upstream import read_imagefolder, upstream_sets
from avl_peft.errors import ConfigError, DataError
from avl_peft.instruments.upstream import (
    UpstreamProbe,
    UpstreamRetentionPlugin,
    embed,
    frozen_classifier,
    knn_accuracy,
    knn_predict,
    pre_logits_features,
    upstream_summary,
)

# -- k-NN -------------------------------------------------------------------------------------------

# Unit vectors at angles (degrees) on the circle; labels chosen so votes and ties are known by hand.
TRAIN_ANGLES = [0, 10, 20, 90, 100, 180]
TRAIN_LABELS = [0, 0, 1, 1, 1, 2]


def _unit(angles):
    rad = torch.deg2rad(torch.tensor(angles, dtype=torch.float32))
    return torch.stack([rad.cos(), rad.sin()], dim=1)


def test_knn_known_answers():
    train, labels = _unit(TRAIN_ANGLES), torch.tensor(TRAIN_LABELS)
    # k=1: the nearest sample's label.
    assert knn_predict(train, labels, _unit([2, 19, 95, 170]), k=1).tolist() == [0, 1, 1, 2]
    # k=3 at 5°: neighbours 0°, 10° (label 0) and 20° (label 1) → majority 0.
    assert knn_predict(train, labels, _unit([5]), k=3).tolist() == [0]
    # k=2 at 14°: neighbours 10° (label 0) and 20° (label 1), one vote each; 20° is closer → summed similarity
    # favours label 1.
    assert knn_predict(train, labels, _unit([16]), k=2).tolist() == [1]
    assert knn_predict(train, labels, _unit([14]), k=2).tolist() == [0]
    # Exact tie (same vote count and summed similarity): the smaller label.
    tie_train = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    assert knn_predict(tie_train, torch.tensor([7, 3]), torch.tensor([[1.0, 0.0]]), k=2).tolist() == [3]
    # Scale does not matter (cosine).
    assert knn_predict(train * 5, labels, _unit([2]) * 0.1, k=1).tolist() == [0]
    acc = knn_accuracy(train, labels, _unit([2, 19, 95, 170]), torch.tensor([0, 1, 2, 2]), k=1)
    assert acc == pytest.approx(0.75)


def test_knn_chunking_gives_same_answer():
    gen = torch.Generator().manual_seed(0)
    train, labels = torch.randn(200, 8, generator=gen), torch.randint(0, 5, (200,), generator=gen)
    test = torch.randn(57, 8, generator=gen)
    ref = knn_predict(train, labels, test, k=7, chunk=1000)
    assert knn_predict(train, labels, test, k=7, chunk=4).tolist() == ref.tolist()
    # brute force reference
    sims = torch.nn.functional.normalize(test, dim=1) @ torch.nn.functional.normalize(train, dim=1).T
    top = sims.topk(7, dim=1)
    for i in range(test.shape[0]):
        votes = torch.bincount(labels[top.indices[i]], minlength=5)
        assert votes[ref[i]] == votes.max()


def test_knn_bad_input():
    train, labels = _unit(TRAIN_ANGLES), torch.tensor(TRAIN_LABELS)
    with pytest.raises(ConfigError, match="k=7 exceeds"):
        knn_predict(train, labels, _unit([0]), k=7)
    with pytest.raises(ConfigError, match="k must be a positive integer"):
        knn_predict(train, labels, _unit([0]), k=0)
    with pytest.raises(ConfigError, match="shape"):
        knn_predict(train, labels, torch.randn(2, 3), k=1)
    with pytest.raises(ConfigError, match="one label per row"):
        knn_accuracy(train, labels, _unit([0]), torch.tensor([0, 1]), k=1)


# -- embedding and the probe ------------------------------------------------------------------------


def _tiny(num_classes: int):
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, img_size=32, patch_size=4, depth=1
    )


def test_pre_logits_with_and_without_classifier():
    with_head = _tiny(5).eval()
    features_only = copy.deepcopy(with_head)
    features_only.reset_classifier(0)  # how ContinualViT builds its backbone
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        phi = pre_logits_features(with_head, x)
        assert phi.shape == (3, with_head.num_features)
        torch.testing.assert_close(features_only(x), phi)  # num_classes=0: backbone(x) is φ(x)
        torch.testing.assert_close(pre_logits_features(features_only, x), phi)
        assert with_head(x).shape == (3, 5)  # with a classifier backbone(x) would be logits, not φ


def test_embed_restores_modes_and_batches():
    model = _tiny(0)
    model.train()
    model.blocks[0].eval()  # a mixed state must come back as it was
    x = torch.randn(7, 3, 32, 32)
    feats = embed(model, x, batch_size=3)
    assert feats.shape == (7, model.num_features)
    assert model.training and not model.blocks[0].training and model.patch_embed.training
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(feats, model(x), rtol=1e-5, atol=1e-5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(7)), batch_size=4)
    torch.testing.assert_close(embed(model, loader), feats)


def test_probe_checkpoint_mode_uses_frozen_original_classifier():
    original = _tiny(4).eval()
    x = torch.randn(12, 3, 32, 32)
    with torch.no_grad():
        y = original(x).argmax(1)
    y[:3] = (y[:3] + 1) % 4  # 9 of 12 right
    probe = UpstreamProbe(x, y, mode="checkpoint", classifier=original, batch_size=5)
    backbone = copy.deepcopy(original)
    backbone.reset_classifier(0)  # the ContinualViT backbone: no classifier of its own
    assert probe.evaluate(backbone) == pytest.approx(0.75)
    assert probe.evaluate(original) == pytest.approx(0.75)  # pre-logits, not logits, are fed to the head
    # The kept head is a frozen copy: training the model's head later does not reach it.
    assert all(not p.requires_grad for p in probe.classifier.parameters())
    with torch.no_grad():
        original.get_classifier().weight.mul_(-1)
    assert probe.evaluate(backbone) == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="nn.Linear"):
        frozen_classifier(backbone)
    with pytest.raises(ConfigError, match="needs the checkpoint's classifier"):
        UpstreamProbe(x, y, mode="checkpoint")
    with pytest.raises(ConfigError, match="4 classes"):
        UpstreamProbe(x, y + 4, mode="checkpoint", classifier=original)


def test_probe_knn_mode():
    model = _tiny(0)
    gen = torch.Generator().manual_seed(1)
    tx, ty = torch.randn(10, 3, 32, 32, generator=gen), torch.arange(10) % 2
    vx, vy = torch.randn(6, 3, 32, 32, generator=gen), torch.arange(6) % 2
    probe = UpstreamProbe(vx, vy, mode="knn", train_images=tx, train_labels=ty, k=3)
    expected = knn_accuracy(embed(model, tx), ty, embed(model, vx), vy, k=3)
    assert probe.evaluate(model) == pytest.approx(expected)
    with pytest.raises(ConfigError, match="mode must be one of"):
        UpstreamProbe(vx, vy, mode="linear")
    with pytest.raises(ConfigError, match="train images"):
        UpstreamProbe(vx, vy, mode="knn")
    with pytest.raises(ConfigError, match="k=11 exceeds"):
        UpstreamProbe(vx, vy, train_images=tx, train_labels=ty, k=11)


def test_retention_plugin_records_before_and_after():
    class FakeProbe:
        values = iter([0.8, 0.7, 0.6])

        def evaluate(self, backbone):
            return next(self.values)

    plugin = UpstreamRetentionPlugin(FakeProbe(), get_backbone=lambda s: None)
    for _ in range(2):
        plugin.before_training_exp(None)
        plugin.after_training_exp(None)
    summary = plugin.summary()
    assert summary["acc"] == [0.8, 0.7, 0.6]
    assert summary["retention"] == pytest.approx(0.75) and summary["forgetting"] == pytest.approx(0.2)
    other = UpstreamRetentionPlugin(FakeProbe())
    other.load_state_dict(plugin.state_dict())
    assert other.acc == plugin.acc


def test_upstream_summary():
    s = upstream_summary([0.8, 0.6, 0.4])
    assert s["acc"] == [0.8, 0.6, 0.4]
    assert s["retention"] == pytest.approx(0.5) and s["forgetting"] == pytest.approx(0.4)
    assert upstream_summary([0.0, 0.1]) == {"acc": [0.0, 0.1], "retention": None, "forgetting": -0.1}
    assert upstream_summary([0.5]) == {"acc": [0.5], "retention": 1.0, "forgetting": 0.0}
    with pytest.raises(ConfigError, match="a_-1"):
        upstream_summary([])


# -- image folders ----------------------------------------------------------------------------------


def _folder(tmp_path, spec):
    """spec: {class: [(file name, colour, size)]} written with Pillow."""
    root = tmp_path / "up"
    for cls, files in spec.items():
        (root / cls).mkdir(parents=True)
        for name, colour, size in files:
            Image.new("RGB", size, colour).save(root / cls / name)
    return root


def test_read_imagefolder_order_and_values(tmp_path):
    root = _folder(
        tmp_path,
        {
            "zebra": [("b.png", (255, 0, 0), (8, 6)), ("a.JPG", (0, 0, 0), (6, 6))],
            "ant": [("x.jpeg", (255, 255, 255), (10, 4))],
            "mole": [("1.png", (0, 255, 0), (4, 4)), ("2.png", (0, 255, 0), (4, 4)), ("3.png", (0, 255, 0), (4, 4))],
        },
    )
    (root / "ant" / "notes.txt").write_text("ignored")
    (root / ".cache").mkdir()
    images, labels, names = read_imagefolder(root, 4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert names == ["ant", "mole", "zebra"]
    assert labels.tolist() == [0, 1, 1, 1, 2, 2]
    assert images.shape == (6, 3, 4, 4) and images.dtype == torch.float32
    torch.testing.assert_close(images[0], torch.ones(3, 4, 4), atol=0.02, rtol=0)  # white → (1 - 0.5) / 0.5
    torch.testing.assert_close(images[4], -torch.ones(3, 4, 4), atol=0.02, rtol=0)  # a.JPG (black) before b.png
    torch.testing.assert_close(images[5][0], torch.ones(4, 4))  # red: channel 0 at 1, others at -1
    torch.testing.assert_close(images[5][1:], -torch.ones(2, 4, 4))
    images, labels, _ = read_imagefolder(root, 4, mean=(0.5,), std=(0.5,), channels=1, max_per_class=1)
    assert images.shape == (3, 1, 4, 4) and labels.tolist() == [0, 1, 2]


def test_read_imagefolder_errors(tmp_path, monkeypatch):
    norm = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    with pytest.raises(DataError, match="does not exist"):
        read_imagefolder(tmp_path / "missing", 4, **norm)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        read_imagefolder(tmp_path / "flat", 4, **norm)
    root = _folder(tmp_path, {"a": [("1.png", (0, 0, 0), (4, 4))]})
    (root / "b").mkdir()
    with pytest.raises(DataError, match="'.*b' has no images"):
        read_imagefolder(root, 4, **norm)
    (root / "b" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png' is not a BMP, GIF, JPEG, PNG, TIFF image"):
        read_imagefolder(root, 4, **norm)
    with pytest.raises(ConfigError, match="mean and std"):
        read_imagefolder(root, 4, mean=(0.5,), std=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="img_size"):
        read_imagefolder(root, 0, **norm)


def test_read_imagefolder_decompression_bomb(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    warn = _folder(tmp_path / "w", {"a": [("big.png", (0, 0, 0), (15, 10))]})  # 150 px: Pillow's warning
    with pytest.raises(DataError, match="big.png' is too large"):
        read_imagefolder(warn, 4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    err = _folder(tmp_path / "e", {"a": [("huge.png", (0, 0, 0), (30, 30))]})  # 900 px > 2·limit: Pillow's error
    with pytest.raises(DataError, match="huge.png' is too large"):
        read_imagefolder(err, 4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def test_glyph_probe_has_a_reference_split_only_for_knn():
    dc = {"img_size": 16, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    up = {"dataset": "glyphs", "per_class": 1, "seed": 0, "data_seed": 0}
    rx, ry, qx, qy = upstream_sets(**up, reference=False, **dc)
    assert len(rx) == len(ry) == 0 and qx.shape == (52, 3, 16, 16) and qy.tolist() == list(range(52))
    kx, ky, kqx, kqy = upstream_sets(**up, reference=True, **dc)
    assert kx.shape == (52, 3, 16, 16) and torch.equal(kqx, qx) and torch.equal(kqy, qy)  # same test split
