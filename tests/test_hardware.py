"""precision: auto and the hardware block (avl_peft/hardware.py): resolution per capability, the warning for
emulated bf16, the records that carry them, and a pretrain cache per resolved precision."""

import json
import warnings

import pytest
import torch

from avl_peft import hardware
from avl_peft import pretrain as pretraining
from avl_peft.hardware import PrecisionWarning, bf16_native, resolve_precision
from avl_peft.pretrain import config_hash, find_or_build, load_pretrain_config, output_dir

CPU = torch.device("cpu")


@pytest.fixture
def cpu_is(monkeypatch):
    """Make the CPU report given features: x86 with AMX / AVX512-BF16 / an ATen capability."""

    def set_cpu(*, amx=False, avx512_bf16=False, capability="AVX512", machine="x86_64"):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(hardware.platform, "machine", lambda: machine)
        for cap in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
            monkeypatch.delenv(cap, raising=False)  # the features above stand for the machine, uncapped

    return set_cpu


@pytest.mark.parametrize(
    "features, expected",
    [
        ({"amx": True, "avx512_bf16": True, "capability": "AVX512"}, "bf16"),  # Sapphire Rapids and later
        ({"amx": False, "avx512_bf16": True, "capability": "AVX512"}, "bf16"),  # Zen 4, Cooper Lake
        ({"amx": False, "avx512_bf16": False, "capability": "AVX512"}, "fp32"),  # Skylake-X: bf16 emulated
        ({"amx": False, "avx512_bf16": False, "capability": "AVX2"}, "fp32"),  # most laptops, EPYC Zen 2/3
        ({"amx": True, "avx512_bf16": True, "capability": "AVX2"}, "fp32"),  # ATEN_CPU_CAPABILITY=avx2 cap
        ({"amx": False, "avx512_bf16": False, "capability": "DEFAULT"}, "fp32"),
    ],
)
def test_auto_resolves_by_cpu_capability(cpu_is, features, expected):
    cpu_is(**features)
    assert resolve_precision("auto", CPU) == expected
    assert bf16_native(CPU) is (expected == "bf16")


