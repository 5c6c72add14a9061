import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on hub retries: there is no network in CI
# One BLAS/OpenMP thread, set before torch loads: on a 2-core machine oversubscribed BLAS made a 576x192 SVD
# take 1.4 s instead of 0.02 s. Subprocesses (CLI, torchrun tests) inherit these variables.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import copy  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

import avl_peft  # noqa: E402
from avl_peft import threads  # noqa: E402

# The process policy the CLI applies (one thread here, freed memory kept for reuse): in-process runs are timed
# as users' runs are. A library call of run_experiment would not apply it (process_settings=False).
threads.configure()


def tiny_vit(depth: int = 2, num_classes: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    return avl_peft.create_backbone(
        "vit_tiny_patch16_224", num_classes=num_classes, img_size=32, patch_size=4, depth=depth
    ).eval()


@pytest.fixture
def tiny():
    return tiny_vit


# The tiny study most end-to-end tests run: a one-block, 48-wide ViT at 16 px on 2 synthetic experiences,
# one epoch of LoRA rank 2, no subspace tracking (a second each, on one thread).
TINY_STUDY: dict[str, Any] = {
    "backbone": {"kwargs": {"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 48, "num_heads": 2}},
    "scenario": {"name": "synthetic", "n_experiences": 2},
    "training": {"epochs": 1, "batch_size": 16},
    "method": {"name": "lora", "options": {"rank": 2}},
    "subspace": {"enabled": False},
}


def make_tiny_study(**sections: Any) -> dict[str, Any]:
    """A fresh copy of TINY_STUDY; each keyword is a section whose keys replace the tiny study's (None drops the
    section, so its defaults apply), e.g. ``make_tiny_study(training={"lr": 0.003}, grid={"seed": [0, 1]})``.
    Module-level tables import it; tests take the ``tiny_study`` fixture."""
    study = copy.deepcopy(TINY_STUDY)
    for name, values in sections.items():
        if values is None:
            study.pop(name, None)
        elif isinstance(values, dict):
            study[name] = {**study.get(name, {}), **copy.deepcopy(values)}
        else:
            study[name] = values  # top-level scalars: name, seed
    return study


@pytest.fixture
def tiny_study():
    return make_tiny_study


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
