"""Configs load from YAML and reject what they don't know (nothing is silently ignored)."""

import enum
import re
from dataclasses import dataclass, field
from typing import Literal

import pytest

from distcur.config import ConfigError, load_config


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


class Mode(enum.Enum):
    EXACT = "exact"
    SUBSAMPLE = "subsample"


@dataclass
class Typed:
    flag: bool = False
    seed: int = 0
    lr: float = 1e-3
    tasks: tuple[str, ...] = ("reach-v3",)
    bounds: tuple[float, float] | None = (-1.0, 1.0)
    sources: list[str] | None = None
    counts: dict[str, int] | None = None
    options: dict = field(default_factory=dict)
    weighting: Literal["sample", "loss"] = "sample"
    mode: Mode = Mode.EXACT
    bandwidth: float | str = "scott"


def test_typed_values_are_accepted_and_normalised(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("flag: true\nseed: 3\nlr: 1e-4\ntasks: [a, b]\nbounds: [0, 2.5]\nsources: [x]\n"
                 "counts: {a: 2}\noptions: {any: [1, x]}\nweighting: loss\nmode: subsample\nbandwidth: 0.5\n")
    cfg = load_config(Typed, p)
    assert cfg == Typed(flag=True, seed=3, lr=1e-4, tasks=("a", "b"), bounds=(0, 2.5), sources=["x"],
                        counts={"a": 2}, options={"any": [1, "x"]}, weighting="loss", mode=Mode.SUBSAMPLE,
                        bandwidth=0.5)
    assert load_config(Typed, {"lr": 1, "bounds": None, "bandwidth": "silverman"}).lr == 1


@pytest.mark.parametrize("yaml_text, message", [
    ('flag: "false"', "flag = 'false' is a str, but Typed.flag expects bool"),
    ('seed: "0"', "seed = '0' is a str, but Typed.seed expects int"),
    ("seed: true", "seed = True is a bool, but Typed.seed expects int"),
    ("seed: 1.5", "seed = 1.5 is a float, but Typed.seed expects int"),
    ("lr: fast", "lr = 'fast' is a str, but Typed.lr expects float"),
    ("tasks: reach-v3", "tasks = 'reach-v3' is a str, but Typed.tasks expects tuple[str, ...]"),
    ("tasks: [a, 3]", "tasks[1] = 3 is an int, but Typed.tasks expects str"),
    ("bounds: [0, 1, 2]", "bounds = [0, 1, 2] is a list, but Typed.bounds expects tuple[float, float]"),
    ("counts: {a: x}", "counts['a'] = 'x' is a str, but Typed.counts expects int"),
    ("options: [1]", "options = [1] is a list, but Typed.options expects dict"),
    ("weighting: both", "weighting = 'both' is a str, but Typed.weighting expects one of ['sample', 'loss']"),
    ("mode: fast", "mode = 'fast' is a str, but Typed.mode expects one of ['exact', 'subsample']"),
    ("bandwidth: [1]", "bandwidth = [1] is a list, but Typed.bandwidth expects float | str"),
])
def test_wrong_types_name_file_key_value_and_type(tmp_path, yaml_text, message):
    p = tmp_path / "t.yaml"
    p.write_text(yaml_text + "\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(p))}: {re.escape(message)}$"):
        load_config(Typed, p)


def test_nested_wrong_type_names_the_path(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("inner:\n  hidden: [4, four]\n")
    with pytest.raises(ConfigError, match=re.escape(f"{p}.inner: hidden[1] = 'four' is a str, but Inner.hidden")):
        load_config(Outer, p)
    p.write_text("inner: 3\n")
    with pytest.raises(ConfigError, match=re.escape(f"{p}.inner: expected a mapping for Inner, got int 3")):
        load_config(Outer, p)


@pytest.mark.parametrize("text, where", [
    ("name: run\ninner: [1, 2\n", "line 3, column 1"),
    ("name: run\n  inner: 1\n", "line 2, column 8"),
    ("name: 'run\n", "line 2, column 1"),
])
def test_malformed_yaml_names_file_and_line(tmp_path, text, where):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(p))}: malformed YAML at {where}: "):
        load_config(Outer, p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a YAML mapping at top level, got list"):
        load_config(Outer, p)


def test_real_stage_configs_reject_the_reported_values(tmp_path):
    from distcur.envs.generation import MetaWorldPriorConfig
    from distcur.policy.train import TrainConfig

    cases = [(MetaWorldPriorConfig, "append_task_onehot", '"false"', "bool"),
             (MetaWorldPriorConfig, "seed", '"0"', "int"),
             (MetaWorldPriorConfig, "tasks", "reach-v3", "tuple[str, ...]"),
             (MetaWorldPriorConfig, "max_steps", '"200"', "int"),
             (TrainConfig, "lr", "fast", "float")]
    for cls, key, value, expected in cases:
        p = tmp_path / f"{key}.yaml"
        p.write_text(f"{key}: {value}\n")
        with pytest.raises(ConfigError, match=re.escape(f"{p}: {key} = ") + f".*{cls.__name__}.{key} expects "
                                              + re.escape(expected)):
            load_config(cls, p)


def test_nested_config_flags_build_the_nested_dataclass(tmp_path):
    import argparse
    from dataclasses import dataclass, field

    from distcur.config import add_config_flags, config_from_args

    @dataclass
    class Inner:
        lr: float = 1e-3
        seed: int = 0

    @dataclass
    class Other:
        seed: int = 1

    @dataclass
    class Outer:
        name: str = "x"
        train: Inner = field(default_factory=Inner)
        other: Other = field(default_factory=Other)

    p = argparse.ArgumentParser()
    names = add_config_flags(p, Outer)
    assert names == ["name", "train.lr", "train.seed", "other.seed"]
    # a name two nested configs share is prefixed with its field; a unique one is not
    args = p.parse_args(["--lr", "0.5", "--train-seed", "3", "--other-seed", "4"])
    cfg = config_from_args(Outer, args, names)
    assert cfg == Outer(train=Inner(lr=0.5, seed=3), other=Other(seed=4))
    path = tmp_path / "c.yaml"
    path.write_text("name: y\ntrain:\n  seed: 9\n")
    cfg = config_from_args(Outer, p.parse_args(["--lr", "0.25"]), names, path)
    assert cfg == Outer(name="y", train=Inner(lr=0.25, seed=9))
    assert config_from_args(Outer, p.parse_args([]), names, path) == Outer(name="y", train=Inner(seed=9))
    path.write_text("train:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*lr = 'fast'"):
        config_from_args(Outer, p.parse_args(["--train-seed", "2"]), names, path)


def test_a_nested_config_given_in_part_keeps_the_enclosing_default():
    from dataclasses import dataclass, field

    @dataclass
    class Inner:
        lr: float = 1e-3
        steps: int = 4000

    @dataclass
    class Outer:
        train: Inner = field(default_factory=lambda: Inner(steps=1500))

    assert load_config(Outer, {"train": {"lr": 0.5}}).train == Inner(lr=0.5, steps=1500)
    assert load_config(Outer, {}).train == Inner(steps=1500)
