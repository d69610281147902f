"""Feature extraction: the FeatureExtractor wrapper, preprocessing and the `dinobridge extract` command."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinobridge import cli
from dinobridge.features import FeatureExtractor, preprocess, target_geometry, to_unit_range
from dinobridge.features import extract_cli
from dinobridge.features.extract_cli import FolderTransform, main
from dinobridge.hub import build_hub_model

TINY = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8)  # overrides of dinov3_vits16 (R = 4 storage tokens)
TINY_ARGS = [f"--override={k}={v}" for k, v in TINY.items()]
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_hub_model("dinov3_vits16", None, **TINY)
    with torch.no_grad():  # non-trivial norms / layerscale so that every output depends on the loaded values
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm.bias", "gamma")):
                p.normal_(0.5, 0.3)
    path = tmp_path_factory.mktemp("w") / "tiny.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def fx(weights) -> FeatureExtractor:
    return FeatureExtractor.from_hub("dinov3_vits16", weights, **TINY)


def reference_backbone(weights):
    model = build_hub_model("dinov3_vits16", weights, **TINY).eval()
    return model


# ---------------------------------------------------------------------- FeatureExtractor
def test_final_features_shapes_and_values(fx, weights):
    x = torch.randn(2, 3, 32, 48)
    f = fx(x)
    assert f.cls.shape == (2, 32)
    assert f.storage.shape == (2, 4, 32)
    assert f.patch_tokens.shape == (2, 4 * 6, 32)
    assert f.grid == (4, 6) and f.layer == 1
    assert f.feature_map.shape == (2, 32, 4, 6)
    with torch.no_grad():
        ref = reference_backbone(weights).forward_features(x)
    torch.testing.assert_close(f.cls, ref["x_norm_clstoken"])
    torch.testing.assert_close(f.storage, ref["x_storage_tokens"])
    torch.testing.assert_close(f.patch_tokens, ref["x_norm_patchtokens"])
    # the weights were really loaded: a random model gives other features
    other = FeatureExtractor.from_hub("dinov3_vits16", random_init=True, **TINY)
    assert not torch.allclose(other(x).cls, f.cls, atol=1e-3)


def test_feature_map_is_the_row_major_patch_grid(fx):
    f = fx(torch.randn(2, 3, 24, 40))
    h, w = f.grid
    fm = f.feature_map
    for b in range(2):
        for i in range(h):
            for j in range(w):
                assert torch.equal(fm[b, :, i, j], f.patch_tokens[b, i * w + j])


def test_frozen_eval_no_grad_even_after_train(weights):
    fx = FeatureExtractor.from_hub("dinov3_vits16", weights, drop_path_rate=0.5, **TINY)
    fx.train()
    assert not fx.training and not fx.backbone.training
    assert all(not p.requires_grad for p in fx.parameters())
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    a, b = fx(x), fx(x)
    assert not a.cls.requires_grad
    torch.testing.assert_close(a.cls, b.cls, rtol=0, atol=0)  # no stochastic depth in the frozen teacher


def test_chosen_layers(fx, weights):
    x = torch.randn(2, 3, 16, 24)
    final = fx(x)
    fl = FeatureExtractor(fx.backbone, layers=[-1, 0, 0])  # negatives, duplicates -> sorted unique blocks
    assert fl.layer_indices == [0, 1]
    outs = fl(x)
    assert isinstance(outs, list) and [o.layer for o in outs] == [0, 1]
    for o in outs:
        assert o.cls.shape == (2, 32) and o.storage.shape == (2, 4, 32) and o.patch_tokens.shape == (2, 6, 32)
        assert o.feature_map.shape == (2, 32, 2, 3)
    # the last block, normed, is the final output
    torch.testing.assert_close(outs[1].cls, final.cls)
    torch.testing.assert_close(outs[1].storage, final.storage)
    torch.testing.assert_close(outs[1].patch_tokens, final.patch_tokens)
    assert not torch.allclose(outs[0].patch_tokens, outs[1].patch_tokens, atol=1e-3)
    last2 = FeatureExtractor(fx.backbone, layers=2)(x)
    torch.testing.assert_close(last2[0].patch_tokens, outs[0].patch_tokens)
    # norm=False gives the raw block output (x_prenorm for the last block)
    raw = FeatureExtractor(fx.backbone, norm=False)(x)
    with torch.no_grad():
        prenorm = reference_backbone(weights).forward_features(x)["x_prenorm"]
    torch.testing.assert_close(raw.cls, prenorm[:, 0])
    torch.testing.assert_close(raw.storage, prenorm[:, 1:5])
    torch.testing.assert_close(raw.patch_tokens, prenorm[:, 5:])
    with pytest.raises(ValueError, match="out of range"):
        FeatureExtractor(fx.backbone, layers=[2])
    with pytest.raises(ValueError, match="last-n"):
        FeatureExtractor(fx.backbone, layers=3)


def test_input_checks_and_weights_required(fx):
    with pytest.raises(ValueError, match="multiples of the patch size 8"):
        fx(torch.randn(1, 3, 20, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        fx(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="random_init=True"):
        FeatureExtractor.from_hub("dinov3_vits16", **TINY)


# ---------------------------------------------------------------------- preprocessing
def test_ranges_give_the_same_normalised_tensor():
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (2, 3, 16, 24), dtype=torch.uint8, generator=g)
    x01 = u8.float() / 255
    xm1 = x01 * 2 - 1
    a = preprocess(u8, 8)
    b = preprocess(x01, 8, input_range="0_1")
    c = preprocess(xm1, 8, input_range="-1_1")
    # sizes are already multiples of 8: no resampling, so the formula applies pixel by pixel (float64 oracle)
    ref = (u8.double().numpy() / 255 - MEAN[None, :, None, None]) / STD[None, :, None, None]
    assert a.shape == (2, 3, 16, 24) and a.dtype == torch.float32
    for t in (a, b, c):
        np.testing.assert_allclose(t.double().numpy(), ref, atol=1e-5)
    # with resampling (21 x 27 -> 24 x 24) they still agree
    u8b = torch.randint(0, 256, (1, 3, 21, 27), dtype=torch.uint8, generator=g)
    outs = [preprocess(u8b, 8), preprocess(u8b.float() / 255, 8), preprocess(u8b.float() / 127.5 - 1, 8, "-1_1")]
    assert outs[0].shape == (1, 3, 24, 24)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs[2], outs[0], atol=1e-5, rtol=0)


def test_pil_equals_uint8_and_caller_tensor_untouched():
    arr = (np.random.default_rng(0).random((16, 24, 3)) * 255).astype(np.uint8)
    from_pil = preprocess(Image.fromarray(arr), 8)
    from_u8 = preprocess(torch.from_numpy(arr).permute(2, 0, 1), 8)
    torch.testing.assert_close(from_pil, from_u8, rtol=0, atol=0)
    x = torch.rand(1, 3, 16, 16)
    keep = x.clone()
    preprocess(x, 8)
    assert torch.equal(x, keep)


def test_declared_range_is_checked():
    with pytest.raises(ValueError, match="input_range='-1_1'"):
        to_unit_range(torch.rand(1, 3, 4, 4) * 2 - 1, "0_1")
    with pytest.raises(ValueError, match="uint8"):
        to_unit_range(torch.rand(1, 3, 4, 4) * 255, "0_1")
    with pytest.raises(ValueError, match=r"expects values in \[-1, 1\]"):
        to_unit_range(torch.rand(1, 3, 4, 4) * 255, "-1_1")
    with pytest.raises(ValueError, match="input_range"):
        to_unit_range(torch.rand(1, 3, 4, 4), "0_255")
    with pytest.raises(ValueError, match="NaN"):
        to_unit_range(torch.full((1, 3, 2, 2), float("nan")), "0_1")
    with pytest.raises(ValueError, match="channels-last"):
        preprocess(torch.rand(1, 16, 16, 3), 8)


def test_geometry_modes():
    # resize: each side to its nearest multiple (halves up); short side to S; explicit (H, W)
    assert target_geometry(20, 28, 8) == ((24, 32), (24, 32))
    assert target_geometry(3, 100, 8) == ((8, 104), (8, 104))  # 12.5 patches rounds up
    assert target_geometry(40, 80, 8, size=32) == ((32, 64), (32, 64))
    assert target_geometry(40, 80, 8, size=(30, 30)) == ((32, 32), (32, 32))
    # crop: cover then centre crop; without size, crop down to multiples without resampling
    assert target_geometry(40, 80, 8, size=32, mode="crop") == ((32, 64), (32, 32))
    assert target_geometry(20, 28, 8, mode="crop") == ((20, 28), (16, 24))
    x = torch.rand(1, 3, 20, 28)
    got = preprocess(x, 8, mode="crop")
    ref = (x[:, :, 2:18, 2:26].double().numpy() - MEAN[None, :, None, None]) / STD[None, :, None, None]
    np.testing.assert_allclose(got.double().numpy(), ref, atol=1e-5)
    with pytest.raises(ValueError, match="mode"):
        target_geometry(8, 8, 8, mode="pad")


def test_extract_on_pil_list(fx):
    rng = np.random.default_rng(1)
    ims = [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for h, w in ((30, 50), (40, 33))]
    f = fx.extract(ims, mode="crop", size=24)
    assert f.cls.shape == (2, 32) and f.grid == (3, 3)
    with pytest.raises(ValueError, match="different sizes"):
        fx.extract(ims)


# ---------------------------------------------------------------------- CLI
def make_images(root: Path) -> list[str]:
    """3 readable images (PNG, JPEG, upper-case JPG in a subfolder), 2 unreadable ones and an ignored .txt."""
    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True)
    for rel, (h, w) in {"b.png": (40, 56), "a.jpeg": (48, 48), "sub/c.JPG": (30, 70)}.items():
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(root / rel)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    full = (root / "a.jpeg").read_bytes()
    (root / "sub" / "truncated.jpg").write_bytes(full[: len(full) // 2])  # valid header, data cut off
    (root / "notes.txt").write_text("not an image")
    return ["a.jpeg", "b.png", "sub/c.JPG"]  # sorted readable paths


def run_cli(capsys, args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_end_to_end(tmp_path, weights, fx, capsys):
    images = tmp_path / "imgs"
    expected = make_images(images)
    out = tmp_path / "new" / "feat.pt"
    rc, stdout, err = run_cli(capsys, ["--model", "dinov3_vits16", "--weights", weights, "--images", images,
                                       "--out", out, "--size", 30, "--batch-size", 2, "--num-workers", 1,
                                       "--patch-tokens", "--device", "cpu", "--quiet", *TINY_ARGS])
    assert rc == 0, err
    assert "skipped 2" in err and "broken.png" in err and "truncated.jpg" in err
    d = torch.load(out, weights_only=True)
    assert d["paths"] == expected
    assert d["skipped"] == ["broken.png", "sub/truncated.jpg"] and len(d["skip_reasons"]) == 2
    assert d["model"] == "dinov3_vits16" and d["weights"] == str(weights) and d["random_init"] is False
    assert d["image_size"] == (32, 32) and d["grid"] == (4, 4) and d["layers"] is None
    assert d["cls"].shape == (3, 32) and d["cls"].dtype == torch.float32
    assert d["storage"].shape == (3, 4, 32)
    assert d["patch_tokens"].shape == (3, 16, 32) and d["patch_tokens"].dtype == torch.float16
    # same features as the Python API on the same images
    tf = FolderTransform(8, 32, "crop")
    x = torch.stack([tf(Image.open(images / p).convert("RGB")) for p in expected])
    ref = fx(x)
    torch.testing.assert_close(d["cls"], ref.cls)
    torch.testing.assert_close(d["patch_tokens"].float(), ref.patch_tokens, atol=2e-2, rtol=1e-2)


def test_cli_layers_and_random_init(tmp_path, capsys):
    images = tmp_path / "imgs"
    make_images(images)
    out = tmp_path / "f.pt"
    rc, _, err = run_cli(capsys, ["--model", "dinov3_vits16", "--random-init", "--images", images, "--out", out,
                                  "--size", 16, "--last-layers", 2, "--resize", "stretch", "--num-workers", 0,
                                  "--precision", "bf16", "--no-norm", "--quiet", *TINY_ARGS])
    assert rc == 0, err
    d = torch.load(out, weights_only=True)
    assert d["random_init"] is True and d["weights"] is None and d["layers"] == [0, 1] and d["norm"] is False
    assert d["cls"].shape == (3, 2, 32) and d["storage"].shape == (3, 2, 4, 32) and "patch_tokens" not in d


@pytest.fixture
def no_model_work(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("model work started before the argument checks finished")

    monkeypatch.setattr(extract_cli.FeatureExtractor, "from_hub", fail)


@pytest.mark.parametrize("case", ["missing_weights", "no_weights", "both", "unknown_model", "missing_dir",
                                  "empty_dir", "out_parent_is_file", "out_is_dir", "bad_layer", "bad_override"])
def test_cli_errors_are_one_line_exit_2(case, tmp_path, weights, capsys, no_model_work):
    images = tmp_path / "imgs"
    make_images(images)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    args = {"--model": "dinov3_vits16", "--weights": weights, "--images": images, "--out": tmp_path / "o.pt"}
    extra, expect = list(TINY_ARGS), ""
    if case == "missing_weights":
        args["--weights"], expect = tmp_path / "nope.pth", "file not found"
    elif case == "no_weights":
        del args["--weights"]
        expect = "--random-init"
    elif case == "both":
        extra.append("--random-init")
        expect = "exclusive"
    elif case == "unknown_model":
        args["--model"], expect = "dinov3_vitx99", "dinov2_vitl14_reg"  # lists the valid names
    elif case == "missing_dir":
        args["--images"], expect = tmp_path / "nodir", "not a directory"
    elif case == "empty_dir":
        args["--images"], expect = tmp_path / "empty", "no jpg"
    elif case == "out_parent_is_file":
        args["--out"], expect = tmp_path / "a_file" / "o.pt", "is not a directory"
    elif case == "out_is_dir":
        args["--out"], expect = tmp_path / "empty", "is a directory"
    elif case == "bad_layer":
        extra += ["--layers", "5"]
        expect = "out of range"
    elif case == "bad_override":
        extra.append("--override=depthh=3")
        expect = "unknown architecture field"
    argv = [str(v) for kv in args.items() for v in kv] + extra
    rc, out, err = run_cli(capsys, argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dinobridge extract: error:"), err
    assert expect in lines[0]
    assert "Traceback" not in err and not (tmp_path / "o.pt").exists()


def test_cli_mismatched_weights_one_line(tmp_path, weights, capsys):
    images = tmp_path / "imgs"
    make_images(images)
    # the tiny checkpoint does not fit the real-size dinov3_vits16 (no overrides)
    rc = cli.main(["extract", "--model", "dinov3_vits16", "--weights", str(weights), "--images", str(images),
                   "--out", str(tmp_path / "o.pt"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "does not match the model" in lines[0] and "--override" in lines[0]
    assert not (tmp_path / "o.pt").exists()
