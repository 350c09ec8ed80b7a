"""Augmentation: batched ops with per-image parameters, checked against torchvision's functional ops;
MixUp / CutMix targets; normalisation variants; test-time augmentation; every preset trains a step."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode as IM
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from regbench.augment import (OPS, Policy, adjust_brightness, adjust_contrast, adjust_saturation, apply_named_op,
                              build_op, build_policy, cutmix, inverse_affine, mixup, preview_indices, shifted_crop,
                              warp)
from regbench.augment.auto import _augmentation_space
from regbench.data import DATASETS, Normalizer, load_data
from regbench.errors import ConfigError
from regbench.train import fit
from tests.conftest import F32_REL, TINY, compose_cfg, config_options, layered_models, small_model

MNIST, CIFAR = DATASETS["mnist5k"], DATASETS["cifar10"]
SIMPLE = {"hflip": {}, "vflip": {}, "crop": {}, "affine": {"rotation": 20, "translate": 0.1, "zoom": 0.1, "shear": 5},
          "brightness": {}, "contrast": {}, "saturation": {}, "noise": {}, "cutout": {},
          "randaugment": {}, "trivialaugment": {}, "random_erasing": {}, "augmix": {}}


def images(n=8, c=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g)


def test_every_op_is_covered():
    assert set(SIMPLE) | {"mixup", "cutmix", "mixup_cutmix"} == set(OPS)


@pytest.mark.parametrize("name", sorted(SIMPLE))
def test_op_shape_dtype_p0_identity_per_sample_and_seeded(name):
    p = 0.5 if name in ("hflip", "vflip") else 1.0  # a flip's only per-image parameter is whether it flips
    op = build_op({"op": name, **SIMPLE[name], "p": p}, "augmentation.ops[0]", CIFAR)
    x = images().expand(8, 3, 32, 32).clone()
    x[:] = x[0]  # eight identical images
    torch.manual_seed(1)
    out = op(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    differs = [not torch.equal(out[0], out[i]) for i in range(1, 8)]
    assert any(differs), "every image draws its own parameters"
    torch.manual_seed(1)
    assert torch.equal(op(x), out)  # seeded: the same draw again
    off = build_op({"op": name, **SIMPLE[name], "p": 0.0}, "augmentation.ops[0]", CIFAR)
    assert torch.allclose(off(x), x, atol=1e-6)  # p = 0 is the identity


def test_flips_and_crop_agree_with_torchvision():
    x = images(4)
    assert torch.equal(build_op({"op": "hflip", "p": 1.0}, "k", CIFAR)(x), TF.horizontal_flip(x))
    assert torch.equal(build_op({"op": "vflip", "p": 1.0}, "k", CIFAR)(x), TF.vertical_flip(x))
    ox, oy = torch.tensor([0, 3, 8, 5]), torch.tensor([8, 1, 0, 4])
    out = shifted_crop(x, 4, "reflect", ox, oy)
    padded = TF.pad(x, [4], padding_mode="reflect")
    for i in range(4):
        assert torch.equal(out[i], TF.crop(padded[i], int(oy[i]), int(ox[i]), 32, 32))
    zero = shifted_crop(x, 4, "zero", ox, oy)
    assert torch.equal(zero[0], TF.crop(TF.pad(x[0], [4], fill=0.0), 8, 0, 32, 32))


@pytest.mark.parametrize("angle,tx,ty,scale,shear", [(17.0, 3, -2, 1.1, 8.0), (-30.0, 0, 0, 0.9, 0.0),
                                                      (5.0, 1, 1, 1.0, -12.0), (0.0, 4, 0, 1.0, 0.0)])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_affine_agrees_with_torchvision(angle, tx, ty, scale, shear, mode):
    x = images(1)
    ref = TF.affine(x, angle=angle, translate=[tx, ty], scale=scale, shear=[shear, 0.0],
                    interpolation=IM.BILINEAR if mode == "bilinear" else IM.NEAREST)
    t = lambda v: torch.tensor([float(v)])  # noqa: E731
    mine = warp(x, inverse_affine(t(angle), t(tx), t(ty), t(scale), t(scale), t(shear), t(0)), mode, "zero")
    assert torch.allclose(mine, ref, atol=1e-5)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_warp_of_a_batch_applies_each_image_its_own_matrix(mode):
    """The batched grid (one matrix product for all images) on non-square images: image i equals
    torchvision's affine of image i alone with its own parameters."""
    x = torch.rand(5, 3, 20, 28, generator=torch.Generator().manual_seed(1))
    angle = torch.tensor([17.0, -30.0, 5.0, 0.0, 44.0])
    tx, ty = torch.tensor([3.0, 0.0, -1.0, 4.0, 2.0]), torch.tensor([-2.0, 0.0, 1.0, 0.0, 5.0])
    scale, shear = torch.tensor([1.1, 0.9, 1.0, 1.0, 1.25]), torch.tensor([8.0, 0.0, -12.0, 0.0, 3.0])
    mine = warp(x, inverse_affine(angle, tx, ty, scale, scale, shear, torch.zeros(5)), mode, "zero")
    for i in range(5):
        ref = TF.affine(x[i], angle=float(angle[i]), translate=[float(tx[i]), float(ty[i])], scale=float(scale[i]),
                        shear=[float(shear[i]), 0.0], interpolation=IM.BILINEAR if mode == "bilinear" else IM.NEAREST)
        assert torch.allclose(mine[i], ref, atol=1e-5), i


