"""Each cross-field rule of a run is checked in one place, by its owner, and every entry point (the study
config, the plugin, the library calls) reports it with that owner's words. One test per rule."""

from __future__ import annotations

import dataclasses

import pytest

from avl_peft.errors import ConfigError
from avl_peft.options import knob, parse_options
from avl_peft.study.config import schema, validate_study

TINY = {"backbone": {"kwargs": {"img_size": 32, "patch_size": 4, "depth": 1}}, "scenario": {"name": "synthetic"}}


def _message(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def _study(**sections) -> dict:
    return {**TINY, **sections}


def _counting(monkeypatch, module, name: str) -> list:
    calls: list = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_policy_is_checked_once_per_run(monkeypatch):
    calls = _counting(monkeypatch, schema, "check_policy")
    validate_study(_study(method={"name": "lora", "policy": "merge"}))
    assert len(calls) == 1
    with pytest.raises(ConfigError, match=r"method\.policy: .*needs policy: stack"):
        validate_study(_study(method={"name": "sdlora", "policy": "continue"}))


def test_method_options_targets_and_init_from_are_one_check(monkeypatch):
    from avl_peft.adapters.base import check_method
    from avl_peft.cl.plugin import PEFTPlugin

    calls = _counting(monkeypatch, schema, "check_method")
    validate_study(_study(method={"name": "lora", "options": {"rank": 2}}))
    assert len(calls) == 1
    # baselines take no options: the same words from the config, the plugin and the owner
    owner = _message(check_method, "head", {"rank": 4})
    assert (
        _message(validate_study, _study(method={"name": "head", "options": {"rank": 4}})) == f"method.options: {owner}"
    )
    assert _message(PEFTPlugin, "head", rank=4) == owner
    # peft LoRA folders: only methods with the capability
    owner = _message(check_method, "pissa", {}, None, "some/folder")
    assert _message(validate_study, _study(method={"name": "pissa", "init_from": "some/folder"})) == owner


def test_targets_are_checked_by_their_owner():
    from avl_peft.adapters.base import check_targets
    from avl_peft.adapters.inject import find_targets
    from avl_peft.cl.plugin import PEFTPlugin

    owner = _message(check_targets, [])
    assert _message(validate_study, _study(method={"targets": []})) == f"method.{owner}"
    assert _message(PEFTPlugin, "lora", targets=[]) == owner
    assert _message(find_targets, None, []) == owner  # the model is not looked at before the targets


def test_one_weights_source_is_one_rule():
    from avl_peft.backbones import check_weights_source, create_backbone

    owner = _message(check_weights_source, pretrained=True, checkpoint="w.pth")
    config = _study(backbone={**TINY["backbone"], "pretrained": True, "checkpoint": "w.pth"})
    assert _message(validate_study, config) == owner
    assert (
        _message(create_backbone, "vit_tiny_patch16_224", pretrained=True, checkpoint="w.pth", num_classes=2) == owner
    )
    both = _study(backbone={**TINY["backbone"], "checkpoint": "w.pth", "pretrain": "p.yaml"})
    assert "got checkpoint, pretrain" in _message(validate_study, both)


def test_base_session_needs_two_experiences_in_one_rule(monkeypatch):
    from avl_peft.cl import training

    owner = _message(training.check_base_session, True, 1)
    config = _study(training={"pretrain": True}, scenario={"name": "synthetic", "n_experiences": 1})
    assert _message(validate_study, config) == owner
    calls = _counting(monkeypatch, schema, "check_base_session")
    validate_study(_study(training={"pretrain": True}, scenario={"name": "synthetic", "n_experiences": 2}))
    assert calls == [(True, 2)]


def test_device_spelling_is_one_rule():
    from avl_peft.cl.training import check_device, resolve_device

    owner = _message(check_device, "gpu0")
    assert _message(validate_study, _study(training={"device": "gpu0"})) == owner
    assert _message(resolve_device, "gpu0") == owner


def test_executor_settings_are_the_executors_options():
    from avl_peft.study.executors import ExecutorOptions

    owner = _message(parse_options, ExecutorOptions, "executor", {"workers": 0}, noun="key")
    assert _message(validate_study, _study(executor={"workers": 0})) == owner == "executor.workers: must be >= 1, got 0"
    assert "Did you mean 'local'" in _message(validate_study, _study(executor={"name": "locl"}))


@dataclasses.dataclass(frozen=True)
class _Search:
    trials: int = knob(8, "trials of the search", minimum=1, maximum=1000)


@dataclasses.dataclass(frozen=True)
class _Study:
    search: _Search = dataclasses.field(default_factory=_Search)


def test_adding_a_key_is_one_knob_line():
    """A study key is a dataclass field: parsed, defaulted, bounded and named in errors with no other edit."""
    assert parse_options(_Study, "", {}, noun="key").search.trials == 8
    assert parse_options(_Study, "", {"search": {"trials": 3}}, noun="key").search.trials == 3
    zero = _message(parse_options, _Study, "", {"search": {"trials": 0}}, noun="key")
    assert zero == "search.trials: must be >= 1, got 0"
    assert "Did you mean 'trials'" in _message(parse_options, _Study, "", {"search": {"trails": 3}}, noun="key")


def test_state_dict_mismatches_are_listed_in_one_format():
    """Saved adapter states, run checkpoints and backbone checkpoints that do not fit name their keys through
    errors.key_summary; buffers sized by the stream are resized by adapters.stack.resize_buffer."""
    import torch
    from torch import nn

    from avl_peft.adapters.inject import inject
    from avl_peft.adapters.stack import adapter_state_dict, load_adapter_state, resize_buffer
    from avl_peft.errors import key_summary

    keys = [f"k{i}" for i in range(6)]
    assert key_summary([("missing", keys), ("unexpected", [])]) == "missing: k0, k1, k2, k3 …"
    model = inject(nn.Sequential(nn.Linear(8, 8)), "lora", targets=["0"], rank=2)
    state = {k: torch.zeros(3, *v.shape[1:]) for k, v in adapter_state_dict(model).items() if "lora_" in k}
    with pytest.raises(ConfigError) as info:
        load_adapter_state(inject(nn.Sequential(nn.Linear(8, 8)), "lora", targets=["0"], rank=2), state)
    detail = key_summary([("shape mismatch", list(state))])
    assert str(info.value) == f"saved adapter state does not fit this model ({detail})"
    holder = nn.Module()
    holder.register_buffer("basis", torch.zeros(8, 0))
    resize_buffer(holder, "basis", torch.Size([8, 3]))
    assert holder.basis.shape == (8, 3)
