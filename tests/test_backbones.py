"""model=torchvision (a torchvision base with a new head) and fine_tune's two stages; offline, small archs."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

from regbench.models.torchvision import TorchvisionNet, hub_file, weights_enum
from regbench.validation import validate
from regbench.errors import ConfigError, DataError, RegbenchError
from regbench.optim import build_optimizer
from regbench.regularizers import Context, build_stack
from regbench.loop import AutogradStep, train_one_epoch
from regbench.train import fit
from tests.conftest import TINY, compose_cfg

SMALL = ["model=torchvision", "model.arch=mobilenet_v3_small", "model.weights=null", "model.input_size=32"]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub folder, and no download possible (a download attempt fails the test)."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    return tmp_path / "hub"


def test_head_replaces_the_classifier_with_exact_parameter_counts():
    torch.manual_seed(0)
    net = TorchvisionNet("mobilenet_v3_small", 5, (1, 28, 28), None, head_hidden=16, input_size=32)
    # mobilenet_v3_small's features end in 576 channels: pool -> Dense(576->16) -> ReLU -> Dense(16->5)
    assert sum(p.numel() for p in net.head.parameters()) == 576 * 16 + 16 + 16 * 5 + 5
    assert [type(m).__name__ for m in net.head] == ["AdaptiveAvgPool2d", "Flatten", "Linear", "ReLU", "Linear"]
    full = torchvision.models.mobilenet_v3_small()
    assert sum(p.numel() for p in net.base.parameters()) == sum(p.numel() for p in full.features.parameters())
    assert len(net.blocks) == 13 and net(torch.zeros(2, 1, 28, 28)).shape == (2, 5)

    resnet = TorchvisionNet("resnet18", 10, (3, 32, 32), None)  # no hidden Dense; the arch's own pooling
    assert sum(p.numel() for p in resnet.head.parameters()) == 512 * 10 + 10
    assert [n for n, _ in resnet.head.named_children()] == ["pool", "flatten", "out"]
    assert len(resnet.blocks) == 6  # conv1, bn1, layer1..layer4


def test_a_state_dict_file_loads_into_the_base_and_sets_the_input_adaptation(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.mobilenet_v3_small(num_classes=7)  # another classifier: ignored
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    net = TorchvisionNet("mobilenet_v3_small", 3, (1, 28, 28), str(path), input_size=None)
    theirs = source.features.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in net.base.state_dict().items())
    # size, mean and std from the arch's DEFAULT weights' transforms (crop 224, ImageNet mean/std)
    meta = weights_enum("mobilenet_v3_small", "DEFAULT").transforms()
    assert net.input_size == meta.crop_size[0] == 224
    x = torch.full((2, 1, 28, 28), 0.25)  # a constant grey image: repeated, resized, normalised per channel
    out = net.adapt(x)
    assert out.shape == (2, 3, 224, 224)
    expected = (torch.tensor(0.25) - torch.tensor(meta.mean)) / torch.tensor(meta.std)
    assert torch.allclose(out.mean(dim=(0, 2, 3)), expected, rtol=1e-5) and torch.allclose(out.std(dim=(0, 2, 3)),
                                                                                          torch.zeros(3), atol=1e-5)


def test_a_state_dict_of_another_arch_or_a_pickle_is_refused(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(RegbenchError, match="not a state dict of mobilenet_v3_small"):
        TorchvisionNet("mobilenet_v3_small", 3, (1, 28, 28), str(path), input_size=32)
    bad = tmp_path / "evil.pt"
    bad.write_bytes(b"junk")
    with pytest.raises(RegbenchError, match="cannot be loaded safely \\(truncated or corrupt: not a torch.save file"):
        TorchvisionNet("mobilenet_v3_small", 3, (1, 28, 28), str(bad), input_size=32)


def test_arch_is_validated_with_a_did_you_mean():
    with pytest.raises(ConfigError, match=r"model.arch='resnet19'.*did you mean model.arch=resnet18\?"):
        validate(compose_cfg(*TINY, "model=torchvision", "model.arch=resnet19", "model.weights=null"))
    with pytest.raises(ConfigError, match=r"model.weights='IMAGENET1K_V3'.*did you mean IMAGENET1K_V1\?"):
        validate(compose_cfg(*TINY, "model=torchvision", "model.weights=IMAGENET1K_V3", "data.normalize=none"))


def test_pretrained_weights_need_unnormalised_data(hub):
    hub_file(weights_enum("resnet18", "DEFAULT")).parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), hub_file(weights_enum("resnet18", "DEFAULT")))
    with pytest.raises(ConfigError, match="data.normalize='per_channel': expected none with pretrained weights "
                       r".*; drop the data.normalize override \(model=torchvision sets none\), or use model.weights=null"):
        validate(compose_cfg(*TINY, "model=torchvision", "data.normalize=per_channel"))
    validate(compose_cfg(*TINY, "model=torchvision", "model.download=false"))
    validate(compose_cfg(*TINY, "model=torchvision", "model.weights=null", "data.normalize=per_channel"))


@pytest.mark.parametrize("data", ["mnist5k", "cifar10"])
def test_the_model_group_sets_the_data_normalisation_it_needs(data):
    """model=torchvision sets data.normalize=none itself, whichever dataset; other models keep per_channel; an
    experiment or the command line still sets it."""
    assert compose_cfg(f"data={data}", "model=torchvision").data.normalize == "none"
    assert compose_cfg(f"data={data}", "model=mlp").data.normalize == "per_channel"
    assert compose_cfg("model=torchvision", "data.normalize=per_channel").data.normalize == "per_channel"
    assert compose_cfg("experiment=transfer_cifar10").data.normalize == "none"


def test_pretrained_torchvision_trains_without_a_data_override(hub, tmp_path):
    """The issue's case: `regbench model=torchvision` (cached DEFAULT weights, no download) trains as it is."""
    w = weights_enum("mobilenet_v3_small", "DEFAULT")
    hub_file(w).parent.mkdir(parents=True)
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), hub_file(w))
    fit(compose_cfg(*TINY, "model=torchvision", "model.arch=mobilenet_v3_small", "model.input_size=32",
                    "model.download=false"), tmp_path / "run")
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["status"] == "completed" and s["data"]["normalize"] == "none"


