"""Small robomimic / LIBERO HDF5 files written with h5py in their published layout
(data/demo_N/{obs/<key>, actions, rewards, dones}, mask/<filter_key>, data.attrs env_args /
problem_info)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

LOW_DIM = {"robot0_eef_pos": 3, "robot0_gripper_qpos": 2, "object": 4}
CAMERA = "agentview_image"
HW = (6, 8)


@dataclass
class Demo:
    name: str
    obs: dict[str, np.ndarray]
    actions: np.ndarray
    rewards: np.ndarray
    dones: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.actions)

    def state(self, keys=None) -> np.ndarray:
        keys = sorted(LOW_DIM) if keys is None else keys
        return np.concatenate([self.obs[k].reshape(self.steps, -1) for k in keys], axis=1).astype(np.float32)


@dataclass
class HDF5Fixture:
    path: str
    demos: list[Demo]
    masks: dict[str, list[str]] = field(default_factory=dict)


def make_hdf5(path, num_demos: int = 12, seed: int = 0, instruction: str | None = "put the bowl on the plate",
              masks: dict[str, list[str]] | None = None, control_freq: float = 20.0, action_dim: int = 7,
              with_camera: bool = True) -> HDF5Fixture:
    import h5py

    rng = np.random.default_rng(seed)
    demos = []
    for i in range(num_demos):
        t = int(rng.integers(3, 7))
        obs = {k: rng.normal(size=(t, d)).astype(np.float64) for k, d in LOW_DIM.items()}
        if with_camera:
            obs[CAMERA] = rng.integers(0, 256, (t, *HW, 3), dtype=np.uint8)
        dones = np.zeros(t, np.int64)
        dones[-1] = 1
        demos.append(Demo(f"demo_{i}", obs, rng.normal(size=(t, action_dim)), (np.arange(t) == t - 1).astype(np.float64),
                          dones))
    if masks is None:
        names = [d.name for d in demos]
        masks = {"train": names[: int(num_demos * 0.75)], "valid": names[int(num_demos * 0.75):],
                 "20_percent": names[::5]}
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["total"] = sum(d.steps for d in demos)
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1,
                                             "env_kwargs": {"control_freq": control_freq}})
        if instruction is not None:
            data.attrs["problem_info"] = json.dumps({"problem_name": "libero_task", "domain_name": "kitchen",
                                                     "language_instruction": instruction})
        for d in reversed(demos):  # written out of order: the reader sorts by demo number
            g = data.create_group(d.name)
            g.attrs["num_samples"] = d.steps
            for k, v in d.obs.items():
                g.create_dataset(f"obs/{k}", data=v)
            g.create_dataset("actions", data=d.actions)
            g.create_dataset("rewards", data=d.rewards)
            g.create_dataset("dones", data=d.dones)
        m = f.create_group("mask")
        for k, names in masks.items():
            m.create_dataset(k, data=np.array(names, dtype="S"))
    return HDF5Fixture(str(path), demos, masks)
