"""The anchors' augmentation ops (issue 28, item 6): random erasing and AugMix against torchvision.transforms.v2,
MixUp / CutMix modes and switch against timm's Mixup (timm/data/mixup.py), and cutout measured as what it is."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from regbench.augment import OPS, build_op, build_policy, erase
from regbench.augment.augmix import ALL_OPS, PARTIAL_OPS, augmix_table
from regbench.augment.mixing import MODES, cutmix, mixup
from regbench.data import DATASETS, load_data
from regbench.errors import ConfigError
from regbench.train import fit
from tests.conftest import TINY, compose_cfg, interrupt_then_resume

CIFAR, MNIST = DATASETS["cifar10"], DATASETS["mnist5k"]
KEY = "augmentation.ops[0]"


def images(n=8, c=3, size=32, seed=0):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------- random erasing


@pytest.mark.parametrize("value", [0.0, [0.5, -1.0, 2.0], "random"])
def test_random_erasing_is_torchvisions_erase_of_each_images_box(value):
    """The op = its boxes + torchvision's functional erase, image by image: image[..., i:i+h, j:j+w] = v."""
    op = build_op({"op": "random_erasing", "p": 0.7, "value": value}, KEY, CIFAR)
    x = images(32)
    torch.manual_seed(4)
    out = op(x)
    torch.manual_seed(4)
    start, end = op.boxes(x)
    fill = op.fill(x).expand_as(x)
    assert torch.equal(erase(x, start, end, fill), out)
    erased = 0
    for k in range(len(x)):
        (i, j), (h, w) = start[k].long().tolist(), (end[k] - start[k]).long().tolist()
        v = fill[k, :, i:i + h, j:j + w] if value == "random" else torch.tensor(value).view(-1, 1, 1)
        assert torch.equal(out[k], TF.erase(x[k], i, j, h, w, v))
        erased += h * w > 0
    assert 10 < erased < 32  # p = 0.7: some erased, some not


def _stats(hw: torch.Tensor, corner: torch.Tensor) -> dict:
    h, w = hw[:, 0], hw[:, 1]
    return {"h": h, "w": w, "area": h * w, "log_ratio": torch.log(h / w), "top": corner[:, 0], "left": corner[:, 1]}


@pytest.mark.parametrize("size,scale,ratio", [((32, 32), (0.02, 0.33), (0.3, 3.3)),
                                              ((20, 36), (0.5, 0.95), (0.5, 4.0))])  # ~13 % no box
def test_random_erasing_draws_boxes_as_torchvisions_make_params(size, scale, ratio):
    """Statistics of 3,000 boxes against 3,000 of torchvision's own RandomErasing.make_params: the share erased
    (all 10 attempts failed: no box), means of the sides, area, log aspect ratio and corner, each within 4.5
    standard errors; the sides' extremes agree (no box reaches the border, as torchvision requires h < H, w < W)."""
    n, (H, W) = 3000, size
    op = build_op({"op": "random_erasing", "p": 1.0, "scale": list(scale), "ratio": list(ratio)}, KEY, CIFAR)
    torch.manual_seed(0)
    start, end = op.boxes(torch.zeros(n, 3, H, W))
    hw = (end - start).double()
    ours_on = (hw > 0).all(1)
    tv = v2.RandomErasing(p=1.0, scale=scale, ratio=ratio)
    torch.manual_seed(0)
    params = [tv.make_params([torch.zeros(3, H, W)]) for _ in range(n)]
    tv_on = torch.tensor([p["v"] is not None for p in params])
    tv_hw = torch.tensor([[p["h"], p["w"]] for p in params if p["v"] is not None], dtype=torch.float64)
    tv_corner = torch.tensor([[p["i"], p["j"]] for p in params if p["v"] is not None], dtype=torch.float64)
    share, tv_share = ours_on.double().mean(), tv_on.double().mean()
    assert abs(share - tv_share) <= 4.5 * math.sqrt(share * (1 - share) / n * 2) + 1e-9
    a, b = _stats(hw[ours_on], start[ours_on].double()), _stats(tv_hw, tv_corner)
    for k in a:
        se = math.sqrt(a[k].var() / len(a[k]) + b[k].var() / len(b[k]))
        assert abs(a[k].mean() - b[k].mean()) <= 4.5 * se, (k, a[k].mean(), b[k].mean())
    assert hw[:, 0].max() < H and hw[:, 1].max() < W and (end[:, 0] <= H).all() and (end[:, 1] <= W).all()
    assert hw[ours_on].min() >= tv_hw.min() - 1 and hw.max() <= tv_hw.max() + 1
    if scale[0] >= 0.5:
        assert 0.05 < 1 - tv_share < 0.25 and 0.05 < 1 - share < 0.25  # the fallback (no box) is exercised


