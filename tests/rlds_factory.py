"""Factory that builds small OXE-like RLDS datasets on disk with TFDS itself.

Used by the RLDS reader tests and the ingest benchmark. Writing needs TensorFlow (TFDS's
writers use it); reading the result back through distcur must not.

The features follow the published OXE specs: two encoded images (jpeg + png), a state
vector, a dict action ``world_vector / rotation_delta / gripper_closedness_action`` (fractal
layout) and the language instruction either per step (``language_instruction``) or in the
observation (``observation/natural_language_instruction``, the older sets).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import numpy as np

IMAGE_HW = (8, 10)
STATE_DIM = 5
# observation keys the state is split into, with their widths (the default: one 5-d observation/state)
STATE_LAYOUT = (("state", STATE_DIM),)
# RT-1's fractal20220817_data: 7-d end-effector pose and a 1-d gripper state (rlds_configs.CONFIGS)
FRACTAL_STATE_LAYOUT = (("base_pose_tool_reached", 7), ("gripper_closed", 1))


@dataclass
class FactoryEpisode:
    """What the factory wrote for one episode (the expected values of an ingest)."""

    steps: int
    instruction: str
    image: list[bytes]
    wrist_image: list[bytes]
    state: np.ndarray  # (T, state dim) float32
    world_vector: np.ndarray  # (T, 3)
    rotation_delta: np.ndarray  # (T, 3)
    gripper: np.ndarray  # (T, 1)
    reward: np.ndarray  # (T,)
    is_terminal: np.ndarray  # (T,) bool

    @property
    def action(self) -> np.ndarray:
        """Flattened in the documented fractal order: world_vector, rotation_delta, gripper."""
        return np.concatenate([self.world_vector, self.rotation_delta, self.gripper], axis=1)


@dataclass
class FactoryDataset:
    """A dataset written by :func:`make_rlds_dataset`: its directory and what it holds."""

    path: str
    name: str
    file_format: str
    num_shards: int
    episodes: list[FactoryEpisode] = field(default_factory=list)

    @property
    def num_steps(self) -> int:
        return sum(e.steps for e in self.episodes)


def _encode(image: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG" if fmt == "jpeg" else "PNG")
    return buf.getvalue()


def make_episode(
    rng: np.random.Generator, index: int, steps: int, image_hw: tuple[int, int] = IMAGE_HW, state_dim: int = STATE_DIM
) -> FactoryEpisode:
    h, w = image_hw
    images = [_encode(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "jpeg") for _ in range(steps)]
    wrist = [_encode(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "png") for _ in range(steps)]
    terminal = np.zeros(steps, bool)
    terminal[-1] = bool(index % 2)
    return FactoryEpisode(
        steps=steps,
        instruction=f"pick object {index % 3}",
        image=images,
        wrist_image=wrist,
        state=rng.normal(size=(steps, state_dim)).astype(np.float32),
        world_vector=rng.normal(size=(steps, 3)).astype(np.float32),
        rotation_delta=rng.normal(size=(steps, 3)).astype(np.float32),
        gripper=rng.uniform(-1, 1, size=(steps, 1)).astype(np.float32),
        reward=(np.arange(steps) == steps - 1).astype(np.float32) * (index % 2),
        is_terminal=terminal,
    )


def rlds_features(language_in_observation: bool = False, image_hw: tuple[int, int] = IMAGE_HW,
                  state_layout: tuple = STATE_LAYOUT):
    """The TFDS FeaturesDict of the factory's datasets (OXE-like)."""
    import tensorflow_datasets as tfds

    h, w = image_hw
    observation = {
        "image": tfds.features.Image(shape=(h, w, 3), dtype=np.uint8, encoding_format="jpeg"),
        "wrist_image": tfds.features.Image(shape=(h, w, 3), dtype=np.uint8, encoding_format="png"),
        **{k: tfds.features.Tensor(shape=(d,), dtype=np.float32) for k, d in state_layout},
    }
    step = {
        "action": tfds.features.FeaturesDict(
            {
                "world_vector": tfds.features.Tensor(shape=(3,), dtype=np.float32),
                "rotation_delta": tfds.features.Tensor(shape=(3,), dtype=np.float32),
                "gripper_closedness_action": tfds.features.Tensor(shape=(1,), dtype=np.float32),
            }
        ),
        "reward": tfds.features.Scalar(dtype=np.float32),
        "discount": tfds.features.Scalar(dtype=np.float32),
        "is_first": tfds.features.Scalar(dtype=np.bool_),
        "is_last": tfds.features.Scalar(dtype=np.bool_),
        "is_terminal": tfds.features.Scalar(dtype=np.bool_),
    }
    if language_in_observation:
        observation["natural_language_instruction"] = tfds.features.Text()
    else:
        step["language_instruction"] = tfds.features.Text()
    step["observation"] = tfds.features.FeaturesDict(observation)
    return tfds.features.FeaturesDict(
        {
            "steps": tfds.features.Dataset(step),
            "episode_metadata": tfds.features.FeaturesDict({"file_path": tfds.features.Text()}),
        }
    )


