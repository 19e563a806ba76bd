"""Configs load from YAML and reject what they don't know (nothing is silently ignored)."""

from dataclasses import dataclass, field

import pytest

from distcur.config import load_config


@dataclass
class Inner:
    lr: float = 1e-3
    hidden: tuple[int, ...] = (8, 8)


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self):
        if not self.name:
            raise ValueError("Outer.name must be non-empty")


def test_yaml_nested_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: run\ninner:\n  lr: 0.01\n  hidden: [4, 4]\n")
    cfg = load_config(Outer, p, name="other")
    assert cfg.name == "other" and cfg.inner.lr == 0.01 and cfg.inner.hidden == (4, 4)


def test_unknown_key_is_an_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("inner:\n  lrr: 0.01\n")
    with pytest.raises(ValueError, match=r"c.yaml.inner: unknown option\(s\) \['lrr'\]"):
        load_config(Outer, p)


def test_validation_in_post_init():
    with pytest.raises(ValueError, match="name must be non-empty"):
        load_config(Outer, {"name": ""})
