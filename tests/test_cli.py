"""The real ``purer`` CLI: help that says what each stage reads and writes, and bad input that
ends in one clear line, exit code 2 and no partial output."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, copy_glyphs, run_purer, write_params
from PIL import Image

from purer_mlops.config import Params
from purer_mlops.data.dataset import ImageSet, load_split
from purer_mlops.data.filelist import write_filelists
from purer_mlops.errors import UserError

# Words each subcommand's --help must contain: what it reads and what it writes.
HELP = {
    "prepare": ["`dataset`", "`glyphs`", "data/raw/", "data/<dataset>/meta_"],
    "filelist": ["data/<dataset>/meta_", "split/", ".csv", "results/data/"],
    "pretrain": ["`pre_backbone`", "pretrain.", "models/teachers/", "results/pretrain/"],
    "metatrain": ["models/teachers/", "models/meta/", "results/metatrain/"],
    "params": ["params.yaml"],
}


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _commands(help_text: str) -> list[str]:
    """Subcommand names listed under ``Commands:`` of a click help page."""
    section = help_text.split("Commands:", 1)[1]
    return re.findall(r"^  (\S+)", section, flags=re.M)


def test_main_help_lists_the_stages_and_their_outputs(tmp_path):
    proc = run_purer(tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: python -m purer_mlops")
    for word in ("prepare", "filelist", "pretrain", "metatrain", "data/<dataset>/split/*.csv",
                 "models/teachers/", "models/meta/", "dvc repro"):
        assert word in proc.stdout, word
    assert set(HELP) <= set(_commands(proc.stdout))


def test_console_script_is_installed(tmp_path):
    proc = subprocess.run([str(BIN / "purer"), "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: purer " in proc.stdout


@pytest.mark.parametrize("command", sorted(HELP))
def test_subcommand_help_says_what_it_reads_and_writes(tmp_path, command):
    proc = run_purer(tmp_path, command, "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # click wraps lines
    for word in HELP[command]:
        assert word in text, (command, word)
    assert "--root" in text and "--params" in text
    assert _files(tmp_path) == []  # help writes nothing


def test_every_listed_subcommand_has_help(tmp_path):
    commands = _commands(run_purer(tmp_path, "--help").stdout)
    assert commands
    for command in commands:
        proc = run_purer(tmp_path, command, "--help")
        assert proc.returncode == 0, (command, proc.stderr)
        assert "Usage:" in proc.stdout and len(proc.stdout.splitlines()) > 3, command


@pytest.mark.parametrize(
    ("command", "changes", "words"),
    [
        ("prepare", {"adv_scal": 1.0}, ["'adv_scal'", "Did you mean 'adv_scale'?"]),
        ("filelist", {"way_train": "five"}, ["'way_train'", "whole number"]),
        ("params", {"inversion.lrr": 0.1}, ["'inversion.lrr'", "Did you mean"]),
        ("pretrain", {"pretrain.holdout": 0.9}, ["'pretrain.holdout'", "at most 0.5"]),
        ("metatrain", {"pre_backbone": "mix"}, ["'average'", "average: false"]),
    ],
)
def test_bad_params_exit_2_with_one_line_and_write_nothing(project, command, changes, words):
    write_params(project, changes)
    before = _files(project)
    proc = run_purer(project, command)
    _assert_one_line_error(proc, *words)
    assert _files(project) == before == ["params.yaml"]
    assert proc.stdout == ""


def test_missing_params_file_is_a_clear_error(tmp_path):
    proc = run_purer(tmp_path, "filelist", "--quiet")
    _assert_one_line_error(proc, "params.yaml not found")
    assert _files(tmp_path) == []


def test_params_command_prints_every_flat_key(project):
    proc = run_purer(project, "params")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "adv_scale: 10.0  # weight of the adversarial (curriculum) term of the bank update" in lines
    assert any(line.startswith("inversion.lr: 0.25  # ") for line in lines)
    assert len(lines) == len(Params().flat())
    assert _files(project) == ["params.yaml"]


@pytest.mark.parametrize("with_raw_folder", [False, True])
def test_prepare_real_dataset_without_raw_data(project, with_raw_folder):
    write_params(project, dataset="cifar100", average=True)
    if with_raw_folder:
        (project / "data" / "raw").mkdir(parents=True)
    proc = run_purer(project, "prepare", "--quiet")
    _assert_one_line_error(proc, "data/raw/cifar-100-python.tar.gz")
    assert not (project / "data" / "cifar100").exists()
    assert not list(project.glob("data/.cifar100*"))  # no temporary leftovers either
    assert not (project / "results").exists()


def test_filelist_with_an_empty_class_folder(project, tiny_glyphs):
    data = copy_glyphs(tiny_glyphs, project)
    shutil.rmtree(data / "split")
    empty = data / "meta_val" / "zz-empty-class"
    empty.mkdir()
    proc = run_purer(project, "filelist", "--quiet")
    _assert_one_line_error(proc, "zz-empty-class", "holds no images")
    assert not (data / "split").exists()
    assert not list(data.glob(".split*"))
    assert not (project / "results").exists()


def test_failed_filelist_keeps_the_previous_lists(project, tiny_glyphs):
    data = copy_glyphs(tiny_glyphs, project)
    before = {p.name: p.read_bytes() for p in (data / "split").iterdir()}
    shutil.rmtree(data / "meta_test")
    proc = run_purer(project, "filelist", "--quiet")
    _assert_one_line_error(proc, "meta_test", "purer prepare")
    assert {p.name: p.read_bytes() for p in (data / "split").iterdir()} == before


def test_filelist_writes_the_lists_and_the_counts(project, tiny_glyphs):
    data = copy_glyphs(tiny_glyphs, project)
    shutil.rmtree(data / "split")
    proc = run_purer(project, "filelist")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (data / "split").iterdir()) == [
        "meta_test.csv", "meta_train.csv", "meta_val.csv"]
    counts = (project / "results" / "data" / "glyphs.json").read_text()
    assert '"classes": 64' in counts and '"classes": 16' in counts and '"classes": 20' in counts


# --------------------------------------------------------------------------- loader errors


@pytest.mark.parametrize(
    "content",
    [b"", b"this is not a png", "truncated"],
    ids=["zero-byte", "text", "truncated"],
)
def test_unreadable_image_is_named(tmp_path, tiny_glyphs, content):
    data = tmp_path / "glyphs"
    shutil.copytree(tiny_glyphs, data)
    victim = sorted((data / "meta_val").rglob("*.png"))[7]
    if content == "truncated":
        content = victim.read_bytes()[: victim.stat().st_size // 2]
    victim.write_bytes(content)
    with pytest.raises(UserError) as info:
        load_split("glyphs", data, "meta_val")
    message = str(info.value)
    assert str(victim) in message
    assert "cannot be read" in message


@pytest.fixture(scope="module")
def tiny_test_split(tiny_glyphs: Path) -> ImageSet:
    return load_split("glyphs", tiny_glyphs, "meta_test")  # 20 classes × 20 images


KEYS = ("way_test", "num_sup_test", "num_qur_test")


def test_impossible_shots_name_the_parameters(tiny_test_split):
    tiny_test_split.check_task_shape(20, 5, 15, KEYS)  # exactly fits: no error
    with pytest.raises(UserError) as info:
        tiny_test_split.check_task_shape(5, 5, 16, KEYS)
    message = str(info.value)
    assert "'num_sup_test'" in message and "'num_qur_test'" in message
    assert "21" in message and "20" in message


def test_more_ways_than_classes_names_way(tiny_test_split):
    with pytest.raises(UserError) as info:
        tiny_test_split.check_task_shape(21, 1, 15, KEYS)
    message = str(info.value)
    assert "'way_test'" in message and "20 classes" in message
    assert "num_sup_test" not in message


def test_small_split_refuses_the_default_task(tmp_path):
    # Two classes of three images: neither 5 ways nor 1 + 15 images per class fit.
    root = tmp_path / "d"
    for split in ("meta_train", "meta_val", "meta_test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (32, 32), (i, 0, 0)).save(root / split / c / f"{i}.png")
    write_filelists(root)
    split = load_split("glyphs", root, "meta_train")
    with pytest.raises(UserError, match="'way_train'"):
        split.check_task_shape(5, 1, 15, ("way_train", "num_sup_train", "num_qur_train"))
    with pytest.raises(UserError, match="'num_sup_train' \\+ 'num_qur_train'"):
        split.check_task_shape(2, 1, 15, ("way_train", "num_sup_train", "num_qur_train"))


def test_presets_list_validate_and_spell_the_dvc_command(tmp_path):
    listed = run_purer(tmp_path, "preset")
    assert listed.returncode == 0, listed.stderr
    names = {line.split()[0] for line in listed.stdout.splitlines()}
    assert {"cifar_51_conv4", "cifar_55_conv4", "purer_plus"} <= names
    shown = run_purer(tmp_path, "preset", "cifar_55_conv4")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("dvc exp run -n cifar_55_conv4 ")
    assert "-S num_sup_train=5" in shown.stdout and "-S synthesis_per_class=20" in shown.stdout
    unknown = run_purer(tmp_path, "preset", "cifar_51")
    assert unknown.returncode == 2 and "unknown preset" in unknown.stderr


def test_a_preset_run_becomes_the_dvc_process(tmp_path):
    # outside a DVC repository dvc itself refuses: its message and exit status are the command's,
    # and the command line was printed before dvc took over the process
    ran = run_purer(tmp_path, "preset", "cifar_51_conv4", "--run")
    assert ran.stdout.startswith("dvc exp run -n cifar_51_conv4 ")
    assert ran.returncode != 0 and "not inside of a DVC repository" in ran.stderr
