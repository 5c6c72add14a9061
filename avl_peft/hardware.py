"""What machine a number came from, and which precision runs natively on it (docs/design.md, "Hardware").

bf16 autocast is only fast where the hardware multiplies bf16 itself: CUDA GPUs from Ampere on, and CPUs
with AMX tiles or AVX512-BF16. Elsewhere torch emulates it: on a 2-core AVX2-only EPYC one training step
of the glyph pretrain's ViT-Tiny (batch 32, one thread) took 0.62 s in fp32 and 6.9 s in bf16. So
``precision: auto`` (:func:`resolve_precision`) picks bf16 only where it is native, and every record
carries :func:`hardware_info` so a reader can tell which class of machine a figure holds on.

The ISA caps a user (or ``benchmarks/time_to_result.py``) sets for a process count: ``ATEN_CPU_CAPABILITY``
lowers what :func:`torch.backends.cpu.get_cpu_capability` reports and ``ONEDNN_MAX_CPU_ISA`` what oneDNN
may use, so a process capped to AVX2 on an AMX machine resolves ``auto`` as an AVX2 CPU would.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import warnings
from functools import lru_cache
from typing import Any

import torch

PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")

# oneDNN ISA names (ONEDNN_MAX_CPU_ISA) whose instruction set includes bf16 dot products; any lower cap
# leaves oneDNN emulating bf16 even on a CPU that has it. "all"/"default" are no cap.
_ONEDNN_BF16_ISAS = {
    "all",
    "default",
    "avx512_core_bf16",
    "avx512_core_fp16",
    "avx512_core_amx",
    "avx512_core_amx_fp16",
    "avx10_1_512",
    "avx10_1_512_amx",
    "avx10_1_512_amx_fp16",
    "avx10_2_512",
    "avx10_2_512_amx_2",
}


class PrecisionWarning(UserWarning):
    """A precision that runs, but emulated and slow, on this machine."""


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's name with its family/model numbers (``/proc/cpuinfo``; VMs often show only "AMD EPYC")."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or fields.get("hardware") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name or "unknown"


def _query(name: str) -> bool:
    """One of torch's private CPU feature queries; False where this torch build lacks it."""
    for owner in (torch.cpu, torch.ops.mkldnn):
        fn = getattr(owner, name, None)
        if fn is not None:
            try:
                return bool(fn())
            except (RuntimeError, AttributeError):
                return False
    return False


def cpu_features() -> dict[str, Any]:
    """The CPU's bf16-relevant features as torch sees them, and the ISA caps in force for this process."""
    capability = torch.backends.cpu.get_cpu_capability()
    amx = _query("_is_amx_tile_supported")
    avx512_bf16 = _query("_is_avx512_bf16_supported")
    onednn_cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    capped_below_bf16 = onednn_cap is not None and onednn_cap.strip().lower() not in _ONEDNN_BF16_ISAS
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
        # Native only with the hardware units AND an ATen/oneDNN ISA that may use them.
        native = (amx or avx512_bf16) and capability.upper().startswith("AVX512") and not capped_below_bf16
    else:  # Arm: BF16 extension (Neoverse V1/N2, Graviton 3+, Apple M2+) as the kernel reports it
        native = _arm_bf16()
    return {
        "cpu_capability": capability,
        "amx_tile": amx,
        "avx512_bf16": avx512_bf16,
        "mkldnn_bf16": _query("_is_mkldnn_bf16_supported"),
        "bf16_native": bool(native),
        "isa_caps": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if os.environ.get(k)},
    }


def isa_key() -> str:
    """A folder-safe name of the ISA this process may use: torch's CPU capability and any cap (``avx512``,
    ``avx2-avx2``). Caches of compiled CPU code are kept per key: code built for one must not load in another."""
    feats = cpu_features()
    key = "-".join([feats["cpu_capability"], *feats["isa_caps"].values()]).lower()
    return re.sub(r"[^a-z0-9_.-]", "_", key) or "default"


def _arm_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return any(line.startswith("Features") and " bf16" in f" {line.split(':', 1)[-1]}" for line in f)
    except OSError:
        return False