def test_affine_with_p_leaves_the_unchosen_images_exactly_alone():
    x = images(64, 1, 28)
    torch.manual_seed(0)
    out = build_op({"op": "affine", "rotation": 20, "translate": 0.1, "zoom": 0.1, "fill": "zero", "p": 0.5},
                   "k", CIFAR)(x)
    # An unchosen image is sampled through the identity grid: equal up to float32 rounding of the grid
    # (2/28 is not a binary fraction; ~3e-6, far below one 8-bit grey level); a chosen one moves a lot.
    diff = (out - x).abs().flatten(1).amax(1)
    same = diff < 1e-5
    assert 16 < int(same.sum()) < 48 and bool((diff[~same] > 0.1).all())


def test_affine_zoom_draws_x_and_y_independently(monkeypatch):
    import regbench.augment.ops as aug

    seen = {}
    real = aug.warp

    def spy(x, theta, *args, **kw):
        seen["theta"] = theta
        return real(x, theta, *args, **kw)

    monkeypatch.setattr(aug, "warp", spy)
    for shear in (0.0, 5.0):  # the rotation-zoom fast path and the general one
        torch.manual_seed(0)
        build_op({"op": "affine", "zoom": 0.3, "shear": shear}, "k", CIFAR)(images(2000, 1, 8))
        theta = seen["theta"]
        if shear == 0:  # no rotation: the inverse matrix is diag(1/zx, 1/zy)
            zx, zy = 1 / theta[:, 0, 0], 1 / theta[:, 1, 1]
            assert zx.min() >= 0.7 and zx.max() <= 1.3 and zy.min() >= 0.7 and zy.max() <= 1.3  # [1 − z, 1 + z]
            assert abs(torch.corrcoef(torch.stack([zx, zy]).float())[0, 1]) < 0.1  # independent (Keras' zoom)
        else:
            assert abs(torch.corrcoef(torch.stack([theta[:, 0, 0], theta[:, 1, 1]]).float())[0, 1]) < 0.2


def test_affine_fast_path_equals_the_general_formula():
    x = images(64)
    a = build_op({"op": "affine", "rotation": 30, "translate": 0.1, "zoom": 0.2}, "k", CIFAR)
    b = build_op({"op": "affine", "rotation": 30, "translate": 0.1, "zoom": 0.2, "shear": 1e-12}, "k", CIFAR)
    torch.manual_seed(3)
    fast = a(x)
    torch.manual_seed(3)
    general = b(x)
    assert torch.allclose(fast, general, atol=1e-5)


