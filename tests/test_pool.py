"""Tests for the stored teacher pool (save, load, safety checks) and the checkpoint importer."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors
from standins import make_class_tree

from purer_mlops.data.registry import DATASETS
from purer_mlops.errors import UserError
from purer_mlops.models.backbones import build_backbone
from purer_mlops.models.pool_storage import TeacherRecord, load_pool, model_from_state_dict, save_pool
from purer_mlops.teachers.importer import import_pool

CLASSES = ("a", "b", "c", "d", "e")


def record(arch: str = "conv4", size: int = 32) -> TeacherRecord:
    info = DATASETS["glyphs"]
    return TeacherRecord(arch=arch, dataset="glyphs", image_size=size, mean=info.mean, std=info.std,
                         classes=CLASSES, class_ids=(0, 1, 2, 3, 4), accuracy=87.5)


def trained_model(arch: str, seed: int = 0, size: int = 32) -> torch.nn.Module:
    """A model whose BatchNorm running statistics are not the defaults (a few train-mode passes)."""
    torch.manual_seed(seed)
    model = build_backbone(arch, len(CLASSES), size)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, size, size) * 2 + 1)
    return model.eval()


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    folder = tmp_path / "pool"
    save_pool(folder, [(record(), trained_model("conv4"))])
    return folder


def edit_pool_json(folder: Path, **changes) -> None:
    doc = json.loads((folder / "pool.json").read_text())
    doc["teachers"][0].update(changes)
    (folder / "pool.json").write_text(json.dumps(doc))


def rewrite_weights(folder: Path, data: bytes, name: str = "teacher_000.safetensors") -> None:
    """Replace a weights file and record its new hash, so only the later checks can object."""
    (folder / name).write_bytes(data)
    edit_pool_json(folder, file=name, sha256=hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize(("arch", "size"), [("conv4", 32), ("resnet10", 16)])
def test_save_load_gives_identical_logits(tmp_path: Path, arch: str, size: int) -> None:
    model = trained_model(arch, size=size)
    stored = save_pool(tmp_path / "pool", [(record(arch, size), model),
                                           (record(arch, size), trained_model(arch, 1, size))])
    assert [r.name for r in stored] == ["teacher_000", "teacher_001"]
    loaded = load_pool(tmp_path / "pool")
    assert [r for r, _ in loaded] == stored
    rec, twin = loaded[0]
    assert rec.accuracy == 87.5 and rec.classes == CLASSES and not twin.training
    x = torch.randn(6, 3, size, size)
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))
    bn = [k for k in model.state_dict() if k.endswith("running_var")]
    assert bn and all(torch.equal(model.state_dict()[k], twin.state_dict()[k]) for k in bn)
    assert not torch.equal(model.state_dict()[bn[0]], torch.ones_like(model.state_dict()[bn[0]]))


def test_tampered_file_is_refused(pool: Path) -> None:
    path = pool / "teacher_000.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="SHA-256"):
        load_pool(pool)


def test_truncated_safetensors_is_refused(pool: Path) -> None:
    data = (pool / "teacher_000.safetensors").read_bytes()
    rewrite_weights(pool, data[: len(data) // 2])
    with pytest.raises(UserError, match="not a valid safetensors"):
        load_pool(pool)


def test_wrong_tensor_shape_is_named(pool: Path) -> None:
    state = trained_model("conv4").state_dict()
    state["head.weight"] = torch.zeros(6, 128)
    rewrite_weights(pool, save_safetensors({k: v.contiguous() for k, v in state.items()}))
    with pytest.raises(UserError, match=r"'head.weight' has shape \(6, 128\).*expects \(5, 128\)"):
        load_pool(pool)


def test_missing_and_unexpected_tensors_are_named() -> None:
    state = dict(trained_model("conv4").state_dict())
    del state["features.body.1.running_mean"]
    with pytest.raises(UserError, match="'features.body.1.running_mean' is missing"):
        model_from_state_dict(state, "conv4", 5, 32, "x")
    state = dict(trained_model("conv4").state_dict(), extra=torch.zeros(2))
    with pytest.raises(UserError, match="unexpected tensor 'extra'"):
        model_from_state_dict(state, "conv4", 5, 32, "x")
    # the same weights do not fit a resnet
    with pytest.raises(UserError, match="missing"):
        model_from_state_dict(trained_model("conv4").state_dict(), "resnet10", 5, 32, "x")


@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/outside.safetensors",
                                  "sub/../../x"])
def test_paths_outside_the_folder_are_refused(pool: Path, name: str) -> None:
    outside = pool.parent / "outside.safetensors"
    outside.write_bytes((pool / "teacher_000.safetensors").read_bytes())
    edit_pool_json(pool, file=name)
    with pytest.raises(UserError, match="inside"):
        load_pool(pool)


def test_symlink_out_of_the_folder_is_refused(pool: Path) -> None:
    outside = pool.parent / "outside.safetensors"
    outside.write_bytes((pool / "teacher_000.safetensors").read_bytes())
    os.symlink(outside, pool / "link.safetensors")
    edit_pool_json(pool, file="link.safetensors")
    with pytest.raises(UserError, match="points outside"):
        load_pool(pool)


def test_missing_weights_and_bad_pool_json_are_refused(pool: Path, tmp_path: Path) -> None:
    (pool / "teacher_000.safetensors").unlink()
    with pytest.raises(UserError, match="missing"):
        load_pool(pool)
    with pytest.raises(UserError, match="pool.json not found"):
        load_pool(tmp_path / "nowhere")
    (pool / "pool.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_pool(pool)
    (pool / "pool.json").write_text(json.dumps({"format": "purer-teacher-pool", "version": 1,
                                                "teachers": [{"arch": "conv4"}]}))
    with pytest.raises(UserError, match="field 'classes' is missing"):
        load_pool(pool)


def test_failed_save_keeps_the_previous_pool(pool: Path) -> None:
    before = (pool / "pool.json").read_bytes()
    with pytest.raises(UserError, match="head.weight"):
        save_pool(pool, [(record(), trained_model("conv4")),
                         (record(), build_backbone("conv4", 7, 32))])
    assert (pool / "pool.json").read_bytes() == before
    assert len(load_pool(pool)) == 1
    assert not [p for p in pool.parent.iterdir() if p.name.startswith(".pool.")]


# --- importer ------------------------------------------------------------------------------


class Payload:
    """Unpickling this creates ``target``: stands for any code a malicious checkpoint could run."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


