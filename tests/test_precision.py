"""Mixed precision, compile and inference-mode evaluation (avl_peft/cl/precision.py) on CPU.

bf16 autocast must train like fp32 up to bf16 rounding; fp16 loss scaling must hand true gradients to
``after_backward`` plugins and keep stepping the optimizer PEFTPlugin rebuilds; a compiled backbone must
give eager's outputs, before and after the adapters change the module tree.
"""

import pytest
import torch
from avalanche.core import SupervisedPlugin

from avl_peft.adapters import _lowrank
from avl_peft.adapters.inject import delta_weights
from avl_peft.cl.precision import CompilePlugin, PrecisionPlugin, loader_options
from avl_peft.cli import main
from avl_peft.errors import ConfigError
from avl_peft.study.config import expand, validate_study
from avl_peft.study.experiment import build

KWARGS = {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 64, "num_heads": 2}


def make_cfg(method="lora", n_experiences=2, **training):
    training = {"precision": "fp32", **training}  # the reference: auto would be bf16 on a CPU with native bf16
    data = {
        "backbone": {"name": "vit_tiny_patch16_224", "kwargs": KWARGS},
        "scenario": {"name": "synthetic", "n_experiences": n_experiences},
        "training": {"epochs": 2, "batch_size": 16, "lr": 1e-2, **training},
        "method": {"name": method, "options": {"rank": 4}},
        "subspace": {"enabled": False},
    }
    ((_, cfg),) = expand(validate_study(data))
    return cfg


def probe(parts, n=32):
    ds = parts.benchmark.train_stream[0].dataset
    return torch.stack([ds[i][0] for i in range(n)])


def train_first(cfg):
    parts = build(cfg, None)
    parts.strategy.train(parts.benchmark.train_stream[0])
    return parts


# --- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "training, message",
    [
        ({"precision": "bf32"}, r"training\.precision.*fp32, bf16, fp16.*Did you mean"),
        ({"precision": "fp16"}, r"fp16 needs a CUDA device.*use bf16"),
        ({"compile": "yes"}, r"training\.compile: must be true or false"),
        ({"threads": 0}, r"training\.threads: must be >= 1"),
        ({"threads": 1.5}, r"training\.threads: must be an integer"),
    ],
)
def test_bad_precision_compile_threads_are_refused(training, message):
    with pytest.raises(ConfigError, match=message):
        make_cfg(**training)


