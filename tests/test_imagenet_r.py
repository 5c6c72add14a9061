"""ImageNet-R from a fake folder in the official layout: split, classes, experiences, clear errors."""

import numpy as np
import pytest
from PIL import Image

from avl_peft.cl.scenarios import build_scenario
from avl_peft.errors import DataError


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for c in range(200):
        folder = root / "imagenet-r" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return root


def test_imagenet_r_split_and_experiences(fake_root):
    bench = build_scenario("imagenet_r", root=fake_root, n_experiences=10, img_size=8, seed=3)
    assert len(bench.train_stream) == 10 and bench.n_classes == 200
    assert sorted(bench.classes_order) == list(range(200))
    assert bench.scenario_config["options"]["n_train"] == 800 and bench.scenario_config["options"]["n_test"] == 200
    first = bench.train_stream[0]
    assert len(first.classes_in_this_experience) == 20
    x, y, _ = first.dataset[0]
    assert tuple(x.shape) == (3, 8, 8) and int(y) in set(first.classes_in_this_experience)


def test_imagenet_r_split_is_seeded_and_disjoint(fake_root):
    from avl_peft.cl.scenarios.imagenet_r import read_folder, split_files

    folder = read_folder(fake_root / "imagenet-r")
    a_train, a_test = split_files(folder, 0.2, seed=0)
    b_train, b_test = split_files(folder, 0.2, seed=0)
    c_train, _ = split_files(folder, 0.2, seed=1)
    assert a_train == b_train and a_test == b_test and a_train != c_train
    assert not {folder.samples[i][0] for i in a_train} & {folder.samples[i][0] for i in a_test}
    assert len(a_test) == 200  # one of five images per class


def test_imagenet_r_missing_folder_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="imagenet-r.tar"):
        build_scenario("imagenet_r", root=tmp_path)


def test_imagenet_r_incomplete_folder_is_named(tmp_path):
    (tmp_path / "imagenet-r" / "n0").mkdir(parents=True)
    with pytest.raises(DataError, match="1 class folders"):
        build_scenario("imagenet_r", root=tmp_path)


def test_imagenet_r_experiences_must_divide_200(fake_root):
    from avl_peft.errors import ConfigError

    with pytest.raises(ConfigError, match="divide"):
        build_scenario("imagenet_r", root=fake_root, n_experiences=7)