def test_random_erasing_runs_on_the_normalised_images(tmp_path):
    """In training the op comes after normalisation: value 0 is the training mean (0 after per_channel), and it
    must follow the per-image ops (one ConfigError line otherwise); bad values are one line too."""
    cfg = compose_cfg("augmentation=random_erasing", "augmentation.ops.0.p=1.0", "data.train_size=100")
    data = load_data(cfg.data, torch.device("cpu"), keep_raw=True)
    policy = build_policy(cfg.augmentation, data.info, data.pixel_mean)
    assert not policy.ops and len(policy.after_norm) == 1 and not policy.identity
    torch.manual_seed(0)
    (xb, _), = list(policy.train_batches(data, 100, torch.Generator().manual_seed(0), False))
    torch.manual_seed(0)
    order = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    start, end = policy.after_norm[0].boxes(data.train_x[order])
    inside = (end - start).prod(1) > 0
    assert inside.float().mean() > 0.9
    for k in torch.nonzero(inside).flatten().tolist()[:20]:
        (i, j), (h, w) = start[k].long().tolist(), end[k].long().tolist()
        assert torch.equal(xb[k, :, i:h, j:w], torch.zeros_like(xb[k, :, i:h, j:w]))  # the mean, normalised
    # the preview maps the erased box back to [0, 1]: the training mean there
    before, after = policy.preview(data, 4)
    assert after.shape == before.shape and not torch.equal(after, before)
    with pytest.raises(ConfigError, match=r"augmentation.ops\[1\]=.*expected the per-image ops before random_erasing"):
        build_policy(compose_cfg("augmentation.ops=[{op:random_erasing},{op:hflip}]").augmentation, CIFAR)
    for bad in ("value:noise", "value:[0.1,0.2]", "scale:[0.5,0.1]", "ratio:[0,1]"):
        with pytest.raises(ConfigError, match=r"augmentation.ops\[0\]=.*value a number, a list of 1 or 3"):
            build_policy(compose_cfg(f"augmentation.ops=[{{op:random_erasing,{bad}}}]").augmentation, CIFAR)


def test_random_erasing_p0_is_the_identity_and_each_image_draws_its_own_box():
    x = images(1).expand(16, 3, 32, 32).clone()
    assert torch.equal(build_op({"op": "random_erasing", "p": 0.0}, KEY, CIFAR)(x), x)
    torch.manual_seed(0)
    out = build_op({"op": "random_erasing", "p": 1.0, "value": "random"}, KEY, CIFAR)(x)
    assert len({tuple(torch.nonzero((o != x[0]).any(0)).min(0).values.tolist()) for o in out}) > 8


# --------------------------------------------------------------------------------------------- AugMix


@pytest.mark.parametrize("all_ops", [True, False])
def test_augmix_table_is_torchvisions(all_ops):
    names, mags, signed = augmix_table(28, 36, all_ops, torch.device("cpu"))
    space = v2.AugMix._AUGMENTATION_SPACE if all_ops else v2.AugMix._PARTIAL_AUGMENTATION_SPACE
    assert names == tuple(space) == (ALL_OPS if all_ops else PARTIAL_OPS)
    for k, name in enumerate(names):
        fn, sign = space[name]
        ref = fn(10, 28, 36)
        assert bool(signed[k]) == sign
        assert torch.equal(mags[k], torch.zeros(10) if ref is None else ref.float()), name