def test_cli_exits_2_on_fp16_for_cpu(tmp_path, capsys):
    cfg = tmp_path / "fp16.yaml"
    cfg.write_text("scenario: {name: synthetic}\ntraining: {device: cpu, precision: fp16}\n")
    assert main(["run", str(cfg), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "fp16 needs a CUDA device" in err and "Traceback" not in err


def test_loader_options_pin_and_persist_only_on_cuda():
    assert loader_options(torch.device("cpu"), 4) == {
        "num_workers": 4,
        "pin_memory": False,
        "persistent_workers": False,
    }
    cuda = loader_options(torch.device("cuda"), 4)
    assert cuda["pin_memory"] and cuda["persistent_workers"]
    assert not loader_options(torch.device("cuda"), 0)["persistent_workers"]  # needs worker processes


# --- the fused node under autocast --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("separate_input", [False, True])
def test_fused_node_runs_under_autocast_like_plain_ops(dtype, separate_input, monkeypatch):
    g = torch.Generator().manual_seed(3)

    def t(*shape, grad=True):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    x, w, bias, a, b = t(4, 40, 32), t(48, 32, grad=False), t(48, grad=False), t(4, 32), t(48, 4) * 0.3
    b = b.detach().requires_grad_()
    x_l = t(4, 40, 32) if separate_input else None
    leaves = [x, a, b] + ([x_l] if separate_input else [])

    def run():
        with torch.autocast("cpu", dtype=dtype):
            out = _lowrank.low_rank_linear(x, w, bias, a, b, 0.5, x_l)
        grads = torch.autograd.grad(out.float().square().sum(), leaves)
        return out, grads

    fused, fused_grads = run()
    assert fused.dtype == dtype and fused.grad_fn.name() == "_LowRankLinearBackward"
    monkeypatch.setattr(_lowrank, "FORCE_PATH", "plain")
    plain, plain_grads = run()
    assert plain.dtype == dtype
    # Both round the same products to the same dtype; they differ only in accumulation order.
    assert ((fused.float() - plain.float()).norm() / plain.float().norm()) < 1e-2
    for got, want in zip(fused_grads, plain_grads):
        assert got.dtype == torch.float32  # gradients return in the leaves' dtype
        assert ((got - want).norm() / want.norm()) < 2e-2


# --- precision plugins in runs ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "wegeft"])
def test_bf16_trains_and_agrees_with_fp32(method):
    """Stated tolerance: after one experience (4 steps), the bf16 run's learned ΔW is within 10% (relative
    norm) of the fp32 run's and points the same way (cosine > 0.99); logits within 1%."""
    fp32, bf16 = train_first(make_cfg(method)), train_first(make_cfg(method, precision="bf16"))
    d32 = torch.cat([d.flatten() for d in delta_weights(fp32.model.backbone).values()])
    d16 = torch.cat([d.flatten() for d in delta_weights(bf16.model.backbone).values()])
    assert d32.norm() > 0 and d16.norm() > 0  # both trained
    assert (d16 - d32).norm() / d32.norm() < 0.1
    assert torch.nn.functional.cosine_similarity(d16, d32, dim=0) > 0.99
    x = probe(fp32)
    with torch.no_grad():
        a, b = fp32.model.eval()(x), bf16.model.eval()(x)
    assert (a - b).norm() / a.norm() < 1e-2


class GradientNorms(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.norms, self.dtypes = [], set()

    def after_forward(self, strategy, **kwargs):
        self.dtypes.add(strategy.mb_output.dtype)

    def after_backward(self, strategy, **kwargs):
        grads = [p.grad for p in strategy.model.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


def test_fp16_loss_scaling_hands_true_gradients_and_survives_optimizer_rebuilds():
    """fp16 on CPU through the plugin (the config refuses it on CPU, the plugin runs wherever torch does)."""
    runs = {}
    for precision in ("fp32", "fp16"):
        parts = build(make_cfg(n_experiences=3), None)
        plugin = next(p for p in parts.strategy.plugins if isinstance(p, PrecisionPlugin))
        plugin.precision, plugin.dtype = precision, {"fp32": None, "fp16": torch.float16}[precision]
        norms = GradientNorms()
        parts.strategy.plugins.append(norms)
        before = {}
        for t, experience in enumerate(parts.benchmark.train_stream):
            parts.strategy.train(experience)  # PEFTPlugin rebuilds the optimizer at experience 0
            delta = torch.cat([d.flatten() for d in delta_weights(parts.model.backbone).values()])
            assert t == 0 or not torch.equal(delta, before[t - 1]), f"{precision}: experience {t} did not step"
            before[t] = delta
        runs[precision] = (norms, plugin, before)
    norms32, norms16 = runs["fp32"][0], runs["fp16"][0]
    scaler = runs["fp16"][1].scaler
    assert scaler is not None and scaler.get_scale() > 1  # scaling was on
    assert norms16.dtypes == {torch.float32}  # outputs come back in float32
    # after_backward sees unscaled gradients: the first step's norm is the fp32 run's up to fp16 rounding,
    # not 2^16 times it.
    assert norms16.norms[0] == pytest.approx(norms32.norms[0], rel=0.05)
    assert runs["fp16"][1].state_dict()["scaler"]["scale"] == scaler.get_scale()


def test_evaluation_runs_under_inference_mode():
    parts = build(make_cfg(), None)
    seen = []
    parts.model.backbone.register_forward_hook(lambda m, i, o: seen.append(torch.is_inference_mode_enabled()))
    experience = parts.benchmark.train_stream[0]
    parts.strategy.train(experience)
    n_train = len(seen)
    parts.strategy.eval(parts.benchmark.test_stream[:1])
    assert n_train > 0 and not any(seen[:n_train])
    assert len(seen) > n_train and all(seen[n_train:])
    parts.strategy.train(parts.benchmark.train_stream[1])  # training works after an inference-mode eval
    assert not torch.is_inference_mode_enabled()


# --- compile ------------------------------------------------------------------------------------


def outputs_after_experiences(cfg, plugin=None, experiences=3, policy=None):
    parts = build(cfg, None)
    if policy is not None:  # the schema does not offer policy: stack yet; the plugin does
        parts.peft.policy = policy
    if plugin is not None:
        parts.strategy.plugins.append(plugin)
    for experience in list(parts.benchmark.train_stream)[:experiences]:
        parts.strategy.train(experience)
        parts.strategy.eval(parts.benchmark.test_stream[:1])
    with torch.no_grad():
        return parts.model.eval()(probe(parts)), parts


@pytest.mark.parametrize("policy", ["merge", pytest.param("stack", marks=pytest.mark.slow)])
def test_compile_plugin_follows_adapter_changes(policy):
    """Dynamo with its eager backend (tracing and guards, no code generation): exactly eager's numbers while
    the adapters are injected, merged or stacked. Merging re-injects a fresh adapter at the end of each
    experience, so every experience trains the same module tree; stacking folds earlier branches, so the tree
    changes once (the folded term appears) and then stays."""
    torch._dynamo.reset()
    n = 2 if policy == "merge" else 3  # merge: adapted, merged, adapted again (no new structure)
    cfg = make_cfg("lora", n_experiences=n)
    eager, _ = outputs_after_experiences(cfg, experiences=n, policy=policy)
    plugin = CompilePlugin(backend="eager")
    compiled, parts = outputs_after_experiences(cfg, plugin, experiences=n, policy=policy)
    assert parts.model.backbone._compiled_call_impl is not None
    assert torch.equal(compiled, eager)
    if policy == "merge":
        assert plugin.resets == 0 and len(plugin.structures) == 1
    else:
        # Stacking folds every frozen branch into one term per layer (adapters/fold.py): the tree changes once,
        # when the first branch folds, and stays the same however long the stream, so nothing is reset.
        assert plugin.resets == 0 and len(plugin.structures) == 2


@pytest.mark.slow
def test_compile_true_gives_eager_outputs():
    """``training.compile: true`` (inductor, C++ on CPU): the same outputs as eager within float32 rounding
    after training (inductor fuses and reorders, so not bit for bit)."""
    torch._dynamo.reset()
    eager, _ = outputs_after_experiences(make_cfg(), experiences=1)
    compiled, parts = outputs_after_experiences(make_cfg(compile=True), experiences=1)
    assert parts.model.backbone._compiled_call_impl is not None
    assert (compiled - eager).abs().max() <= 1e-4 * eager.abs().max()


def test_task_incremental_model_runs_under_bf16_autocast():
    """Avalanche's MultiTaskModule writes each task's logits into a float32 buffer: under autocast the
    per-task heads must hand back float32 (precision: auto is bf16 on CPUs with native bf16)."""
    from types import SimpleNamespace

    from avalanche.models.utils import avalanche_model_adaptation

    from avl_peft.cl.backbone import create_continual_model

    model = create_continual_model("vit_tiny_patch16_224", head="multi", **KWARGS)
    for task in (0, 1):  # what Avalanche does when each task's experience starts
        avalanche_model_adaptation(
            model, SimpleNamespace(classes_in_this_experience=[2 * task, 2 * task + 1], task_labels=[task])
        )
    x, tasks = torch.randn(4, 3, 16, 16), torch.tensor([0, 0, 1, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, tasks)
    assert out.dtype == torch.float32 and out.shape[0] == 4
    out.sum().backward()  # gradients flow through the cast
