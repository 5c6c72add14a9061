"""Scenario builders: offline datasets, option checking, offline failures and five_datasets on fake data."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_study
from PIL import Image
from torch.utils.data import DataLoader

from avl_peft.cl.scenarios import SCENARIOS, build_scenario, five_datasets
from avl_peft.errors import ConfigError, DataError

OFFLINE = {"digits": (10, 5), "mnist5k": (10, 5), "synthetic": (6, 3)}  # name -> (classes, default exps)


def _classes_per_exp(benchmark) -> list[list[int]]:
    return [sorted(int(c) for c in exp.classes_in_this_experience) for exp in benchmark.train_stream]


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------


def test_all_scenarios_registered_with_one_line_descriptions():
    described = SCENARIOS.describe()
    assert set(described) >= {
        "digits",
        "mnist5k",
        "synthetic",
        "split_cifar100",
        "core50",
        "five_datasets",
        "imagenet_r",
    }
    for name, text in described.items():
        assert text and "\n" not in text, name


def test_unknown_scenario_suggests_close_name():
    with pytest.raises(ConfigError, match=r"unknown scenario 'digit'.*Did you mean 'digits'\?"):
        build_scenario("digit")


# ------------------------------------------------------------------------------------------------
# Offline in-memory datasets
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OFFLINE))
def test_offline_scenario_structure(name):
    n_classes, n_exp = OFFLINE[name]
    bench = build_scenario(name, img_size=16, seed=3)

    assert len(bench.train_stream) == n_exp and len(bench.test_stream) == n_exp
    per_exp = _classes_per_exp(bench)
    assert all(len(c) == n_classes // n_exp for c in per_exp)
    flat = [c for exp in per_exp for c in exp]
    assert sorted(flat) == list(range(n_classes))  # disjoint and complete
    assert bench.n_classes == n_classes
    assert sorted(bench.classes_order) == list(range(n_classes))
    assert all(type(c) is int for c in bench.classes_order)
    # Experience k holds the k-th group of the recorded order.
    k = n_classes // n_exp
    assert per_exp == [sorted(bench.classes_order[i * k : (i + 1) * k]) for i in range(n_exp)]

    for stream in (bench.train_stream, bench.test_stream):
        for exp in stream:
            x, y, t = exp.dataset[0]
            assert x.shape == (3, 16, 16) and x.dtype == torch.float32
            assert y in exp.classes_in_this_experience and t == 0
            assert set(int(v) for v in exp.dataset.targets) == set(exp.classes_in_this_experience)

    xb, yb, tb = next(iter(DataLoader(bench.train_stream[0].dataset, batch_size=8, shuffle=True)))
    assert xb.shape == (8, 3, 16, 16)
    assert set(yb.tolist()) <= set(bench.train_stream[0].classes_in_this_experience)
    assert float(xb.min()) >= -1.0 - 1e-5 and float(xb.max()) <= 1.0 + 1e-5  # mean=std=0.5 -> [-1, 1]


def test_digits_split_is_stratified_and_fixed():
    a = build_scenario("digits", img_size=8, seed=0)
    b = build_scenario("digits", img_size=8, seed=5)
    n_train = sum(len(e.dataset) for e in a.train_stream)
    n_test = sum(len(e.dataset) for e in a.test_stream)
    assert n_train + n_test == 1797 and abs(n_test / 1797 - 0.25) < 0.01
    test_counts = np.bincount([int(y) for e in a.test_stream for y in e.dataset.targets], minlength=10)
    assert test_counts.min() >= 40  # every class is in the test set (~45 each)
    # The split does not depend on the class-order seed: same test images, just regrouped.
    by_class_a = {c: len(e.dataset) for e in a.test_stream for c in e.classes_in_this_experience}
    by_class_b = {c: len(e.dataset) for e in b.test_stream for c in e.classes_in_this_experience}
    assert sum(by_class_a.values()) == sum(by_class_b.values())


def test_mnist5k_sizes():
    bench = build_scenario("mnist5k", img_size=8, n_experiences=2, test_fraction=0.2)
    assert len(bench.train_stream) == 2
    assert sum(len(e.dataset) for e in bench.train_stream) == 4000
    assert sum(len(e.dataset) for e in bench.test_stream) == 1000


def test_seed_fixes_class_order():
    orders = {seed: build_scenario("digits", img_size=8, seed=seed).classes_order for seed in (0, 1, 2)}
    assert build_scenario("digits", img_size=8, seed=1).classes_order == orders[1]
    assert len({tuple(o) for o in orders.values()}) > 1
    assert build_scenario("synthetic", img_size=8, seed=7).classes_order == (
        build_scenario("synthetic", img_size=8, seed=7).classes_order
    )


def test_explicit_class_order_is_used():
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    bench = build_scenario("digits", img_size=8, class_order=order)
    assert bench.classes_order == order
    assert _classes_per_exp(bench)[0] == [8, 9]


def test_building_leaves_the_global_torch_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_scenario("synthetic", img_size=8, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_task_labels_give_one_task_per_experience():
    bench = build_scenario("synthetic", img_size=8, task_labels=True)
    assert [exp.task_label for exp in bench.train_stream] == [0, 1, 2]
    assert [exp.task_label for exp in bench.test_stream] == [0, 1, 2]
    assert bench.train_stream[2].dataset[0][2] == 2


def test_grey_images_share_one_channel_in_memory():
    x = build_scenario("digits", img_size=16).train_stream[0].dataset[0][0]
    assert x.shape == (3, 16, 16) and x.stride()[0] == 0  # 3 channels are a view of 1
    assert torch.equal(x[0], x[2])


def test_per_channel_normalisation_and_img_size():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    bench = build_scenario("digits", img_size=24, mean=mean, std=std)
    x = bench.train_stream[0].dataset[0][0]
    assert x.shape == (3, 24, 24)
    # Background pixels are 0 in every channel, so each channel holds -mean/std there.
    expected = torch.tensor([-m / s for m, s in zip(mean, std)])
    assert torch.allclose(x[:, 0, 0], expected, atol=1e-4)


def test_synthetic_is_deterministic_and_learnable():
    a = build_scenario("synthetic", img_size=8, n_classes=4, n_experiences=2, seed=0)
    b = build_scenario("synthetic", img_size=8, n_classes=4, n_experiences=2, seed=0)
    assert torch.equal(a.train_stream[0].dataset[0][0], b.train_stream[0].dataset[0][0])
    assert sum(len(e.dataset) for e in a.train_stream) == 4 * 20

    def stack(stream):
        items = [item for e in stream for item in e.dataset]
        return torch.stack([i[0] for i in items]).flatten(1), torch.tensor([i[1] for i in items])

    xtr, ytr = stack(a.train_stream)
    xte, yte = stack(a.test_stream)
    centroids = torch.stack([xtr[ytr == c].mean(0) for c in range(4)])
    pred = torch.cdist(xte, centroids).argmin(1)
    assert (pred == yte).float().mean() > 0.9  # nearest class mean separates the classes


def test_scenario_config_records_resolved_arguments():
    bench = build_scenario("synthetic", img_size=8, seed=4, n_classes=4, n_experiences=2)
    cfg = bench.scenario_config
    assert cfg["name"] == "synthetic" and cfg["seed"] == 4 and cfg["n_experiences"] == 2
    assert cfg["options"]["n_classes"] == 4 and cfg["options"]["n_train_per_class"] == 20


# ------------------------------------------------------------------------------------------------
# Bad options
# ------------------------------------------------------------------------------------------------


def test_n_experiences_must_divide_classes():
    with pytest.raises(ConfigError, match=r"n_experiences=4.*10 classes.*allowed: 1, 2, 5, 10"):
        build_scenario("digits", n_experiences=4)


def test_unknown_option_lists_allowed_and_suggests():
    with pytest.raises(ConfigError) as err:
        build_scenario("synthetic", n_clases=4)
    msg = str(err.value)
    assert "scenario 'synthetic' has no option 'n_clases'" in msg and "Did you mean 'n_classes'?" in msg
    assert "Allowed:" in msg and "n_train_per_class" in msg


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("digits", {"test_fraction": 1.5}, "scenario 'digits'.test_fraction: must be in [0.01, 0.99], got 1.5"),
        ("synthetic", {"n_classes": 0}, "scenario 'synthetic'.n_classes: must be >= 1, got 0"),
        ("glyphs", {"per_class": True}, "scenario 'glyphs'.per_class: must be an integer, got True"),
        ("core50", {"protocol": "nic"}, "scenario 'core50'.protocol: must be one of nc, ni, got 'nic'"),
        ("five_datasets", {"order": ["mnist"]}, "scenario 'five_datasets'.order: must be 'fixed'"),
    ],
)
def test_scenario_option_values_are_checked_before_building(name, options, message):
    """Options are parsed from the builder's Options dataclass (validate.py's messages), before any data is
    read or downloaded: the same parse serves build_scenario and the config's dry-run."""
    from avl_peft.cl.scenarios import parse_scenario_options

    with pytest.raises(ConfigError) as err:
        parse_scenario_options(name, options)
    assert message in str(err.value)
    with pytest.raises(ConfigError) as err:
        build_scenario(name, **options)
    assert message in str(err.value)


