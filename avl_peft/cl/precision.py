"""Time to a result on any Avalanche strategy: mixed precision, a compiled backbone, inference-mode
evaluation, and the data-loader settings for CUDA.

Three plugins, each composing with every strategy (they never subclass one): :class:`PrecisionPlugin`
(bf16/fp16 autocast, fp16 loss scaling), :class:`InferenceModeEval` and :class:`CompilePlugin`. Avalanche
calls ``strategy.forward()``/``backward()``/``optimizer_step()`` itself, so the plugins wrap those methods
on the strategy instance, once. Why each choice (float32 outputs and optimizer state, unscaling before the
``after_backward`` plugins, when compiled graphs are dropped): docs/design.md, "Precision, compilation,
inference mode".
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from avalanche.core import SupervisedPlugin

from ..errors import ConfigError
from ..hardware import isa_key
from ..safeio import project_cache_dir

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> None:
    """A precision the device can run, else ConfigError saying which to use."""
    if precision not in PRECISIONS:
        raise ConfigError(f"training.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"training.precision: fp16 needs a CUDA device (training.device is {device.type}); on CPU use bf16 "
            "(CPUs have no fast fp16 matrix units and loss scaling would only add work) or fp32"
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"training.precision: this GPU ({torch.cuda.get_device_name(device)}) has no bf16 support; use fp16"
        )


def loader_options(device: torch.device, num_workers: int) -> dict[str, Any]:
    """Data-loader keywords for ``strategy.train``/``eval``: pinned memory and persistent workers on CUDA.

    Pinned (page-locked) batches let the non-blocking host-to-device copies Avalanche issues overlap the
    step; persistent workers keep their processes (and each worker's dataset state) across epochs instead
    of restarting them every epoch. On CPU neither helps, so both stay off.
    """
    cuda = device.type == "cuda"
    return {"num_workers": num_workers, "pin_memory": cuda, "persistent_workers": cuda and num_workers > 0}


def _wrap(strategy: Any, name: str, make: Callable[[Callable[[], Any]], Callable[[], Any]], owner: Any) -> None:
    """Replace ``strategy.<name>`` by ``make(original)`` once per owner (a second install is a no-op)."""
    installed = strategy.__dict__.setdefault("_avl_peft_wrapped", set())
    if (id(owner), name) in installed:
        return
    setattr(strategy, name, make(getattr(strategy, name)))
    installed.add((id(owner), name))


def _float32(out: Any) -> Any:
    if isinstance(out, torch.Tensor) and out.is_floating_point() and out.dtype != torch.float32:
        return out.float()
    if isinstance(out, dict):  # L2P's prompted ViT returns a dict of outputs
        return {k: _float32(v) for k, v in out.items()}
    return out


class PrecisionPlugin(SupervisedPlugin, supports_distributed=True):
    """Run the forward under ``precision`` autocast (``fp32``: unchanged); fp16 with loss scaling.

    The run config refuses fp16 on CPU (:func:`check_precision`); the plugin itself runs wherever torch
    supports the dtype, which is what lets the loss-scaling path be tested without a GPU.
    """

    def __init__(self, precision: str = "fp32"):
        super().__init__()
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision, self.dtype = precision, PRECISIONS[precision]
        self.scaler: torch.amp.GradScaler | None = None
        self._scaler_state: dict[str, Any] | None = None  # restored before the scaler exists (resume)

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        self._install(strategy)

    def before_eval(self, strategy: Any, **kwargs: Any) -> None:
        self._install(strategy)

    def _install(self, strategy: Any) -> None:
        if self.dtype is None:
            return
        device = strategy.device.type
        dtype = self.dtype

        def forward_with(forward):
            def forward_autocast():
                with torch.autocast(device, dtype=dtype):
                    out = forward()
                return _float32(out)

            return forward_autocast

        _wrap(strategy, "forward", forward_with, self)
        if self.precision != "fp16":
            return
        if self.scaler is None:
            self.scaler = torch.amp.GradScaler(device)
            if self._scaler_state is not None:
                self.scaler.load_state_dict(self._scaler_state)
        scaler = self.scaler

        def backward_with(backward):
            def scaled_backward():
                scaler.scale(strategy.loss).backward(retain_graph=strategy.retain_graph)
                scaler.unscale_(strategy.optimizer)  # true gradients from here on (after_backward plugins)

            return scaled_backward

        def step_with(step):
            def scaled_step():
                scaler.step(strategy.optimizer)  # skipped if the unscaled gradients hold inf/NaN
                scaler.update()

            return scaled_step

        _wrap(strategy, "backward", backward_with, self)
        _wrap(strategy, "optimizer_step", step_with, self)

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The loss scale of an interrupted fp16 run (so a resumed run continues with the same scale)."""
        self._scaler_state = state.get("scaler")
        if self.scaler is not None and self._scaler_state is not None:
            self.scaler.load_state_dict(self._scaler_state)


class InferenceModeEval(SupervisedPlugin, supports_distributed=True):
    """Evaluate under ``torch.inference_mode`` instead of Avalanche's ``no_grad``.

    Only the model's forward runs inside it (the wrapper enters and leaves the context around each call,
    so an exception can never leave the process in inference mode); the outputs are inference tensors,
    which the loss and the metrics only read.
    """

    def before_eval(self, strategy: Any, **kwargs: Any) -> None:
        def forward_with(forward):
            def forward_maybe_inference():
                if strategy.is_training:  # the same wrapper serves the training forward
                    return forward()
                with torch.inference_mode():
                    return forward()

            return forward_maybe_inference

        _wrap(strategy, "forward", forward_with, self)


def compile_target(model: torch.nn.Module) -> torch.nn.Module:
    """The module compiled: the backbone of a harness model (the growing head stays eager), else the model."""
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, torch.nn.Module) else model


