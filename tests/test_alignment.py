"""Class moments, classifier alignment (SLCA), drift compensation (SDC) and first-session adaptation: known answers."""

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_study, tiny_vit
from torch import nn

import avl_peft
from avl_peft.cl.heads import (
    AlignOptions,
    ClassMoments,
    MomentOptions,
    StatisticsHeadPlugin,
    align_linear,
    build_head,
    head_options,
)
from avl_peft.cl.plugin import PEFTPlugin
from avl_peft.errors import ConfigError
from avl_peft.study import experiment as study_mod
from avl_peft.study.config import validate_study
from avl_peft.study.run_study import run_study

D, K = 4, 3
MUS = torch.tensor([[0.0, 0, 0, 0], [2.0, 0, 0, 0], [0, 2.0, 1, 0]])


def gaussians(seed=0):
    """Three classes sharing one covariance: the Bayes posterior is a softmax of linear functions (LDA)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(D, D, generator=g) * 0.4 + torch.eye(D)
    cov = a @ a.T
    chol = torch.linalg.cholesky(cov)
    return cov, (lambda c, n: MUS[c] + torch.randn(n, D, generator=g) @ chol.T)


def test_moments_are_exact_and_merge_like_one_pass():
    x = torch.randn(60, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2] * 20)
    whole = ClassMoments(5)
    whole.update(x, y)
    parts = ClassMoments(5)
    parts.update(x[:25], y[:25])  # classes come back: parallel-variance merge
    parts.update(x[25:], y[25:])
    low = ClassMoments(5, "lowrank", rank=5)  # full rank: the low-rank form is exact too
    low.update(x[:25], y[:25])
    low.update(x[25:], y[25:])
    for c in range(3):
        xc = x[y == c]
        assert torch.allclose(whole.means[c], xc.mean(0), atol=1e-12)
        assert torch.allclose(whole.covariance_matrix(c), torch.cov(xc.T), atol=1e-5)
        assert torch.allclose(parts.covariance_matrix(c), torch.cov(xc.T), atol=1e-5)
        assert torch.allclose(low.covariance_matrix(c), torch.cov(xc.T), atol=1e-5)
    trunc = ClassMoments(5, "lowrank", rank=2)
    trunc.update(x, y)
    for c in range(3):  # a truncated factor keeps the diagonal exact
        assert torch.allclose(torch.diagonal(trunc.covariance_matrix(c)), torch.cov(x[y == c].T).diagonal(), atol=1e-5)


def test_alignment_recovers_the_joint_training_head():
    """Aligning on moments gathered experience by experience ({0, 1}, then {2}) gives the head that joint
    training on all the real features gives (same recipe), and both match the Bayes (LDA) posterior.
    Tolerance: mean over test points of max_c |p_align − p_joint| ≤ 0.03, argmax agreement ≥ 97 %."""
    torch.manual_seed(0)
    cov, draw = gaussians()
    x = [draw(c, 2000) for c in range(K)]
    moments = ClassMoments(D)
    moments.update(torch.cat(x[:2]), torch.tensor([0] * 2000 + [1] * 2000))
    moments.update(x[2], torch.full((2000,), 2))
    opts = AlignOptions(epochs=20, samples_per_class=2000, lr=0.2, batch_size=500, logit_norm=None, shrink=0.0)
    aligned = nn.Linear(D, K)
    align_linear(aligned, moments, opts, torch.Generator().manual_seed(3), "cpu")

    joint = nn.Linear(D, K)
    sgd = torch.optim.SGD(joint.parameters(), lr=0.2, momentum=0.9)
    xa, ya = torch.cat(x), torch.arange(K).repeat_interleave(2000)
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        order = torch.randperm(len(ya), generator=g)
        for s in range(0, len(ya), 500):
            i = order[s : s + 500]
            sgd.zero_grad()
            nn.functional.cross_entropy(joint(xa[i]), ya[i]).backward()
            sgd.step()

    test = torch.cat([draw(c, 1000) for c in range(K)])
    prec = torch.linalg.inv(cov)
    bayes = torch.softmax(test @ (MUS @ prec).T - 0.5 * (MUS @ prec * MUS).sum(1), 1)
    with torch.no_grad():
        pa, pj = torch.softmax(aligned(test), 1), torch.softmax(joint(test), 1)
    assert (pa - pj).abs().max(1).values.mean() <= 0.03
    assert (pa - bayes).abs().max(1).values.mean() <= 0.03
    assert (pa.argmax(1) == pj.argmax(1)).float().mean() >= 0.97


def test_drift_compensation_moves_prototypes_by_a_known_translation():
    x = torch.randn(90, 6, dtype=torch.float64)
    y = torch.arange(3).repeat(30)
    moments = ClassMoments(6)
    moments.update(x, y)
    cov = moments.covariance_matrix(1)
    shift = torch.tensor([0.5, -1.0, 2.0, 0.0, 0.25, 3.0], dtype=torch.float64)
    current = torch.randn(40, 6, dtype=torch.float64) * 2
    for sigma in (None, 0.1, 10.0):  # every kernel width: a uniform translation is the weighted mean
        m = ClassMoments(6)
        m.load_state_dict(moments.state_dict())
        applied = m.compensate(current, current + shift, sigma)
        assert torch.allclose(m.means, moments.means + shift, atol=1e-10)
        assert torch.allclose(applied, shift.expand(3, 6), atol=1e-10)
        assert torch.equal(m.covariance_matrix(1), cov)  # covariances are not moved
    head = build_head("prototype", 6)
    head.fit_moments(m, 8, 0.0, torch.Generator())
    assert torch.allclose(head.means(), moments.means + shift, atol=1e-10)


def test_drift_weights_favour_nearby_samples():
    moments = ClassMoments(2)
    moments.update(torch.tensor([[0.0, 0.0], [10.0, 10.0]]), torch.tensor([0, 1]))
    before = torch.tensor([[0.1, 0.0], [9.9, 10.0]])
    after = before + torch.tensor([[1.0, 0.0], [0.0, -2.0]])
    moments.compensate(before, after, sigma=1.0)  # each class follows the sample next to it
    assert torch.allclose(moments.means.float(), torch.tensor([[1.0, 0.0], [10.0, 8.0]]), atol=1e-6)


def test_memory_at_vit_b_width_and_200_classes_is_stated_and_bounded():
    """Fake 768-wide stream, 200 classes in 10 experiences: the stored bytes equal the documented formula and
    stay under the stated bounds (full 473.1 MB is by formula only: allocating it here would cost the quick loop)."""
    g = torch.Generator().manual_seed(0)
    moments = ClassMoments(768, "lowrank", rank=16)
    for e in range(10):
        labels = torch.arange(20 * e, 20 * e + 20).repeat_interleave(4)
        moments.update(torch.randn(labels.numel(), 768, generator=g), labels)
    assert moments.n_classes == 200
    assert moments.nbytes() == ClassMoments.expected_nbytes(200, 768, "lowrank", 16) <= 11.7e6
    assert ClassMoments.expected_nbytes(200, 768, "lowrank", 64) <= 41.3e6
    assert 473.0e6 <= ClassMoments.expected_nbytes(200, 768, "full") <= 473.2e6
    full = ClassMoments(768)
    full.update(torch.randn(8, 768, generator=g), torch.tensor([0, 1] * 4))
    assert full.nbytes() == ClassMoments.expected_nbytes(2, 768, "full")


def test_sampling_matches_the_stored_gaussian():
    cov, draw = gaussians(1)
    x = draw(1, 4000)
    for kind in ("full", "lowrank"):
        m = ClassMoments(D, kind, rank=2)
        m.update(x, torch.full((4000,), 1))
        s = m.sample(1, 20000, 0.0, torch.Generator().manual_seed(0)).double()
        assert torch.allclose(s.mean(0), m.means[1], atol=0.05)
        assert torch.allclose(torch.cov(s.T), m.covariance_matrix(1), atol=0.08)


def test_options_parse_and_refuse():
    opts = head_options("ranpac", align={"epochs": 2}, drift="sdc", covariance="lowrank")
    assert opts.align == AlignOptions(epochs=2) and opts.drift.sigma is None and opts.uses_moments
    assert head_options("prototype", drift={"sigma": 0.5}).drift.sigma == 0.5
    assert not head_options("linear").uses_moments and head_options("linear", align=True).align == AlignOptions()
    assert head_options("prototype", drift="none", align=False).drift is None
    for bad in ({"align": {"epoch": 2}}, {"drift": "adc"}, {"covariance": "diag"}, {"align": {"lr": -1}}):
        with pytest.raises(ConfigError):
            head_options("prototype", **bad)
    with pytest.raises(ConfigError, match="statistics head .* or align"):
        StatisticsHeadPlugin(None, options=MomentOptions(drift=True), feature_dim=8)


def test_first_session_policy_leaves_the_backbone_bit_identical_after_experience_0():
    model = tiny_vit(1)
    plugin = PEFTPlugin("lora", policy="first", rank=2)
    avl_peft.inject(model, "lora", rank=2)
    plugin._adopt(model)
    with torch.no_grad():  # "experience 0 trained": the adapter moved
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    snapshot = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    plugin._next_structure(model)  # end of experience 0: the adapter freezes
    plugin.experiences_done = 1
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):  # experiences 1, 2: training steps and further ends of experience
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
        opt.step()
        plugin._next_structure(model)
        plugin.experiences_done += 1
    after = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(snapshot[k], after[k]) for k in snapshot)
    with pytest.raises(ConfigError, match="policy: first"):
        PEFTPlugin("full", policy="first")


STUDY = make_tiny_study(
    name="align",
    scenario={"n_experiences": 3, "options": {"n_classes": 6, "n_train_per_class": 20}},
    training={
        "lr": 0.003,
        "head": "ranpac",
        "head_options": {"dim": 64, "align": {"epochs": 1, "samples_per_class": 16}, "drift": "sdc"},
    },
)


@pytest.mark.slow
def test_alignment_and_drift_state_survive_a_kill_and_resume_exactly(tmp_path, monkeypatch):
    run_study(validate_study(STUDY), tmp_path / "ref", progress=False)
    reference = json.loads((tmp_path / "ref" / "lora-rank2-naive-s0" / "results.json").read_text())
    original = study_mod.run_state.save_run_state

    def save_then_crash(run_dir, t, state):
        original(run_dir, t, state)
        if t == 1:
            raise KeyboardInterrupt  # a kill right after experience 1's state reached the disk

    with monkeypatch.context() as m:
        m.setattr(study_mod.run_state, "save_run_state", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            run_study(validate_study(STUDY), tmp_path / "run", progress=False)
    run_study(validate_study(STUDY), tmp_path / "run", resume=True, progress=False)
    results = json.loads((tmp_path / "run" / "lora-rank2-naive-s0" / "results.json").read_text())
    assert results["resumed_at_experience"] == 2
    assert results["accuracy_matrix"] == reference["accuracy_matrix"]  # bit-identical on CPU
    assert results["heads"] == reference["heads"]
    assert reference["heads"]["moments"] == {"classes": 6, "bytes": ClassMoments.expected_nbytes(6, 48, "full")}


@pytest.mark.slow
def test_first_session_run_keeps_the_adapted_backbone_bit_identical(tmp_path):
    study = {**STUDY, "method": {"name": "lora", "policy": "first", "options": {"rank": 2}}}
    study["training"] = {**STUDY["training"], "head": "prototype", "head_options": {}}
    run_study(validate_study(study), tmp_path, progress=False)
    ckpt = tmp_path / "lora-rank2-first-naive-s0" / "checkpoints"
    states = [torch.load(ckpt / f"exp_{t}.pt", weights_only=True)["model"] for t in range(3)]
    adapter = [k for k in states[0] if "lora_" in k]
    assert adapter and any(states[0][k].abs().sum() > 0 for k in adapter if "lora_B" in k)  # experience 0 adapted
    for later in states[1:]:
        assert all(torch.equal(states[0][k], later[k]) for k in states[0] if not k.startswith("head."))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["alignment_split_cifar100", "alignment_imagenet_r"])
def test_paper_scale_configs_validate(name):
    import yaml

    from avl_peft.study.config import expand

    data = yaml.safe_load((Path(__file__).parents[1] / "configs" / f"{name}.yaml").read_text())
    data["training"]["device"] = "cpu"  # the dry run of a GPU config on a CPU machine
    runs = expand(validate_study(data))
    assert len(runs) == 54
    heads = {head_options("ranpac", **cfg["training"]["head_options"]).uses_moments for _, cfg in runs}
    assert heads == {True, False}


def test_align_is_refused_where_the_run_model_is_not_the_classifier():
    data = {**STUDY, "strategy": {"name": "l2p"}, "method": {"name": "head"}}
    data["training"] = {**STUDY["training"], "head": "linear", "head_options": {"align": True}}
    with pytest.raises(ConfigError, match="align re-trains the run model's linear head"):
        validate_study(data)
