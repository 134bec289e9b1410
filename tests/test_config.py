"""Typed configs: unknown keys and wrong types are errors, overrides parse."""
import pytest

from semifer.config import ConfigError, load_config


def test_defaults_and_overrides():
    cfg = load_config(overrides=["ssl.tau=0.9", "model.backbone_args={width: 8}", "data.unlabeled=[a:b, c:d]"])
    assert cfg.ssl.tau == 0.9 and cfg.model.backbone_args == {"width": 8}
    assert cfg.data.unlabeled == ["a:b", "c:d"]


def test_unquoted_off_reaches_a_literal_field_as_the_word():
    # YAML 1.1 reads `off` as False; optim.amp's choices spell it "off".
    assert load_config(overrides=["optim.amp=off"]).optim.amp == "off"
    with pytest.raises(ConfigError, match="not one of"):
        load_config(overrides=["optim.amp=true"])   # "on" is not one of amp's choices


@pytest.mark.parametrize("override, message", [
    ("ssl.taux=0.9", "unknown key"),
    ("bogus.x=1", "unknown key"),
    ("ssl.teacher=student", "not one of"),
    ("optim.steps=1.5", "integer"),
    ("optim.lr=fast", "number"),
    ("run.progress=3", "true/false"),
])
def test_bad_values_are_rejected_with_their_path(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("ssl:\n  algorithm: fixmatch\noptim:\n  steps: 7\n")
    cfg = load_config(p)
    assert cfg.ssl.algorithm == "fixmatch" and cfg.optim.steps == 7
    p.write_text("ssl:\n  algoritm: fixmatch\n")
    with pytest.raises(ConfigError, match="algoritm"):
        load_config(p)


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 2
    for p in configs:
        load_config(p)  # raises on unknown keys or wrong types