def structure(module: torch.nn.Module) -> tuple:
    """What a compiled graph depends on: every submodule's name and type, every parameter's name and shape."""
    return (
        tuple((name, type(m).__qualname__) for name, m in module.named_modules()),
        tuple((name, tuple(p.shape), p.requires_grad) for name, p in module.named_parameters()),
    )


class CompilePlugin(SupervisedPlugin, supports_distributed=True):
    """``torch.compile`` the strategy's backbone (adapters included) once its modules are in place.

    Place it after :class:`~avl_peft.cl.plugin.PEFTPlugin` in the plugin list. ``options`` go to
    ``torch.compile`` (e.g. ``mode="max-autotune"``). Inductor's and Triton's caches (~150 MB for a ViT)
    go to ``cache_dir`` (default: the project cache, ``$AVL_PEFT_CACHE/compile/<ISA>`` or
    ``~/.cache/avl-peft/compile/<ISA>``) instead of the system temp folder, unless TORCHINDUCTOR_CACHE_DIR or
    TRITON_CACHE_DIR already name another place. ``<ISA>`` is torch's CPU capability plus any ISA cap of the
    process: kernels compiled under an AVX2 cap and loaded uncapped (or the reverse) aborted the process.
    With ``reset``, a third structure (of the model, e.g. after merging) resets Dynamo, which drops every
    compiled graph in the process, to free its recompile budget; without it Dynamo's own limit applies.
    """

    KEEP = 2  # structures whose graphs stay cached together (adapted and merged, or train and eval)

    def __init__(self, cache_dir: str | os.PathLike | None = None, *, reset: bool = False, **options: Any):
        super().__init__()
        self.reset = reset  # may drop every compiled graph of the process (its owner's choice: the CLI's)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else project_cache_dir("compile") / isa_key()
        self.options = options
        self.structures: list[tuple] = []  # structures compiled since the last reset
        self.resets = 0  # times the old graphs were dropped

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._ensure(strategy.model)

    def before_eval_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._ensure(strategy.model)

    def _ensure(self, model: torch.nn.Module) -> None:
        target = compile_target(model)
        shape = structure(target)
        if target._compiled_call_impl is not None and shape in self.structures:
            return  # Dynamo's cache holds this structure's graphs
        if len(self.structures) >= self.KEEP and self.reset:
            torch._dynamo.reset()  # free the recompile budget: these graphs will be rebuilt if needed
            self.structures.clear()
            self.resets += 1
        self._redirect_caches()
        target.compile(**self.options)
        self.structures.append(shape)

    def _redirect_caches(self) -> None:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        # Inductor writes its own default (the system temp folder) into the variable on first use; that
        # value, or none, is replaced; a folder the user chose is kept.
        if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.cache_dir / "inductor")
        os.environ.setdefault("TRITON_CACHE_DIR", str(self.cache_dir / "triton"))
