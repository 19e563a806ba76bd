"""The method registry: one list of methods and one place where each scorer's options are checked."""

from __future__ import annotations

import dataclasses

import pytest

from distcur import methods
from distcur.cli import build_parser


def test_registry_kinds_partition_every_method_in_order():
    by_kind = [n for k in methods.KINDS for n in methods.names(k)]
    assert sorted(by_kind) == sorted(methods.names()) and len(set(by_kind)) == len(by_kind)
    assert methods.names("scorer") == ("sr", "ar", "br", "strap", "iwr", "random")
    assert methods.names(similarity=True) == ("sr", "ar", "br", "strap", "iwr")
    for name in methods.names():
        m = methods.get(name)
        assert (m.config is not None) == (m.kind == "scorer"), name
    with pytest.raises(ValueError, match="unknown method 'knn'"):
        methods.get("knn")
    with pytest.raises(ValueError, match="unknown method kind"):
        methods.names("scorers")


def test_scorer_config_checks_each_option_once():
    assert methods.scorer_config("iwr", bandwidth="0.3").bandwidth == 0.3
    assert methods.scorer_config("iwr", bandwidth=1).bandwidth == 1  # a number keeps its type (fingerprints)
    assert methods.scorer_config("iwr", bandwidth="likelihood").bandwidth == "likelihood"
    for bad in ("wide", "-1", float("nan"), 0.0):
        with pytest.raises(ValueError, match="bandwidth"):
            methods.scorer_config("iwr", bandwidth=bad)
    with pytest.raises(ValueError, match=r"option\(s\) \['k'\] do not apply to method 'sr'; it takes \['block'\]"):
        methods.scorer_config("sr", k=3)
    with pytest.raises(ValueError, match="subsample >= 2"):
        methods.scorer_config("iwr", mode="subsample")
    with pytest.raises(ValueError, match="level must be one of"):
        methods.scorer_config("random", level="task")
    with pytest.raises(ValueError, match="scoring must be one of"):
        methods.scorer_config("strap", scoring="dtw")
    with pytest.raises(ValueError, match="not a scorer"):
        methods.scorer_config("oracle")
    assert methods.scorer_options("strap", position_dims=[4, 5, 6])["position_dims"] == (4, 5, 6)


def test_score_cli_has_a_flag_for_every_scorer_option():
    parser = build_parser()
    score = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "score")[1]
    dests = {a.dest for a in score._actions}
    for name, (_f, takers) in methods.option_fields().items():
        assert name in dests, name
        assert takers and all(name in {g.name for g in dataclasses.fields(methods.get(t).config)} for t in takers)
    args = parser.parse_args(["score", "--method", "iwr", "--target", "t", "--run", "r", "--iwr-kernel", "per-set",
                              "--bandwidth", "0.5"])
    assert args.kernel == "per-set" and args.bandwidth == "0.5"
    args = parser.parse_args(["score", "--method", "strap", "--target", "t", "--run", "r", "--position-dims", "1", "2"])
    assert args.position_dims == [1, 2]


def test_demo_and_sweep_take_their_methods_from_the_registry():
    from distcur.distributed.sweep import SweepConfig
    from distcur.stages.demo import ALL_METHODS, DemoConfig

    assert ALL_METHODS == methods.names()
    cfg = DemoConfig()
    assert cfg.level_of("strap") == "step" and cfg.level_of("oracle") == "episode"
    assert cfg.level_of("random-episode") == "episode" and cfg.level_of("br") == cfg.retrieval_level
    with pytest.raises(ValueError, match="unknown bandwidth 'wide'"):
        SweepConfig("s", bandwidths=("wide",))
    assert SweepConfig("s", bandwidths=("0.3", "scott")).bandwidths == (0.3, "scott")
