"""PEFTPlugin with other Avalanche strategies and plugins, and as a Python API: early validation, reuse,
Python-level resume, hooks, what trains (RWalk, MIR, EWC under merge, ICaRL/SCR/FeatureReplay/L2P parts)."""

import warnings

import pytest
import torch
from avalanche.evaluation.metrics import MAC
from avalanche.models import PNN, IncrementalClassifier
from avalanche.training import MIR, SCR, FeatureReplay, ICaRL, Naive, PNNStrategy
from avalanche.training.plugins import EWCPlugin, RWalkPlugin, SynapticIntelligencePlugin
from torch import nn

from avl_peft.adapters.inject import adapted_layers, inject, lineage
from avl_peft.cl.backbone import create_backbone, create_continual_model
from avl_peft.cl.checkpoints import restore_checkpoint
from avl_peft.cl.composition import TrainableMIRPlugin
from avl_peft.cl.plugin import PEFTPlugin
from avl_peft.cl.scenarios import build_scenario
from avl_peft.errors import ConfigError

VIT = {"img_size": 16, "patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2}


def scenario(n=3):
    return build_scenario(
        "synthetic", n_experiences=n, seed=0, root=None, task_labels=False, img_size=16, mean=(0.5,) * 3,
        std=(0.5,) * 3, n_classes=2 * n, n_train_per_class=8, n_test_per_class=4,
    )  # fmt: skip


def model(seed=0):
    torch.manual_seed(seed)
    return create_continual_model("vit_tiny_patch16_224", **VIT)


def naive(m, plugins, **kw):
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    return Naive(model=m, optimizer=opt, criterion=nn.CrossEntropyLoss(), train_mb_size=8, train_epochs=1,
                 eval_mb_size=16, plugins=plugins, evaluator=None, **kw)  # fmt: skip


def adapter_values(m):
    return {n: p.detach().clone() for n, p in m.named_parameters() if ".adapter." in n}


@torch.no_grad()
def outputs(m, x):
    was = m.training
    m.eval()
    out = m(x)
    m.train(was)
    return out


# -- validation as early as possible --------------------------------------------------------------------


def test_options_targets_and_rank_fail_at_construction_with_the_model():
    with pytest.raises(ConfigError, match="rnak"):
        PEFTPlugin("lora", rnak=4)
    with pytest.raises(ConfigError, match="too large"):
        PEFTPlugin("lora", rank=100_000, model=model())
    with pytest.raises(ConfigError, match="Conv2d"):
        PEFTPlugin("lora", rank=2, targets=["proj"], model=model())
    with pytest.raises(ConfigError, match="names no module"):
        PEFTPlugin("lora", rank=2, trainable=["nothing_here"], model=model())
    with pytest.raises(ConfigError, match="stack"):
        PEFTPlugin("head", policy="stack")


def test_without_the_model_bad_targets_fail_before_any_experience_trains():
    m = model()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    strategy = naive(m, [PEFTPlugin("lora", rank=100_000)])
    with pytest.raises(ConfigError, match="too large"):
        strategy.train(scenario().train_stream[0])
    assert strategy.clock.train_exp_counter == 0 and strategy.clock.train_iterations == 0
    assert not adapted_layers(m)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())


def test_one_plugin_one_model():
    bench = scenario()
    plugin = PEFTPlugin("lora", rank=2)
    naive(model(), [plugin]).train(bench.train_stream[0])
    with pytest.raises(ConfigError, match="another model"):
        naive(model(1), [plugin]).train(bench.train_stream[0])


def test_strategies_with_their_own_model_are_refused():
    pnn = PNN(num_layers=1, in_features=16 * 16 * 3, hidden_features_per_column=8)
    strategy = PNNStrategy(model=pnn, optimizer=torch.optim.SGD(pnn.parameters(), lr=0.1),
                           criterion=nn.CrossEntropyLoss(), plugins=[PEFTPlugin("lora", rank=2)])  # fmt: skip
    with pytest.raises(ConfigError, match="own model"):
        strategy.train(scenario().train_stream[0])


