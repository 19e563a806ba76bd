"""The method registry: every curation method distcur knows, by name, with its scorer config.

One table answers "which methods exist, what kind is each, what options does it take": the demo,
the sweep, the score stage, its CLI and the report ask it instead of keeping their own tuples.

Kinds:
- ``baseline``   no scoring: ``target_only`` (the target demos alone), ``all`` (every prior step);
- ``scorer``     a per-step score from :mod:`distcur.score` (``distcur score --method``), whose
  options are the fields of its config class below;
- ``random``     the ``random`` scorer at a fixed granularity (``random-subtraj``, ``random-episode``);
- ``datamodel``  DataMIL's cluster scores (``distcur datamodel``), configured by ``DatamodelConfig``;
- ``reference``  a row that is not a method but bounds one (``oracle``: successful prior demos only).

The scorer configs hold only what a user chooses; a value is parsed and checked once, here (for
example IWR's bandwidth: a rule name, or a number given as a string on the command line).
This module is light (no torch, no Ray, no store): the CLI builds its flags from it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from distcur.score.strap import DEFAULT_MIN_LENGTH, DEFAULT_THRESHOLD, DEFAULT_TOP_K
from distcur.score.strap import SCORINGS as STRAP_SCORINGS

# -- scorer configs ------------------------------------------------------------------------------

ENCODER_HELP = "the embedding scored in (default: vae)"
BLOCK_HELP = "rows per distance block (default 1024)"


def _opt(default: Any, help: str, flag: str | None = None, **kw) -> Any:
    """A config field with its CLI help (and, where it differs from ``--<name>``, its flag)."""
    meta = {"help": help, **({"flag": flag} if flag else {}), **kw}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class StateNearestConfig:
    """SR / AR: negative distance to the nearest target state (SR) or action (AR), min-max scaled."""

    block: int = _opt(1024, BLOCK_HELP)

    def __post_init__(self):
        if self.block < 1:
            raise ValueError(f"block must be >= 1, got {self.block}")


@dataclass(frozen=True)
class BrConfig(StateNearestConfig):
    """BR: the nearest-neighbour score in an encoder's embedding space."""

    encoder: str = _opt("vae", ENCODER_HELP)


@dataclass(frozen=True)
class StrapConfig:
    """STRAP: target segments matched by subsequence DTW; the top ``k`` matches scored."""

    encoder: str = _opt("vae", ENCODER_HELP)
    k: int | None = _opt(DEFAULT_TOP_K, f"matched sub-trajectories kept (default {DEFAULT_TOP_K})")
    threshold: float = _opt(DEFAULT_THRESHOLD, f"end-effector speed cut of the target segmentation "
                                               f"(default {DEFAULT_THRESHOLD:g})")
    min_length: int = _opt(DEFAULT_MIN_LENGTH, f"minimum segment length (default {DEFAULT_MIN_LENGTH})")
    position_dims: tuple[int, ...] = _opt((0, 1, 2), "state dims of the end-effector position (default 0 1 2)")
    scoring: str = _opt("cost", "score of a matched step: its match's DTW cost or its rank within its segment",
                        choices=STRAP_SCORINGS)
    padding: int = _opt(0, "steps kept on each side of a matched sub-trajectory (default 0)")

    def __post_init__(self):
        object.__setattr__(self, "position_dims", tuple(int(d) for d in self.position_dims))
        if self.k is not None and self.k < 1:
            raise ValueError(f"STRAP k must be >= 1 (or None for every match), got {self.k}")
        if self.min_length < 1 or self.padding < 0 or not self.threshold > 0:
            raise ValueError(f"STRAP needs min_length >= 1, padding >= 0 and threshold > 0, got {self.min_length}, "
                             f"{self.padding}, {self.threshold}")
        if self.scoring not in STRAP_SCORINGS:
            raise ValueError(f"STRAP scoring must be one of {STRAP_SCORINGS}, got {self.scoring!r}")
        if not self.position_dims or min(self.position_dims) < 0:
            raise ValueError(f"STRAP position_dims must be non-negative state dims, got {self.position_dims}")


RANDOM_LEVELS = ("step", "subtraj", "episode")


@dataclass(frozen=True)
class RandomConfig:
    """Uniform random scores, one draw per step, sub-trajectory or episode."""

    seed: int = _opt(0, "seed of the hash-based draws (default 0)")
    level: str = _opt("step", "one draw per step, sub-trajectory or episode", choices=RANDOM_LEVELS)
    horizon: int = _opt(30, "sub-trajectory length at level subtraj (default 30)")

    def __post_init__(self):
        if self.level not in RANDOM_LEVELS or self.horizon < 1:
            raise ValueError(f"random: level must be one of {RANDOM_LEVELS} and horizon >= 1, got {self.level!r}, "
                             f"{self.horizon}")


BANDWIDTH_RULES = ("scott", "silverman", "likelihood")
IWR_MODES = ("exact", "subsample")
IWR_KERNELS = ("shared-prior", "per-set")
KDE_EXECUTORS = ("tasks", "ray-data")  # the grid executors of distcur.distributed.kde


def parse_bandwidth(value: str | float) -> str | float:
    """A bandwidth rule name, or a positive finite number (strings such as ``"0.3"`` are numbers)."""
    if isinstance(value, str) and value not in BANDWIDTH_RULES:
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"unknown bandwidth {value!r}: expected a number or one of {BANDWIDTH_RULES}") from None
    if not isinstance(value, str):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"bandwidth must be a positive finite number, got {value}")
    return value