def test_offline_names_the_weights_file_and_where_to_put_it_without_downloading(hub):
    cfg = compose_cfg(*TINY, "model=torchvision", "model.arch=mobilenet_v3_small", "data.normalize=none",
                      "model.download=false")
    with pytest.raises(DataError) as e:
        validate(cfg)
    msg = str(e.value)
    assert msg.startswith("model.weights=DEFAULT: the mobilenet_v3_small weights file mobilenet_v3_small-047dcff4.pth "
                          f"is not in {hub}/checkpoints (model.download=false); fix: download "
                          "https://download.pytorch.org/models/mobilenet_v3_small-047dcff4.pth into")
    assert "\n" not in msg


def test_the_cached_weights_file_is_what_loads(hub):
    w = weights_enum("mobilenet_v3_small", "IMAGENET1K_V1")
    torch.manual_seed(3)
    saved = torchvision.models.mobilenet_v3_small()
    hub_file(w).parent.mkdir(parents=True)
    torch.save(saved.state_dict(), hub_file(w))
    net = TorchvisionNet("mobilenet_v3_small", 4, (3, 32, 32), "IMAGENET1K_V1", input_size=32)
    assert torch.equal(net.base[0][0].weight, saved.features[0][0].weight)


# ------------------------------------------------------------------------------------ fine_tune


