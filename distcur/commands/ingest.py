"""``distcur ingest``: write a source's canonical step table into the store.

    distcur ingest rlds PATH --dataset NAME --out URI [--source NAME] [--split train ...]
    distcur ingest rlds PATH --dataset NAME --state-keys observation/state --action-keys action ...
    distcur ingest metaworld --target TASK --out URI [--config YAML] [--seed N] [--tasks T ...]
    distcur ingest hdf5 FILE.hdf5 ... --source NAME [--obs-keys K ...] [--image-keys CAM ...] [--filter-key KEY]
    distcur ingest parquet PATH --source NAME --map state=obs.state action=act episode=ep_id [step=t ...]
    distcur ingest lerobot ROOT --source NAME [--state-key observation.state] [--action-key action]

Every kind's flags are its stage config's fields (:mod:`distcur.stages.ingest`); ``--config
YAML`` gives them as a file (``ingest metaworld``: the ``MetaWorldPriorConfig`` options), the flags
winning. ``--store`` is the same option as ``--out`` (the name every other stage uses, so a job's
``common: {store: ...}`` reaches ingest too).

``--dataset`` names a shipped RLDS config (fractal20220817_data, bridge, bridge_dataset,
language_table); with ``--state-keys`` and ``--action-keys`` it names a generic config built
from the flags instead. A rerun with the same inputs and config is skipped (resume).
"""

from __future__ import annotations

import json
import time

from distcur.commands import add_rerun_options, output_store
from distcur.config import DEFAULT_STORE, add_config_flags, config_from_args
from distcur.envs.generation import IMAGE_FORMATS, PRIOR_KINDS, MetaWorldPriorConfig
from distcur.stages.ingest import (
    HDF5IngestConfig,
    LeRobotIngestConfig,
    MetaWorldIngestConfig,
    ParquetIngestConfig,
    RLDSIngestConfig,
)


def register(sub) -> None:
    p = sub.add_parser("ingest", help="ingest a source (RLDS/OXE dataset or the MetaWorld prior) into the store")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")

    r = kinds.add_parser("rlds", help="a TFDS RLDS dataset directory (local or s3://), e.g. an OXE dataset")
    r.add_argument("path", help="dataset directory holding dataset_info.json, features.json and the shards")
    names = ["path", *add_config_flags(r, RLDSIngestConfig, flags={"splits": "--split"}, skip=("path",))]
    _common_options(r)
    r.set_defaults(func=run_rlds, config_names=names)

    m = kinds.add_parser("metaworld", help="generate the MetaWorld prior and target sets (scripted experts)")
    m.add_argument("--config", default=None, help="YAML with MetaWorldPriorConfig options")
    m.add_argument("--prior", choices=PRIOR_KINDS, default="hard",
                   help="hard (the target's successes left out) or datamil (every usable v3 task, 10 demos + 10 "
                        "failures of at least 200 steps each, the target's own demos in the prior): the defaults "
                        "under the YAML's and the flags' own options")
    prior_names = add_config_flags(m, MetaWorldPriorConfig, skip=("kind", "task_counts"),
                                   choices={"image_format": IMAGE_FORMATS}, helps={
        "target": "target task, any MetaWorld v3 task name",
        "tasks": "prior tasks (default: the config's)",
        "image_size": "render every step's camera frame at this size (e.g. 128) into the `image` column (headless: "
                      "MUJOCO_GL=osmesa after apt-get install libosmesa6; ~0.1-0.2 s per frame)",
        "camera": "MetaWorld camera of the rendered frames (default corner)",
        "image_format": "encoding of the frames (default png)"})
    names = add_config_flags(m, MetaWorldIngestConfig, skip=("prior",))
    m.add_argument("--out", "--store", dest="out", default=DEFAULT_STORE,
                   help="store URI (folder or s3://bucket/prefix)")
    add_rerun_options(m)
    m.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    m.set_defaults(func=run_metaworld, config_names=names, prior_names=prior_names)

    h = kinds.add_parser("hdf5", help="robomimic / LIBERO HDF5 files (data/demo_N/{obs,actions,rewards,dones})")
    h.add_argument("paths", nargs="+", metavar="PATH", help="HDF5 files (local or mounted paths)")
    names = ["paths", *add_config_flags(h, HDF5IngestConfig, skip=("paths",))]
    _common_options(h)
    h.set_defaults(func=run_hdf5, config_names=names)

    q = kinds.add_parser("parquet", help="your own step table: a Parquet/Arrow file or a folder of them")
    q.add_argument("path", help="a .parquet/.arrow/.feather file or a folder of them (local or s3://)")
    names = ["path", *add_config_flags(q, ParquetIngestConfig, skip=("path",))]
    _common_options(q)
    q.set_defaults(func=run_parquet, config_names=names)

    lr = kinds.add_parser("lerobot", help="a LeRobot v3 dataset root (local or s3://)")
    lr.add_argument("root", help="dataset root holding meta/info.json, meta/tasks.parquet, meta/episodes/, data/")
    names = ["root", *add_config_flags(lr, LeRobotIngestConfig, skip=("root",))]
    _common_options(lr)
    lr.set_defaults(func=run_lerobot, config_names=names)