def test_geometric_ops_in_one_warp_equal_each_op_alone():
    """RandAugment's five geometric ops share one warp per batch: image by image, exactly the op alone."""
    from regbench.augment import GEOMETRIC, geometric_ops

    g = torch.Generator().manual_seed(2)
    x = images(40, 3)
    kind = torch.arange(40) % 5
    top = torch.tensor([0.3, 0.3, 14.0, 14.0, 30.0])[kind]  # shear, shear, translate px, translate px, degrees
    m = (torch.rand(40, generator=g) * 2 - 1) * top
    together = geometric_ops(x, kind, m)
    for i in range(40):
        alone = apply_named_op(x[i:i + 1], GEOMETRIC[int(kind[i])], m[i:i + 1])
        assert torch.equal(together[i:i + 1], alone), (i, GEOMETRIC[int(kind[i])])


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("kind", ["randaugment", "trivialaugment"])
def test_autoaugment_grouped_and_whole_batch_strategies_give_the_same_images(kind, channels):
    """CPU gathers the images of each op; CUDA runs every op on the whole batch and selects (no host sync).
    Same draws, same images — checked here on CPU, where both run."""
    x = images(200, channels)
    o = build_op({"op": kind}, "k", CIFAR)
    bin_ = None if kind == "trivialaugment" else 9
    torch.manual_seed(5)
    grouped = o._round(x, bin_, grouped=True)
    torch.manual_seed(5)
    whole = o._round(x, bin_, grouped=False)
    assert not torch.equal(grouped, x)
    assert torch.equal(grouped, whole)


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("kind,cls", [("randaugment", v2.RandAugment), ("trivialaugment", v2.TrivialAugmentWide)])
def test_randaugment_ops_agree_with_torchvision(kind, cls, channels):
    """Every op of torchvision's list, at several magnitude bins and both signs, on single images."""
    reference = cls()
    x = images(1, channels)
    ours = _augmentation_space(kind, 31, 32, 32)
    for name, (bins_fn, signed) in reference._AUGMENTATION_SPACE.items():
        mags = bins_fn(31, 32, 32)
        if mags is not None:
            assert torch.equal(mags.float(), ours[name][0].float()), name  # the same magnitude bins
        for b in (0, 9, 20, 30):
            m = float(mags[b]) if mags is not None and mags.ndim else 0.0
            for sign in ((1, -1) if signed else (1,)):
                value = int(m) if name == "Posterize" else m * sign
                ref = reference._apply_image_or_video_transform(x, name, value, interpolation=IM.NEAREST,
                                                                fill={torch.Tensor: None})
                mine = apply_named_op(x, name, torch.tensor([float(value)]))
                assert torch.allclose(mine, ref, atol=1e-5), (name, b, sign)


@pytest.mark.parametrize("fn,ref", [(adjust_brightness, TF.adjust_brightness), (adjust_contrast, TF.adjust_contrast),
                                    (adjust_saturation, TF.adjust_saturation)])
def test_colour_ops_agree_with_torchvision_per_sample(fn, ref):
    x = images(3)
    factors = torch.tensor([0.6, 1.0, 1.4])
    out = fn(x, factors)
    for i in range(3):
        assert torch.allclose(out[i], ref(x[i], float(factors[i])), atol=1e-6)


def test_flip_next_to_crop_is_fused_into_one_gather():
    from regbench.augment import Crop, HFlip

    for ops in ([HFlip(p=0.3), Crop(padding=2)], [Crop(padding=2), HFlip(p=0.3)]):
        policy = Policy(ops, 10)
        assert len(policy.ops) == 1 and isinstance(policy.ops[0], Crop) and policy.ops[0].flip_p == 0.3
        assert policy.flips
    x = images(1).expand(400, 3, 32, 32).clone()
    x[:] = x[0]
    torch.manual_seed(0)
    out = Policy([HFlip(p=0.3), Crop(padding=2, p=0.0)], 10).images(x)  # no shift: only the flip acts
    flipped = sum(torch.equal(o, x[0].flip(-1)) for o in out) / len(out)
    assert all(torch.equal(o, x[0]) or torch.equal(o, x[0].flip(-1)) for o in out)
    assert flipped == pytest.approx(0.3, abs=0.07)


