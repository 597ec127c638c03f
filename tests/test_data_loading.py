"""Filelists, decoding into one uint8 tensor, episode sampling and class views."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GLYPHS_CLASSES, TINY_IMAGES_PER_CLASS
from PIL import Image

from purer_mlops.data.dataset import (
    ImageSet,
    class_view,
    decode_image,
    fixed_tasks,
    load_split,
    sample_task_indices,
)
from purer_mlops.data.filelist import read_filelist, write_filelists
from purer_mlops.data.registry import DATASETS, SPLITS
from purer_mlops.errors import UserError
from purer_mlops.meta.tasks import stack_tasks


@pytest.fixture(scope="module")
def meta_test(tiny_glyphs: Path) -> ImageSet:
    return load_split("glyphs", tiny_glyphs, "meta_test")


def _csv_rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def _tiny_tree(root: Path, per_class: int = 2) -> Path:
    """A 3-split dataset of solid-colour 32 px PNGs: two classes per split."""
    for s, split in enumerate(SPLITS):
        for c in range(2):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                colour = (40 * s + 10 * c + i, 100, 200)
                Image.new("RGB", (32, 32), colour).save(folder / f"{i:02d}.png")
    return root


# --------------------------------------------------------------------------- load_split


def test_load_split_decodes_every_listed_image(tiny_glyphs, meta_test):
    rows = _csv_rows(tiny_glyphs / "split" / "meta_test.csv")
    assert rows[0] == ["filename", "label"]
    rows = rows[1:]
    n = GLYPHS_CLASSES["meta_test"] * TINY_IMAGES_PER_CLASS
    assert len(rows) == n
    assert meta_test.images.dtype == torch.uint8
    assert tuple(meta_test.images.shape) == (n, 3, 32, 32)
    assert meta_test.images.is_contiguous()
    assert meta_test.labels.dtype == torch.int64
    assert meta_test.classes == sorted({label for _, label in rows})
    assert [meta_test.classes[i] for i in meta_test.labels.tolist()] == [lab for _, lab in rows]
    for i in (0, n // 2, n - 1):  # pixels are the file's pixels, channels first
        with Image.open(tiny_glyphs / rows[i][0]) as im:
            expected = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(meta_test.images[i], expected)
    assert meta_test.name == "glyphs/meta_test"
    assert meta_test.image_size == 32
    assert meta_test.min_per_class() == TINY_IMAGES_PER_CLASS
    assert [len(ix) for ix in meta_test.by_class] == [TINY_IMAGES_PER_CLASS] * 20
    for c, ix in enumerate(meta_test.by_class):
        assert (meta_test.labels[ix] == c).all()


def test_normalize_uses_the_datasets_mean_and_std(tiny_glyphs, meta_test):
    x = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    out = meta_test.normalize(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.allclose(out[0], torch.full((3, 2, 2), -2.0))  # (0 - 0.5) / 0.25
    assert torch.allclose(out[1], torch.full((3, 2, 2), 2.0))  # (1 - 0.5) / 0.25

    # The same 32 px files read as CIFAR-100 take CIFAR's constants.
    cifar = load_split("cifar100", tiny_glyphs, "meta_val")
    info = DATASETS["cifar100"]
    assert (cifar.mean, cifar.std) == (info.mean, info.std)
    white = cifar.normalize(torch.full((3, 1, 1), 255, dtype=torch.uint8)).flatten()
    expected = (1 - torch.tensor(info.mean)) / torch.tensor(info.std)
    assert torch.allclose(white, expected)
    assert len(set(white.tolist())) == 3  # per channel, not one constant


def test_odd_image_modes_decode_to_rgb(tmp_path):
    root = _tiny_tree(tmp_path / "odd")
    folder = root / "meta_train" / "class0"
    grey = Image.new("L", (32, 32), 200)
    grey.save(folder / "grey.png")
    Image.new("RGBA", (32, 32), (10, 20, 30, 0)).save(folder / "rgba.png")
    pal = Image.new("P", (32, 32), 3)
    pal.putpalette([0, 0, 0] * 3 + [70, 80, 90] + [0, 0, 0] * 252)
    pal.save(folder / "palette.png")
    deep = np.full((32, 32), 0x8000, dtype=np.uint16)
    deep[0, 0] = 0xFFFF
    Image.fromarray(deep).save(folder / "deep16.png")
    Image.new("RGB", (48, 40), (1, 2, 3)).save(folder / "big.png")
    Image.new("RGB", (32, 32), (5, 6, 7)).save(folder / "photo.jpg", quality=100)
    (folder / "notes.txt").write_text("not an image, skipped")
    write_filelists(root)

    images = load_split("glyphs", root, "meta_train")
    names = [p.name for p, _ in read_filelist(root, "meta_train")]
    assert "notes.txt" not in names
    pixel = {name: images.images[i, :, 5, 5].tolist() for i, name in enumerate(names)}
    assert pixel["grey.png"] == [200, 200, 200]
    assert pixel["rgba.png"] == [10, 20, 30]
    assert pixel["palette.png"] == [70, 80, 90]
    assert pixel["deep16.png"][0] in (127, 128) and len(set(pixel["deep16.png"])) == 1
    assert pixel["big.png"] == [1, 2, 3]  # resized to 32 px
    assert all(abs(a - b) <= 2 for a, b in zip(pixel["photo.jpg"], (5, 6, 7), strict=True))
    assert tuple(images.images.shape) == (len(names), 3, 32, 32)


def test_decode_resizes_to_the_dataset_size(tmp_path):
    Image.new("RGB", (100, 60), (9, 8, 7)).save(tmp_path / "x.png")
    arr = decode_image(tmp_path / "x.png", 84)
    assert arr.shape == (84, 84, 3) and arr.dtype == np.uint8
    assert arr[40, 40].tolist() == [9, 8, 7]


# --------------------------------------------------------------------------- filelists


def test_filelists_are_sorted_and_byte_identical(tiny_glyphs, tmp_path):
    root = tmp_path / "glyphs"
    shutil.copytree(tiny_glyphs, root, ignore=shutil.ignore_patterns("split"))
    # Decoys that are not images, or hidden, must not change the lists.
    (root / "meta_train" / ".DS_Store").write_text("x")
    first_class = sorted((root / "meta_val").iterdir())[0]
    (first_class / "README.txt").write_text("x")
    (first_class / ".hidden.png").write_bytes(b"")
    counts = write_filelists(root)
    assert counts == {s: {"classes": n, "images": n * TINY_IMAGES_PER_CLASS}
                      for s, n in GLYPHS_CLASSES.items()}
    first = {s: (root / "split" / f"{s}.csv").read_bytes() for s in SPLITS}
    write_filelists(root)
    second = {s: (root / "split" / f"{s}.csv").read_bytes() for s in SPLITS}
    assert first == second
    # The same tree generated elsewhere gives the same bytes.
    assert first == {s: (tiny_glyphs / "split" / f"{s}.csv").read_bytes() for s in SPLITS}
    for split in SPLITS:
        text = first[split].decode()
        assert "\r" not in text and text.endswith("\n")
        rows = _csv_rows(root / "split" / f"{split}.csv")[1:]
        assert rows == sorted(rows, key=lambda r: (r[1], r[0]))
        assert all(r[0].startswith(f"{split}/{r[1]}/") for r in rows)
    assert sorted(p.name for p in (root / "split").iterdir()) == sorted(f"{s}.csv" for s in SPLITS)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("../x.png,class0", "outside the dataset root"),
        ("/etc/passwd,class0", "outside the dataset root"),
        ("meta_train/class0/00.png", "expected 2 columns"),
    ],
)
def test_filelist_row_that_leaves_the_root_is_refused(tmp_path, row, message):
    root = _tiny_tree(tmp_path / "d")
    write_filelists(root)
    (tmp_path / "x.png").write_bytes((root / "meta_train" / "class0" / "00.png").read_bytes())
    csv_path = root / "split" / "meta_train.csv"
    csv_path.write_text(csv_path.read_text() + row + "\n")
    with pytest.raises(UserError, match=message) as info:
        load_split("glyphs", root, "meta_train")
    assert "meta_train.csv" in str(info.value)


def test_symlink_out_of_the_root_is_refused(tmp_path):
    root = _tiny_tree(tmp_path / "d")
    outside = tmp_path / "secret.png"
    Image.new("RGB", (32, 32)).save(outside)
    (root / "meta_train" / "class0" / "link.png").symlink_to(outside)
    write_filelists(root)
    with pytest.raises(UserError, match="outside the dataset root"):
        read_filelist(root, "meta_train")


@pytest.mark.parametrize("header", ["file,label", "label,filename", "", "filename,label,extra"])
def test_wrong_header_is_refused(tmp_path, header):
    root = _tiny_tree(tmp_path / "d")
    write_filelists(root)
    csv_path = root / "split" / "meta_val.csv"
    body = csv_path.read_text().split("\n", 1)[1]
    csv_path.write_text(f"{header}\n{body}")
    with pytest.raises(UserError, match="header must be 'filename,label'"):
        load_split("glyphs", root, "meta_val")


def test_missing_or_empty_filelist_is_refused(tmp_path):
    root = _tiny_tree(tmp_path / "d")
    with pytest.raises(UserError, match="purer filelist"):
        read_filelist(root, "meta_test")
    write_filelists(root)
    (root / "split" / "meta_test.csv").write_text("filename,label\n")
    with pytest.raises(UserError, match="lists no images"):
        read_filelist(root, "meta_test")


def test_missing_image_is_named(tmp_path):
    root = _tiny_tree(tmp_path / "d")
    write_filelists(root)
    gone = root / "meta_test" / "class1" / "01.png"
    gone.unlink()
    with pytest.raises(UserError, match="missing") as info:
        load_split("glyphs", root, "meta_test")
    assert str(gone) in str(info.value)


# --------------------------------------------------------------------------- episodes


def test_sample_task_shapes_labels_and_disjointness(meta_test):
    gen = torch.Generator().manual_seed(7)
    way, shot, query = 5, 3, 4
    classes, sup, qry = sample_task_indices(meta_test.by_class, way, shot, query, gen)
    assert classes.shape == (way,) and len(set(classes.tolist())) == way
    assert sup.shape == (way, shot) and qry.shape == (way, query)
    assert not set(sup.flatten().tolist()) & set(qry.flatten().tolist())
    for i, c in enumerate(classes.tolist()):
        assert (meta_test.labels[sup[i]] == c).all() and (meta_test.labels[qry[i]] == c).all()
        assert len(set(sup[i].tolist() + qry[i].tolist())) == shot + query

    task = stack_tasks(meta_test, [(classes, sup, qry)], torch.device("cpu"))
    assert task.xs.shape == (1, way * shot, 3, 32, 32) and task.xs.dtype == torch.float32
    assert task.xq.shape == (1, way * query, 3, 32, 32) and task.way == way
    assert task.ys[0].tolist() == [c for c in range(way) for _ in range(shot)]
    assert task.yq[0].tolist() == [c for c in range(way) for _ in range(query)]
    assert torch.equal(task.xs[0], meta_test.normalize(meta_test.images[sup.reshape(-1)]))


def test_same_seed_same_task_other_seed_other_task(meta_test):
    def draw(seed):
        return sample_task_indices(meta_test.by_class, 5, 1, 15, torch.Generator().manual_seed(seed))

    a, b, c = draw(3), draw(3), draw(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_fixed_tasks_depend_only_on_the_seed(meta_test):
    one = fixed_tasks(meta_test, 20, 5, 1, 15, seed=2023)
    two = fixed_tasks(meta_test, 20, 5, 1, 15, seed=2023)
    other = fixed_tasks(meta_test, 20, 5, 1, 15, seed=2024)
    assert len(one) == 20
    assert all(torch.equal(x, y) for t, u in zip(one, two, strict=True)
               for x, y in zip(t, u, strict=True))
    assert any(not torch.equal(t[1], u[1]) for t, u in zip(one, other, strict=True))
    # Successive episodes differ (the generator advances).
    assert len({tuple(t[1].flatten().tolist()) for t in one}) == 20


# --------------------------------------------------------------------------- class views


def test_class_view_splits_each_class_80_20(meta_test):
    ids = [3, 7, 1]
    tr_i, tr_y, ho_i, ho_y = class_view(meta_test, ids, holdout=0.2, seed=5)
    assert not set(tr_i.tolist()) & set(ho_i.tolist())
    assert sorted(tr_i.tolist() + ho_i.tolist()) == sorted(
        i for c in ids for i in meta_test.by_class[c].tolist())
    assert set(tr_y.tolist()) == set(ho_y.tolist()) == {0, 1, 2}
    for rel, c in enumerate(ids):
        assert (tr_y == rel).sum() == 16 and (ho_y == rel).sum() == 4
        assert (meta_test.labels[tr_i[tr_y == rel]] == c).all()
        assert (meta_test.labels[ho_i[ho_y == rel]] == c).all()
    again = class_view(meta_test, ids, holdout=0.2, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(again, (tr_i, tr_y, ho_i, ho_y), strict=True))
    other = class_view(meta_test, ids, holdout=0.2, seed=6)
    assert not torch.equal(other[2], ho_i)


def test_class_view_holds_out_at_least_one_and_needs_two(meta_test):
    _, _, ho_i, _ = class_view(meta_test, [0], holdout=0.01, seed=0)
    assert len(ho_i) == 1
    lonely = ImageSet(images=torch.zeros(3, 3, 32, 32, dtype=torch.uint8),
                      labels=torch.tensor([0, 0, 1]), classes=["a", "b"],
                      mean=(0.5,) * 3, std=(0.25,) * 3, name="toy/meta_train")
    with pytest.raises(UserError, match="'b'.*at least 2"):
        class_view(lonely, [0, 1], holdout=0.2, seed=0)