def _stack_model_optimizer(*overrides):
    cfg = compose_cfg(*TINY, *SMALL, "regularizer=[fine_tune]", *overrides)
    ctx = Context(cfg, num_classes=10)
    stack = build_stack(cfg, ctx)
    torch.manual_seed(0)
    from regbench.models import build_model

    model = build_model(cfg.model, (1, 28, 28), 10, stack.slots())
    stack.setup(model)
    optimizer = build_optimizer(cfg.optimizer, stack.param_groups(model, cfg.optimizer))
    return cfg, ctx, stack, model, optimizer


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _epoch(model, optimizer, steps=2):
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(steps)]
    train_one_epoch(AutogradStep(model, optimizer), data)


def test_stage_one_trains_only_the_head_and_keeps_frozen_batchnorm_statistics():
    cfg, ctx, stack, model, optimizer = _stack_model_optimizer("regularizer.fine_tune.freeze_base_epochs=1",
                                                               "regularizer.fine_tune.unfreeze_top=2")
    base, head = _snapshot(model.base), _snapshot(model.head)
    assert any("running_mean" in k for k in base)
    _epoch(model, optimizer)
    after = model.base.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base.items())  # weights and BN running stats, bitwise
    assert not torch.equal(head["out.weight"], model.head.out.weight)
    info = stack.info()["fine_tune"]
    assert info["unfrozen_blocks"] == 2 and info["head_parameters"] == 576 * 10 + 10
    assert optimizer.param_groups[1]["lr"] == pytest.approx(cfg.optimizer.lr * 0.1, rel=1e-5)

    stack.on_epoch_end(1, {}, model)  # stage 2: the top two blocks train at the lower lr, the rest stays frozen
    head_state = {id(p): optimizer.state[p]["step"].item() for p in model.head.parameters()}
    assert set(head_state.values()) == {2.0}
    before = _snapshot(model.base)
    _epoch(model, optimizer)
    after = model.base.state_dict()
    top = ("11.", "12.")  # mobilenet_v3_small's features.11, features.12
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert changed and all(k.startswith(top) for k in changed)
    assert {k for k in changed if "running_mean" in k}  # the unfrozen blocks' BN layers train normally
    assert any(k.startswith("11.") and k.endswith("weight") for k in changed)
    assert all(optimizer.state[p]["step"].item() == 4.0 for p in model.head.parameters())  # state carried over
    assert stack.state_dict()["fine_tune"] == {"stage": 2, "stage2_from_epoch": 2}


def test_unfreeze_top_zero_is_a_frozen_base_and_bad_values_are_config_errors():
    _, ctx, stack, model, optimizer = _stack_model_optimizer("regularizer.fine_tune.unfreeze_top=0",
                                                             "regularizer.fine_tune.freeze_base_epochs=0")
    base = _snapshot(model.base)
    stack.on_epoch_end(1, {}, model)
    _epoch(model, optimizer)
    assert all(torch.equal(v, model.base.state_dict()[k]) for k, v in base.items())
    assert len(optimizer.param_groups) == 1 and stack.info()["fine_tune"]["stage2_from_epoch"] is None
    with pytest.raises(ConfigError, match=r"unfreeze_top=14: expected at most 13"):
        _stack_model_optimizer("regularizer.fine_tune.unfreeze_top=14")
    with pytest.raises(ConfigError, match="finetune_lr_scale"):
        _stack_model_optimizer("regularizer.fine_tune.finetune_lr_scale=0")


def test_fine_tune_runs_in_fit_and_records_the_stage_switch(tmp_path):
    fit(compose_cfg(*TINY, "model.hidden=[16,8]", "regularizer=[fine_tune]", "trainer.max_epochs=2",
                    "regularizer.fine_tune.freeze_base_epochs=1"), tmp_path / "run")
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["status"] == "completed"
    assert s["regularizer_info"]["fine_tune"]["stage2_from_epoch"] == 2
    assert s["params"]["frozen"] == 784 * 16 + 16 + 16 * 8 + 8  # counted at the start: stage 1, the base frozen


# ------------------------------------------------------------------------------- resume in stage 2