def test_randaugment_gives_each_image_its_own_op():
    op = build_op({"op": "trivialaugment"}, "k", CIFAR)
    x = images(1).expand(64, 3, 32, 32).clone()
    torch.manual_seed(0)
    out = op(x)
    distinct = {tuple(o.flatten()[:50].tolist()) for o in out}
    assert len(distinct) > 10


# --------------------------------------------------------------------------------------- mixing


def test_mixup_targets_sum_to_one_and_loss_is_the_lambda_mixture():
    x, y = images(6), torch.tensor([0, 1, 2, 3, 4, 5])
    y1 = F.one_hot(y, 10).float()
    lam = torch.tensor([0.9, 0.5, 0.3, 1.0, 0.0, 0.7])
    perm = torch.tensor([1, 0, 3, 2, 5, 4])
    xm, ym = mixup(x, y1, lam, perm)
    assert torch.allclose(ym.sum(1), torch.ones(6))
    assert torch.allclose(xm[0], 0.9 * x[0] + 0.1 * x[1])
    logits = torch.randn(6, 10)
    soft = F.cross_entropy(logits, ym, reduction="none")
    expected = lam * F.cross_entropy(logits, y, reduction="none") + (1 - lam) * F.cross_entropy(logits, y[perm],
                                                                                               reduction="none")
    assert torch.allclose(soft, expected, atol=1e-6)
    # label smoothing commutes with mixing: smoothing the mixed target = mixing the smoothed targets
    smoothed = F.cross_entropy(logits, ym, label_smoothing=0.1, reduction="none")
    mixed = lam * F.cross_entropy(logits, y, label_smoothing=0.1, reduction="none") + (1 - lam) * F.cross_entropy(
        logits, y[perm], label_smoothing=0.1, reduction="none")
    assert torch.allclose(smoothed, mixed, atol=1e-6)


def test_cutout_boxes_have_the_configured_area_and_aspect_ratio():
    n, size = 3000, 64
    x = torch.ones(n, 1, size, size)
    torch.manual_seed(0)
    out = build_op({"op": "cutout", "scale": [0.1, 0.2], "ratio": [0.5, 2.0], "value": 0.0, "p": 1.0}, "k", CIFAR)(x)
    erased = out[:, 0] == 0
    assert bool(((out == 0) | (out == 1)).all())  # filled exactly with the value, the rest exactly untouched
    rows, cols = erased.any(2), erased.any(1)
    bh, bw = rows.sum(1), cols.sum(1)
    assert torch.equal(bh * bw, erased.sum((1, 2)))  # one rectangle per image
    inner = ~(rows[:, 0] | rows[:, -1] | cols[:, 0] | cols[:, -1])  # boxes not clipped by the border
    area, aspect = (bh * bw)[inner].float() / size ** 2, bh[inner].float() / bw[inner].float()
    assert int(inner.sum()) > 1000 and (area > 0.085).all() and (area < 0.215).all()  # scale, up to rounding
    assert (aspect > 0.45).all() and (aspect < 2.2).all()
    assert abs(float(aspect.log().mean())) < 0.05  # log-uniform in [1/2, 2]: symmetric about 1
    torch.manual_seed(0)
    half = build_op({"op": "cutout", "value": 0.0, "p": 0.5}, "k", CIFAR)(x)
    assert 0.4 < float((half == 0).flatten(1).any(1).float().mean()) < 0.6


def test_cutmix_lambda_equals_the_pasted_area_exactly():
    torch.manual_seed(0)
    n, h, w = 500, 24, 32  # not square: catches an H/W mix-up
    x = torch.zeros(n, 1, h, w)
    partner = torch.ones(n, 1, h, w)
    both = torch.cat([x, partner])
    y = F.one_hot(torch.cat([torch.zeros(n), torch.ones(n)]).long(), 2).float()
    perm = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    lam = torch.distributions.Beta(torch.tensor(1.0), torch.tensor(1.0)).sample((2 * n,))
    xm, ym, lam_adj = cutmix(both, y, lam, perm)
    pasted = xm[:n].mean(dim=(1, 2, 3))  # fraction of pixels from the partner (ones)
    assert torch.allclose(1 - lam_adj[:n], pasted, atol=1e-6)
    assert torch.allclose(ym[:n, 1], pasted, atol=1e-6) and torch.allclose(ym.sum(1), torch.ones(2 * n))
    # the box is clipped at the borders, so λ_adj >= λ on average (never the uncorrected λ)
    assert (lam_adj[:n] >= lam[:n] - 1e-6).float().mean() > 0.95