def write_manifest(path: Path, teachers: list[dict]) -> Path:
    path.write_text(json.dumps({"teachers": teachers}))
    return path


def entry(file: str, **extra) -> dict:
    return {"file": file, "arch": "conv4", "dataset": "glyphs", "classes": list(CLASSES),
            "class_ids": [0, 1, 2, 3, 4], **extra}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_import_refuses_malicious_pickle_without_running_it(tmp_path: Path, writer: str) -> None:
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(Payload(proof)))  # the payload is live: plain unpickling runs it
    assert proof.exists()

    target = tmp_path / "pwned"
    src = tmp_path / "src"
    src.mkdir()
    state = {**trained_model("conv4").state_dict(), "evil": Payload(target)}
    if writer == "torch.save":
        torch.save(state, src / "t.pt")
    else:
        with open(src / "t.pt", "wb") as f:
            pickle.dump(state, f)
    manifest = write_manifest(tmp_path / "m.json", [entry("t.pt")])
    with pytest.raises(UserError, match="not a plain PyTorch state dict.*Unsupported"):
        import_pool(src, manifest, tmp_path / "out", root=tmp_path)
    assert not target.exists()
    assert not (tmp_path / "out").exists()


def test_import_names_the_tensor_that_does_not_fit(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    state = trained_model("conv4").state_dict()
    state["features.body.4.weight"] = torch.zeros(32, 16, 3, 3)
    torch.save(state, src / "t.pth")
    manifest = write_manifest(tmp_path / "m.json", [entry("t.pth")])
    with pytest.raises(UserError, match=r"'features.body.4.weight' has shape \(32, 16, 3, 3\).*"
                                        r"expects \(32, 32, 3, 3\)"):
        import_pool(src, manifest, tmp_path / "out", root=tmp_path)


def test_import_refuses_file_outside_source(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    torch.save(trained_model("conv4").state_dict(), tmp_path / "t.pt")
    manifest = write_manifest(tmp_path / "m.json", [entry("../t.pt")])
    with pytest.raises(UserError, match="inside"):
        import_pool(src, manifest, tmp_path / "out", root=tmp_path)


def test_import_good_checkpoint_resolves_class_ids_and_loads(tmp_path: Path) -> None:
    make_class_tree(tmp_path / "data" / "glyphs", ["x", "e", "c", "a", "b", "d", "f"])
    src = tmp_path / "src"
    src.mkdir()
    model = trained_model("conv4")
    # as a DataParallel training script would save it
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": wrapped, "epoch": 3}, src / "t.pt")
    manifest = tmp_path / "m.yaml"
    manifest.write_text("teachers:\n  - file: t.pt\n    arch: conv4\n    dataset: glyphs\n"
                        "    classes: [e, a, d, b, c]\n")
    records = import_pool(src, manifest, tmp_path / "out", root=tmp_path)
    assert records[0].class_ids == (4, 0, 3, 1, 2)  # sorted: a b c d e f x
    assert records[0].accuracy is None and records[0].image_size == 32
    (rec, twin), = load_pool(tmp_path / "out")
    assert rec == records[0]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))


def test_import_needs_class_ids_without_dataset(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    torch.save(trained_model("conv4").state_dict(), src / "t.pt")
    bare = {k: v for k, v in entry("t.pt").items() if k != "class_ids"}
    manifest = tmp_path / "m.json"
    with pytest.raises(UserError, match="give 'class_ids'"):
        import_pool(src, write_manifest(manifest, [bare]), tmp_path / "out", root=tmp_path)
    records = import_pool(src, write_manifest(manifest, [entry("t.pt")]), tmp_path / "out",
                          root=tmp_path)
    assert records[0].class_ids == (0, 1, 2, 3, 4)


@pytest.mark.parametrize("change, words", [
    ({"std": [0, 0, 0]}, ["std must be 3 finite numbers above 0", "[0.0, 0.0, 0.0]"]),
    ({"mean": [0.5, float("nan"), 0.5]}, ["mean must be 3 finite numbers"]),
    ({"std": [0.2, 0.2]}, ["'std' must be a list of 3 numbers"]),
    ({"image_size": 100000}, ["image_size must be from 1 to 512", "100000"]),
])
def test_a_hand_edited_record_is_refused_on_load(pool: Path, change: dict, words: list[str]) -> None:
    edit_pool_json(pool, **change)  # the weights' hash still matches: only the record's fields can object
    with pytest.raises(UserError) as info:
        load_pool(pool)
    assert all(w in str(info.value) for w in words) and "teacher" in str(info.value)
