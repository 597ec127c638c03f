"""params.yaml → Params: the documented file matches the code, and every mistake is named."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO, read_params, set_key, write_params

from purer_mlops.config import METHODS, ConfigError, Params, from_dict, load_params
from purer_mlops.errors import UserError


def test_repo_params_yaml_equals_the_code_defaults():
    assert load_params(REPO / "params.yaml") == Params()


def test_repo_params_yaml_lists_every_parameter():
    # Not only equal after defaults fill the gaps: the documented file spells out every key.
    raw = read_params(REPO)
    flat = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    assert sorted(flat) == sorted(Params().flat())


def test_a_missing_key_takes_its_default(tmp_path):
    (tmp_path / "params.yaml").write_text("adv_scale: 0.5\n")
    assert load_params(tmp_path / "params.yaml") == Params().replace(adv_scale=0.5)


BAD = [
    # (changes, words the message must contain)
    ({"adv_scal": 1.0}, ["'adv_scal'", "did you mean 'adv_scale'"]),
    ({"num_sup_tset": 1}, ["'num_sup_tset'", "did you mean 'num_sup_test'"]),
    ({"inversion.lrr": 0.1}, ["'inversion.lrr'", "did you mean 'inversion.lr'"]),
    ({"way_train": "5"}, ["'way_train'", "whole number"]),
    ({"way_train": True}, ["'way_train'", "whole number"]),
    ({"seed": 1.5}, ["'seed'", "whole number"]),
    ({"adv_scale": "big"}, ["'adv_scale'", "number"]),
    ({"average": "yes"}, ["'average'", "true or false"]),
    ({"experiment_name": ["a", "b"]}, ["'experiment_name'", "string"]),
    ({"pool_datasets": "glyphs"}, ["'pool_datasets'", "list"]),
    ({"way_train": 1}, ["'way_train'", "at least 2"]),
    ({"inversion.lr": 0}, ["'inversion.lr'", "greater than 0"]),
    ({"pretrain.holdout": 0.9}, ["'pretrain.holdout'", "at most 0.5"]),
    ({"pretrain.momentum": -0.1}, ["'pretrain.momentum'", "at least 0"]),
    ({"glyphs.images_per_class": 0}, ["'glyphs.images_per_class'", "at least 1"]),
    ({"dataset": "imagenet"}, ["'dataset'", "imagenet", "glyphs"]),
    ({"device": "tpu"}, ["'device'", "cpu"]),
    ({"pre_backbone": "mix", "average": True}, ["'average'", "pre_backbone=mix", "average: false"]),
    ({"pre_backbone": "resnet18", "average": True}, ["'average'", "resnet18"]),
    ({"pool_datasets": ["cub"], "average": True}, ["'average'", "pool_datasets=['cub']"]),
    ({"pool_datasets": ["imagenet"]}, ["'pool_datasets'", "imagenet"]),
    ({"compare.methods": ["purer", "maml"]}, ["'compare.methods'", "'maml'"]),
    ({"compare.shots": [1, 0]}, ["'compare.shots'", "0"]),
    ({"inversion": 3}, ["'inversion'", "mapping"]),
]


@pytest.mark.parametrize(("changes", "words"), BAD, ids=[",".join(c) for c, _ in BAD])
def test_bad_value_names_the_key(tmp_path, changes, words):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    write_params(tmp_path, changes)
    with pytest.raises(ConfigError) as info:
        load_params(tmp_path / "params.yaml")
    message = str(info.value)
    for word in words:
        assert word.lower() in message.lower(), message
    assert "\n" not in message  # one line for the CLI


@pytest.mark.parametrize(
    ("changes", "check"),
    [
        ({"pre_backbone": "mix", "average": False}, lambda p: p.pre_backbone == "mix"),
        ({"adv_scale": 3}, lambda p: p.adv_scale == 3.0 and isinstance(p.adv_scale, float)),
        ({"compare.methods": ["purer", "oracle"]},
         lambda p: p.compare.methods == ["purer", "oracle"]),
        ({"pool_datasets": ["glyphs"]}, lambda p: p.teacher_datasets == ["glyphs"]),
        ({"inversion": None}, lambda p: p.inversion == Params().inversion),
    ],
)
def test_good_values_are_accepted(changes, check):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in changes.items():
        set_key(raw, key, value)
    assert check(from_dict(raw))


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, UserError)
    assert ConfigError.exit_code == 2


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")


def test_flat_uses_dotted_section_keys():
    flat = Params().flat()
    assert flat["adv_scale"] == 10.0
    assert flat["inversion.lr"] == 0.25
    assert flat["glyphs.images_per_class"] == 100
    assert flat["compare.methods"] == list(METHODS)
    assert not any(isinstance(v, dict) for v in flat.values())
    sections = {"glyphs", "folder", "pretrain", "augment", "inversion", "metatrain", "distill", "metatest",
                "calibration", "compare"}
    assert not sections & set(flat)
    assert {k.partition(".")[0] for k in flat if "." in k} == sections


def test_replace_changes_and_validates():
    p = Params()
    q = p.replace(adv_scale=0.5, **{"inversion.lr": 0.01, "glyphs.images_per_class": 20})
    assert (q.adv_scale, q.inversion.lr, q.glyphs.images_per_class) == (0.5, 0.01, 20)
    assert p.adv_scale == 10.0 and p.inversion.lr == 0.25  # the original is untouched
    assert q.inversion.bn == p.inversion.bn
    with pytest.raises(ConfigError, match="'way_test'"):
        p.replace(way_test=1)
    with pytest.raises(ConfigError, match="'inversion.lrr'"):
        p.replace(**{"inversion.lrr": 0.1})


@pytest.mark.parametrize(("key", "words"), [
    ("foo.bar", ["unknown key 'foo.bar'"]),               # was a KeyError
    ("seed.x", ["'seed' is a single value", "'seed.x'"]),  # was a TypeError
    ("inversion.lrr", ["'inversion.lrr'", "Did you mean 'inversion.lr'"]),
])
def test_replace_with_a_wrong_dotted_key_is_a_config_error(key, words):
    with pytest.raises(ConfigError) as info:
        Params().replace(**{key: 1})
    for word in words:
        assert word in str(info.value)


def test_meta_iterations_and_teacher_datasets():
    p = Params()
    assert p.meta_iterations == 1500
    assert p.replace(episode_train=3, episode_batch=4).meta_iterations == 1
    assert p.teacher_datasets == ["glyphs"]