def test_scenario_config_records_defaults_and_options_as_written():
    bench = build_scenario("synthetic", img_size=8, noise=1, n_train_per_class=2, n_test_per_class=1)
    assert bench.scenario_config["options"] == {
        "n_classes": 6,
        "n_train_per_class": 2,
        "n_test_per_class": 1,
        "noise": 1,
        "data_seed": 0,
        "class_order": None,
        "first_exp_classes": None,
    }
    assert type(bench.scenario_config["options"]["noise"]) is int  # an int stays an int in results.json


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(img_size=0), "img_size"),
        (dict(n_experiences=True), "n_experiences"),
        (dict(seed="x"), "seed"),
        (dict(mean=(0.5, 0.5)), "mean"),
        (dict(std=(0.5, 0.0, 0.5)), "std"),
        (dict(task_labels="yes"), "task_labels"),
        (dict(test_fraction=1.5), "test_fraction"),
        (dict(class_order=[0, 1, 2]), "class_order"),
    ],
)
def test_bad_values_name_the_option(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_scenario("digits", **kwargs)


def test_core50_options_checked_before_any_download(tmp_path):
    with pytest.raises(ConfigError, match=r"protocol.*nc, ni.*Did you mean 'ni'"):
        build_scenario("core50", protocol="nii", root=tmp_path)
    with pytest.raises(ConfigError, match=r"fixed 9 experiences"):
        build_scenario("core50", n_experiences=5, root=tmp_path)
    with pytest.raises(ConfigError, match=r"run: must be <= 9"):
        build_scenario("core50", run=10, root=tmp_path)
    with pytest.raises(ConfigError, match=r"task_labels"):
        build_scenario("core50", task_labels=True, root=tmp_path)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------
# Missing data with no network
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Every download (torchvision and Avalanche both go through urllib) fails like an offline machine."""

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.mark.parametrize(
    "name, label, sub, url",
    [
        ("split_cifar100", "CIFAR-100", "cifar100", "cifar-100-python.tar.gz"),
        ("core50", "CORe50", "core50", "core50_128x128.zip"),
    ],
)
def test_download_failure_is_a_data_error(no_network, tmp_path, name, label, sub, url):
    with pytest.raises(DataError) as err:
        build_scenario(name, root=tmp_path)
    msg = str(err.value)
    assert label in msg and str(tmp_path / sub) in msg and url in msg and "root:" in msg
    assert "URLError" in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no urllib traceback chain


# ------------------------------------------------------------------------------------------------
# five_datasets on fake data
# ------------------------------------------------------------------------------------------------

# Fake torchvision datasets: distinct sizes (per class, train split) and colours identify each one.
FAKE_SPECS = {"CIFAR10": (1, "RGB", (200, 0, 0)), "MNIST": (3, "L", 50), "FashionMNIST": (4, "L", 100)}


def _fake_dataset(per_class: int, mode: str, colour, labels_attr: str = "targets"):
    class Fake:
        def __init__(self, root, train=True, download=False, transform=None, split=None):
            is_train = train if split is None else split == "train"
            labels = [c for c in range(10) for _ in range(per_class if is_train else 1)]
            setattr(self, labels_attr, np.array(labels) if labels_attr == "labels" else labels)
            self._labels = labels

        def __len__(self):
            return len(self._labels)

        def __getitem__(self, i):
            return Image.new(mode, (8, 8), colour), self._labels[i]

    return Fake


def _write_notmnist(folder: Path, per_class: dict[str, int], size: int = 8) -> None:
    for split, n in per_class.items():
        for c, letter in enumerate("ABCDEFGHIJ"):
            d = folder / split / letter if split else folder / letter
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("L", (size, size), 20 * c + i).save(d / f"img{i}.png")


@pytest.fixture
def fake_five(monkeypatch, tmp_path):
    for name, spec in FAKE_SPECS.items():
        monkeypatch.setattr(five_datasets, name, _fake_dataset(*spec))
    monkeypatch.setattr(five_datasets, "SVHN", _fake_dataset(5, "RGB", (0, 0, 200), labels_attr="labels"))
    _write_notmnist(tmp_path / "notMNIST", {"train": 2, "test": 1})
    return tmp_path


def test_five_datasets_offsets_and_sizes(fake_five):
    bench = build_scenario("five_datasets", root=fake_five, img_size=12)
    assert len(bench.train_stream) == 5 and bench.n_classes == 50
    assert bench.dataset_order == ["cifar10", "mnist", "fashion_mnist", "svhn", "notmnist"]
    assert bench.classes_order == list(range(50))
    assert _classes_per_exp(bench) == [list(range(10 * k, 10 * k + 10)) for k in range(5)]
    # Train sizes identify which dataset landed in which experience: 1, 3, 4, 5 and 2 images per class.
    assert [len(e.dataset) for e in bench.train_stream] == [10, 30, 40, 50, 20]
    assert [len(e.dataset) for e in bench.test_stream] == [10] * 5

    cifar_x, cifar_y, _ = bench.train_stream[0].dataset[0]
    assert cifar_x.shape == (3, 12, 12) and 0 <= cifar_y < 10
    assert cifar_x[0, 0, 0] == pytest.approx(200 / 255 * 2 - 1, abs=1e-4)  # red stays red
    assert cifar_x[1, 0, 0] == pytest.approx(-1.0)
    mnist_x, mnist_y, _ = bench.train_stream[1].dataset[0]
    assert 10 <= mnist_y < 20
    assert torch.allclose(mnist_x[0], mnist_x[2])  # grey -> 3 equal channels
    assert mnist_x[0, 0, 0] == pytest.approx(50 / 255 * 2 - 1, abs=1e-4)
    # notMNIST letter c was written with grey value 20*c (+ image index); its label is 40 + c.
    for x, y, _ in list(bench.test_stream[4].dataset)[:3]:
        assert 40 <= y < 50 and x[0, 0, 0] == pytest.approx(20 * (y - 40) / 255 * 2 - 1, abs=1e-4)

    xb, yb, _ = next(iter(DataLoader(bench.test_stream[3].dataset, batch_size=4)))
    assert xb.shape == (4, 3, 12, 12) and all(30 <= int(y) < 40 for y in yb)


def test_five_datasets_seeded_order_and_task_labels(fake_five):
    sizes = {"cifar10": 10, "mnist": 30, "fashion_mnist": 40, "svhn": 50, "notmnist": 20}
    bench = build_scenario("five_datasets", root=fake_five, img_size=8, order="seeded", seed=1, task_labels=True)
    again = build_scenario("five_datasets", root=fake_five, img_size=8, order="seeded", seed=1)
    assert bench.dataset_order == again.dataset_order
    assert sorted(bench.dataset_order) == sorted(sizes)
    assert [len(e.dataset) for e in bench.train_stream] == [sizes[n] for n in bench.dataset_order]
    assert _classes_per_exp(bench) == [list(range(10 * k, 10 * k + 10)) for k in range(5)]
    assert [e.task_label for e in bench.train_stream] == [0, 1, 2, 3, 4]
    assert bench.scenario_config["options"]["order"] == bench.dataset_order

    with pytest.raises(ConfigError, match="order: must be"):
        build_scenario("five_datasets", root=fake_five, order=["mnist"])
    with pytest.raises(ConfigError, match="exactly 5 experiences"):
        build_scenario("five_datasets", root=fake_five, n_experiences=10)


def test_five_datasets_unsplit_notmnist_folder(monkeypatch, tmp_path):
    for name, spec in FAKE_SPECS.items():
        monkeypatch.setattr(five_datasets, name, _fake_dataset(*spec))
    monkeypatch.setattr(five_datasets, "SVHN", _fake_dataset(5, "RGB", (0, 0, 200), labels_attr="labels"))
    _write_notmnist(tmp_path / "notMNIST", {"": 5})  # A..J directly, as in the notMNIST_small archive
    bench = build_scenario("five_datasets", root=tmp_path, img_size=8)
    assert len(bench.train_stream[4].dataset) == 40 and len(bench.test_stream[4].dataset) == 10


def test_notmnist_missing_folder(fake_five):
    missing = fake_five / "elsewhere"
    missing.mkdir()
    with pytest.raises(DataError) as err:
        build_scenario("five_datasets", root=missing, img_size=8)
    msg = str(err.value)
    assert str(missing / "notMNIST") in msg and "yaroslavvb.com/upload/notMNIST" in msg
    assert "10 letter folders" in msg and "root:" in msg


def test_notmnist_wrong_layout(fake_five):
    import shutil

    shutil.rmtree(fake_five / "notMNIST" / "train" / "J")
    with pytest.raises(DataError, match=r"must hold 10 class sub-folders.*found 9"):
        build_scenario("five_datasets", root=fake_five, img_size=8)


def test_notmnist_class_without_images(fake_five):
    for png in (fake_five / "notMNIST" / "test" / "B").iterdir():
        png.unlink()
    with pytest.raises(DataError, match=r"holds no images"):
        build_scenario("five_datasets", root=fake_five, img_size=8)


def test_notmnist_corrupt_png_is_named(fake_five):
    bad = fake_five / "notMNIST" / "train" / "C" / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DataError) as err:
        build_scenario("five_datasets", root=fake_five, img_size=8)
    assert str(bad) in str(err.value) and "delete or replace" in str(err.value)


def test_five_datasets_download_failure_names_dataset_and_folder(fake_five, monkeypatch):
    class Offline:
        def __init__(self, *args, **kwargs):
            raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(five_datasets, "SVHN", Offline)
    with pytest.raises(DataError) as err:
        build_scenario("five_datasets", root=fake_five, img_size=8)
    msg = str(err.value)
    assert "SVHN" in msg and str(fake_five / "svhn") in msg and "ufldl.stanford.edu" in msg


# --- the same failures through the CLI: exit code 2, the message, no traceback ------------------------


def _cli_run(tmp_path, capsys, scenario: dict) -> tuple[int, str]:
    import yaml

    from avl_peft.cli import main

    config = tmp_path / "study.yaml"
    study = {**make_tiny_study(subspace=None), "scenario": scenario, "training": {"epochs": 1}}
    config.write_text(yaml.safe_dump(study))
    code = main(["run", str(config), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_cli_missing_notmnist_folder_exits_2(fake_five, tmp_path, capsys):
    import shutil

    shutil.rmtree(fake_five / "notMNIST")
    code, err = _cli_run(tmp_path, capsys, {"name": "five_datasets", "root": str(fake_five)})
    assert code == 2 and "notMNIST" in err and str(fake_five) in err


def test_cli_unreadable_image_exits_2(fake_five, tmp_path, capsys):
    bad = fake_five / "notMNIST" / "train" / "C" / "img0.png"
    bad.write_bytes(b"not a png")
    code, err = _cli_run(tmp_path, capsys, {"name": "five_datasets", "root": str(fake_five)})
    assert code == 2 and "img0.png" in err


def test_cli_dataset_cannot_be_downloaded_exits_2(no_network, tmp_path, capsys):
    code, err = _cli_run(tmp_path, capsys, {"name": "split_cifar100", "root": str(tmp_path / "data")})
    assert code == 2 and "CIFAR-100" in err and str(tmp_path / "data") in err


def test_every_scenario_declares_its_options_as_knobs():
    """One config engine: each registered builder takes an Options dataclass (``@takes``), whose checked
    fields are knobs with a reason; only class_order and five_datasets' order are left to their checkers."""
    import dataclasses

    unchecked = {"class_order", "order"}
    for name in SCENARIOS.names():
        options = SCENARIOS.get(name).Options
        assert dataclasses.is_dataclass(options), name
        for field in dataclasses.fields(options):
            assert field.name in unchecked or field.metadata.get("doc"), (name, field.name)