@pytest.mark.parametrize("policy, pretrain", [("merge", False), ("continue", True)])
def test_path_integral_regularisers_need_policy_continue(policy, pretrain):
    for reg in (SynapticIntelligencePlugin(si_lambda=0.1), RWalkPlugin()):
        strategy = naive(model(), [PEFTPlugin("lora", rank=2, policy=policy, pretrain=pretrain), reg])
        with pytest.raises(ConfigError, match="path"):
            strategy.train(scenario().train_stream[0])


# -- Python-level resume --------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["continue", "merge"])
def test_restore_continues_exactly_and_never_overwrites(policy, tmp_path):
    bench = scenario()
    x = torch.stack([bench.test_stream[0].dataset[i][0] for i in range(6)])
    torch.manual_seed(1)
    m = model()
    strategy = naive(m, [PEFTPlugin("pissa", rank=2, policy=policy, checkpoint_dir=tmp_path / "ref")])
    for e in bench.train_stream:
        torch.manual_seed(100 + e.current_experience)
        strategy.train(e)
    expected = outputs(m, x)

    ckpt = tmp_path / "run"
    m1 = model()
    strategy = naive(m1, [PEFTPlugin("pissa", rank=2, policy=policy, checkpoint_dir=ckpt)])
    for e in list(bench.train_stream)[:2]:
        torch.manual_seed(100 + e.current_experience)
        strategy.train(e)
    written = {p.name: p.read_bytes() for p in ckpt.glob("exp_*.pt")}
    assert sorted(written) == ["exp_0.pt", "exp_1.pt"]

    # A new process: the model built as before, a new plugin on the same directory.
    m2 = model()
    fresh = PEFTPlugin("pissa", rank=2, policy=policy, checkpoint_dir=ckpt)
    with pytest.raises(ConfigError, match="never overwrites"):
        naive(m2, [fresh]).train(bench.train_stream[2])
    m2 = model()
    plugin = PEFTPlugin("pissa", rank=2, policy=policy, checkpoint_dir=ckpt)
    assert plugin.restore(m2) == 2
    torch.manual_seed(102)
    naive(m2, [plugin]).train(bench.train_stream[2])
    assert sorted(p.name for p in ckpt.glob("exp_*.pt")) == ["exp_0.pt", "exp_1.pt", "exp_2.pt"]
    assert all((ckpt / n).read_bytes() == b for n, b in written.items()), "earlier checkpoints untouched"
    # SGD without momentum keeps no optimizer state, so the restored run continues exactly.
    assert torch.load(ckpt / "exp_2.pt", weights_only=True)["experience"] == 2
    torch.testing.assert_close(outputs(m2, x), expected, rtol=1e-5, atol=1e-5)


def test_merge_checkpoints_out_of_order_are_refused(tmp_path):
    bench = scenario(2)
    strategy = naive(model(), [PEFTPlugin("lora", rank=2, policy="merge", checkpoint_dir=tmp_path)])
    for e in bench.train_stream:
        strategy.train(e)
    fresh = model()
    with pytest.raises(ConfigError, match="in order"):
        restore_checkpoint(fresh, tmp_path / "exp_1.pt")
    restore_checkpoint(fresh, tmp_path / "exp_0.pt")
    from avl_peft.adapters.inject import merge

    merge(fresh)
    assert lineage(fresh) == 1
    restore_checkpoint(fresh, tmp_path / "exp_1.pt")  # now in order


