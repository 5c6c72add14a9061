"""The subspace instruments (avl_peft/instruments/geometry.py): known-answer math, method geometry, tracker."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vit

import avl_peft
from avl_peft.adapters.inject import adapted_layers
from avl_peft.errors import ConfigError
from avl_peft.instruments.geometry import (
    alignment,
    feature_drift,
    linear_cka,
    orthonormalize,
    principal_energy,
    principal_overlap,
    relative_norm,
    stable_rank,
    top_left_singular,
    top_singular,
)
from avl_peft.instruments.tracker import SubspaceTracker
from avl_peft.study.config import expand, validate_study
from avl_peft.study.experiment import build


def orth(d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]


def with_spectrum(d_out, d_in, s, seed=0):
    return (orth(d_out, len(s), seed) * torch.tensor(s, dtype=torch.float64)) @ orth(d_in, len(s), seed + 1).t()


# ------------------------------------------------------------------------------------------------
# principal_overlap
# ------------------------------------------------------------------------------------------------


def test_overlap_of_a_subspace_with_itself_is_one_whatever_the_basis():
    U = orth(20, 3)
    assert principal_overlap(U, U) == pytest.approx(1.0)
    assert principal_overlap(U, U @ orth(3, 3, seed=5)) == pytest.approx(1.0)  # same span, rotated basis


def test_orthogonal_subspaces_have_zero_overlap():
    Q = orth(10, 6)
    assert principal_overlap(Q[:, :3], Q[:, 3:]) == pytest.approx(0.0, abs=1e-12)


def test_known_principal_angles_give_mean_cos_squared():
    t1, t2 = 0.3, 1.1
    e = torch.eye(4, dtype=torch.float64)
    U1 = e[:, :2]
    U2 = torch.stack([math.cos(t1) * e[0] + math.sin(t1) * e[2], math.cos(t2) * e[1] + math.sin(t2) * e[3]], 1)
    expected = (math.cos(t1) ** 2 + math.cos(t2) ** 2) / 2
    assert principal_overlap(U1, U2) == pytest.approx(expected)
    assert principal_overlap(U2, U1) == pytest.approx(expected)  # symmetric


def test_overlap_divides_by_the_smaller_dimension():
    Q = orth(12, 5)
    assert principal_overlap(Q[:, :2], Q) == pytest.approx(1.0)  # contained: every angle is 0
    assert principal_overlap(Q[:, :2], torch.cat([Q[:, :1], Q[:, 2:4]], 1)) == pytest.approx(0.5)
    assert principal_overlap(Q[:, :0], Q) == 0.0  # empty subspace
    with pytest.raises(ValueError):
        principal_overlap(Q, orth(11, 2))


# ------------------------------------------------------------------------------------------------
# top_left_singular, stable rank, norms
# ------------------------------------------------------------------------------------------------


def test_top_left_singular_finds_the_principal_subspace():
    M = with_spectrum(80, 60, [10.0, 8.0, 6.0, 5.0, 1.0, 0.5, 0.2, 0.1]).float()
    exact = top_left_singular(M, 4, exact=True)
    fast = top_left_singular(M, 4)
    assert fast.shape == exact.shape == (80, 4)
    assert torch.allclose(fast.t() @ fast, torch.eye(4), atol=1e-5)  # orthonormal columns
    assert principal_overlap(fast, exact) == pytest.approx(1.0, abs=1e-4)
    truth = orth(80, 8)[:, :4]
    assert principal_overlap(exact, truth) == pytest.approx(1.0, abs=1e-5)


def test_top_left_singular_clamps_to_rank_and_handles_zero():
    low = (torch.randn(30, 2) @ torch.randn(2, 20)).float()
    assert top_left_singular(low, 5).shape == (30, 2)
    assert top_left_singular(low, 5, exact=True).shape == (30, 2)
    assert top_left_singular(torch.zeros(30, 20), 4).shape == (30, 0)
    assert top_left_singular(torch.randn(6, 3), 10).shape == (6, 3)  # k above min(d_out, d_in)
    u, s, v = top_singular(low, 5)
    assert s.shape == (2,) and v.shape == (20, 2)
    with pytest.raises(ValueError):
        top_left_singular(low, 0)


def test_orthonormalize_spans_the_union():
    Q = orth(15, 6)
    basis = orthonormalize([Q[:, :3], Q[:, 2:5]])  # one shared direction
    assert basis.shape == (15, 5)
    assert principal_overlap(basis, Q[:, :5].float()) == pytest.approx(1.0, abs=1e-6)


def test_stable_rank_known_values():
    u, v = torch.randn(7), torch.randn(5)
    assert stable_rank(torch.outer(u, v)) == pytest.approx(1.0, rel=1e-5)
    for n in (1, 4, 16):
        assert stable_rank(torch.eye(n)) == pytest.approx(n, rel=1e-5)
    assert stable_rank(torch.zeros(3, 4)) == 0.0
    assert stable_rank(torch.diag(torch.tensor([2.0, 1.0]))) == pytest.approx(5 / 4)


def test_relative_norm():
    W = torch.eye(4)
    assert relative_norm(0.5 * W, W) == pytest.approx(0.5)
    assert relative_norm(torch.zeros(4, 4), W) == 0.0


def test_alignment_of_updates_inside_and_outside_the_principal_subspace():
    W = with_spectrum(40, 30, [9.0, 7.0, 5.0, 3.0, 1.0, 0.5]).float()
    U = orth(40, 6)[:, :3].float()
    inside = U @ torch.randn(3, 30)
    assert alignment(inside, W, 3, exact=True) == pytest.approx(1.0, abs=1e-5)
    outside = (torch.eye(40) - orth(40, 6).float()[:, :3] @ orth(40, 6).float()[:, :3].t()) @ torch.randn(40, 30)
    assert alignment(outside, W, 3, exact=True) == pytest.approx(0.0, abs=1e-5)
    assert alignment(torch.zeros_like(W), W, 3) == 0.0


def test_principal_energy_is_two_sided():
    W = with_spectrum(40, 30, [9.0, 7.0, 5.0, 3.0, 1.0, 0.5]).float()
    U, V = orth(40, 6)[:, :3].float(), orth(30, 6, seed=1)[:, :3].float()
    left = U @ torch.randn(3, 30)  # writes into W's principal output directions
    right = torch.randn(40, 3) @ V.t()  # reads W's principal input directions
    assert principal_energy(left + right, W, 3, exact=True) == pytest.approx(1.0, abs=1e-5)
    assert alignment(right, W, 3, exact=True) < 0.5  # left-only alignment misses the right-aligned part
    assert principal_energy(torch.zeros_like(W), W, 3) == 0.0


# ------------------------------------------------------------------------------------------------
# Linear CKA
# ------------------------------------------------------------------------------------------------


def test_cka_of_identical_features_is_one():
    X = torch.randn(50, 12)
    assert linear_cka(X, X) == pytest.approx(1.0)
    assert feature_drift(X, X) == pytest.approx(0.0, abs=1e-12)


def test_cka_is_invariant_to_rotation_scaling_and_translation():
    X = torch.randn(50, 12)
    Q = orth(12, 12, seed=3).float()
    assert linear_cka(X, 3.0 * X @ Q + 1.5) == pytest.approx(1.0, abs=1e-6)
    wide = torch.randn(10, 40)  # n < d: the Gram-matrix path
    assert linear_cka(wide, 0.1 * wide @ orth(40, 40, seed=4).float()) == pytest.approx(1.0, abs=1e-6)


def test_cka_of_unrelated_features_is_below_one():
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(200, 8, generator=g), torch.randn(200, 16, generator=g)
    value = linear_cka(X, Y)
    assert 0.0 <= value < 0.3
    assert feature_drift(X, Y) == pytest.approx(1 - value)
    assert linear_cka(X, torch.ones(200, 3)) == 0.0  # constant features carry no structure


# ------------------------------------------------------------------------------------------------
# Method geometry on a tiny ViT
# ------------------------------------------------------------------------------------------------

R = 4


def _pretrained_weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _sgd_steps(model, steps=3, lr=1e-3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _mean_geometry(model, w0):
    deltas = avl_peft.delta_weights(model)
    al = [alignment(d, w0[n], R, exact=True) for n, d in deltas.items()]
    en = [principal_energy(d, w0[n], R, exact=True) for n, d in deltas.items()]
    return sum(al) / len(al), sum(en) / len(en)


def test_pissa_update_starts_in_the_principal_subspace_lora_does_not():
    # Moving A only (B₀ δA): PiSSA's ΔW lies in W's top-r output directions, exactly.
    model = tiny_vit()
    w0 = _pretrained_weights(model)
    avl_peft.inject(model, "pissa", rank=R)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.adapter.lora_A.add_(1e-3 * torch.randn(layer.adapter.lora_A.shape, generator=g))
    assert _mean_geometry(model, w0)[0] == pytest.approx(1.0, abs=1e-3)


def test_gradient_steps_pissa_is_principal_lora_is_at_chance():
    # A gradient step moves both factors: ΔW ≈ −η(G V_r S_r V_rᵀ + U_r S_r U_rᵀ G), half left-aligned,
    # half right-aligned. Left-only alignment sees about half of it; the two-sided energy sees all.
    results = {}
    for method in ("pissa", "lora"):
        model = tiny_vit()
        w0 = _pretrained_weights(model)
        avl_peft.inject(model, method, rank=R)
        _sgd_steps(model)
        results[method] = _mean_geometry(model, w0)
    (pissa_al, pissa_en), (lora_al, lora_en) = results["pissa"], results["lora"]
    assert pissa_en > 0.98
    assert lora_en < 0.15  # chance ≈ r/d_out + r/d_in
    assert pissa_al > 0.3 and lora_al < 0.1  # chance ≈ r/d_out


# ------------------------------------------------------------------------------------------------
# SubspaceTracker on a short continual run
# ------------------------------------------------------------------------------------------------

SMALL = {
    "backbone": {"kwargs": {"img_size": 32, "patch_size": 4, "depth": 2}},
    "scenario": {"name": "synthetic"},
    "training": {"batch_size": 16},
    "subspace": {"enabled": False},  # these tests add their own tracker
}


def _parts(method="lora", policy="continue", run_dir=None, **options):
    if method not in ("full", "head"):
        options = {"rank": R, **options}
    study = validate_study({**SMALL, "method": {"name": method, "policy": policy, "options": options}})
    ((_, cfg),) = expand(study)
    return build(cfg, run_dir)


def _probe(parts, n=16):
    data = parts.benchmark.test_stream[0].dataset
    return torch.stack([data[i][0] for i in range(n)])


class FakeWriter:
    def __init__(self):
        self.calls = []

    def add_scalar(self, tag, value, step):
        self.calls.append((tag, value, step))


def _train(parts, tracker, first=False):
    plugins = parts.strategy.plugins
    plugins.insert(0, tracker) if first else plugins.append(tracker)
    for exp in parts.benchmark.train_stream:
        parts.strategy.train(exp)
    return tracker.records


def _check_ranges(records, n=3):
    assert [r["experience"] for r in records] == list(range(n))
    assert records[0]["overlap"] is None
    for r in records:
        for key in ("alignment", "principal_energy", "feature_drift"):
            assert 0.0 <= r[key] <= 1.0, (key, r[key])
        assert r["relative_norm"] >= 0.0 and math.isfinite(r["relative_norm"])
        assert r["effective_rank"] >= 0.0
    for r in records[1:]:
        assert r["overlap"] is not None and 0.0 <= r["overlap"] <= 1.0


@pytest.fixture(scope="module")
def lora_run():
    torch.manual_seed(0)
    parts = _parts("lora")
    writer = FakeWriter()
    tracker = SubspaceTracker(_probe(parts), k=R, writer=writer)
    _train(parts, tracker)
    return parts, tracker, writer


def test_tracker_records_one_entry_per_experience(lora_run):
    parts, tracker, _ = lora_run
    records = tracker.records
    _check_ranges(records)
    layers = set(adapted_layers(parts.model))
    assert len(layers) == 8  # depth 2 × (qkv, proj, fc1, fc2); never the head
    for r in records:
        assert set(r["layers"]) == layers
        assert 1.0 <= r["effective_rank"] <= R + 1e-3  # a rank-r update: stable rank ≤ r
        assert r["relative_norm"] > 0 and r["feature_drift"] > 0
    norms = [r["relative_norm"] for r in records]
    assert norms == sorted(norms)  # one adapter keeps learning: the cumulative update grows here


def test_tracker_cumulative_update_is_delta_w_under_continue(lora_run):
    parts, tracker, _ = lora_run
    last = tracker.records[-1]["layers"]
    for name, layer in adapted_layers(parts.model).items():
        delta = layer.delta_weight().detach()
        expected = float(delta.norm() / layer.base.weight.detach().norm())  # base W never changes here
        assert last[name]["relative_norm"] == pytest.approx(expected, rel=1e-4)
        assert last[name]["effective_rank"] == pytest.approx(stable_rank(delta), rel=1e-3)


def test_tracker_logs_averages_to_the_writer(lora_run):
    _, tracker, writer = lora_run
    tags = {tag for tag, _, _ in writer.calls}
    assert {
        "subspace/alignment",
        "subspace/effective_rank",
        "subspace/relative_norm",
        "subspace/feature_drift",
        "subspace/overlap",
    } <= tags
    overlap_steps = [step for tag, _, step in writer.calls if tag == "subspace/overlap"]
    assert overlap_steps == [1, 2]  # experience 0 has no earlier update to overlap with
    drift = [(step, v) for tag, v, step in writer.calls if tag == "subspace/feature_drift"]
    assert drift == [(r["experience"], r["feature_drift"]) for r in tracker.records]


def test_tracker_under_merge_policy_in_either_plugin_order():
    runs = []
    for first in (True, False):  # before PEFTPlugin (sees adapters) or after it (sees merged weights)
        torch.manual_seed(0)
        parts = _parts("lora", policy="merge")
        runs.append(_train(parts, SubspaceTracker(_probe(parts), k=R, writer=None), first=first))
    for a, b in zip(*runs):
        for key in ("overlap", "alignment", "effective_rank", "relative_norm", "feature_drift"):
            if a[key] is None:
                assert b[key] is None
            else:
                assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5), key
    _check_ranges(runs[0])
    # merged adapters accumulate: after 3 experiences the cumulative update can exceed rank r
    assert runs[0][-1]["effective_rank"] > 0


def test_tracker_follows_full_fine_tuning_and_tensorboard(tmp_path):
    torch.manual_seed(0)
    parts = _parts("full", run_dir=tmp_path)
    tracker = SubspaceTracker(_probe(parts), k=R)  # writer="auto": the run's TensorboardLogger
    records = _train(parts, tracker)
    _check_ranges(records)
    assert set(records[0]["layers"]) == {
        f"backbone.blocks.{i}.{t}" for i in range(2) for t in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    }
    assert all(r["relative_norm"] > 0 for r in records)
    parts.evaluator.loggers[0].writer.flush()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert "subspace/feature_drift" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("subspace/feature_drift")] == [0, 1, 2]


def test_tracker_rebases_after_a_base_session():
    torch.manual_seed(0)
    study = validate_study(
        {
            **SMALL,
            "training": {**SMALL["training"], "pretrain": True},
            "method": {"name": "lora", "options": {"rank": R}},
        }
    )
    ((_, cfg),) = expand(study)
    parts = build(cfg, None)
    records = _train(parts, SubspaceTracker(_probe(parts), k=R, writer=None, base_session=True))
    assert records[0]["base_session"] is True and "base_session" not in records[1]
    assert records[0]["overlap"] is None and records[1]["overlap"] is None  # the adapter starts at exp 1
    assert records[2]["overlap"] is not None
    # against the base-session backbone, the adapter's cumulative update is exactly its ΔW
    for name, layer in adapted_layers(parts.model).items():
        delta = layer.delta_weight().detach()
        expected = float(delta.norm() / layer.base.weight.detach().norm())
        assert records[2]["layers"][name]["relative_norm"] == pytest.approx(expected, rel=1e-4)


def test_tracker_with_a_frozen_backbone_reports_no_update():
    torch.manual_seed(0)
    parts = _parts("head")
    records = _train(parts, SubspaceTracker(_probe(parts), k=R, writer=None))
    for r in records:
        assert r["overlap"] is None
        assert r["relative_norm"] == r["effective_rank"] == r["alignment"] == 0.0
        assert r["feature_drift"] == pytest.approx(0.0, abs=1e-6)


def test_feature_snapshot_restores_each_modules_mode():
    torch.manual_seed(0)
    parts = _parts("lora")
    model, strategy = parts.model, parts.strategy
    model.train()
    model.head.eval()  # a mixed state must come back exactly
    tracker = SubspaceTracker(_probe(parts), k=R, writer=None)
    tracker.before_training(strategy)
    assert model.training and model.backbone.training and not model.head.training


def test_tracker_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="probe"):
        SubspaceTracker(torch.randn(1, 3, 32, 32))
    with pytest.raises(ConfigError, match="k must be"):
        SubspaceTracker(torch.randn(4, 3, 32, 32), k=0)
    with pytest.raises(ConfigError, match="writer"):
        SubspaceTracker(torch.randn(4, 3, 32, 32), writer=object())


def test_tracker_does_not_perturb_training():
    """Randomized SVD draws random numbers: they must not come from (and shift) the training RNG."""
    results = []
    for enabled in (False, True):
        study = validate_study({**SMALL, "subspace": {"enabled": enabled}, "method": {"name": "lora"}})
        ((_, cfg),) = expand(study)
        parts = build(cfg, None)
        for experience in parts.benchmark.train_stream:
            parts.strategy.train(experience)
            parts.strategy.eval(parts.benchmark.test_stream)
        results.append(parts.matrix.matrices)
    assert results[0] == results[1]