def cuda_bf16_native(device: torch.device | None = None) -> bool:
    """bf16 in hardware on this GPU (compute capability 8.0+), not the emulation torch also accepts."""
    if not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:  # Volta/Turing: torch.cuda.is_bf16_supported() may still say True, through emulation
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older torch without the keyword
        return bool(torch.cuda.is_bf16_supported())


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matrix products natively (CUDA Ampere+, CPU with AMX/AVX512-BF16)."""
    if device.type == "cuda":
        return cuda_bf16_native(device)
    if device.type == "cpu":
        return cpu_features()["bf16_native"]
    return False


def resolve_precision(requested: str, device: torch.device, *, key: str = "training.precision") -> str:
    """The precision a run uses: ``auto`` becomes bf16 where ``device`` has it natively, else fp32.

    An explicit bf16 on a CPU or GPU without native support still runs, with one :class:`PrecisionWarning`
    saying it is emulated. Unknown names are the caller's to refuse (the config schemas list the choices).
    """
    if requested == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    if requested == "bf16" and device.type == "cuda" and torch.cuda.is_available() and not bf16_native(device):
        major, minor = torch.cuda.get_device_capability(device)
        warnings.warn(
            f"{key}: bf16 on this GPU (compute capability {major}.{minor}; native bf16 needs 8.0, Ampere or newer) "
            "is emulated and slow; use precision: auto (fp32 here) or fp16",
            PrecisionWarning,
            stacklevel=2,
        )
    if requested == "bf16" and device.type == "cpu" and not bf16_native(device):
        feats = cpu_features()
        warnings.warn(
            f"{key}: bf16 on this CPU ({cpu_model()}, {feats['cpu_capability']}, no AMX or AVX512-BF16 in use) is "
            "emulated and typically about 10x slower than fp32; use precision: auto (fp32 here) or fp32",
            PrecisionWarning,
            stacklevel=2,
        )
    return requested


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def hardware_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """The hardware block every record carries: CPU model and features, cores, load, and the GPU if used."""
    from .threads import available_cores

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        **cpu_features(),
        "cores_available": available_cores(),
        "threads": torch.get_num_threads(),
        "load_average": load_average(),
        "torch": torch.__version__,
    }
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        info["gpu"] = {
            "name": torch.cuda.get_device_name(index),
            "compute_capability": f"{major}.{minor}",
            "bf16_native": cuda_bf16_native(torch.device("cuda", index)),
            "memory_gb": round(torch.cuda.get_device_properties(index).total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
        }
    return info


def describe(info: dict[str, Any], *, load: bool = True) -> str:
    """One line for a report: ``AMD EPYC (AVX512, bf16 native), 2 threads, load 0.3`` and the GPU if any."""
    native = "bf16 native" if info.get("bf16_native") else "bf16 emulated"
    caps = info.get("isa_caps") or {}
    capped = f", capped {'/'.join(caps.values())}" if caps else ""
    isa = f"{info.get('cpu_capability', '?')}, {native}{capped}"
    line = f"{info.get('cpu_model', '?')} ({isa}), {info.get('threads')} threads"
    average = info.get("load_average")
    if load and isinstance(average, list) and average:
        line += f", load {average[0]}"
    gpu = info.get("gpu")
    if isinstance(gpu, dict):
        line += f"; GPU {gpu.get('name')} (sm {gpu.get('compute_capability')})"
    return line


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak for :func:`peak_memory_mb`: each run of a study (runs share one process) gets its own.

    CUDA: the caching allocator's peak statistics. CPU (Linux): the process's resident high-water mark,
    reset by writing 5 to ``/proc/self/clear_refs``; elsewhere it cannot be reset and stays the process's.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "cpu":
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
        except OSError:
            pass


def peak_memory_mb(device: torch.device | str) -> float:
    """The peak since :func:`reset_peak_memory` in MiB: tensors allocated on a GPU, the process's resident
    memory on CPU (which includes freed memory the allocator keeps, see :mod:`avl_peft.threads`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
