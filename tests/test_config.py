"""Typed configuration: help on every field, value checks with their exact messages,
coercion of overrides, config files, layering and presets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import fields

import pytest

from tumorseg import cli
from tumorseg.config import (
    CHANNELS,
    DEFAULT_ARCHITECTURE,
    LEGACY_INFERENCE_FIELDS,
    PRESETS,
    InferenceConfig,
    ModelConfig,
    TrainConfig,
    field_help,
    load_config_file,
    merge_layers,
    preset,
    replace_config,
    validate,
)
from tumorseg.errors import ConfigError

KNOWN_FIELDS = ", ".join(sorted(f.name for f in fields(TrainConfig)))

POSTPROCESS_ERROR = ("postprocess must be none, lcc, top_mass, min_size:N (N >= 1) or confident:P (0 < P < 1), "
                     "got 'biggest'")


# --------------------------------------------------------------------------- help texts


@pytest.mark.parametrize("cls", [TrainConfig, ModelConfig, InferenceConfig])
def test_every_field_has_help(cls):
    for f in fields(cls):
        assert field_help(cls, f.name).strip(), f"{cls.__name__}.{f.name} has no help text"


def test_model_fields_of_train_config_share_the_model_help():
    for name in ("n_features", "depth", "features"):
        assert field_help(TrainConfig, name) == field_help(ModelConfig, name)


def test_train_help_lists_every_train_config_option(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')} " in text, f"--{f.name} missing from `tumorseg train --help`"


# --------------------------------------------------------------------------- InferenceConfig


def test_inference_defaults():
    assert InferenceConfig() == InferenceConfig(threshold=0.5, postprocess="none", tta=False)
    assert InferenceConfig().to_dict() == {"threshold": 0.5, "postprocess": "none", "tta": False}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 0}, "threshold must be between 0 and 1, got 0"),
        ({"threshold": 1}, "threshold must be between 0 and 1, got 1"),
        ({"threshold": 5}, "threshold must be between 0 and 1, got 5"),
        ({"threshold": -0.1}, "threshold must be between 0 and 1, got -0.1"),
        ({"threshold": "x"}, "threshold must be between 0 and 1, got 'x'"),
        ({"threshold": float("nan")}, "threshold must be between 0 and 1, got nan"),
        ({"postprocess": "biggest"}, POSTPROCESS_ERROR),
        ({"tta": "yes"}, "tta must be true or false, got 'yes'"),
    ],
)
def test_inference_config_rejects(kwargs, message):
    with pytest.raises(ConfigError) as e:
        InferenceConfig(**kwargs)
    assert str(e.value) == message


def test_inference_replace_ignores_none_and_checks_values():
    base = InferenceConfig(threshold=0.4, postprocess="lcc", tta=True)
    assert base.replace(threshold=None, postprocess=None, tta=None) == base
    # False is a value, not "not given".
    assert base.replace(tta=False) == InferenceConfig(0.4, "lcc", False)
    assert base.replace(threshold=0.7, postprocess="none") == InferenceConfig(0.7, "none", True)
    with pytest.raises(ConfigError) as e:
        base.replace(threshold=1.5)
    assert str(e.value) == "threshold must be between 0 and 1, got 1.5"
    with pytest.raises(ConfigError) as e:
        base.replace(postprocess="biggest")
    assert str(e.value) == POSTPROCESS_ERROR


def test_inference_from_dict_ignores_unknown_keys():
    assert InferenceConfig.from_dict({"threshold": 0.3, "tta": True, "extra": 1}) == InferenceConfig(0.3, "none", True)


# --------------------------------------------------------------------------- TrainConfig


def test_train_config_round_trip_through_json():
    cfg = replace_config(TrainConfig(), {"channels": ("FLAIR", "post-contrast"), "depth": 3, "features": (8, 16, 24),
                                         "lr": 0.02, "augment": False, "fold": -1, "schedule": "step"})
    d = cfg.to_dict()
    assert d["channels"] == ["FLAIR", "post-contrast"] and d["features"] == [8, 16, 24]
    assert TrainConfig.from_dict(json.loads(json.dumps(d))) == cfg
    plain = replace_config(TrainConfig(), {"features": None})
    assert plain.to_dict()["features"] is None
    assert TrainConfig.from_dict(json.loads(json.dumps(plain.to_dict()))) == plain


def test_model_config_round_trip():
    mc = ModelConfig(in_channels=2, n_features=4, depth=3, features=(4, 8, 16))
    assert mc.to_dict() == {"in_channels": 2, "out_channels": 1, "n_features": 4, "depth": 3, "features": [4, 8, 16]}
    assert ModelConfig.from_dict({**mc.to_dict(), "unknown": 1}) == mc


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"augment": "true"}, {"augment": True}),
        ({"augment": "0"}, {"augment": False}),
        ({"channels_last": "Off"}, {"channels_last": False}),
        ({"channels_last": "yes"}, {"channels_last": True}),
        ({"depth": "2", "features": "16,32"}, {"depth": 2, "features": (16, 32)}),
        ({"depth": 2, "features": "16; 32"}, {"depth": 2, "features": (16, 32)}),
        ({"depth": 2, "features": [16, "32"]}, {"depth": 2, "features": (16, 32)}),
        ({"features": "none"}, {"features": None}),
        ({"features": "None"}, {"features": None}),
        ({"features": ""}, {"features": None}),
        ({"channels": "FLAIR, post-contrast"}, {"channels": ("FLAIR", "post-contrast")}),
        ({"channels": ["flair"]}, {"channels": ("flair",)}),
        ({"epochs": "7", "lr": "0.01", "fold": 2.0}, {"epochs": 7, "lr": 0.01, "fold": 2}),
        ({"schedule": "step"}, {"schedule": "step"}),
    ],
)
def test_replace_config_coerces(overrides, expected):
    cfg = replace_config(TrainConfig(), overrides)
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert all(type(getattr(cfg, k)) is type(v) for k, v in expected.items())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"augment": "maybe"}, "config field 'augment': expected true/false, got 'maybe'"),
        ({"epochs": 2.5}, "config field 'epochs': expected an integer, got 2.5"),
        ({"epochs": "seven"},
         "config field 'epochs': cannot use 'seven' (could not convert string to float: 'seven')"),
        ({"lr": "fast"}, "config field 'lr': cannot use 'fast' (could not convert string to float: 'fast')"),
        ({"learning_rate": 1, "bogus": 2}, f"unknown config field(s): bogus, learning_rate; known: {KNOWN_FIELDS}"),
        ({"tta": True}, f"unknown config field(s): tta; known: {KNOWN_FIELDS}"),
        ({"channels": "T2"}, "unknown channel 'T2'; choose from pre-contrast, FLAIR, post-contrast, optionally "
                             "with a neighbouring-slice offset such as FLAIR-1 or FLAIR+1"),
        ({"channels": "FLAIR,FLAIR+x"}, "unknown channel 'FLAIR+x'; choose from pre-contrast, FLAIR, "
                                        "post-contrast, optionally with a neighbouring-slice offset such as "
                                        "FLAIR-1 or FLAIR+1"),
        ({"channels": "FLAIR,flair"}, "channel 'flair' given twice"),
        ({"channels": ""}, "at least one channel is needed"),
        ({"features": "16,32"}, "features must list one width per level (5), got (16, 32)"),
    ],
)
def test_replace_config_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        replace_config(TrainConfig(), overrides)
    assert str(e.value) == message


def test_null_channels_in_a_config_file_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("channels: null\n")
    with pytest.raises(ConfigError) as e:
        merge_layers(None, path, {})
    assert str(e.value) == "config field 'channels': list at least one sequence, e.g. FLAIR"


def test_numpy_thresholds_are_plain_floats():
    import numpy as np

    cfg = InferenceConfig(threshold=np.float32(0.25))
    assert cfg.threshold == 0.25 and type(cfg.threshold) is float


def test_legacy_inference_fields_are_ignored():
    assert LEGACY_INFERENCE_FIELDS == ("threshold", "postprocess")
    legacy = {"threshold": 0.3, "postprocess": "lcc", "epochs": 4}
    assert replace_config(TrainConfig(), legacy) == replace_config(TrainConfig(), {"epochs": 4})
    assert TrainConfig.from_dict({**TrainConfig().to_dict(), "threshold": 0.3, "postprocess": "lcc"}) == TrainConfig()


def test_validate_accepts_defaults_and_edges():
    validate(TrainConfig())
    validate(dataclasses.replace(TrainConfig(), fold=-1))
    validate(dataclasses.replace(TrainConfig(), fold=4, folds=5, seed=0))
    validate(dataclasses.replace(TrainConfig(), depth=4, features=None, crop=8))
    validate(dataclasses.replace(TrainConfig(), depth=4, features=None, crop=0))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"seed": -1}, "seed must be >= 0, got -1"),
        ({"fold": 5, "folds": 5}, "fold must be in 0..4, or -1 for all, got 5"),
        ({"fold": -2}, "fold must be in 0..4, or -1 for all, got -2"),
        ({"folds": 1, "fold": 0}, "folds must be >= 2, got 1"),
        ({"depth": 4, "features": None, "crop": 7}, "crop must be 0 or >= 8, got 7"),
        ({"crop": 15}, "crop must be 0 or >= 16, got 15"),
        ({"depth": 1, "features": None}, "depth must be >= 2, got 1"),
        ({"lr": float("nan")}, "lr must be > 0, got nan"),
        ({"test_fraction": 1.0}, "test_fraction must be in [0, 1), got 1.0"),
        ({"tumour_fraction": 1.0}, "tumour_fraction must be < 1, got 1.0"),
        ({"sequence_dropout": 1.5}, "sequence_dropout must be in [0, 1], got 1.5"),
        ({"loss": "focal"}, "loss must be one of dice, dice_per_image, bce_dice or bce_tversky:A,B (A, B in [0, 1]), "
                                "got 'focal'"),
        ({"loss": "bce_tversky:2,0"}, "loss must be one of dice, dice_per_image, bce_dice or bce_tversky:A,B (A, B in "
                                       "[0, 1]), got 'bce_tversky:2,0'"),
        ({"precision": "fp16"}, "precision must be one of auto, bf16, fp32, got 'fp16'"),
    ],
)
def test_validate_rejects(changes, message):
    cfg = dataclasses.replace(TrainConfig(), **changes)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value) == message
    with pytest.raises(ConfigError) as e:  # the same check through replace_config
        replace_config(TrainConfig(), changes)
    assert str(e.value) == message


# --------------------------------------------------------------------------- config files

FILES = {
    ".json": '{"lr": 0.002, "epochs": 7, "channels": ["FLAIR"], "augment": false, "features": null}\n',
    ".toml": 'lr = 0.002\nepochs = 7\nchannels = ["FLAIR"]\naugment = false\nfeatures = "none"\n',
    ".yaml": "lr: 0.002\nepochs: 7\nchannels: [FLAIR]\naugment: false\nfeatures: null\n",
    ".yml": "lr: 0.002\nepochs: 7\nchannels:\n  - FLAIR\naugment: no\nfeatures:\n",
}


@pytest.mark.parametrize("suffix", list(FILES))
def test_load_config_file_formats(suffix, tmp_path):
    path = tmp_path / f"c{suffix}"
    path.write_text(FILES[suffix])
    data = load_config_file(path)
    assert {k: data[k] for k in ("lr", "epochs", "channels", "augment")} == {
        "lr": 0.002, "epochs": 7, "channels": ["FLAIR"], "augment": False}
    cfg = merge_layers(None, path, {})
    assert cfg == dataclasses.replace(TrainConfig(), lr=0.002, epochs=7, channels=("FLAIR",), augment=False,
                                      features=None)


def test_load_config_file_upper_case_suffix(tmp_path):
    path = tmp_path / "c.YAML"
    path.write_text("epochs: 3\n")
    assert load_config_file(path) == {"epochs": 3}


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("c.ini", "[train]\nlr = 1\n", "{path}: unknown config format '.ini'; use .json, .toml or .yaml"),
        ("c.yaml", "- lr\n- 0.1\n", "{path}: expected a mapping of config fields at the top level"),
        ("c.json", "[1, 2]", "{path}: expected a mapping of config fields at the top level"),
        ("c.yaml", "", "{path}: expected a mapping of config fields at the top level"),
        ("c.yaml", "lr: [1, 2\n", "{path}: cannot parse ("),
        ("c.json", '{"lr": }', "{path}: cannot parse (Expecting value: line 1 column 8 (char 7))"),
        ("c.toml", "lr = \n", "{path}: cannot parse ("),
    ],
)
def test_load_config_file_errors(name, content, message, tmp_path):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError) as e:
        load_config_file(path)
    expected = message.format(path=path)
    if expected.endswith("("):
        assert str(e.value).startswith(expected) and str(e.value).endswith(")"), str(e.value)
    else:
        assert str(e.value) == expected


def test_load_config_file_missing_or_not_text(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config_file(tmp_path / "none.toml")
    assert str(e.value) == f"config file {tmp_path / 'none.toml'} does not exist"
    binary = tmp_path / "c.json"
    binary.write_bytes(b"\xff\xfe\x00{")
    with pytest.raises(ConfigError) as e:
        load_config_file(binary)
    assert str(e.value).startswith(f"{binary}: cannot read as UTF-8 text (")


# --------------------------------------------------------------------------- layers and presets


def test_merge_layers_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.002\nepochs: 7\ndepth: 3\nbatch_size: 4\n")
    # Options are strings as the CLI passes them; None means "not given".
    cfg = merge_layers("seed", path, {"epochs": "3", "features": "8,16,32", "batch_size": None, "lr": None})
    seed = preset("seed")
    assert (cfg.loss, cfg.schedule, cfg.augment, cfg.precision) == (seed.loss, seed.schedule, False, "fp32")  # preset
    assert (cfg.lr, cfg.batch_size) == (0.002, 4)  # file over preset
    assert cfg.epochs == 3  # options over file
    # depth from the file and features from the options are checked together, once.
    assert (cfg.depth, cfg.features) == (3, (8, 16, 32))


def test_merge_layers_without_layers_is_the_default():
    assert merge_layers(None, None, {}) == TrainConfig()
    assert merge_layers("default", None, {"epochs": None}) == TrainConfig()


def test_unknown_preset():
    with pytest.raises(ConfigError) as e:
        merge_layers("fast", None, {})
    assert str(e.value) == "unknown preset 'fast'; choose from seed, default"


def test_presets():
    assert preset("default") == TrainConfig()
    seed = preset("seed")
    assert seed == replace_config(TrainConfig(), PRESETS["seed"])
    # The seed recipe trains the original architecture, ModelConfig's defaults.
    assert seed.model_config() == ModelConfig()
    assert (seed.depth, seed.n_features, seed.features, seed.lr, seed.schedule) == (4, 32, None, 1e-4, "step")
    assert (seed.loss, seed.augment, seed.precision) == ("dice", False, "fp32")
    assert (seed.weight_decay, seed.samples_per_epoch, seed.channels_last) == (0.0, 0, False)


def test_model_config_defaults_are_the_unets():
    from tumorseg.model import UNet

    assert UNet().config == ModelConfig()
    assert ModelConfig() == ModelConfig(in_channels=3, out_channels=1, n_features=32, depth=4, features=None)


def test_default_architecture_is_the_default_recipes():
    mc = TrainConfig().model_config()
    assert mc.in_channels == len(TrainConfig().channels) == len(CHANNELS)
    assert dataclasses.replace(mc, in_channels=DEFAULT_ARCHITECTURE.in_channels) == DEFAULT_ARCHITECTURE
    assert DEFAULT_ARCHITECTURE.features == (16, 32, 64, 128, 128) and DEFAULT_ARCHITECTURE.depth == 5
    flair_only = replace_config(TrainConfig(), {"channels": "FLAIR"}).model_config()
    assert flair_only == dataclasses.replace(DEFAULT_ARCHITECTURE, in_channels=1)