STAGES = [*TINY, "model.hidden=[16,8]", "regularizer=[fine_tune]", "trainer.max_epochs=4", "optimizer.lr=0.01",
          "regularizer.fine_tune.freeze_base_epochs=1", "regularizer.fine_tune.unfreeze_top=1", "scheduler=cosine"]


def _same_run(a, b):
    from tests.test_resume import assert_same_run

    assert_same_run(a, b)


def test_an_interrupted_run_resumed_in_stage_two_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    import regbench.run as train

    fit(compose_cfg(*STAGES), tmp_path / "ref")
    real = train.fault_point

    def interrupt(point, epoch, settle=None):
        if (point, epoch) == ("after_summary", 3):
            if settle is not None:
                settle()  # as the real hook does before it acts
            raise KeyboardInterrupt
        real(point, epoch, settle)

    monkeypatch.setattr(train, "fault_point", interrupt)
    with pytest.raises(KeyboardInterrupt):
        fit(compose_cfg(*STAGES), tmp_path / "run")
    monkeypatch.setattr(train, "fault_point", real)
    fit(compose_cfg(*STAGES), tmp_path / "run", resume=True)
    _same_run(tmp_path / "ref", tmp_path / "run")
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["resumed_from_epoch"] == 3 and s["regularizer_info"]["fine_tune"]["stage2_from_epoch"] == 2
    # the lower hidden layer stayed frozen through both stages: bitwise the initial weights
    from regbench.checkpoint import load_checkpoint

    first = load_checkpoint(tmp_path / "ref" / "checkpoints" / "best.pt")["model"]
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    assert torch.equal(first["hidden.0.linear.weight"], last["hidden.0.linear.weight"])


@pytest.mark.slow
def test_sigkill_in_stage_two_then_resume_is_bitwise_identical(tmp_path):
    from tests.test_resume import cli

    cli([*STAGES, f"hydra.run.dir={tmp_path}/ref"])
    killed = cli([*STAGES, f"hydra.run.dir={tmp_path}/run"], env={"REGBENCH_FAULT": "after_checkpoint:3"}, check=False)
    assert killed.returncode == -9, killed.stderr
    cli(["resume", str(tmp_path / "run")])
    _same_run(tmp_path / "ref", tmp_path / "run")


def test_rerun_of_a_torchvision_run_types_its_saved_config_and_repeats_it_bitwise(tmp_path):
    from regbench.cli import main
    from tests.test_resume import metrics_without_time

    args = [*TINY, "model=torchvision", "model.arch=mobilenet_v3_small", "model.weights=null", "model.head_hidden=8",
            "regularizer=[fine_tune]", "regularizer.fine_tune.freeze_base_epochs=0", "regularizer.fine_tune.unfreeze_top=1"]
    main([*args, f"hydra.run.dir={tmp_path}/a"])
    main(["rerun", str(tmp_path / "a"), f"hydra.run.dir={tmp_path}/b"])
    assert metrics_without_time(tmp_path / "a") == metrics_without_time(tmp_path / "b")
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert s["regularizer_info"]["fine_tune"]["head_parameters"] == 576 * 8 + 8 + 8 * 10 + 10
    with pytest.raises(SystemExit) as e:  # the saved config is typed: a typo'd key of the family fails
        main(["rerun", str(tmp_path / "a"), "model.head_hiden=4", f"hydra.run.dir={tmp_path}/c"])
    assert e.value.code == 2


@pytest.mark.parametrize("stack", ["[dropout]", "[batchnorm,dropout]", "[layer_norm]"])
def test_layer_members_are_refused_before_anything_is_built(stack):
    # The arch has its own layers: the layer slots have no place in them (validation, not the first step).
    members = sorted(stack.strip("[]").split(","))
    with pytest.raises(ConfigError, match=rf"regularizer={members!r}: expected no member that changes the model's "
                       r"layers with model=torchvision \(the torchvision arch has its own\)".replace("[", r"\[")):
        validate(compose_cfg(*TINY, *SMALL, f"regularizer={stack}"))
