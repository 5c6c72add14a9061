"""Adding a method is one class plus one registration: with no other edit, a toy method is injectable,
budgetable, resumable, runnable from a YAML study, listed by `avl-peft list` and present in the report."""

import torch
from conftest import make_tiny_study
from torch import nn

import avl_peft
from avl_peft.adapters import METHODS, Adapter, AdapterOptions
from avl_peft.adapters.budget import select_for_budget
from avl_peft.cli import main
from avl_peft.study.config import expand, validate_study
from avl_peft.study.experiment import run_experiment
from avl_peft.study.report import build_report


class Toy(Adapter):
    """ΔW = s·u vᵀ summed over r rank-one terms: LoRA with its own parameter names."""

    Options = AdapterOptions

    def __init__(self, layer: nn.Linear, opts: AdapterOptions, shared: nn.Module | None = None):
        super().__init__(layer, opts)
        w = layer.weight
        self.v = nn.Parameter(torch.randn(opts.rank, w.shape[1], dtype=w.dtype, device=w.device) / w.shape[1] ** 0.5)
        self.u = nn.Parameter(torch.zeros(w.shape[0], opts.rank, dtype=w.dtype, device=w.device))

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.confine(self.scale * self.u @ self.v)

    def factors(self, weight):
        return self.scale * self.u, self.confine(self.v)

    def input_factor(self):
        return self.v


def _study():
    return make_tiny_study(
        name="toy",
        backbone={"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 16, "patch_size": 4, "depth": 1}},
        scenario={"n_experiences": 3},
        training={"epochs": 2, "lr": 1e-2},
        method={"name": "toy"},
    )


def test_a_toy_method_is_first_class(tmp_path, capsys, monkeypatch):
    METHODS.register("toy", "a toy rank-one-sum adapter")(Toy)  # the one registration
    try:
        # injectable
        model = avl_peft.create_backbone("vit_tiny_patch16_224", num_classes=3, img_size=16, patch_size=4, depth=1)
        avl_peft.inject(model, "toy", rank=2)
        assert avl_peft.parameter_counts(model)["adapter"] > 0
        # budgetable
        fresh = avl_peft.create_backbone("vit_tiny_patch16_224", num_classes=3, img_size=16, patch_size=4, depth=1)
        chosen = select_for_budget("toy", 5_000, backbone_model=fresh)
        assert 0 < chosen["adapter_params"] <= 5_000 and chosen["rank"] >= 1
        # runnable from a YAML study, and resumable: a crash after experience 0, then --resume
        study = validate_study(_study())
        ((rid, cfg),) = expand(study)
        reference = run_experiment(cfg, tmp_path / "ref", run_id=rid, progress=False)

        from avl_peft.study import experiment

        original = experiment.run_state.save_run_state

        def crash_after_first(run_dir, t, state):
            original(run_dir, t, state)
            raise KeyboardInterrupt

        monkeypatch.setattr(experiment.run_state, "save_run_state", crash_after_first)
        try:
            run_experiment(cfg, tmp_path / "resumed", run_id=rid, progress=False)
        except KeyboardInterrupt:
            pass
        monkeypatch.setattr(experiment.run_state, "save_run_state", original)
        assert not (tmp_path / "resumed" / "results.json").exists()
        resumed = run_experiment(cfg, tmp_path / "resumed", run_id=rid, progress=False, resume=True)
        assert resumed["resumed_at_experience"] == 1
        assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]
        # listed by `avl-peft list`
        assert main(["list"]) == 0
        assert "toy" in capsys.readouterr().out
        # present in the report
        rows = build_report(tmp_path / "ref")
        assert [r["method"] for r in rows] == ["toy"]
    finally:
        METHODS.unregister("toy")
    assert "toy" not in METHODS