@pytest.mark.parametrize("name", ["mixup", "cutmix", "mixup_cutmix"])
def test_mixers_in_a_policy_give_soft_targets(name):
    policy = Policy([build_op({"op": name}, "k", CIFAR)], 10)
    torch.manual_seed(0)
    x, y = policy(images(16), torch.arange(16) % 10)
    assert y.shape == (16, 10) and torch.allclose(y.sum(1), torch.ones(16)) and policy.soft_targets


def test_mixup_run_counts_accuracy_against_the_dominant_label(tmp_path):
    fit(compose_cfg(*TINY, "augmentation=mixup"), tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["augmentation"]["soft_targets"] is True
    assert "dominant label" in s["augmentation"]["train_acc"]


# ------------------------------------------------------------------------------- policy and config


@pytest.mark.parametrize("model", layered_models())
@pytest.mark.parametrize("preset", config_options("augmentation"))
def test_every_preset_composes_and_trains_a_step(preset, model, tmp_path):
    fit(compose_cfg(*TINY, f"augmentation={preset}", *small_model(model), "augmentation.allow_label_unsafe=true"),
        tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["status"] == "completed" and s["augmentation"]["name"] == preset


def test_presets_are_what_the_lectures_say():
    digits = compose_cfg("augmentation=digits").augmentation.ops
    assert [o.op for o in digits] == ["affine"] and digits[0].rotation <= 20 and digits[0].translate <= 0.2
    keras = compose_cfg("augmentation=keras_lecture").augmentation.ops
    assert {o.op for o in keras} == {"affine", "hflip"} and keras[0].rotation == 15 and keras[0].fill == "nearest"
    heavy = [o.op for o in compose_cfg("augmentation=heavy").augmentation.ops]
    assert heavy == ["crop", "hflip", "trivialaugment", "cutout"]
    assert [o.op for o in compose_cfg("augmentation=standard").augmentation.ops] == ["crop", "hflip"]


@pytest.mark.parametrize("ops,match", [
    ("[{op:hflip,prob:0.5}]", r"augmentation.ops\[0\].prob=0.5: expected a key of op hflip \(p\)"),
    ("[{op:rotate}]", r"augmentation.ops\[0\].op='rotate': expected one of"),
    ("[{op:mixup},{op:hflip}]", r"augmentation.ops\[1\]=.*expected mixing ops .* last"),
    ("[{op:crop,padding:0}]", r"augmentation.ops\[0\]=.*padding >= 1"),
    ("[{op:saturation}]", r"expected an RGB dataset"),
    ("[{op:hflip,p:1.5}]", r"augmentation.ops\[0\].p=1.5: expected a probability"),
])
def test_bad_ops_are_config_errors(ops, match):
    with pytest.raises(ConfigError, match=match):
        from regbench.validation import validate

        validate(compose_cfg(f"augmentation.ops={ops}"))


def test_flipping_digits_warns_unless_allowed(tmp_path):
    fit(compose_cfg(*TINY, "augmentation=standard"), tmp_path / "a")
    warnings = json.loads((tmp_path / "a" / "summary.json").read_text())["warnings"]
    assert any("mirrored '3'" in w for w in warnings)
    fit(compose_cfg(*TINY, "augmentation=standard", "augmentation.allow_label_unsafe=true"), tmp_path / "b")
    warnings = json.loads((tmp_path / "b" / "summary.json").read_text())["warnings"]
    assert [w for w in warnings if "chance accuracy" not in w] == []  # one tiny epoch may well end at chance


def test_label_smoothing_with_mixup_warns(tmp_path):
    fit(compose_cfg(*TINY, "augmentation=mixup", "regularizer=[label_smoothing]"), tmp_path)
    warnings = json.loads((tmp_path / "summary.json").read_text())["warnings"]
    assert any("softened twice" in w for w in warnings)


def test_preview_grid_goes_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(compose_cfg(*TINY, "augmentation=digits"), tmp_path)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {"augmentation/before", "augmentation/after"} <= set(acc.Tags()["images"])


def test_augmented_training_is_reproducible(tmp_path):
    fit(compose_cfg(*TINY, "augmentation=heavy", "trainer.max_epochs=2"), tmp_path / "a")
    fit(compose_cfg(*TINY, "augmentation=heavy", "trainer.max_epochs=2"), tmp_path / "b")
    a = [r.rsplit(",", 1)[0] for r in (tmp_path / "a" / "metrics.csv").read_text().splitlines()]
    b = [r.rsplit(",", 1)[0] for r in (tmp_path / "b" / "metrics.csv").read_text().splitlines()]
    assert a == b


# ------------------------------------------------------------------------------ training batches


def _old_training_batches(policy, data, batch_size, g, drop_last, chunk, consume):
    """What fit composed by hand before the policy owned the path: per-image ops + normalisation as
    ``data.batches``' transform on the raw images, mixing per batch in the loop (``consume`` stands for the
    loop's own random draws, e.g. dropout, between batches)."""
    from regbench.data import batches

    if policy.identity:
        stream = batches(data.train_x, data.train_y, batch_size, g, drop_last)
    else:
        stream = batches(data.train_raw, data.train_y, batch_size, g, drop_last,
                         lambda xb: policy.normalised(data.normalize(policy.images(xb))), chunk)
    out = []
    for xb, yb in stream:
        if policy.soft_targets:
            xb, yb = policy.mix(xb, yb)
        out.append((xb, yb))
        consume()
    return out


@pytest.mark.parametrize("preset", config_options("augmentation"))
@pytest.mark.parametrize("drop_last,chunk", [(False, None), (True, 64)])
def test_train_batches_are_bitwise_the_old_transform_and_mix_composition(preset, drop_last, chunk):
    """Same batches, same random draws in the same order (the global generator's state after the epoch, with
    the loop's own draws interleaved, and the data-order generator's), for every preset."""
    cfg = compose_cfg(f"augmentation={preset}", "data.train_size=150")
    data = load_data(cfg.data, torch.device("cpu"), keep_raw=True)
    policy = build_policy(cfg.augmentation, data.info, data.pixel_mean)
    runs = []
    for make in (lambda g, consume: _old_training_batches(policy, data, 32, g, drop_last, chunk, consume),
                 lambda g, consume: [(b, consume())[0] for b in policy.train_batches(data, 32, g, drop_last, chunk)]):
        torch.manual_seed(11)
        g = torch.Generator().manual_seed(5)
        loop_draws = []
        got = make(g, lambda: loop_draws.append(torch.rand(1)))
        runs.append((got, torch.cat(loop_draws), torch.get_rng_state(), g.get_state()))
    (old, old_draws, old_state, old_g), (new, new_draws, new_state, new_g) = runs
    assert len(new) == len(old) == (150 // 32 if drop_last else -(-150 // 32))
    for (xo, yo), (xn, yn) in zip(old, new):
        assert torch.equal(xo, xn) and torch.equal(yo, yn)
    assert torch.equal(old_draws, new_draws) and torch.equal(old_state, new_state) and torch.equal(old_g, new_g)
    assert (yn.ndim == 2) == policy.soft_targets


def test_no_ops_is_the_identity_policy():
    """augmentation=none: a Policy all the same (fit never asks whether there is one); its training batches are
    the normalised images as they are, no preview, no TTA unless asked for, and the summary says none."""
    from regbench.data import batches

    cfg = compose_cfg("data.train_size=100")
    data = load_data(cfg.data, torch.device("cpu"))
    policy = build_policy(cfg.augmentation, data.info, data.pixel_mean)
    assert isinstance(policy, Policy) and policy.identity and not policy.soft_targets and not policy.flips
    new = list(policy.train_batches(data, 32, torch.Generator().manual_seed(0), False))
    old = list(batches(data.train_x, data.train_y, 32, torch.Generator().manual_seed(0)))
    assert all(torch.equal(a, b) for (xa, ya), (xb, yb) in zip(new, old) for a, b in ((xa, xb), (ya, yb)))
    assert len(new) == 4 and policy.preview(data, 16) is None
    assert policy.tta(torch.nn.Flatten(), data.test_x, data.test_y, 100) is None
    assert policy.info() == {"name": "none", "preset": "none", "ops": [], "soft_targets": False}


def test_preview_shows_the_policy_and_leaves_training_draws_alone():
    cfg = compose_cfg("augmentation=digits", "data.train_size=100")
    data = load_data(cfg.data, torch.device("cpu"), keep_raw=True)
    policy = build_policy(cfg.augmentation, data.info, data.pixel_mean)
    torch.manual_seed(0)
    before, after = policy.preview(data, 12)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(0).get_state())  # forked: nothing drawn
    assert torch.equal(before, data.train_raw[preview_indices(data.train_y, 12)])
    assert after.shape == before.shape and not torch.equal(after, before)
    assert policy.preview(data, 0) is None


def test_train_one_epoch_takes_no_augment_callable():
    """Augmentation has one path, the policy's training batches: the loop takes batches, nothing else."""
    import inspect

    from regbench.loop import train_one_epoch

    assert not {"augment", "transform", "mix"} & set(inspect.signature(train_one_epoch).parameters)


# --------------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("kind", ["per_channel", "featurewise", "samplewise", "zca", "none"])
def test_normalisations_use_training_statistics(kind):
    d = load_data(compose_cfg("data.train_size=500", f"data.normalize={kind}").data, torch.device("cpu"))
    x = d.train_x.flatten(1).double()
    if kind == "per_channel":
        assert abs(x.mean().item()) < 1e-5 and x.std().item() == pytest.approx(1, abs=1e-3)
    elif kind == "featurewise":
        assert x.mean(0).abs().max().item() < 1e-4
    elif kind == "samplewise":
        assert x.mean(1).abs().max().item() < 1e-5 and torch.allclose(x.std(1), torch.ones(500, dtype=x.dtype),
                                                                          atol=1e-3)
    elif kind == "zca":
        cov = x.T @ x / len(x)  # whitened: covariance ≈ S / (S + ε) on the data's directions, ≤ 1
        eig = torch.linalg.eigvalsh(cov)
        assert eig.max().item() <= 1.0 + 1e-3 and eig.max().item() > 0.9
    else:
        assert d.train_x.min().item() == 0.0 and d.train_x.max().item() == 1.0
    # validation images use the same (training) statistics: re-normalising raw val pixels reproduces them
    assert d.meta["normalize"] == kind


def test_zca_matches_a_hand_computation():
    torch.manual_seed(0)
    x = torch.rand(50, 1, 2, 2, dtype=torch.float64)
    norm = Normalizer("zca", x, zca_epsilon=0.1)
    flat = (x - x.mean(0, keepdim=True)).flatten(1)
    cov = flat.T @ flat / 50
    s, u = torch.linalg.eigh(cov)
    w = u @ torch.diag(1 / torch.sqrt(s + 0.1)) @ u.T
    assert torch.allclose(norm.to(torch.device("cpu"))(x.float()).double().flatten(1), (flat @ w), atol=1e-5)


# ------------------------------------------------------------------------------------- TTA


def test_tta_views_and_identity_only_equals_plain_evaluation(tmp_path):
    from regbench.evaluation import evaluate

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    x, y = images(20), torch.arange(20) % 10

    def tta(*overrides, info=CIFAR):
        return build_policy(compose_cfg(*overrides).augmentation, info).tta(model, x, y, 7)

    only = tta("augmentation.tta.enabled=true", "augmentation.tta.hflip=false", "augmentation.tta.shift=0")
    assert only["views"] == ["identity"]
    assert only["nll"] == pytest.approx(evaluate(model, x, y, 100)["loss"], rel=F32_REL)
    assert tta("augmentation.tta.enabled=true")["views"] == [
        "identity", "hflip", "shift_left", "shift_right", "shift_up", "shift_down"]
    assert "hflip" not in tta("augmentation.tta.enabled=true", info=MNIST)["views"]  # digits: no mirrored view
    assert tta() is None  # off by default
    fit(compose_cfg(*TINY, "augmentation.tta.enabled=true"), tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert set(s["test_extra"]["tta"]) >= {"acc", "nll", "ece", "views"}
    assert math.isfinite(s["test_extra"]["tta"]["nll"])


def test_tta_equals_the_views_applied_batch_by_batch():
    """Policy.tta views the whole test set, then computes the softmax batch by batch; the earlier form viewed
    each batch: the same numbers, bitwise (views are per-image gathers and flips)."""
    from regbench.augment.tta import views
    from regbench.metrics import summarize_probs

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 30 * 30, 10))
    x, y = images(20), torch.arange(20) % 10
    cfg = compose_cfg("augmentation.tta.enabled=true", "augmentation.tta.vflip=true").augmentation
    got = build_policy(cfg, CIFAR).tta(model, x, y, 7)
    total = 0
    with torch.no_grad():
        for _, view in views(cfg.tta, True):
            total = total + torch.cat([torch.softmax(model(view(x[i:i + 7])).double(), 1) for i in range(0, 20, 7)])
    assert got == {**summarize_probs(total / 7, y, cfg.tta.bins), "views": got["views"]} and len(got["views"]) == 7


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", [p for p in config_options("augmentation") if p != "none"])
def test_augmented_training_epoch_never_waits_for_the_device(preset, device):
    """What fit runs per epoch (batches + per-image policy + normalisation, mixing, forward, backward, step).
    On CUDA, under torch.cuda.set_sync_debug_mode("error"), any host sync in it (a .item(), a nonzero, a
    host->GPU copy of a constant made at every step) raises. On CPU it runs the same code once for real."""
    from regbench.models import build_model
    from regbench.optim import build_optimizer
    from regbench.loop import AutogradStep, train_one_epoch

    dev = torch.device(device)
    cfg = compose_cfg(f"augmentation={preset}", "data.train_size=512", "data.batch_size=64")
    data = load_data(cfg.data, dev, keep_raw=True)
    policy = build_policy(cfg.augmentation, data.info, data.pixel_mean)
    torch.manual_seed(0)
    model = build_model(cfg.model, data.input_shape, 10).to(dev)
    opt = build_optimizer(cfg.optimizer, model.parameters())
    g = torch.Generator(device=dev).manual_seed(0)

    def epoch():
        return train_one_epoch(AutogradStep(model, opt), policy.train_batches(data, 64, g, False, chunk=128))

    epoch()  # first use: per-device constants are made here, once
    if dev.type == "cuda":
        from tests.sync_check import cuda_sync_errors

        with cuda_sync_errors():
            out = epoch()
    else:
        out = epoch()
    assert out["seen"] == 512 and math.isfinite(float(out["loss"]))


@pytest.mark.parametrize("preset", [p for p in config_options("augmentation") if p != "none"])
def test_every_documented_op_key_of_a_preset_can_be_overridden(preset):
    """Each preset spells every key of its ops (README's op table), so `augmentation.ops.<i>.<key>=v` composes
    for any of them, e.g. augmentation=mixup augmentation.ops.0.p=0.5 (Hydra refuses a key the YAML lacks)."""
    import dataclasses

    ops = compose_cfg(f"augmentation={preset}").augmentation.ops
    for i, spec in enumerate(ops):
        fields = [f.name for f in dataclasses.fields(OPS[spec.op])]
        assert sorted(k for k in spec if k != "op") == sorted(fields), (preset, spec.op)
        assert compose_cfg(f"augmentation={preset}", f"augmentation.ops.{i}.p=0.25").augmentation.ops[i].p == 0.25