@dataclass(frozen=True)
class IwrConfig:
    """IWR: the log density ratio of a target and a prior Gaussian KDE in an embedding space."""

    encoder: str = _opt("vae", ENCODER_HELP)
    bandwidth: str | float = _opt("scott", "scott (default), silverman, likelihood (max held-out likelihood), "
                                           "or a number")
    kernel: str = _opt("shared-prior", "kernel shapes: the prior's covariance for both KDEs (shared-prior, default) "
                                       "or each set's own (per-set, as two scipy gaussian_kde)",
                       flag="--iwr-kernel", choices=IWR_KERNELS)
    mode: str = _opt("exact", "KDE over every prior point (exact, default) or a subsample", choices=IWR_MODES)
    num_shards: int | None = _opt(None, "prior shards for the KDE partial sums (default: one per 100k rows)")
    subsample: int | None = _opt(None, "reference subsample size in subsample mode")
    executor: str | None = _opt(None, "how the KDE partial sums run on Ray: a grid of Ray tasks (tasks, default) or "
                                      "a Ray Data dataset of query blocks (ray-data); the same scores either way",
                                flag="--kde-executor", choices=KDE_EXECUTORS)

    def __post_init__(self):
        object.__setattr__(self, "bandwidth", parse_bandwidth(self.bandwidth))
        if self.mode not in IWR_MODES:
            raise ValueError(f"unknown IWR mode {self.mode!r}: expected one of {IWR_MODES}")
        if self.kernel not in IWR_KERNELS:
            raise ValueError(f"unknown IWR kernel {self.kernel!r}: expected one of {IWR_KERNELS}")
        if self.mode == "subsample" and (self.subsample is None or self.subsample < 2):
            raise ValueError(f"mode='subsample' needs subsample >= 2 reference points, got {self.subsample}")
        if self.mode == "exact" and self.subsample is not None:
            raise ValueError("subsample is only used with mode='subsample'; got mode='exact'")
        if self.num_shards is not None and self.num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {self.num_shards}")
        if self.executor is not None and self.executor not in KDE_EXECUTORS:
            raise ValueError(f"unknown IWR KDE executor {self.executor!r}: expected one of {KDE_EXECUTORS}")


# -- the registry --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # baseline | scorer | random | datamodel | reference
    summary: str
    config: type | None = None  # the scorer's options (kind "scorer")
    similarity: bool = False  # a retrieval-by-similarity method (the report's "best similarity method")
    level: str | None = None  # the granularity it fills the budget at, when fixed (else the demo's)


_METHODS = (
    Method("target_only", "baseline", "the target demos alone"),
    Method("all", "baseline", "every prior step, co-trained with the target"),
    Method("sr", "scorer", "state retrieval: nearest target state", StateNearestConfig, similarity=True),
    Method("ar", "scorer", "action retrieval: nearest target action", StateNearestConfig, similarity=True),
    Method("br", "scorer", "Behavior Retrieval: nearest target step in a VAE's latent space", BrConfig,
           similarity=True),
    Method("strap", "scorer", "STRAP: sub-trajectories matched by subsequence DTW", StrapConfig, similarity=True,
           level="step"),
    Method("iwr", "scorer", "importance-weighted retrieval: KDE density ratio", IwrConfig, similarity=True),
    Method("random", "scorer", "uniform random scores", RandomConfig),
    Method("random-subtraj", "random", "random, one draw per sub-trajectory", level="subtraj"),
    Method("random-episode", "random", "random, one draw per episode", level="episode"),
    Method("datamodel-regression", "datamodel", "DataMIL: a linear datamodel over subset-trained policies"),
    Method("datamodel-metagrad", "datamodel", "DataMIL: exact meta-gradients of the target loss"),
    Method("oracle", "reference", "successful prior demos only, random among them", level="episode"),
)
REGISTRY: dict[str, Method] = {m.name: m for m in _METHODS}
KINDS = ("baseline", "scorer", "random", "datamodel", "reference")


def get(name: str) -> Method:
    """The method called ``name``; an error listing the known ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {tuple(REGISTRY)}") from None


def names(*kinds: str, similarity: bool | None = None) -> tuple[str, ...]:
    """Method names in registry order, of the given kinds (all when none) and similarity flag."""
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown method kind(s) {bad}; known: {KINDS}")
    return tuple(m.name for m in _METHODS if (not kinds or m.kind in kinds)
                 and (similarity is None or m.similarity == similarity))


def scorer_config(method: str, **options) -> Any:
    """The checked config of scorer ``method`` from ``options``; an option it does not take is an
    error naming it and the ones it takes (never silently ignored)."""
    m = get(method)
    if m.config is None:
        raise ValueError(f"{method!r} is not a scorer (a {m.kind}); scorers: {names('scorer')}")
    accepted = {f.name for f in fields(m.config)}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"option(s) {unknown} do not apply to method {method!r}; it takes {sorted(accepted)}")
    return m.config(**options)


def scorer_options(method: str, **options) -> dict[str, Any]:
    """:func:`scorer_config` as the keyword arguments of the scorer's stage function."""
    return asdict(scorer_config(method, **options))


def option_fields() -> dict[str, tuple[Any, list[str]]]:
    """Every scorer option once: {name: (its dataclass field, the scorers taking it)}, in registry
    order (what ``distcur score`` builds its flags from)."""
    out: dict[str, tuple[Any, list[str]]] = {}
    for name in names("scorer"):
        for f in fields(REGISTRY[name].config):
            out.setdefault(f.name, (f, []))[1].append(name)
    return out

