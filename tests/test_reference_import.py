"""Importing teachers saved by the PURER reference code (its ``pretrain.py``: ``model_<i>.pth``).

The reference networks are re-built here from their published layout (``network.py`` of the
authors' repository): module trees whose ``state_dict()`` gives exactly the reference's tensor
names, and whose forward is the reference's. Imported teachers must give their logits.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import run_purer
from standins import make_class_tree
from torch import nn
from torch.nn import functional as F

from purer_mlops.errors import UserError
from purer_mlops.models.pool_storage import load_pool
from purer_mlops.teachers.importer import import_pool

# --------------------------------------------------------------------------- the reference layout


class RefNet(nn.Module):
    """The reference's ConvNet / ResNet: every layer in one Sequential named ``trunk``."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.trunk = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


class RefConvBlock(nn.Module):
    """The reference's ConvBlock: conv and BN as attributes ``C``, ``BN`` and again in ``trunk``."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.C = nn.Conv2d(in_ch, 32, 3, padding=1)
        self.BN = nn.BatchNorm2d(32)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.trunk = nn.Sequential(self.C, self.BN, self.relu, self.pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


class RefSimpleBlock(nn.Module):
    """The reference's (CloserLook) SimpleBlock: C1, BN1, C2, BN2, and a 1×1 shortcut on width change."""

    def __init__(self, in_ch: int, out_ch: int, half_res: bool):
        super().__init__()
        stride = 2 if half_res else 1
        self.C1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.BN1 = nn.BatchNorm2d(out_ch)
        self.C2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.BN2 = nn.BatchNorm2d(out_ch)
        self.identity = in_ch == out_ch
        if not self.identity:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)
            self.BNshortcut = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.BN2(self.C2(F.relu(self.BN1(self.C1(x)))))
        return F.relu(out + (x if self.identity else self.BNshortcut(self.shortcut(x))))