def test_a_fresh_plugin_counts_on_from_the_strategy_clock(tmp_path):
    bench = scenario()
    m = model()
    strategy = naive(m, [])
    strategy.train(bench.train_stream[0])  # one experience without the plugin
    plugin = PEFTPlugin("lora", rank=2, checkpoint_dir=tmp_path)
    strategy.plugins.insert(0, plugin)
    strategy.train(bench.train_stream[1])
    assert plugin.experiences_done == 2 and [p.name for p in tmp_path.glob("exp_*.pt")] == ["exp_1.pt"]


# -- hooks and MAC --------------------------------------------------------------------------------------


def test_forward_hooks_on_adapted_layers_keep_firing_and_mac_counts_them():
    m = model()
    x = torch.randn(2, 3, 16, 16)
    seen = []
    handle = m.backbone.blocks[0].mlp.fc1.register_forward_hook(lambda mod, i, o: seen.append(o.detach().clone()))
    mac = MAC()
    mac.update(m.eval(), x)
    before = mac.result()
    inject(m, "lora", rank=2)
    with torch.no_grad():
        m.backbone.blocks[0].mlp.fc1.adapter.lora_B.fill_(0.1)  # a non-zero ΔW the hook must see
    after = []
    m.backbone.blocks[0].mlp.fc1.register_forward_hook(lambda mod, i, o: after.append(o.detach().clone()))
    seen.clear()
    out = m(x)
    assert len(seen) == 1, "the hook registered on the Linear before injection fires after it"
    torch.testing.assert_close(seen[0], after[0])  # and sees the adapted output, (W + ΔW) x + b
    handle.remove()
    seen.clear()
    m(x)
    assert seen == [], "its handle still removes it"
    mac.update(m, x)
    assert mac.result() == before, "Avalanche's MAC counts the adapted layers' base multiplications"
    assert out.shape == (2, 2)


# -- what trains ----------------------------------------------------------------------------------------


def test_rwalk_and_mir_train_the_adapters_with_the_plugin():
    bench = scenario()
    for make in (
        lambda m, p: naive(m, [p, RWalkPlugin(delta_t=2)]),
        lambda m, p: MIR(
            model=m,
            optimizer=torch.optim.SGD(m.parameters(), lr=0.05),
            criterion=nn.CrossEntropyLoss(),
            mem_size=8,
            subsample=6,
            batch_size_mem=2,
            train_mb_size=8,
            plugins=[p],
            evaluator=None,
        ),  # fmt: skip
    ):
        m = model()
        plugin = PEFTPlugin("lora", rank=2)
        strategy = make(m, plugin)
        frozen = {n: p.detach().clone() for n, p in m.backbone.named_parameters()}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for e in bench.train_stream:
                start = adapter_values(m)  # empty before the first experience: injection comes with train()
                strategy.train(e)
                now = adapter_values(m)
                assert now and all(not torch.equal(p, start.get(n, torch.zeros_like(p))) for n, p in now.items()
                                   if n.endswith("lora_B") or n in start)  # fmt: skip
        assert all(torch.equal(p, frozen[n.replace(".base.", ".")]) for n, p in m.backbone.named_parameters()
                   if ".adapter." not in n)  # fmt: skip
        if isinstance(strategy, MIR):
            assert any("TrainableMIRPlugin" in str(w.message) for w in caught)
            assert any(isinstance(p, TrainableMIRPlugin) for p in strategy.plugins)


def test_rwalk_before_the_plugin_is_refused():
    strategy = naive(model(), [RWalkPlugin(), PEFTPlugin("lora", rank=2)])
    with pytest.raises(ConfigError, match="after PEFTPlugin"):
        strategy.train(scenario().train_stream[0])


def test_ewc_under_merge_holds_importances_on_what_trains():
    bench = scenario()
    m = model()
    ewc = EWCPlugin(ewc_lambda=1.0)
    strategy = naive(m, [PEFTPlugin("pissa", rank=2, policy="merge"), ewc])
    for e in list(bench.train_stream)[:2]:
        strategy.train(e)
    for t in (0, 1):
        importances = ewc.importances[t]
        trainable = {n for n, p in m.named_parameters() if p.requires_grad}
        assert trainable <= set(importances), "every parameter that trains next has an importance"
        for layer in adapted_layers(m):
            total = sum(
                float(importances[n].data.abs().sum()) for n in importances if n.startswith(layer + ".adapter.")
            )
            assert total > 0, f"{layer}: zero importance on its adapter"
        assert float(importances["head.classifier.weight"].data.abs().sum()) > 0


