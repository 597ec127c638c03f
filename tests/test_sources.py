"""Tests for preparing the seed's real datasets, on tiny inputs in their real formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from standins import cifar_parts, save_image, split_json, write_cifar_archive, write_flowers

from purer_mlops.data.registry import SPLITS
from purer_mlops.data.sources import prepare
from purer_mlops.errors import UserError


def listing(out: Path) -> dict[str, dict[str, list[str]]]:
    """``{split: {class: [file names]}}`` of a prepared folder."""
    return {
        split: {c.name: sorted(f.name for f in c.iterdir()) for c in (out / split).iterdir()}
        for split in SPLITS
    }


def assert_no_output(out: Path) -> None:
    """Neither the output folder nor a leftover temporary sibling exists."""
    assert not out.exists()
    if out.parent.exists():
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# --- CIFAR-100 python archive -------------------------------------------------------------


def test_cifar_archive_is_split_by_cifar_fs_classes(tmp_path):
    names, train, test = cifar_parts()
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_cifar_archive(raw / "cifar-100-python.tar.gz", names, train, test)

    summary = prepare("cifar100", raw, out, progress=False)

    split = split_json("cifar_fs_split.json")
    assert summary == {
        "classes": {"meta_train": 64, "meta_val": 16, "meta_test": 20},
        "images": {"meta_train": 128, "meta_val": 32, "meta_test": 40},
    }
    layout = listing(out)
    for s in SPLITS:
        assert sorted(layout[s]) == sorted(split[s])
        assert all(f == ["0.png", "1.png"] for f in layout[s].values())
    # One sample: the class's training image comes first, the test image second.
    cls = split["meta_val"][3]
    label = names.index(cls)
    for index, part in enumerate((train, test)):
        row = part[b"data"][part[b"fine_labels"].index(label)]
        with Image.open(out / "meta_val" / cls / f"{index}.png") as img:
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (32, 32)
            pixels = np.asarray(img)
        assert np.array_equal(pixels, row.reshape(3, 32, 32).transpose(1, 2, 0))


def test_cifar_folder_is_preferred_to_the_archive(tmp_path):
    names, train, test = cifar_parts()
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_cifar_archive(raw / "cifar-100-python.tar.gz", names, train, test)
    for split in ("meta_train", "mete_val", "meta_test"):
        save_image(raw / "cifar100" / split / f"{split}_cls" / "7.png", (1, 2, 3))

    summary = prepare("cifar100", raw, out, progress=False)

    assert summary["classes"] == {"meta_train": 1, "meta_val": 1, "meta_test": 1}
    assert listing(out)["meta_val"] == {"mete_val_cls": ["7.png"]}


def test_archive_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    names, train, test = cifar_parts()
    train[b"extra"] = Evil()
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_cifar_archive(raw / "cifar-100-python.tar.gz", names, train, test)

    with pytest.raises(UserError, match="not a valid CIFAR-100 pickle"):
        prepare("cifar100", raw, out, progress=False)
    assert not marker.exists()
    assert_no_output(out)


def test_truncated_or_garbage_archive_is_a_user_error(tmp_path):
    names, train, test = cifar_parts()
    raw, out = tmp_path / "raw", tmp_path / "out"
    archive = raw / "cifar-100-python.tar.gz"
    write_cifar_archive(archive, names, train, test)
    whole = archive.read_bytes()
    for broken in (whole[: len(whole) // 2], b"not a gzip file at all"):
        archive.write_bytes(broken)
        with pytest.raises(UserError, match="corrupt or truncated"):
            prepare("cifar100", raw, out, progress=False)
        assert_no_output(out)


def test_archive_lacking_a_split_class_is_a_user_error(tmp_path):
    names, train, test = cifar_parts()
    missing = split_json("cifar_fs_split.json")["meta_test"][0]
    names[names.index(missing)] = "not_a_cifar_class"
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_cifar_archive(raw / "cifar-100-python.tar.gz", names, train, test)

    with pytest.raises(UserError, match=missing):
        prepare("cifar100", raw, out, progress=False)
    assert_no_output(out)


def test_failed_prepare_keeps_the_previous_output(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    (raw / "cifar-100-python.tar.gz").parent.mkdir()
    (raw / "cifar-100-python.tar.gz").write_bytes(b"\x1f\x8b garbage")
    (out / "meta_train" / "old").mkdir(parents=True)
    (out / "meta_train" / "old" / "0.png").write_bytes(b"previous")

    with pytest.raises(UserError):
        prepare("cifar100", raw, out, progress=False)
    assert (out / "meta_train" / "old" / "0.png").read_bytes() == b"previous"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# --- the seed's folder form -------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "prefix", "suffix"),
    [
        ("cifar100", "meta_", ".png"),
        ("cifar100", "mete_", ".png"),
        ("miniimagenet", "meta_", ".jpg"),
    ],
)
def test_seed_folder_is_copied_as_is(tmp_path, dataset, prefix, suffix):
    raw, out = tmp_path / "raw", tmp_path / "out"
    for s, split in enumerate(SPLITS):
        for c in range(2):
            for i in range(3):
                save_image(raw / dataset / f"{prefix}{split[5:]}" / f"n{s}{c}" / f"{i}{suffix}",
                           (s * 80, c * 80, i * 80))
    # Clutter a user's copy may carry: none of it is an image.
    (raw / dataset / f"{prefix}train" / "n00" / ".DS_Store").write_bytes(b"x")
    (raw / dataset / f"{prefix}train" / "n00" / "notes.txt").write_text("x")
    (raw / dataset / f"{prefix}train" / "n00" / "._0.jpg").write_bytes(b"x")
    (raw / dataset / f"{prefix}train" / "Thumbs.db").write_bytes(b"x")

    summary = prepare(dataset, raw, out, progress=False)

    assert summary == {"classes": dict.fromkeys(SPLITS, 2), "images": dict.fromkeys(SPLITS, 6)}
    names = [f"{i}{suffix}" for i in range(3)]
    assert listing(out) == {
        split: {f"n{s}0": names, f"n{s}1": names} for s, split in enumerate(SPLITS)
    }
    source = raw / dataset / f"{prefix}test" / "n21" / f"2{suffix}"
    assert (out / "meta_test" / "n21" / f"2{suffix}").read_bytes() == source.read_bytes()


def test_prepare_replaces_a_previous_output(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    for split in SPLITS:
        save_image(raw / "miniimagenet" / split / f"{split}_n1" / "a.jpg", (9, 9, 9))
    (out / "meta_train" / "stale").mkdir(parents=True)

    prepare("miniimagenet", raw, out, progress=False)

    assert listing(out)["meta_train"] == {"meta_train_n1": ["a.jpg"]}


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "is empty"), ({".DS_Store": b"x", "a.txt": b"x"}, "holds no image"),
     ({"a.jpg": b""}, r"0 bytes")],
)
def test_bad_class_folder_is_a_user_error(tmp_path, content, message):
    raw, out = tmp_path / "raw", tmp_path / "out"
    for split in SPLITS:
        save_image(raw / "miniimagenet" / split / f"good_{split}" / "a.jpg", (1, 1, 1))
    bad = raw / "miniimagenet" / "meta_val" / "bad"
    bad.mkdir()
    for name, data in (content or {}).items():
        (bad / name).write_bytes(data)

    with pytest.raises(UserError, match=message):
        prepare("miniimagenet", raw, out, progress=False)
    assert_no_output(out)


def test_seed_folder_without_a_split_is_a_user_error(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    save_image(raw / "miniimagenet" / "meta_train" / "n1" / "a.jpg", (1, 1, 1))
    with pytest.raises(UserError, match="no meta_val/ folder"):
        prepare("miniimagenet", raw, out, progress=False)
    assert_no_output(out)


def test_class_in_two_splits_is_a_user_error(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    for split in SPLITS:
        save_image(raw / "cifar100" / split / "same" / "0.png", (1, 1, 1))
    with pytest.raises(UserError, match="'same' is in both"):
        prepare("cifar100", raw, out, progress=False)
    assert_no_output(out)


# --- CUB and Flowers --------------------------------------------------------------------


def test_cub_classes_are_split_by_sorted_index(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    classes = [f"{i:03d}.Bird_{chr(65 + i)}" for i in range(1, 9)]
    for i, name in reversed(list(enumerate(classes))):  # creation order must not matter
        for k in range(2):
            save_image(raw / "CUB_200_2011" / "images" / name / f"{name}_{k}.jpg", (i, k, 0))

    summary = prepare("cub", raw, out, progress=False)

    assert summary["classes"] == {"meta_train": 4, "meta_val": 2, "meta_test": 2}
    assert summary["images"] == {"meta_train": 8, "meta_val": 4, "meta_test": 4}
    layout = listing(out)
    assert sorted(layout["meta_train"]) == [classes[i] for i in (0, 2, 4, 6)]
    assert sorted(layout["meta_val"]) == [classes[i] for i in (1, 5)]
    assert sorted(layout["meta_test"]) == [classes[i] for i in (3, 7)]


def test_flowers_are_split_by_class_id(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    labels = np.random.default_rng(0).permutation(np.arange(1, 103)).astype(np.uint8)
    write_flowers(raw, labels)

    summary = prepare("flower", raw, out, progress=False)

    assert summary["classes"] == {"meta_train": 71, "meta_val": 15, "meta_test": 16}
    split = split_json("flower_split.json")
    layout = listing(out)
    for s in SPLITS:
        assert sorted(layout[s]) == sorted(f"class_{c:03d}" for c in split[s])
    # Image k (1-based) lands in the folder of labels[k - 1].
    k = 37
    s = next(s for s in SPLITS if labels[k - 1] in split[s])
    copied = out / s / f"class_{labels[k - 1]:03d}" / f"image_{k:05d}.jpg"
    assert copied.read_bytes() == (raw / "flower" / "jpg" / f"image_{k:05d}.jpg").read_bytes()


def test_flowers_missing_image_or_class_is_a_user_error(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    labels = np.arange(1, 103, dtype=np.uint8)
    write_flowers(raw, labels)
    (raw / "flower" / "jpg" / "image_00050.jpg").unlink()
    with pytest.raises(UserError, match="image_00050.jpg not found"):
        prepare("flower", raw, out, progress=False)
    assert_no_output(out)

    write_flowers(raw, np.where(labels == 7, 8, labels).astype(np.uint8))
    with pytest.raises(UserError, match=r"class id\(s\) \[7\]"):
        prepare("flower", raw, out, progress=False)
    assert_no_output(out)


# --- missing raw data and bad names -----------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        ("cifar100", "cifar-100-python.tar.gz"),
        ("miniimagenet", "miniimagenet"),
        ("cub", "CUB_200_2011/images"),
        ("flower", "flower/jpg"),
    ],
)
def test_missing_raw_data_names_the_expected_path(tmp_path, dataset, expected):
    raw, out = tmp_path / "raw", tmp_path / "out"
    with pytest.raises(UserError) as err:
        prepare(dataset, raw, out, progress=False)
    assert str(raw / expected) in str(err.value)
    assert "dvc add" in str(err.value)
    assert_no_output(out)


def test_missing_flower_labels_names_the_expected_path(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    save_image(raw / "flower" / "jpg" / "image_00001.jpg", (1, 1, 1))
    with pytest.raises(UserError, match="imagelabels.mat"):
        prepare("flower", raw, out, progress=False)
    assert_no_output(out)


def test_unknown_dataset_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown dataset 'imagenet'"):
        prepare("imagenet", tmp_path, tmp_path / "out", progress=False)
    assert_no_output(tmp_path / "out")


def test_output_over_the_raw_data_is_refused(tmp_path):
    raw = tmp_path / "raw"
    for split in SPLITS:
        save_image(raw / "miniimagenet" / split / f"{split}_n1" / "a.jpg", (1, 1, 1))
    with pytest.raises(UserError, match="contains the input"):
        prepare("miniimagenet", raw, tmp_path, progress=False)
    assert (raw / "miniimagenet" / "meta_train" / "meta_train_n1" / "a.jpg").is_file()