def reference_net(arch: str, way: int, size: int = 32, seed: int = 0) -> RefNet:
    """A reference-layout teacher in eval mode, with random non-default BatchNorm state."""
    torch.manual_seed(seed)
    if arch == "conv4":
        side = size >> 4
        layers = [RefConvBlock(3 if b == 0 else 32) for b in range(4)]
        layers += [nn.Flatten(), nn.Linear(32 * side * side, way)]
    else:
        per_stage = {"resnet10": 1, "resnet18": 2}[arch]
        layers, in_ch = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)], 64
        for i, width in enumerate((64, 128, 256, 512)):
            for j in range(per_stage):
                layers.append(RefSimpleBlock(in_ch, width, half_res=i >= 1 and j == 0))
                in_ch = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, way)]
    net = RefNet(layers)
    with torch.no_grad():
        for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.2)
            bn.running_mean.normal_(0, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
        net.trunk[-1].weight.normal_(0, 1)  # logits of a trained teacher's size, not default-init's
    return net.eval()


def save_reference(net: RefNet, path: Path) -> None:
    """As the reference's pretrain.py does: ``torch.save(teacher.state_dict(), path)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)


def assert_same_logits(ref: RefNet, ours: nn.Module, size: int = 32, rows: int | None = None) -> None:
    x = torch.randn(6, 3, size, size)
    with torch.no_grad():
        expected, found = ref(x)[:, :rows], ours(x)
    assert expected.std() > 0.1  # not a degenerate network
    assert found.shape == expected.shape
    assert (found - expected).abs().max().item() <= 1e-5


def manifest(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc))
    return path


def entry(arch: str, file: str = "model_0.pth") -> dict:
    return {"file": file, "arch": arch, "dataset": "cifar100", "classes": list("abcde"),
            "class_ids": [0, 1, 2, 3, 4]}


# --------------------------------------------------------------------------- tests


def test_the_rebuilt_layouts_have_the_reference_tensor_names():
    conv4 = reference_net("conv4", 5).state_dict()
    assert len(conv4) == 4 * 2 * 7 + 2  # (conv 2 + BN 5 tensors) twice per block, + head
    assert {"trunk.0.C.weight", "trunk.0.trunk.0.weight", "trunk.3.BN.running_var",
            "trunk.3.trunk.1.running_var", "trunk.5.weight", "trunk.5.bias"} <= set(conv4)
    assert conv4["trunk.2.C.bias"].data_ptr() == conv4["trunk.2.trunk.0.bias"].data_ptr()
    resnet18 = reference_net("resnet18", 5).state_dict()
    assert {"trunk.0.weight", "trunk.1.running_mean", "trunk.2.C1.weight", "trunk.3.BN2.bias",
            "trunk.4.shortcut.weight", "trunk.4.BNshortcut.running_var", "trunk.12.weight"} <= set(resnet18)
    assert "trunk.2.shortcut.weight" not in resnet18  # 64 → 64: identity shortcut


@pytest.mark.parametrize("arch", ["conv4", "resnet10", "resnet18"])
def test_reference_checkpoint_imports_with_its_logits(tmp_path, arch):
    ref = reference_net(arch, 5)
    save_reference(ref, tmp_path / "src" / "model_0.pth")
    records = import_pool(tmp_path / "src", manifest(tmp_path / "m.json", [entry(arch)]),
                          tmp_path / "pool", root=tmp_path)
    assert [r.arch for r in records] == [arch]
    (_, ours), = load_pool(tmp_path / "pool")
    assert_same_logits(ref, ours)


def test_reference_folder_imports_without_a_manifest(tmp_path):
    """The SS scenario: model_<i>.pth is the teacher of block i of the sorted meta_train classes."""
    names = [f"class_{k:02d}" for k in range(12)]
    make_class_tree(tmp_path / "data" / "cifar100", names)
    nets = [reference_net(arch, 5, seed=i) for i, arch in enumerate(["conv4", "resnet10", "conv4"])]
    for i, net in enumerate(nets):
        save_reference(net, tmp_path / "src" / f"model_{i}.pth")

    proc = run_purer(tmp_path, "teachers", "import", "src", "--dataset", "cifar100")

    assert proc.returncode == 0, proc.stderr
    assert "imported 3 teachers into models/teachers" in proc.stdout
    pool = load_pool(tmp_path / "models" / "teachers")
    assert [r.arch for r, _ in pool] == ["conv4", "resnet10", "conv4"]
    assert [r.classes for r, _ in pool] == [tuple(names[0:5]), tuple(names[5:10]), tuple(names[10:12])]
    assert [r.class_ids for r, _ in pool] == [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9), (10, 11)]
    assert all(r.dataset == "cifar100" and r.image_size == 32 and r.accuracy is None for r, _ in pool)
    for net, (rec, ours) in zip(nets, pool, strict=True):
        # the last block has 2 classes behind the reference's 5 logits: the untrained 3 are dropped
        assert_same_logits(net, ours, rows=rec.num_classes)


def test_short_manifest_gives_the_reference_class_order(tmp_path):
    names = [f"n{k}" for k in range(7)]
    make_class_tree(tmp_path / "data" / "cifar100", names)
    for i in range(2):
        save_reference(reference_net("conv4", 5, seed=i), tmp_path / "src" / f"model_{i}.pth")
    order = ["n6", "n0", "n5", "n1", "n4", "n2", "n3"]
    short = tmp_path / "m.yaml"
    short.write_text(f"dataset: cifar100\nclass_order: [{', '.join(order)}]\n")

    records = import_pool(tmp_path / "src", short, tmp_path / "pool", root=tmp_path)

    assert [r.classes for r in records] == [tuple(order[:5]), tuple(order[5:])]
    assert [r.class_ids for r in records] == [(6, 0, 5, 1, 4), (2, 3)]


def corrupt(state: dict, how: str) -> dict:
    """A reference conv4 state dict spoiled in one way."""
    state = dict(state)
    if how == "missing":
        del state["trunk.2.trunk.1.running_var"]
    elif how == "extra":
        state["trunk.6.weight"] = torch.zeros(5, 32)
    elif how == "copies differ":
        state["trunk.1.C.weight"] = state["trunk.1.C.weight"] + 1
    elif how == "mixed":
        state["features.body.0.weight"] = state.pop("trunk.0.C.weight")
    elif how == "unknown":
        state = {f"layer{i}.weight": v for i, v in enumerate(state.values())}
    return state


@pytest.mark.parametrize(("how", "message"), [
    ("missing", r"1 tensor\(s\) are missing: 'trunk.2.trunk.1.running_var'"),
    ("extra", r"do not belong to it: 'trunk.6.weight'"),
    ("copies differ", r"ambiguous: 'trunk.1.C.weight' and 'trunk.1.trunk.0.weight'"),
    ("mixed", r"ambiguous layout: it mixes our tensor names \('features.body.0.weight'\)"),
    ("unknown", r"unknown layout: .*'layer0.weight'"),
])
@pytest.mark.parametrize("mode", ["manifest", "folder"])
def test_a_spoilt_reference_checkpoint_is_refused_naming_the_keys(tmp_path, how, message, mode):
    make_class_tree(tmp_path / "data" / "cifar100", list("abcde"))
    (tmp_path / "src").mkdir()
    torch.save(corrupt(reference_net("conv4", 5).state_dict(), how), tmp_path / "src" / "model_0.pth")
    doc = [entry("conv4")] if mode == "manifest" else {"dataset": "cifar100"}
    with pytest.raises(UserError, match=message):
        import_pool(tmp_path / "src", manifest(tmp_path / "m.json", doc), tmp_path / "pool", root=tmp_path)
    assert not (tmp_path / "pool").exists()


def test_reference_resnet_of_another_depth_or_arch_is_refused(tmp_path):
    state = reference_net("resnet10", 5).state_dict()
    (tmp_path / "src").mkdir()
    torch.save(state, tmp_path / "src" / "model_0.pth")
    with pytest.raises(UserError, match="reference-code resnet10 checkpoint, but 'arch' says resnet18"):
        import_pool(tmp_path / "src", manifest(tmp_path / "m.json", [entry("resnet18")]), tmp_path / "pool")
    three_blocks = {k: v for k, v in state.items() if not k.startswith("trunk.5.")}
    torch.save(three_blocks, tmp_path / "src" / "model_0.pth")
    with pytest.raises(UserError, match=r"reference ResNet with 3 basic blocks \(trunk.2..4\)"):
        import_pool(tmp_path / "src", manifest(tmp_path / "m.json", [entry("resnet10")]), tmp_path / "pool")


@pytest.mark.parametrize(("files", "classes", "message"), [
    ([0, 2], 10, "model_1.pth is missing"),
    ([0, 1], 12, "holds 2 teachers of 5 classes, but the reference's blocks of the 12 meta_train classes "
                 "of cifar100 make 3"),
    ([], 5, "holds no model_<i>.pth"),
])
def test_reference_folder_that_is_not_one_pool_is_refused(tmp_path, files, classes, message):
    make_class_tree(tmp_path / "data" / "cifar100", [f"c{k:02d}" for k in range(classes)])
    (tmp_path / "src").mkdir()
    for i in files:
        save_reference(reference_net("conv4", 5, seed=i), tmp_path / "src" / f"model_{i}.pth")
    with pytest.raises(UserError, match=re.escape(message)):
        import_pool(tmp_path / "src", None, tmp_path / "pool", root=tmp_path, dataset="cifar100")
    assert not (tmp_path / "pool").exists()


def test_reference_folder_needs_the_class_names(tmp_path):
    save_reference(reference_net("conv4", 5), tmp_path / "src" / "model_0.pth")
    with pytest.raises(UserError, match="meta_train.csv not found.*purer prepare --dataset cifar100"):
        import_pool(tmp_path / "src", None, tmp_path / "pool", root=tmp_path, dataset="cifar100")
    make_class_tree(tmp_path / "data" / "cifar100", list("abcde"))
    bad_order = manifest(tmp_path / "m.json", {"dataset": "cifar100", "class_order": list("abcdz")})
    with pytest.raises(UserError, match="'class_order' must list exactly the 5 meta_train classes"):
        import_pool(tmp_path / "src", bad_order, tmp_path / "pool", root=tmp_path)
    for doc, dataset in ((bad_order, "cifar100"), (None, None)):
        with pytest.raises(UserError, match="exactly one of a manifest and .* a dataset"):
            import_pool(tmp_path / "src", doc, tmp_path / "pool", root=tmp_path, dataset=dataset)
