"""Config: every shipped YAML loads; bad keys and values are errors that name the key, the file and what is allowed."""

from pathlib import Path

import pytest

from signpost.config import ConfigError, SignpostConfig, load_config, save_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


def test_the_shipped_configs_exist() -> None:
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "gtsrb.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, SignpostConfig)
    assert config.name == path.stem


def test_defaults_without_a_file() -> None:
    config = load_config(None)
    assert config.data.image_size == 32
    assert config.data.source == "local"


def test_overrides_are_typed_and_nested(tmp_path: Path) -> None:
    config = load_config(
        None, ["data.image_size=48", "data.roi_margin=0.25", "train.augment.enabled=false", "name=x1", "seed=7"]
    )
    assert config.data.image_size == 48
    assert config.data.roi_margin == 0.25
    assert config.train.augment.enabled is False
    assert (config.name, config.seed) == ("x1", 7)


def test_unknown_key_names_key_file_and_allowed(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  imge_size: 32\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "data.imge_size" in message
    assert str(path) in message
    assert "image_size" in message  # both the suggestion and the allowed keys
    assert "roi_margin" in message


def test_bad_value_names_the_key_and_what_is_allowed(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("data:\n  layout: zipfile\n")
    with pytest.raises(ConfigError, match=r"data\.layout.*'gtsrb'.*'kaggle'"):
        load_config(path)


def test_bad_override_is_named_as_an_override(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.image_size \(from override 'data.image_size=3'\)"):
        load_config(None, ["data.image_size=3"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["data.image_size"])
    path = tmp_path / "exp.yaml"
    path.write_text("seed: 3\n")
    with pytest.raises(ConfigError, match="seed is a value, not a section"):
        load_config(path, ["seed.x=1"])


def test_cross_field_rules() -> None:
    with pytest.raises(ConfigError, match="max_tracks"):
        load_config(None, ["data.synthetic.min_tracks=5", "data.synthetic.max_tracks=2"])


@pytest.mark.parametrize(
    ("text", "needle"),
    [("- a\n- b\n", "top level must be a mapping"), ("data: [unclosed\n", "not valid YAML")],
)
def test_malformed_files(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(path)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("does/not/exist.yaml")


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config = load_config(CONFIGS[0], ["data.image_size=40"])
    out = tmp_path / "resolved.yaml"
    save_config(config, out)
    assert load_config(out) == config
