import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on hub retries: there is no network in CI
# One BLAS/OpenMP thread, set before torch loads: on a 2-core machine oversubscribed BLAS made a 576x192 SVD
# take 1.4 s instead of 0.02 s. Subprocesses (CLI, torchrun tests) inherit these variables.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