def episode_example(ep: FactoryEpisode, index: int, language_in_observation: bool,
                    state_layout: tuple = STATE_LAYOUT) -> dict:
    bounds = np.cumsum([0, *(d for _, d in state_layout)])
    steps = []
    for t in range(ep.steps):
        observation = {"image": ep.image[t], "wrist_image": ep.wrist_image[t],
                       **{k: ep.state[t, bounds[i]:bounds[i + 1]] for i, (k, _) in enumerate(state_layout)}}
        step = {
            "action": {
                "world_vector": ep.world_vector[t],
                "rotation_delta": ep.rotation_delta[t],
                "gripper_closedness_action": ep.gripper[t],
            },
            "reward": ep.reward[t],
            "discount": np.float32(1.0),
            "is_first": t == 0,
            "is_last": t == ep.steps - 1,
            "is_terminal": bool(ep.is_terminal[t]),
        }
        if language_in_observation:
            observation["natural_language_instruction"] = ep.instruction
        else:
            step["language_instruction"] = ep.instruction
        step["observation"] = observation
        steps.append(step)
    return {"steps": steps, "episode_metadata": {"file_path": f"episode_{index}.npz"}}


def make_rlds_dataset(
    root: str | os.PathLike,
    name: str = "factory_rlds",
    file_format: str = "tfrecord",
    num_episodes: int = 6,
    num_shards: int = 2,
    steps: tuple[int, int] = (3, 7),
    seed: int = 0,
    language_in_observation: bool = False,
    episodes: list[FactoryEpisode] | None = None,
    image_hw: tuple[int, int] = IMAGE_HW,
    state_layout: tuple = STATE_LAYOUT,
) -> FactoryDataset:
    """Write an RLDS dataset with TFDS (``file_format`` 'tfrecord' or 'array_record').

    Returns the dataset directory (``root/name/1.0.0``) and the episodes in file order
    (shards are written in order with shuffling disabled). Pass ``episodes`` to write the
    same episodes again with another format or shard count. ``state_layout``: the observation
    keys the state is written under, with their widths (``FRACTAL_STATE_LAYOUT``: RT-1's).
    """
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(seed)
    if episodes is None:
        episodes = [
            make_episode(rng, i, int(rng.integers(steps[0], steps[1] + 1)), image_hw,
                         sum(d for _, d in state_layout)) for i in range(num_episodes)
        ]
    examples = [(i, episode_example(ep, i, language_in_observation, state_layout)) for i, ep in enumerate(episodes)]
    builder = tfds.dataset_builders.store_as_tfds_dataset(
        name=name,
        version="1.0.0",
        features=rlds_features(language_in_observation, image_hw, state_layout),
        split_datasets={"train": examples},
        data_dir=os.fspath(root),
        file_format=file_format,
        download_config=tfds.download.DownloadConfig(num_shards=num_shards),
        disable_shuffling=True,
    )
    return FactoryDataset(
        path=os.fspath(builder.data_dir), name=name, file_format=file_format, num_shards=num_shards,
        episodes=episodes,
    )
