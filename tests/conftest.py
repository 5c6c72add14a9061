import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on hub retries: there is no network in CI

import pytest
import torch

import avl_peft


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
