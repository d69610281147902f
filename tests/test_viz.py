"""`dinobridge viz`: PCA maps of patch features, last-block CLS attention, the colormap and the command."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinobridge.cli import main as dinobridge_main
from dinobridge.models.vision_transformer import build_vit
from dinobridge.viz import cls_attention, colormap, pca_project, pca_rgb


# ---------------------------------------------------------------------- PCA
def _correlated_tokens(n=3, hw=20, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.linspace(3.0, 0.1, d)  # anisotropic: distinct eigenvalues
    return torch.randn(n, hw, d, generator=g) @ mix.T + 5.0


def test_pca_components_are_uncorrelated_and_match_float64_eigenvectors():
    x = _correlated_tokens()
    proj = torch.cat(pca_project(x, k=3)).double()  # [N*HW, 3], pre-scaling
    r = np.corrcoef(proj.numpy().T)
    off = r[~np.eye(3, dtype=bool)]
    assert np.abs(off).max() < 1e-4
    var = proj.var(dim=0)
    assert var[0] > var[1] > var[2]
    # reference: top eigenvectors of the float64 covariance (numpy), signs free
    flat = x.reshape(-1, x.shape[-1]).double().numpy()
    flat = flat - flat.mean(0)
    vals, vecs = np.linalg.eigh(flat.T @ flat / (flat.shape[0] - 1))
    ref = flat @ vecs[:, ::-1][:, :3]
    for c in range(3):
        cos = abs(ref[:, c] @ proj[:, c].numpy()) / (np.linalg.norm(ref[:, c]) * np.linalg.norm(proj[:, c].numpy()))
        assert cos > 1 - 1e-5
    assert np.allclose(var.numpy(), vals[::-1][:3], rtol=1e-4)


def test_pca_rgb_range_shape_and_per_image_fit():
    x = _correlated_tokens(n=2, hw=12)
    rgb = pca_rgb(x, (3, 4))
    assert rgb.shape == (2, 3, 3, 4) and rgb.dtype == torch.float32
    for c in range(3):  # joint scaling: each channel spans [0, 1] over all images together
        assert rgb[:, c].min().item() == pytest.approx(0.0, abs=1e-6)
        assert rgb[:, c].max().item() == pytest.approx(1.0, abs=1e-6)
    # the map is the projection, scaled: channel 0 is an increasing affine function of component 0
    p0 = torch.cat(pca_project(x, k=3))[:, 0]
    ch0 = rgb[:, 0].reshape(-1)
    expected = (p0 - p0.min()) / (p0.max() - p0.min())
    assert torch.allclose(ch0, expected, atol=1e-5)
    per = pca_rgb(x, (3, 4), per_image=True)
    for i in range(2):  # per image: each image spans [0, 1] on its own
        assert per[i].amin(dim=(1, 2)).max().item() == pytest.approx(0.0, abs=1e-6)
        assert per[i].amax(dim=(1, 2)).min().item() == pytest.approx(1.0, abs=1e-6)


def test_foreground_threshold_blacks_out_background():
    # a centre square of "object" patches, distinct from the border: the threshold keeps the centre
    g = torch.Generator().manual_seed(0)
    h = w = 6
    tok = 0.1 * torch.randn(2, h * w, 8, generator=g)
    centre = torch.zeros(h, w, dtype=torch.bool)
    centre[2:4, 2:4] = True
    tok[:, centre.flatten(), 0] -= 5.0  # object patches differ along feature 0 (sign chosen against the heuristic)
    rgb = pca_rgb(tok, (h, w), fg_threshold=0.5)
    black = rgb.sum(dim=1) == 0  # [2, h, w]
    assert black[:, ~centre].all()
    assert not black[:, centre].all()
    with pytest.raises(ValueError, match="fg_threshold"):
        pca_rgb(torch.zeros(2, h * w, 8), (h, w), fg_threshold=0.5)  # constant features: no foreground


# ---------------------------------------------------------------------- attention
def _ref_rope(h, w, head_dim, base=100.0):
    """RoPE (sin, cos) [h*w, head_dim] from the DINOv3 formula, float64."""
    n = head_dim // 4
    periods = base ** (2 * torch.arange(n, dtype=torch.float64) / (head_dim // 2))
    ch = (torch.arange(h, dtype=torch.float64) + 0.5) / h * 2 - 1
    cw = (torch.arange(w, dtype=torch.float64) + 0.5) / w * 2 - 1
    coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), -1).reshape(-1, 2)  # [hw, 2]
    ang = (2 * math.pi * coords[:, :, None] / periods).reshape(h * w, 2 * n)
    ang = torch.cat((ang, ang), dim=-1)
    return ang.sin(), ang.cos()


def _reference_attention(model, x):
    """float64 oracle: the tokens entering the last block (hooked in a float64 copy's forward), then the formula."""
    m = build_vit("vit_test", **_KW[model.cfg.pos_embed_type], n_storage_tokens=model.n_storage_tokens)
    m.load_state_dict(model.state_dict())
    m = m.double().eval()
    seen = {}
    hook = m.blocks[-1].register_forward_pre_hook(lambda mod, args: seen.setdefault("t", args[0]))
    with torch.no_grad():
        m.forward_features(x.double())
    hook.remove()
    t = seen["t"][0] if isinstance(seen["t"], list) else seen["t"]
    blk = m.blocks[-1]
    B, N, D = t.shape
    H = blk.attn.num_heads
    dh = D // H
    y = F.layer_norm(t, (D,), blk.norm1.weight, blk.norm1.bias, eps=1e-6)
    qkv = y @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
    q, k = qkv[..., :D], qkv[..., D:2 * D]
    q = q.reshape(B, N, H, dh).transpose(1, 2)
    k = k.reshape(B, N, H, dh).transpose(1, 2)
    p = 1 + model.n_storage_tokens
    h, w = x.shape[-2] // model.patch_size, x.shape[-1] // model.patch_size
    if model.cfg.pos_embed_type == "rope":
        sin, cos = _ref_rope(h, w, dh)

        def rot(a):
            pa = a[:, :, p:]
            half = torch.cat((-pa[..., dh // 2:], pa[..., :dh // 2]), dim=-1)
            return torch.cat((a[:, :, :p], pa * cos + half * sin), dim=2)

        q, k = rot(q), rot(k)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
    return a[:, :, 0, p:].reshape(B, H, h, w), a[:, :, 0, :p]


_KW = {"rope": dict(patch_size=4), "learned": dict(patch_size=4, pos_embed_type="learned", img_size=32)}


@pytest.mark.parametrize("kind,storage", [("rope", 2), ("rope", 0), ("learned", 1)])
def test_cls_attention_matches_float64_reference(kind, storage):
    torch.manual_seed(0)
    model = build_vit("vit_test", **_KW[kind], n_storage_tokens=storage).eval()
    with torch.no_grad():  # sharper, non-uniform attention than the 0.02-std init gives
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(20.0)
    x = torch.randn(2, 3, 32, 24)
    att = cls_attention(model, x)
    assert att.shape == (2, 2, 8, 6)
    ref, ref_prefix = _reference_attention(model, x)
    assert torch.allclose(att.double(), ref, atol=1e-5, rtol=1e-4)
    sums = att.sum(dim=(-1, -2))
    assert (sums <= 1 + 1e-6).all()
    # the remainder is the attention to cls + storage tokens
    assert torch.allclose(sums.double(), 1 - ref_prefix.sum(-1), atol=1e-5)
    assert ref.std() > 1e-3  # the oracle is not trivially uniform


def test_cls_attention_needs_eval_mode():
    model = build_vit("vit_test", patch_size=4).train()
    with pytest.raises(ValueError, match="eval mode"):
        cls_attention(model, torch.randn(1, 3, 16, 16))


def test_colormap_anchors_and_interpolation():
    c = colormap(np.array([0.0, 1.0, 0.5, -3.0, 7.0]))
    assert c.dtype == np.uint8 and c.shape == (5, 3)
    assert c[0].tolist() == [68, 1, 84] and c[1].tolist() == [253, 231, 37]
    assert c[2].tolist() == [33, 145, 140]  # 0.5 = the middle anchor
    assert c[3].tolist() == c[0].tolist() and c[4].tolist() == c[1].tolist()  # clipped


# ---------------------------------------------------------------------- command
def _images(root, n=3, size=32):
    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / ("sub" if i == 0 else ".") / f"im{i}.png")


def _weights(path, **kw):
    torch.save({"teacher": {f"backbone.{k}": v for k, v in build_vit("vit_test", **kw).state_dict().items()}}, path)


@pytest.fixture()
def setup(tmp_path):
    _images(tmp_path / "imgs")
    _weights(tmp_path / "w.pth", patch_size=4, n_storage_tokens=2)
    base = ["--arch", "vit_test", "--patch-size", "4", "--override", "n_storage_tokens=2", "--weights",
            str(tmp_path / "w.pth"), "--images", str(tmp_path / "imgs"), "--size", "32", "--device", "cpu"]
    return tmp_path, base


@pytest.mark.parametrize("extra", [[], ["--per-image"], ["--fg-threshold", "0.3"]])
def test_viz_pca_writes_pictures(setup, extra, capsys):
    tmp_path, base = setup
    out = tmp_path / "out"
    assert dinobridge_main(["viz", "pca", *base, "--out", str(out), *extra]) == 0
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert files == ["im1.png", "im2.png", "sub/im0.png"]
    for f in files:
        with Image.open(out / f) as im:
            assert im.size == (2 * 32 + 2, 32) and im.mode == "RGB"
            right = np.asarray(im)[:, 34:]
        # nearest upsampling: constant 4x4 blocks, one per patch
        blocks = right.reshape(8, 4, 8, 4, 3)
        assert (blocks == blocks[:, :1, :, :1]).all()
        if not extra:
            assert right.max() > 200 and right.min() < 55  # min-max scaled colours


def test_viz_attention_writes_grid(setup):
    tmp_path, base = setup
    out = tmp_path / "att"
    assert dinobridge_main(["viz", "attention", *base, "--out", str(out)]) == 0
    for f in ("im1.png", "im2.png", "sub/im0.png"):
        with Image.open(out / f) as im:
            # image + 2 heads = 3 tiles -> 2 x 2 grid with 2 px gaps
            assert im.size == (2 * 32 + 2, 2 * 32 + 2)


@pytest.mark.parametrize("case,message", [
    ("no_images_dir", "--images: "),
    ("empty_dir", "--images: no images"),
    ("no_weights", "--weights: a weights file is required"),
    ("missing_weights", "--weights: file not found"),
    ("bad_arch", "--arch: unknown preset"),
    ("bad_threshold", "--fg-threshold: expected"),
    ("mismatched_weights", "error:"),
])
def test_viz_usage_errors(setup, case, message, capsys):
    tmp_path, base = setup
    args = ["viz", "pca", *base, "--out", str(tmp_path / "o")]
    w = str(tmp_path / "w.pth")
    if case == "no_images_dir":
        args[args.index(str(tmp_path / "imgs"))] = str(tmp_path / "nope")
    elif case == "empty_dir":
        (tmp_path / "empty").mkdir()
        args[args.index(str(tmp_path / "imgs"))] = str(tmp_path / "empty")
    elif case == "no_weights":
        args = [a for a in args if a not in ("--weights", w)]
    elif case == "missing_weights":
        args[args.index(w)] = str(tmp_path / "nope.pth")
    elif case == "bad_arch":
        args[args.index("vit_test")] = "vit_nope"
    elif case == "bad_threshold":
        args += ["--fg-threshold", "1.5"]
    elif case == "mismatched_weights":
        args[args.index("4")] = "8"
    assert dinobridge_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert err[0].startswith("dinobridge viz pca: error:")


def test_viz_without_subcommand_exits_2(capsys):
    assert dinobridge_main(["viz"]) == 2