def _torchvision_augmix(img, d, i, names, interpolation):
    """torchvision's own AugMix.forward on image i, fed image i's draws: its documented test hook
    ``_sample_dirichlet`` returns m then w, and ``_get_random_item`` returns each step's op with a magnitude
    table holding that step's signed magnitude (unsigned, so no sign is drawn again); steps past the chain's
    depth are torchvision's Identity."""
    depth = d["which"].shape[2]
    t = v2.AugMix(severity=3, mixture_width=d["w"].shape[1], chain_depth=depth, alpha=1.0,
                  interpolation=v2.InterpolationMode(interpolation))  # (torchvision < 0.26 takes only the enum)
    dirichlet = iter([d["m"][i:i + 1], d["w"][i:i + 1]])
    t._sample_dirichlet = lambda params: next(dirichlet)
    steps = []
    for k in range(d["which"].shape[1]):
        for s in range(depth):
            j, mag = int(d["which"][i, k, s]), float(d["magnitude"][i, k, s])
            table = None if j < 0 or names[j] in ("AutoContrast", "Equalize") else torch.full((10,), mag)
            steps.append(("Identity" if j < 0 else names[j], (lambda nb, h, w, table=table: table, False)))
    step = iter(steps)
    t._get_random_item = lambda space: next(step)
    return t(img)


@pytest.mark.parametrize("interpolation,tol,grouped,channels,size", [
    ("nearest", 1e-6, True, 3, 32), ("bilinear", 1e-5, False, 3, 32), ("bilinear", 1e-5, True, 1, 28)])
def test_augmix_equals_torchvisions_augmix_image_by_image(interpolation, tol, grouped, channels, size):
    """Each image's draws (weights, depths, ops, bins, signs) given to torchvision's AugMix for that image alone
    give the op's output for it (within float rounding: sharpness and bilinear warps round differently); both
    strategies (CPU's grouped, CUDA's whole-batch) alike."""
    info = CIFAR if channels == 3 else MNIST
    op = build_op({"op": "augmix", "interpolation": interpolation, "chain_depth": -1}, KEY, info)
    x = images(6, channels, size, seed=channels)
    torch.manual_seed(size)
    d = op.draw(x)
    out = op.apply(x, d, grouped)
    names = augmix_table(size, size, True, x.device)[0]
    for i in range(len(x)):
        torch.testing.assert_close(out[i], _torchvision_augmix(x[i], d, i, names, interpolation), atol=tol, rtol=0)
    torch.manual_seed(size)
    whole = op(x)
    torch.manual_seed(size)
    assert torch.equal(whole, op.apply(x, op.draw(x)))


def test_augmix_draws_what_torchvision_draws_per_image():
    """Per image and chain: depth uniform in 1..3, ops uniform over the 13, bins in [0, severity), a sign per
    signed op; weights m₀ + Σ m₁·wₖ = 1; chain_depth ≥ 1 is a fixed depth; p = 0 leaves every image alone."""
    op = build_op({"op": "augmix", "severity": 2}, KEY, CIFAR)
    torch.manual_seed(0)
    x = torch.zeros(3000, 3, 8, 8)
    d = op.draw(x)
    depth = (d["which"] >= 0).sum(2).flatten()
    assert torch.equal(d["which"][..., 0] >= 0, torch.ones_like(depth.view(3000, 3), dtype=torch.bool))
    counts = torch.bincount(depth, minlength=4)[1:].double() / len(depth)
    assert torch.allclose(counts, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.02)
    ops = torch.bincount(d["which"][d["which"] >= 0], minlength=13).double()
    assert (ops / ops.sum() - 1 / 13).abs().max() < 0.01
    mags = augmix_table(8, 8, True, x.device)[1]
    used = d["magnitude"][d["which"] >= 0].abs()
    allowed = mags[:, :2].flatten().abs()
    assert torch.isin(used, allowed).all()  # severity 2: bins 0 and 1 only
    total = d["m"][:, 0] + (d["w"] * d["m"][:, 1:]).sum(1)
    assert torch.allclose(total, torch.ones(3000), atol=1e-6)
    fixed = build_op({"op": "augmix", "chain_depth": 2}, KEY, CIFAR).draw(x)
    assert fixed["which"].shape == (3000, 3, 2) and (fixed["which"] >= 0).all()
    y = images(4)
    assert torch.equal(build_op({"op": "augmix", "p": 0.0}, KEY, CIFAR)(y), y)
    with pytest.raises(ConfigError, match=r"1 <= severity <= 10"):
        build_op({"op": "augmix", "severity": 11}, KEY, CIFAR)
    with pytest.raises(ConfigError, match=r"chain_depth -1 or >= 1"):
        build_op({"op": "augmix", "chain_depth": 0}, KEY, CIFAR)