def _common_options(p) -> None:
    p.add_argument("--config", default=None, help="YAML with the stage config's options (the flags win)")
    p.add_argument("--out", "--store", dest="out", default=DEFAULT_STORE,
                   help="store URI (folder or s3://bucket/prefix)")
    p.add_argument("--force", action="store_true", help="re-ingest even when the committed output matches")
    p.add_argument("--no-ray", action="store_true", help="read in this process instead of Ray Data (same output)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")


def _executor(args):
    """None (read in this process) with ``--no-ray``, else the Ray Data executor."""
    if args.no_ray:
        return None
    from distcur.distributed.ingest import ray_mapper

    return ray_mapper(args.address)


def _print_result(result, store, t0: float) -> int:
    m = result.manifest
    meta = next(iter(m.metadata.values()), {})
    print(json.dumps({
        "key": result.key, "store": store.uri, "skipped": result.skipped, "rows": m.rows,
        "episodes": meta.get("episodes"), "state_dim": meta.get("state_dim"), "action_dim": meta.get("action_dim"),
        "wall_s": round(time.time() - t0, 2),
    }, indent=2))
    return 0


def _run(args, cls, run) -> int:
    from distcur.store import Store

    config = config_from_args(cls, args, args.config_names, source=args.config)
    store = Store(args.out)
    t0 = time.time()
    result = run(store, config, executor=_executor(args), force=args.force)
    return _print_result(result, store, t0)


def run_rlds(args) -> int:
    from distcur.stages.ingest import run_rlds as run

    return _run(args, RLDSIngestConfig, run)


def run_hdf5(args) -> int:
    from distcur.stages.ingest import run_hdf5 as run

    return _run(args, HDF5IngestConfig, run)


def run_parquet(args) -> int:
    from distcur.stages.ingest import run_parquet as run

    return _run(args, ParquetIngestConfig, run)


def run_lerobot(args) -> int:
    from distcur.stages.ingest import run_lerobot as run

    return _run(args, LeRobotIngestConfig, run)


def run_metaworld(args) -> int:
    from distcur import progress
    from distcur.distributed.tasks import RayTasks
    from distcur.stages.ingest import run_metaworld as run

    source = args.config
    if args.prior == "datamil":  # the DataMIL-like defaults, under the YAML's own options
        from distcur.config import read_yaml
        from distcur.envs.generation import datamil_options

        source = {**datamil_options(), **((read_yaml(args.config) or {}) if args.config else {})}
    prior = config_from_args(MetaWorldPriorConfig, args, args.prior_names, source=source)
    config = config_from_args(MetaWorldIngestConfig, args, args.config_names, source={"prior": prior})
    store = output_store(args.out, args)
    executor = RayTasks(args.address, progress=progress.enabled(), label="metaworld episodes")
    info = run(store, config, executor=executor, progress=progress.enabled())
    print(json.dumps(info, indent=2, default=str))
    return 0
