import logging
import os

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from dinobridge.data import datasets as dsmod
from dinobridge.data.datasets import (
    ImageFolderDataset,
    MixtureDataset,
    TxtListDataset,
    build_dataset,
    build_train_dataset,
    ratio_indices,
)
from dinobridge.data.synthetic import MAX_CLASSES, ProceduralShapes, class_shape_texture
from dinobridge.errors import DataError, UserError


def _jpeg(path, value, size=12):
    """A small JPEG whose pixels all equal `value` (so tests can recognise which file was loaded)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (size, size), (value, value, value)).save(path, quality=95)


def _value(img):
    return int(round(np.asarray(img, dtype=np.float64).mean()))


@pytest.fixture
def class_tree(tmp_path):
    root = tmp_path / "imgs"
    _jpeg(str(root / "cat" / "a.jpg"), 10)
    _jpeg(str(root / "cat" / "sub" / "deep" / "b.JPEG"), 20)
    _jpeg(str(root / "cat" / "c.jpg"), 30)
    (root / "cat" / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    _jpeg(str(root / "dog" / "d.jpg"), 40)
    Image.new("RGB", (12, 12), (50, 50, 50)).save(root / "dog" / "e.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    _jpeg(str(root / "dog" / ".hidden.jpg"), 99)
    _jpeg(str(root / ".git" / "x.jpg"), 99)
    return root


def test_image_folder_layout_order_labels(class_tree):
    ds = ImageFolderDataset(str(class_tree))
    assert ds.classes == ["cat", "dog"]
    rel = [ds.paths[i] for i in range(len(ds))]
    assert rel == ["cat/a.jpg", "cat/c.jpg", "cat/sub/deep/b.JPEG", "cat/zz_corrupt.jpg", "dog/d.jpg", "dog/e.png"]
    assert [ds.label(i) for i in range(len(ds))] == [0, 0, 0, 0, 1, 1]
    img, label = ds[4]
    assert img.mode == "RGB" and img.size == (12, 12) and label == 1 and _value(img) == 40


def test_corrupt_image_is_skipped_counted_and_logged_once(class_tree, caplog):
    ds = ImageFolderDataset(str(class_tree))
    with caplog.at_level(logging.WARNING, logger="dinobridge.data"):
        img, label, skipped = ds.load(3)  # the corrupt file -> the next index (dog/d.jpg)
        img2, _, skipped2 = ds.load(3)
    assert skipped == 1 and skipped2 == 1 and ds.num_skipped == 2
    assert _value(img) == 40 and label == 1 and _value(img2) == 40
    warnings = [r for r in caplog.records if "zz_corrupt.jpg" in r.getMessage()]
    assert len(warnings) == 1
    assert ds.load(0)[2] == 0 and _value(ds[0][0]) == 10


def test_too_many_consecutive_failures_raise(tmp_path):
    for i in range(60):
        (tmp_path / f"{i:03d}.jpg").write_bytes(b"garbage")
    ds = ImageFolderDataset(str(tmp_path))
    with pytest.raises(DataError, match="50 consecutive"):
        ds.load(0)


def test_flat_folder_and_empty_or_missing_folders(tmp_path):
    _jpeg(str(tmp_path / "flat" / "b.jpg"), 1)
    _jpeg(str(tmp_path / "flat" / "a.webp"), 2)
    ds = ImageFolderDataset(str(tmp_path / "flat"))
    assert len(ds) == 2 and ds.classes == [] and [ds.label(i) for i in range(2)] == [-1, -1]
    assert ds.paths[0] == "a.webp"
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images") as e:
        ImageFolderDataset(str(tmp_path / "empty"), key="data.x.root")
    assert "data.x.root" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="not a directory"):
        ImageFolderDataset(str(tmp_path / "nope"))
    assert issubclass(DataError, UserError)


def test_folder_cache_is_reused_and_invalidated(class_tree, tmp_path, monkeypatch):
    cache = str(tmp_path / "c" / "list.npz")
    first = ImageFolderDataset(str(class_tree), cache_file=cache)
    assert os.path.isfile(cache)

    def no_scan(root):
        raise AssertionError("should have used the cache")

    monkeypatch.setattr(dsmod, "scan_image_folder", no_scan)
    second = ImageFolderDataset(str(class_tree), cache_file=cache)
    assert [second.paths[i] for i in range(len(second))] == [first.paths[i] for i in range(len(first))]
    assert second.classes == first.classes and np.array_equal(second.labels, first.labels)
    monkeypatch.undo()
    _jpeg(str(class_tree / "emu" / "f.jpg"), 60)  # new class folder -> root mtime changes -> rescan
    third = ImageFolderDataset(str(class_tree), cache_file=cache)
    assert third.classes == ["cat", "dog", "emu"] and len(third) == len(first) + 1


def _txt_fixture(tmp_path):
    for i in range(6):
        _jpeg(str(tmp_path / "data" / f"im {i}.jpg"), 10 * i)
    lines = [
        "# a comment",
        "",
        "data/im 0.jpg\t3",
        "data/im 1.jpg 7",
        f"{tmp_path}/data/im 2.jpg",
        "  data/im 3.jpg  ",
        "data/im 4.jpg\t-1",
        "data/im 5.jpg",
    ]
    path = tmp_path / "list.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_txt_list_parsing(tmp_path):
    ds = TxtListDataset(str(_txt_fixture(tmp_path)))
    assert len(ds) == 6
    assert [ds.label(i) for i in range(6)] == [3, 7, -1, -1, -1, -1]
    assert [_value(ds[i][0]) for i in range(6)] == [0, 10, 20, 30, 40, 50]
    assert os.path.isabs(ds.path(0)) and ds.path(0).endswith("im 0.jpg")


def test_txt_list_missing_files_one_line_error(tmp_path):
    path = _txt_fixture(tmp_path)
    with open(path, "a") as f:
        f.write("data/missing_a.jpg\n/abs/missing_b.jpg\n")
    with pytest.raises(DataError) as e:
        TxtListDataset(str(path), key="data.imagenet_1k.txt_path")
    msg = str(e.value)
    assert "\n" not in msg and "data.imagenet_1k.txt_path" in msg
    assert "missing_a.jpg" in msg and "/abs/missing_b.jpg" in msg and "2 of 8" in msg
    assert len(TxtListDataset(str(path), check_files="none")) == 8  # opt-out: skipped at load time instead
    (tmp_path / "blank.txt").write_text("# nothing\n\n")
    with pytest.raises(DataError, match="lists no image paths"):
        TxtListDataset(str(tmp_path / "blank.txt"))
    with pytest.raises(DataError, match="no such file"):
        TxtListDataset(str(tmp_path / "absent.txt"))


def test_ratio_indices_and_txt_ratio(tmp_path):
    assert ratio_indices(10, 1.0, 0) is None
    half = ratio_indices(10, 0.5, 0)
    assert len(half) == 5 and len(set(half.tolist())) == 5 and list(half) == sorted(half)
    assert np.array_equal(half, ratio_indices(10, 0.5, 0)) and not np.array_equal(half, ratio_indices(10, 0.5, 1))
    rep = ratio_indices(10, 2.3, 0)
    counts = np.bincount(rep, minlength=10)
    assert len(rep) == 23 and set(counts.tolist()) == {2, 3} and (counts == 3).sum() == 3
    assert len(ratio_indices(10, 0.0, 0)) == 0
    path = _txt_fixture(tmp_path)
    sub = TxtListDataset(str(path), dataset_ratio=0.5, seed=4)
    assert len(sub) == 3 and len(TxtListDataset(str(path), dataset_ratio=2.0)) == 12
    with pytest.raises(DataError, match="dataset_ratio"):
        TxtListDataset(str(path), dataset_ratio=-1)


class _Const:
    """A tiny map-style dataset of (tag, index) pairs (no robust `load`)."""

    def __init__(self, tag, n):
        self.tag, self.n = tag, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return (self.tag, i), 0


def test_mixture_ratios_counts():
    mix = MixtureDataset({"a": _Const("a", 10), "b": _Const("b", 20), "c": _Const("c", 5)},
                         {"b": 0.5, "c": 2.0}, seed=3)  # fmt: skip
    assert len(mix) == 10 + 10 + 10 and mix.counts == {"a": 10, "b": 10, "c": 10}
    items = [mix[i][0] for i in range(len(mix))]
    by_tag = {t: [i for tag, i in items if tag == t] for t in "abc"}
    assert sorted(by_tag["a"]) == list(range(10))
    assert len(set(by_tag["b"])) == 10 and all(0 <= i < 20 for i in by_tag["b"])
    assert sorted(by_tag["c"]) == sorted(list(range(5)) * 2)
    again = MixtureDataset({"a": _Const("a", 10), "b": _Const("b", 20), "c": _Const("c", 5)},
                           {"b": 0.5, "c": 2.0}, seed=3)  # fmt: skip
    assert [again[i][0] for i in range(len(again))] == items
    off = MixtureDataset({"a": _Const("a", 4), "b": _Const("b", 3)}, {"a": 0})
    assert len(off) == 3 and {off[i][0][0] for i in range(3)} == {"b"}
    with pytest.raises(DataError, match="select no image"):
        MixtureDataset({"a": _Const("a", 4)}, {"a": 0})
    with pytest.raises(DataError, match="unknown sources"):
        MixtureDataset({"a": _Const("a", 4)}, {"z": 1})


def test_mixture_skips_inside_source(class_tree):
    mix = MixtureDataset({"f": ImageFolderDataset(str(class_tree)), "g": _Const("g", 2)})
    img, label, skipped = mix.load(3)
    assert skipped == 1 and _value(img) == 40 and label == 1


# ---------------------------------------------------------------------------------------------- synthetic
def test_procedural_shapes_deterministic_balanced_distinct():
    a, b = ProceduralShapes(n=200, seed=5), ProceduralShapes(n=200, seed=5)
    for i in (0, 17, 199):
        assert np.array_equal(a.render(i), b.render(i))
    assert not np.array_equal(a.render(3), ProceduralShapes(n=200, seed=6).render(3))
    assert not np.array_equal(a.render(3), ProceduralShapes(n=200, seed=5, split="val").render(3))
    labels = [a[i][1] for i in range(200)]
    assert np.bincount(labels).tolist() == [20] * 10
    img = a[0][0]
    assert img.mode == "RGB" and img.size == (64, 64)
    flat = np.stack([a.render(i) for i in range(50)]).reshape(50, -1)
    assert len({row.tobytes() for row in flat}) == 50
    pairs = {class_shape_texture(c) for c in range(MAX_CLASSES)}
    assert len(pairs) == MAX_CLASSES == 20 and len(set(a.classes)) == 10
    assert {class_shape_texture(c)[1] for c in range(10)} == {0, 1}  # default classes: 5 shapes x {solid, stripes}
    with pytest.raises(ValueError, match="num_classes"):
        ProceduralShapes(num_classes=MAX_CLASSES + 1)


def test_procedural_shapes_objects_stand_out_in_luminance():
    # each image: one background colour (the most frequent) plus one flat fill colour per object (2-4 objects), and
    # every fill differs from the background by >= LUMA_GAP in luminance, so the objects survive grey-scale
    ds = ProceduralShapes(n=300, size=64, seed=3)
    luma = np.array([0.299, 0.587, 0.114])
    lo, hi = ProceduralShapes.OBJECTS
    for i in range(300):
        img = ds.render(i).reshape(-1, 3)
        colours, counts = np.unique(img, axis=0, return_counts=True)
        assert 1 + lo <= len(colours) <= 1 + hi, i  # objects never hide each other completely
        bg = colours[counts.argmax()]
        gaps = np.abs((colours.astype(np.float64) - bg) @ luma) / 255
        assert np.sort(gaps)[1] >= ProceduralShapes.LUMA_GAP - 2 / 255, i


def _nearest_class_mean_acc(feat, y, feat_v, y_v, k):
    means = np.stack([feat[y == c].mean(0) for c in range(k)])
    pred = np.argmin(((feat_v[:, None] - means[None]) ** 2).sum(-1), 1)
    return (pred == y_v).mean()


def test_procedural_shapes_not_separable_by_colour_or_pixels():
    tr, va = ProceduralShapes(n=1500, size=32), ProceduralShapes(n=500, size=32, split="val")
    x = np.stack([tr.render(i) for i in range(1500)]).astype(np.float64) / 255
    xv = np.stack([va.render(i) for i in range(500)]).astype(np.float64) / 255
    y, yv = np.arange(1500) % 10, np.arange(500) % 10
    mean_rgb, mean_rgb_v = x.mean((1, 2)), xv.mean((1, 2))
    assert _nearest_class_mean_acc(mean_rgb, y, mean_rgb_v, yv, 10) < 0.2  # chance 0.1
    f, fv = x.reshape(1500, -1), xv.reshape(500, -1)
    f, fv = f / np.linalg.norm(f, axis=1, keepdims=True), fv / np.linalg.norm(fv, axis=1, keepdims=True)
    nn_idx = np.argsort(-(fv @ f.T), axis=1)[:, :10]
    knn = np.array([np.bincount(y[r], minlength=10).argmax() for r in nn_idx])
    assert (knn == yv).mean() < 0.2


# ---------------------------------------------------------------------------------------------- specs / config
def test_build_dataset_specs(tmp_path, class_tree):
    assert len(build_dataset("builtin:shapes:n=100")) == 100
    shapes = build_dataset("Shapes:n=30:num_classes=3:size=16:split=val")
    assert isinstance(shapes, ProceduralShapes) and shapes.num_classes == 3 and shapes.split == "val"
    assert len(build_dataset(f"ImageFolder:root={class_tree}")) == 6
    assert len(build_dataset(str(class_tree))) == 6
    path = _txt_fixture(tmp_path)
    assert len(build_dataset(f"TxtList:path={path}:ratio=0.5")) == 3
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "rel.txt").write_text("im 1.jpg\nim 4.jpg\n")
    rel = build_dataset(f"TxtList:path={tmp_path / 'lists' / 'rel.txt'}:root={tmp_path / 'data'}")
    assert [_value(rel[i][0]) for i in range(2)] == [10, 40]
    _jpeg(str(tmp_path / "inet" / "train" / "n01" / "n01_1.JPEG"), 5)
    _jpeg(str(tmp_path / "inet" / "val" / "ILSVRC2012_val_00000001.JPEG"), 6)
    train = build_dataset(f"ImageNet:split=TRAIN:root={tmp_path / 'inet'}:extra=/whatever")
    assert len(train) == 1 and train.classes == ["n01"] and train.label(0) == 0
    val = build_dataset(f"ImageNet:split=VAL:root={tmp_path / 'inet'}")
    assert len(val) == 1 and val.label(0) == -1


@pytest.mark.parametrize(
    "spec, pattern",
    [
        ("Foo:root=/x", "unknown dataset kind 'Foo'"),
        ("ImageFolder:path=/x", "unknown option"),
        ("ImageFolder", r"missing option\(s\) \['root'\]"),
        ("ImageFolder:root=/definitely/missing", "not a directory"),
        ("TxtList:path=/definitely/missing.txt", "no such file"),
        ("/definitely/missing", "not a directory"),
        ("builtin:shapes:n=abc", "not a valid int"),
        ("builtin:shapes:num_classes=99", "num_classes"),
        ("ImageNet:split=FOO:root=/x", "TRAIN|VAL|TEST"),
        ("", "expected a dataset string"),
    ],
)
def test_build_dataset_bad_specs(spec, pattern):
    with pytest.raises(DataError, match=pattern) as e:
        build_dataset(spec)
    assert str(e.value).startswith("train.dataset_path") and "\n" not in str(e.value)


def test_build_train_dataset_from_config(tmp_path, class_tree):
    path = _txt_fixture(tmp_path)
    one = {"txt_path": str(path), "dataset_ratio": 1.0}
    cfg = OmegaConf.create({"train": {"dataset_path": None, "seed": 0}, "data": {"one": one}})
    assert isinstance(build_train_dataset(cfg), TxtListDataset)
    cfg.data["two"] = {"root": str(class_tree), "dataset_ratio": 0.5}
    mix = build_train_dataset(cfg)
    assert isinstance(mix, MixtureDataset) and mix.counts == {"one": 6, "two": 3}
    out = tmp_path / "run"
    cfg2 = OmegaConf.create({"train": {"dataset_path": f"ImageFolder:root={class_tree}", "cache_dataset": True,
                                        "output_dir": str(out)}, "data": {}})  # fmt: skip
    assert len(build_train_dataset(cfg2)) == 6 and len(os.listdir(out / "cache")) == 1
    assert len(build_train_dataset({"train": {"dataset_path": "builtin:shapes:n=12"}})) == 12

    with pytest.raises(DataError, match=r"^train\.dataset_path: expected a dataset spec"):
        build_train_dataset(OmegaConf.create({"train": {"dataset_path": None}, "data": {}}))
    bad = OmegaConf.create({"train": {"seed": 0}, "data": {"imagenet_1k": {"txt_path": str(tmp_path / "nope.txt")}}})
    with pytest.raises(DataError, match=r"^data\.imagenet_1k\.txt_path: .*nope\.txt"):
        build_train_dataset(bad)
    with pytest.raises(DataError, match=r"^data\.x: expected exactly one of"):
        build_train_dataset({"train": {}, "data": {"x": {"dataset_ratio": 1.0}}})
    with pytest.raises(DataError, match=r"^data\.x: unknown key"):
        build_train_dataset({"train": {}, "data": {"x": {"txt_path": str(path), "ratio": 1.0}}})