# ------------------------------------------------------------------------------------ MixUp / CutMix modes


def _timm_mix(x, y, mode, lam, use_cut, centre):
    """timm's ``Mixup._mix_elem`` / ``_mix_pair`` / ``_mix_batch`` and ``mixup_target`` (timm/data/mixup.py, read
    at huggingface/pytorch-image-models 066e490), transcribed with their random draws given: ``lam``, ``use_cut``
    and the CutMix box centre (``rand_bbox``'s cy, cx) per draw — per image (elem), per pair i < B/2 (pair) or
    index 0 (batch); correct_lam=True, no label smoothing."""
    B, _, H, W = x.shape
    x, x_orig = x.clone(), x.clone()

    def bbox_and_lam(l, c):  # cutmix_bbox_and_lam(img_shape, lam) with rand_bbox's centre given
        ratio = math.sqrt(1 - float(l))
        cut_h, cut_w = int(H * ratio), int(W * ratio)
        cy, cx = int(c[0]), int(c[1])
        yl, yh = min(max(cy - cut_h // 2, 0), H), min(max(cy + cut_h // 2, 0), H)
        xl, xh = min(max(cx - cut_w // 2, 0), W), min(max(cx + cut_w // 2, 0), W)
        return (yl, yh, xl, xh), torch.tensor(1. - (yh - yl) * (xh - xl) / float(H * W), dtype=torch.float32)

    if mode in ("elem", "pair"):
        count = B if mode == "elem" else B // 2
        lam_batch = [lam[i].clone() for i in range(count)]
        for i in range(count):
            j = B - i - 1
            lb = lam_batch[i]
            if lb != 1.:
                if use_cut[i]:
                    (yl, yh, xl, xh), lb = bbox_and_lam(lb, centre[i])
                    x[i][:, yl:yh, xl:xh] = x_orig[j][:, yl:yh, xl:xh]
                    if mode == "pair":
                        x[j][:, yl:yh, xl:xh] = x_orig[i][:, yl:yh, xl:xh]
                    lam_batch[i] = lb
                else:
                    x[i] = x[i] * lb + x_orig[j] * (1 - lb)
                    if mode == "pair":
                        x[j] = x[j] * lb + x_orig[i] * (1 - lb)
        if mode == "pair":
            lam_batch = lam_batch + lam_batch[::-1]
        lam_t = torch.stack(lam_batch).unsqueeze(1)
    else:  # batch
        lb = float(lam[0])
        if lb != 1.:
            if use_cut[0]:
                (yl, yh, xl, xh), lb = bbox_and_lam(lb, centre[0])
                x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
                lb = float(lb)
            else:
                x_flipped = x.flip(0).mul_(1. - lb)
                x.mul_(lb).add_(x_flipped)
        lam_t = lb
    return x, y * lam_t + y.flip(0) * (1. - lam_t)


def _onehot(n, classes=10):
    return torch.eye(classes)[torch.arange(n) % classes]


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("switch_prob", [0.0, 0.5, 1.0])
def test_mixup_cutmix_modes_equal_timms_mixup(mode, switch_prob):
    """mixup_cutmix in timm's modes: the op's draws fed to timm's Mixup code give the op's images and targets;
    per batch one λ and one choice, per pair one set shared by i and B−1−i, per image its own."""
    op = build_op({"op": "mixup_cutmix", "mixup_alpha": 0.8, "cutmix_alpha": 1.0, "switch_prob": switch_prob,
                   "p": 0.8, "mode": mode}, KEY, CIFAR)
    x, y = images(16), _onehot(16)
    for seed in range(2):
        torch.manual_seed(seed)
        params = op.params(x)
        xm, ym = op.apply(x, y, params)
        torch.manual_seed(seed)
        assert all(torch.equal(a, b) for a, b in zip(op.mix(x, y), (xm, ym)))
        use_cut = params["use_cut"]
        lam = torch.where(use_cut, params["lam_cutmix"], params["lam_mixup"])
        assert torch.equal(params["partner"], torch.arange(15, -1, -1))
        if mode == "batch":
            assert (lam == lam[0]).all() and (use_cut == use_cut[0]).all()
        if mode == "pair":
            assert torch.equal(lam, lam.flip(0)) and torch.equal(use_cut, use_cut.flip(0))
            assert torch.equal(params["centre"], params["centre"].flip(0))
        if switch_prob in (0.0, 1.0):
            assert (use_cut == bool(switch_prob)).all()
        tx, ty = _timm_mix(x, y, mode, lam, use_cut, params["centre"])
        torch.testing.assert_close(xm, tx, atol=1e-6, rtol=0)
        torch.testing.assert_close(ym, ty, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("name", ["mixup", "cutmix"])
def test_mixup_and_cutmix_alone_in_timms_modes(name, mode):
    """mixup / cutmix ops with a mode: timm's Mixup with only that α (every draw MixUp, or every draw CutMix)."""
    from regbench.augment.mixing import _centres, pairing

    op = build_op({"op": name, "alpha": 0.5, "p": 0.9, "mode": mode}, KEY, CIFAR)
    x, y = images(12), _onehot(12)
    torch.manual_seed(7)
    xm, ym = op.mix(x, y)
    torch.manual_seed(7)
    lam, partner = op.draw(x)
    centre = _centres(x)[pairing(12, mode, x.device)[0]] if name == "cutmix" else None
    assert torch.equal(partner, torch.arange(11, -1, -1))
    tx, ty = _timm_mix(x, y, mode, lam, torch.full((12,), name == "cutmix"), centre)
    torch.testing.assert_close(xm, tx, atol=1e-6, rtol=0)
    torch.testing.assert_close(ym, ty, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_the_middle_image_of_an_odd_batch_stays_itself(mode):
    """timm refuses odd batches; here (a last batch may be odd) the middle image, its own partner, is unchanged."""
    op = build_op({"op": "mixup_cutmix", "switch_prob": 0.5, "mode": mode}, KEY, CIFAR)
    x, y = images(9), _onehot(9)
    for seed in range(3):
        torch.manual_seed(seed)
        xm, ym = op.mix(x, y)
        assert torch.equal(xm[4], x[4]) and torch.equal(ym[4], y[4])
        assert torch.allclose(ym.sum(1), torch.ones(9))


def _pre_mode_mixup_cutmix(op, x, y):
    """MixUpCutMix.mix before modes existed (regbench at issue 27), verbatim: the default mode must be it."""
    from regbench.augment.functional import _chosen, _where
    from regbench.augment.mixing import _beta

    n = len(x)
    perm = torch.randperm(n, device=x.device)
    use_cut = _chosen(n, op.switch_prob, x.device)
    on = _chosen(n, op.p, x.device)
    lam_m = torch.where(on, _beta(op.mixup_alpha, n, x.device), torch.ones(n, device=x.device))
    lam_c = torch.where(on, _beta(op.cutmix_alpha, n, x.device), torch.ones(n, device=x.device))
    xm, ym = mixup(x, y, lam_m, perm)
    xc, yc, _ = cutmix(x, y, lam_c, perm)
    return _where(use_cut, xc, xm), torch.where(use_cut.view(-1, 1), yc, ym)


def _pre_mode_beta_mixer(op, x, y):
    from regbench.augment.functional import _chosen
    from regbench.augment.mixing import _beta

    n = len(x)
    lam = _beta(op.alpha, n, x.device)
    lam, perm = torch.where(_chosen(n, op.p, x.device), lam, torch.ones_like(lam)), torch.randperm(n, device=x.device)
    if op.name == "mixup":
        return mixup(x, y, lam, perm)
    return cutmix(x, y, lam, perm)[:2]


@pytest.mark.parametrize("name,old", [("mixup", _pre_mode_beta_mixer), ("cutmix", _pre_mode_beta_mixer),
                                      ("mixup_cutmix", _pre_mode_mixup_cutmix)])
def test_the_default_mode_is_bitwise_the_ops_before_modes(name, old):
    op = build_op({"op": name, "p": 0.7}, KEY, CIFAR)
    assert op.mode == "shuffle" and MODES[0] == "shuffle"
    x, y = images(16), _onehot(16)
    for seed in range(3):
        torch.manual_seed(seed)
        new = op.mix(x, y)
        new_state = torch.get_rng_state()
        torch.manual_seed(seed)
        ref = old(op, x, y)
        assert torch.equal(new[0], ref[0]) and torch.equal(new[1], ref[1])
        assert torch.equal(torch.get_rng_state(), new_state)
    with pytest.raises(ConfigError, match=r"augmentation.ops\[0\].mode='half': expected one of shuffle, batch"):
        build_op({"op": name, "mode": "half"}, KEY, CIFAR)


# ---------------------------------------------------------------------------------------------- cutout


def test_cutout_erases_less_than_its_drawn_area_random_erasing_does_not():
    """Measured (docs/benchmarks.md, README): the cutout preset draws 10–25 % of a 32×32 image, but its boxes have
    a uniform centre and are clipped at the border (DeVries & Taylor), so 23 % erase under 10 % and the
    mean erased share is 0.14 (0.175 drawn); random_erasing's boxes always lie inside (torchvision)."""
    cfg = compose_cfg("augmentation=cutout")
    cut = build_policy(cfg.augmentation, CIFAR, [0.5] * 3).ops[0]
    torch.manual_seed(0)
    x = torch.zeros(10000, 1, 32, 32)
    cut.mean = (1.0,)
    share = cut(x).mean((1, 2, 3))
    assert 0.20 < (share < 0.10).double().mean() < 0.26
    assert 0.13 < share.mean() < 0.15 and share.max() <= 0.25
    erasing = build_op({"op": "random_erasing", "p": 1.0, "scale": [0.1, 0.25], "ratio": [1.0, 1.0],
                        "value": 1.0}, KEY, MNIST)
    share = erasing(x).mean((1, 2, 3))
    assert (share < 0.09).double().mean() == 0 and 0.16 < share.mean() < 0.18


# ------------------------------------------------------------------------- composed, trained, resumed, stacked

# Every new op in one policy, from the command line: per-image ops, AugMix, random erasing on the normalised
# images, then timm's pair-mode MixUp/CutMix switch.
NEW_OPS = ("augmentation.ops=[{op:crop,padding:2},{op:augmix,severity:2},"
           "{op:random_erasing,p:0.5,value:random},{op:mixup_cutmix,switch_prob:0.5,mode:pair}]")


def _untimed_rows(run_dir):
    return [r.rsplit(",", 1)[0] for r in (run_dir / "metrics.csv").read_text().splitlines()]


def test_new_ops_compose_train_and_resume_bitwise(tmp_path, monkeypatch):
    """Their draws come from torch's global generator, which checkpoints save: a run stopped after epoch 1 and
    resumed equals the uninterrupted run, metric by metric."""
    overrides = [*TINY, "trainer.max_epochs=2", "model.hidden=[32]", NEW_OPS]
    fit(compose_cfg(*overrides), tmp_path / "whole")
    s = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert s["status"] == "completed" and s["augmentation"]["soft_targets"] is True
    assert [o["op"] for o in s["augmentation"]["ops"]] == ["crop", "augmix", "random_erasing", "mixup_cutmix"]
    interrupt_then_resume(monkeypatch, overrides, tmp_path / "resumed", epoch=1)
    assert _untimed_rows(tmp_path / "resumed") == _untimed_rows(tmp_path / "whole")


def test_stacked_members_with_the_new_ops_equal_their_single_runs(tmp_path):
    """Augmentation in a stack: each member's own policy under its own RNG stream, as its single run."""
    from tests.test_stacked_engine import assert_equal_rows, single, stacked

    small = [NEW_OPS, "trainer.max_epochs=2", "data.train_size=64", "trainer.clean_subset=32"]
    members = [[*small, "seed=0"], [*small, "seed=1", "optimizer.lr=0.002"]]
    dirs, _ = stacked(tmp_path, "stack", members)
    for k, m in enumerate(members):
        assert_equal_rows(dirs[k], single(tmp_path, f"single{k}", *m))


def test_every_new_op_is_an_op_with_a_preset():
    assert {"random_erasing", "augmix"} <= set(OPS)
    for preset, op in (("random_erasing", "random_erasing"), ("augmix", "augmix"), ("mixup_cutmix", "mixup_cutmix")):
        assert [o.op for o in compose_cfg(f"augmentation={preset}").augmentation.ops] == [op]
    assert compose_cfg("augmentation=mixup", "augmentation.ops.0.mode=pair").augmentation.ops[0].mode == "pair"