def _moved(params, before):
    return {n for n, p in params if not torch.equal(p.detach(), before[n])}


def test_wrappers_own_parts_train_icarl_scr_feature_replay():
    bench = scenario(2)

    def vit():
        torch.manual_seed(0)
        backbone = create_backbone("vit_tiny_patch16_224", num_classes=1, **VIT)
        backbone.reset_classifier(0)  # features only
        return backbone

    builds = {
        "icarl": lambda p: ICaRL(
            feature_extractor=vit(),
            classifier=nn.Linear(16, 4),
            optimizer=None,
            memory_size=8,
            buffer_transform=None,
            fixed_memory=True,
            train_mb_size=8,
            plugins=[p],
            evaluator=None,
        ),  # fmt: skip
        "scr": lambda p: SCR(
            model=_scr_model(vit()),
            optimizer=None,
            mem_size=8,
            batch_size_mem=4,
            train_mb_size=8,
            plugins=[p],
            evaluator=None,
        ),  # fmt: skip
        "feature_replay": lambda p: FeatureReplay(
            model=create_continual_model("vit_tiny_patch16_224", **VIT),
            optimizer=None,
            last_layer_name="head",
            mem_size=8,
            batch_size_mem=4,
            train_mb_size=8,
            plugins=[p],
            evaluator=None,
        ),  # fmt: skip
    }
    own = {"icarl": "train_classifier", "scr": "train_classifier", "feature_replay": "train_classifier"}
    for name, build in builds.items():
        strategy = build(PEFTPlugin("lora", rank=2))
        strategy.optimizer = torch.optim.SGD(strategy.model.parameters(), lr=0.05)
        m = strategy.model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            strategy.train(bench.train_stream[0])
        part = dict(m.named_modules())[own[name]]
        assert all(p.requires_grad for p in part.parameters()), f"{name}: {own[name]} was frozen"
        before = {n: p.detach().clone() for n, p in part.named_parameters()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            strategy.train(bench.train_stream[1])
        assert _moved(part.named_parameters(), before), f"{name}: {own[name]} did not train"
        assert adapted_layers(m), name


def _scr_model(vit):
    from avalanche.models import SCRModel

    return SCRModel(feature_extractor=vit, projection=nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)))


def test_prompts_are_named_when_frozen_and_train_when_declared():
    from avl_peft.cl.strategies.l2p import build_prompted_vits

    prompted, _ = build_prompted_vits(model(), pool_size=2, prompt_length=1, top_k=1)
    with pytest.warns(UserWarning, match="prompt"):
        inject(prompted, "lora", rank=2)
    assert not prompted.prompt.prompt.requires_grad
    prompted, _ = build_prompted_vits(model(), pool_size=2, prompt_length=1, top_k=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # declared: nothing to warn about
        inject(prompted, "lora", rank=2, trainable=["prompt"])
    assert prompted.prompt.prompt.requires_grad and prompted.head.classifier.weight.requires_grad


def test_a_custom_model_warns_about_a_frozen_classifier():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Flatten(), nn.Linear(12, 8))
            self.classifier = IncrementalClassifier(8, 2)

        def forward(self, x):
            return self.classifier(self.features(x))

    with pytest.warns(UserWarning, match="classifier"):
        inject(Net(), "lora", rank=2, targets=["features.1"])
    net = inject(Net(), "lora", rank=2, targets=["features.1"], trainable=["classifier"])
    assert all(p.requires_grad for p in net.classifier.parameters())
