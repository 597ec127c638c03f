"""The user's own dataset ``folder``: laid out from data/raw/folder/, its declared or computed
normalisation recorded with the filelists and used to load it, and the augmentation knobs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import new_project, write_params
from PIL import Image
from standins import write_seed_folder

from purer_mlops.config import from_dict
from purer_mlops.config.knobs import ConfigError
from purer_mlops.config.loading import load_params
from purer_mlops.data.dataset import load_split
from purer_mlops.errors import UserError
from purer_mlops.paths import Project
from purer_mlops.stages.filelists import filelist
from purer_mlops.stages.prepare import prepare
from purer_mlops.teachers.augment import augmentation_knobs, augmentation_of


def folder_project(tmp_path: Path) -> Project:
    """A project whose data/raw/folder/ holds a tiny dataset in the seed's layout (4 classes of 6 images)."""
    write_seed_folder(tmp_path / "data" / "raw" / "folder", ".png", classes=4, images=6)
    return Project(tmp_path)


def test_folder_is_laid_out_and_its_normalisation_computed_and_used(tmp_path: Path) -> None:
    project = folder_project(tmp_path)
    params = from_dict({"dataset": "folder", "folder": {"image_size": 16}})
    prepare(params, project, progress=False)
    filelist(params, project)
    record = json.loads((project.dataset("folder") / "split" / "normalisation.json").read_text())
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB").resize((16, 16), Image.BILINEAR))
                       for p in sorted((project.dataset("folder") / "meta_train").glob("*/*.png"))]) / 255.0
    assert record["image_size"] == 16 and record["computed"] == ["mean", "std"]
    assert np.allclose(record["mean"], pixels.mean((0, 1, 2)), atol=1e-5)
    # the stand-in's meta-train red channel is constant: a floor keeps its std from dividing by zero
    assert np.allclose(record["std"], np.maximum(pixels.std((0, 1, 2)), 1e-3), atol=1e-5)
    train = load_split("folder", project.dataset("folder"), "meta_train")
    assert train.image_size == 16 and list(train.mean) == record["mean"] and list(train.std) == record["std"]
    assert len(train.classes) == 4 and len(train.labels) == 24

    declared = params.replace(**{"folder.mean": [0.5, 0.4, 0.3], "folder.std": [0.2, 0.2, 0.2]})
    filelist(declared, project)
    test = load_split("folder", project.dataset("folder"), "meta_test")
    assert (test.mean, test.std, test.image_size) == ((0.5, 0.4, 0.3), (0.2, 0.2, 0.2), 16)


def test_folder_needs_its_raw_data_and_a_valid_declaration(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"data/raw/folder not found: put .* then `dvc add .*data/raw/folder`"):
        prepare(from_dict({"dataset": "folder"}), Project(tmp_path), progress=False)
    with pytest.raises(ConfigError, match="'folder.std' must be empty .* three numbers > 0"):
        from_dict({"folder": {"std": [0.2, 0.0, 0.2]}})
    with pytest.raises(ConfigError, match="'folder.mean'"):
        from_dict({"folder": {"mean": [0.5, 0.5]}})
    with pytest.raises(UserError, match="normalisation.json not found: run `dvc repro filelist`"):
        load_split("folder", tmp_path / "data" / "folder", "meta_train")


def test_augmentation_knobs_default_to_the_dataset_and_override_it(tmp_path: Path) -> None:
    def of(dataset: str, **augment: object) -> tuple[int, bool, bool]:
        return augmentation_of(dataset, from_dict({"augment": augment, "folder": {"image_size": 64}}))

    assert of("glyphs") == (4, False, True) and of("cifar100") == (4, True, False) and of("cub") == (8, True, False)
    assert of("folder") == (8, False, False)  # nothing assumed of one's own images but crops of 1/8 of the side
    assert of("glyphs", flip="on", recolour="off", crop_pad=0) == (0, True, False)
    assert of("cifar100", flip="off", recolour="on") == (4, False, True)
    # YAML reads a bare on / off, as `-S augment.flip=on` writes it, as a boolean
    new_project(tmp_path)
    params = load_params(write_params(tmp_path, {"augment.flip": True, "augment.recolour": False}))
    assert (params.augment.flip, params.augment.recolour) == ("on", "off")
    (tmp_path / "params.yaml").write_text((tmp_path / "params.yaml").read_text().replace("flip: true", "flip: on"))
    assert load_params(tmp_path / "params.yaml").augment.flip == "on"
    text = augmentation_knobs("glyphs", from_dict({}))
    assert text == "augment.flip=off, augment.recolour=on, augment.crop_pad=4"


def write_coloured_folder(raw: Path, own_colour: bool, classes: int = 4, images: int = 8) -> None:
    """A seed-layout folder of 16-pixel images, a square whose size is the class: drawn in the class's
    own colour (``own_colour``) or in a random colour per image (colour carries no class)."""
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (classes, 3))
    for split in ("meta_train", "meta_val", "meta_test"):
        for c in range(classes):
            folder = raw / split / f"{split}_class{c}"  # each class in one split
            folder.mkdir(parents=True)
            for i in range(images):
                colour = palette[c] if own_colour else rng.integers(0, 256, 3)
                pixels = np.full((16, 16, 3), 255, dtype=np.uint8)
                pixels[2:5 + 3 * c, 2:5 + 3 * c] = colour
                Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.mark.parametrize("own_colour", [False, True])
def test_recolouring_follows_whether_the_folders_colours_carry_the_class(tmp_path: Path, own_colour: bool) -> None:
    write_coloured_folder(tmp_path / "data" / "raw" / "folder", own_colour)
    project, params = Project(tmp_path), from_dict({"dataset": "folder", "folder": {"image_size": 16}})
    prepare(params, project, progress=False)
    filelist(params, project)
    record = json.loads((project.dataset("folder") / "split" / "normalisation.json").read_text())
    assert (record["colour_f"] > 20) if own_colour else (record["colour_f"] < 2)
    train = load_split("folder", project.dataset("folder"), "meta_train")
    assert record["recolour"] is train.recolour is (not own_colour)
    assert augmentation_of("folder", params, train.recolour)[2] is (not own_colour)  # augment.recolour: auto
    forced = params.replace(**{"augment.recolour": "on" if own_colour else "off"})
    assert augmentation_of("folder", forced, train.recolour)[2] is own_colour  # the knob overrides the data
