"""CL-LoRA: roles, the dense formula of shared and specific branches, distillation and its gradient reassignment."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vit

import avl_peft
from avl_peft.adapters import METHODS, stack
from avl_peft.adapters.inject import adapted_layers
from avl_peft.errors import ConfigError

CLLoRA = METHODS.get("cl_lora")
X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def model_after_one_experience(**options):
    """Depth-2 tiny ViT (block 0 task-shared, block 1 task-specific), experience 0 'trained', then stacked."""
    model = avl_peft.inject(tiny_vit(2), "cl_lora", rank=4, alpha=8, **options)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.adapter.lora_B.copy_(torch.randn(layer.adapter.lora_B.shape, generator=g) * 0.1)
    # experience 0's branches as they were, for the assertions (stacking folds them into one term per layer)
    FIRST.clear()
    FIRST.update({name: copy.deepcopy(layer.adapter) for name, layer in adapted_layers(model).items()})
    stack(model)
    return model


FIRST: dict = {}  # layer name -> experience 0's adapter, set by model_after_one_experience


def test_roles_and_what_trains():
    model = model_after_one_experience()
    layers = adapted_layers(model)
    assert {n: layer.adapter.layer_role for n, layer in layers.items() if "qkv" in n} == {
        "blocks.0.attn.qkv": "shared",
        "blocks.1.attn.qkv": "specific",
    }
    shared, specific = layers["blocks.0.attn.qkv"], layers["blocks.1.attn.qkv"]
    assert torch.equal(shared.adapter.lora_A, FIRST["blocks.0.attn.qkv"].lora_A)  # one A_sh, trained in exp. 0 only
    assert not shared.adapter.lora_A.requires_grad and shared.adapter.lora_B.requires_grad
    assert "block_weight" not in dict(shared.adapter.named_parameters())  # no block weights on shared layers
    assert specific.adapter.lora_A.requires_grad and specific.adapter.block_weight.requires_grad
    assert specific.adapter.block_weight.shape == (3,)  # q, k, v
    assert not torch.equal(specific.adapter.lora_A, FIRST["blocks.1.attn.qkv"].lora_A)  # a fresh A_t per experience
    a = specific.adapter.lora_A
    assert torch.allclose(a @ a.T, torch.eye(4), atol=1e-5)  # orthonormal rows
    assert CLLoRA.role("blocks.7.mlp.fc1", [f"blocks.{i}.mlp.fc1" for i in range(12)], CLLoRA.Options()) == "specific"
    assert CLLoRA.role("blocks.5.mlp.fc1", [f"blocks.{i}.mlp.fc1" for i in range(12)], CLLoRA.Options()) == "shared"
    with pytest.raises(ConfigError, match="shared_blocks"):
        avl_peft.inject(tiny_vit(2), "cl_lora", shared_blocks=-1)
    with pytest.raises(ConfigError, match="reassign must be true or false, got 1"):  # validate.check_bool
        avl_peft.inject(tiny_vit(2), "cl_lora", reassign=1)


def test_forward_equals_the_dense_formula():
    model = model_after_one_experience()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            for p in layer.adapter.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
    s = 8 / 4
    for name, layer in adapted_layers(model).items():
        w = layer.base.weight.double()
        branches = [FIRST[name], layer.adapter]  # experience 0's branch (folded now) and the current one
        if layer.adapter.layer_role == "shared":  # s · (B_0 + B_1) A_sh
            dense = w + s * sum(b.lora_B.double() for b in branches) @ branches[0].lora_A.double()
        else:  # Σ_t s · ((ω_t ⊗ 1) ⊙ B_t) A_t
            dense = w.clone()
            for b in branches:
                rows = b.block_weight.double().repeat_interleave(w.shape[0] // b.block_weight.numel())[:, None]
                dense += s * (rows * b.lora_B.double()) @ b.lora_A.double()
        x = torch.randn(2, 5, w.shape[1])
        expected = x.double() @ dense.T + layer.base.bias.double()
        assert (layer(x).double() - expected).abs().max() <= 1e-5, name


def test_distillation_is_flat_at_the_start_and_reassigns_its_gradient():
    model = model_after_one_experience(block_orth=0.0)
    model.train()
    shared = adapted_layers(model)["blocks.0.attn.qkv"].adapter
    loss = CLLoRA.model_loss(model, X)
    loss.backward()  # student = teacher: the distillation gradient vanishes
    assert shared.lora_B.grad.abs().max() <= 1e-6
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            if layer.adapter.layer_role == "shared":
                layer.adapter.lora_B.normal_(0, 0.1)
    grads = {}
    for reassign in (False, True):
        model.zero_grad()
        for layer in adapted_layers(model).values():
            layer.adapter.opts.reassign = reassign
        CLLoRA.model_loss(model, X).backward()
        grads[reassign] = shared.lora_B.grad.clone()
        assert all(
            p.grad is None or p.grad.abs().sum() == 0 for n, p in model.named_parameters() if "blocks.1." in n
        )  # the distillation reads the shared blocks only
    old = FIRST["blocks.0.attn.qkv"].lora_B.norm(dim=1)
    weights = old * old.numel() / old.sum()
    assert grads[False].abs().sum() > 0
    assert torch.allclose(grads[True], weights[:, None] * grads[False], atol=1e-7)


def test_distillation_loss_value_and_block_weight_penalty():
    model = model_after_one_experience(kd_weight=0.0, block_orth=0.5)
    specific = {n: layer for n, layer in adapted_layers(model).items() if layer.adapter.layer_role == "specific"}
    now = torch.cat([layer.adapter.block_weight for layer in specific.values()])
    before = torch.cat([FIRST[n].block_weight for n in specific])
    expected = 0.5 * F.cosine_similarity(now, before, dim=0).abs()
    assert torch.allclose(CLLoRA.model_loss(model, X), expected)
    fresh = avl_peft.inject(tiny_vit(2), "cl_lora", rank=2)
    assert CLLoRA.model_loss(fresh, X) is None  # experience 0: nothing to distil or compare
