"""Declarative per-dataset configs for reading RLDS (Open X-Embodiment) datasets.

An :class:`RLDSConfig` says where each canonical step column comes from inside an RLDS
step. Keys are ``/``-separated paths relative to one step of ``steps`` (TFDS's flattened
feature names without the ``steps/`` prefix), e.g. ``observation/state`` or
``action/world_vector``.

Flattening order (documented, and what the manifest metadata records):

- ``state``  = concatenation of ``state_keys`` in the order given, each reshaped to (T, -1).
- ``action`` = concatenation of ``action_keys`` in the order given, each reshaped to (T, -1);
  booleans become 0.0 / 1.0. A tensor action is the single key ``action``; the OXE dict action
  is ``world_vector (3), rotation_delta (3), gripper (1)``.
- ``task``   = ``language_key`` decoded as UTF-8 (or from Unicode code points for
  language_table, ``language_encoding="codepoints"``); ``default_task`` when there is none.
- ``image``  = the first of ``image_keys``, kept as the encoded bytes (jpeg/png) as stored.

The shipped configs follow the datasets' published TFDS feature specs (Open X-Embodiment,
as catalogued by octo's and openvla's per-dataset configs); state and action choices follow
those catalogues (end-effector pose + gripper state; end-effector deltas + gripper action).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

LANGUAGE_ENCODINGS = ("utf8", "codepoints")


@dataclass(frozen=True)
class RLDSConfig:
    """Where the canonical step columns come from in one RLDS dataset.

    name: the config's name (also the default source name).
    state_keys / action_keys: step feature paths concatenated in order (see module doc).
    language_key: step feature path of the instruction, or None.
    image_keys: step feature paths of camera images; the first is stored in ``image``.
    state_dim / action_dim: expected flattened dims; None to accept what the data has.
    control_frequency: Hz, recorded in the manifest (None when unknown).
    success: the episode outcome to record for every episode (e.g. True for a dataset of
        curated demonstrations), or None when unknown.
    """

    name: str
    state_keys: tuple[str, ...]
    action_keys: tuple[str, ...]
    language_key: str | None = None
    language_encoding: str = "utf8"
    image_keys: tuple[str, ...] = ()
    reward_key: str | None = "reward"
    state_dim: int | None = None
    action_dim: int | None = None
    control_frequency: float | None = None
    success: bool | None = None
    default_task: str = ""

    def __post_init__(self) -> None:
        for field_name in ("state_keys", "action_keys", "image_keys"):
            value = getattr(self, field_name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, field_name, tuple(k.strip("/") for k in value))
        if not self.name:
            raise ValueError("RLDSConfig.name must be non-empty")
        if not self.state_keys:
            raise ValueError(f"RLDSConfig {self.name!r}: state_keys must name at least one step feature")
        if not self.action_keys:
            raise ValueError(f"RLDSConfig {self.name!r}: action_keys must name at least one step feature")
        if self.language_encoding not in LANGUAGE_ENCODINGS:
            raise ValueError(
                f"RLDSConfig {self.name!r}: language_encoding {self.language_encoding!r} is not one of "
                f"{LANGUAGE_ENCODINGS}"
            )
        for dim_name in ("state_dim", "action_dim"):
            dim = getattr(self, dim_name)
            if dim is not None and dim <= 0:
                raise ValueError(f"RLDSConfig {self.name!r}: {dim_name} must be positive, got {dim}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def required_keys(self) -> tuple[str, ...]:
        """Every step feature path this config reads."""
        keys = [*self.state_keys, *self.action_keys, *self.image_keys[:1], "is_first", "is_last", "is_terminal"]
        if self.language_key:
            keys.append(self.language_key)
        if self.reward_key:
            keys.append(self.reward_key)
        return tuple(keys)


OXE_DICT_ACTION = ("action/world_vector", "action/rotation_delta", "action/gripper_closedness_action")

CONFIGS: dict[str, RLDSConfig] = {
    # RT-1 (fractal): 7-d end-effector pose + 1-d gripper state; dict action flattened as
    # world_vector (3), rotation_delta (3), gripper_closedness_action (1); 3 Hz.
    "fractal20220817_data": RLDSConfig(
        name="fractal20220817_data",
        state_keys=("observation/base_pose_tool_reached", "observation/gripper_closed"),
        action_keys=OXE_DICT_ACTION,
        language_key="observation/natural_language_instruction",
        image_keys=("observation/image",),
        state_dim=8,
        action_dim=7,
        control_frequency=3.0,
    ),
    # Bridge as published in OXE (``bridge``): 7-d state; dict action world_vector (3),
    # rotation_delta (3), open_gripper (bool -> 0/1); instruction in the observation; 5 Hz.
    "bridge": RLDSConfig(
        name="bridge",
        state_keys=("observation/state",),
        action_keys=("action/world_vector", "action/rotation_delta", "action/open_gripper"),
        language_key="observation/natural_language_instruction",
        image_keys=("observation/image",),
        state_dim=7,
        action_dim=7,
        control_frequency=5.0,
    ),
    # BridgeData V2 in RLDS (``bridge_dataset``): 7-d state, 7-d tensor action, step-level
    # language_instruction, four cameras image_0..image_3 (image_0 is the fixed main view); 5 Hz.
    "bridge_dataset": RLDSConfig(
        name="bridge_dataset",
        state_keys=("observation/state",),
        action_keys=("action",),
        language_key="language_instruction",
        image_keys=("observation/image_0", "observation/image_1"),
        state_dim=7,
        action_dim=7,
        control_frequency=5.0,
    ),
    # Language-Table: 2-d effector translation as state, 2-d tensor action, instruction as
    # int32 Unicode code points (zero padded) in the observation, rgb camera; 10 Hz.
    "language_table": RLDSConfig(
        name="language_table",
        state_keys=("observation/effector_translation",),
        action_keys=("action",),
        language_key="observation/instruction",
        language_encoding="codepoints",
        image_keys=("observation/rgb",),
        state_dim=2,
        action_dim=2,
        control_frequency=10.0,
    ),
}


def get_config(name: str) -> RLDSConfig:
    """The shipped config called ``name``; a clear error listing the known ones otherwise."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(
            f"unknown RLDS dataset config {name!r}; known: {sorted(CONFIGS)} "
            "(or describe the dataset with --state-keys/--action-keys/--language-key/--image-keys)"
        ) from None


def config_from_keys(
    name: str,
    state_keys: list[str] | tuple[str, ...],
    action_keys: list[str] | tuple[str, ...],
    language_key: str | None = None,
    image_keys: list[str] | tuple[str, ...] = (),
    language_encoding: str = "utf8",
    control_frequency: float | None = None,
) -> RLDSConfig:
    """A generic config for a dataset without a shipped one (e.g. built from CLI flags)."""
    return RLDSConfig(
        name=name,
        state_keys=tuple(state_keys),
        action_keys=tuple(action_keys),
        language_key=language_key,
        language_encoding=language_encoding,
        image_keys=tuple(image_keys),
        control_frequency=control_frequency,
    )