def test_a_onednn_isa_cap_below_bf16_counts_as_emulated(cpu_is, monkeypatch):
    cpu_is(amx=True, avx512_bf16=True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert resolve_precision("auto", CPU) == "fp32"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert resolve_precision("auto", CPU) == "bf16"
    assert hardware.hardware_info()["isa_caps"] == {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}


def test_auto_on_arm_follows_the_kernels_bf16_flag(cpu_is, monkeypatch):
    cpu_is(machine="aarch64", capability="DEFAULT")
    for flag, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(hardware, "_arm_bf16", lambda flag=flag: flag)
        assert resolve_precision("auto", CPU) == expected


@pytest.mark.parametrize(
    "capability, supported, expected",
    [((8, 0), True, "bf16"), ((9, 0), True, "bf16"), ((7, 5), True, "fp32"), ((7, 0), False, "fp32")],
)
def test_auto_on_cuda_needs_ampere_or_newer(monkeypatch, capability, supported, expected):
    """Turing/Volta report bf16 through emulation (is_bf16_supported() is True there): auto must say fp32."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: supported)
    assert resolve_precision("auto", torch.device("cuda")) == expected


def test_explicit_choices_are_kept_and_emulated_bf16_warns_once(cpu_is):
    cpu_is(capability="AVX2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_precision("fp32", CPU) == "fp32"
        assert resolve_precision("bf16", CPU) == "bf16"  # runs, but says so
    assert len(caught) == 1 and caught[0].category is PrecisionWarning
    assert "emulated" in str(caught[0].message) and "10x slower" in str(caught[0].message)
    cpu_is(avx512_bf16=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", CPU) == "bf16"  # native: no warning


def test_hardware_block_and_its_line():
    info = hardware.hardware_info("cpu")
    assert json.loads(json.dumps(info)) == info  # JSON-clean
    assert {"cpu_model", "cpu_capability", "amx_tile", "avx512_bf16", "bf16_native", "cores_available"} <= set(info)
    assert info["threads"] == torch.get_num_threads() and "gpu" not in info
    line = hardware.describe(info)
    assert info["cpu_capability"] in line and ("bf16 native" in line or "bf16 emulated" in line)
    assert "load" not in hardware.describe(info, load=False)
    hostile = {"cpu_model": ["x"] * 3, "gpu": "not a dict", "load_average": "high", "isa_caps": {}}
    assert hardware.describe(hostile)  # a tampered results.json still gives a line, never a traceback


def test_study_precision_defaults_to_auto_and_accepts_it():
    from avl_peft.study.config import expand, validate_study

    ((_, cfg),) = expand(validate_study({"scenario": {"name": "synthetic"}}))
    assert cfg["training"]["precision"] == "auto"


# --- pretrain: the resolved precision keys the cache and is on the card ---------------------------------------
# Two steps of a one-block ViT: the bf16 build stays cheap on a CPU that emulates bf16.
TINY = {
    "name": "tiny",
    "backbone": {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 16, "patch_size": 4, "depth": 1}},
    "data": {"train_per_class": 1, "test_per_class": 1, "img_size": 16},
    "training": {"epochs": 1, "batch_size": 26, "lr": 0.001, "warmup": 0.2, "threads": 1},
}


def _native(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(pretraining.config, "bf16_native", lambda device: native)
    monkeypatch.setattr(pretraining.training, "resolve_precision", lambda p, d, key="": "bf16" if native else "fp32")


def test_pretrain_hash_is_per_resolved_precision(monkeypatch):
    assert load_pretrain_config({})["training"]["precision"] == "auto"
    _native(monkeypatch, True)
    as_bf16 = config_hash(TINY)
    assert as_bf16 == config_hash({**TINY, "training": {**TINY["training"], "precision": "bf16"}})
    _native(monkeypatch, False)
    as_fp32 = config_hash(TINY)
    assert as_fp32 == config_hash({**TINY, "training": {**TINY["training"], "precision": "fp32"}})
    assert as_fp32 != as_bf16


def test_a_cache_built_in_one_precision_is_not_reused_for_the_other(tmp_path, monkeypatch):
    monkeypatch.setenv("AVL_PEFT_CACHE", str(tmp_path))
    trained = []
    real = pretraining.outputs._train
    monkeypatch.setattr(pretraining.outputs, "_train", lambda *a, **k: trained.append(1) or real(*a, **k))
    _native(monkeypatch, False)
    fp32_dir = find_or_build(TINY, progress=False)
    card = json.loads((fp32_dir / "card.json").read_text())
    assert card["precision"] == "fp32" and card["config"]["training"]["precision"] == "auto"
    assert {"cpu_model", "cpu_capability", "bf16_native"} <= set(card["hardware"])
    assert card["hardware"]["threads"] == TINY["training"]["threads"]
    _native(monkeypatch, True)
    bf16_dir = find_or_build(TINY, progress=False)
    assert bf16_dir != fp32_dir and bf16_dir == output_dir(TINY) and len(trained) == 2
    assert json.loads((bf16_dir / "card.json").read_text())["precision"] == "bf16"
    assert (bf16_dir / "model.safetensors").read_bytes() != (fp32_dir / "model.safetensors").read_bytes()
    _native(monkeypatch, False)
    assert find_or_build(TINY, progress=False) == fp32_dir and len(trained) == 2  # each class reuses its own


def test_explicit_bf16_on_a_pre_ampere_gpu_warns_that_it_is_emulated(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # 7.5: by emulation
    cuda = torch.device("cuda")
    for capability, warns in (((7, 5), True), ((8, 0), False), ((9, 0), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert resolve_precision("bf16", cuda) == "bf16"
            assert resolve_precision("fp16", cuda) == "fp16"
        assert [w.category for w in caught] == ([PrecisionWarning] if warns else [])
        if warns:
            assert "7.5" in str(caught[0].message) and "fp16" in str(caught[0].message)


def test_peak_memory_restarts_per_run_on_cpu():
    """A study's runs share one process: the peak of a run must not be an earlier run's."""
    import mmap

    size = 96 * 2**20
    hardware.reset_peak_memory("cpu")
    with mmap.mmap(-1, size) as block:  # unmapped on close: the resident memory really goes back
        block[:: mmap.PAGESIZE] = b"\1" * (size // mmap.PAGESIZE)  # touch every page
        high = hardware.peak_memory_mb("cpu")
    assert high >= 90
    hardware.reset_peak_memory("cpu")
    assert hardware.peak_memory_mb("cpu") < high - 80


def test_peak_memory_on_cuda_is_the_allocators_and_every_run_resets_it(monkeypatch):
    from avl_peft.study import experiment
    from avl_peft.study.config import expand, validate_study

    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append(device))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20)
    hardware.reset_peak_memory("cuda")
    assert calls == [torch.device("cuda")] and hardware.peak_memory_mb("cuda") == 3.0

    resets = []
    monkeypatch.setattr(experiment, "reset_peak_memory", resets.append)
    data = {
        "backbone": {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 16, "patch_size": 8, "depth": 1}},
        "scenario": {"name": "synthetic", "n_experiences": 2},
        "subspace": {"enabled": False},
    }
    ((_, cfg),) = expand(validate_study(data))
    experiment.build(cfg, None)
    assert resets == [torch.device("cpu")]


def test_compile_caches_are_kept_per_isa(cpu_is, monkeypatch, tmp_path):
    """Inductor kernels built under an AVX2 cap aborted an uncapped process that loaded them: one folder per ISA."""
    from avl_peft.cl.precision import CompilePlugin

    monkeypatch.setenv("AVL_PEFT_CACHE", str(tmp_path))
    cpu_is(capability="AVX512")
    native = CompilePlugin().cache_dir
    cpu_is(capability="AVX2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    capped = CompilePlugin().cache_dir
    assert native != capped and native.parent == capped.parent == tmp_path / "compile"
    assert (native.name, capped.name) == ("avx512", "avx2-avx2")
