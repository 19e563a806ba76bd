"""``distcur ingest``: write a source's canonical step table into the store.

    distcur ingest rlds PATH --dataset NAME --out URI [--source NAME] [--split train ...]
    distcur ingest rlds PATH --dataset NAME --state-keys observation/state --action-keys action ...
    distcur ingest metaworld --target TASK --out URI [--config YAML] [--seed N] [--tasks T ...]
    distcur ingest hdf5 FILE.hdf5 ... --source NAME [--obs-keys K ...] [--image-keys CAM ...] [--filter-key KEY]
    distcur ingest parquet PATH --source NAME --map state=obs.state action=act episode=ep_id [step=t ...]
    distcur ingest lerobot ROOT --source NAME [--state-key observation.state] [--action-key action]

``--store`` is the same option as ``--out`` (the name every other stage uses, so a job's
``common: {store: ...}`` reaches ingest too).

``--dataset`` names a shipped RLDS config (fractal20220817_data, bridge, bridge_dataset,
language_table); with ``--state-keys`` and ``--action-keys`` it names a generic config built
from the flags instead. A rerun with the same inputs and config is skipped (resume).
"""

from __future__ import annotations

import json
import time

from distcur.commands import add_rerun_options, output_store
from distcur.config import DEFAULT_STORE


def register(sub) -> None:
    p = sub.add_parser("ingest", help="ingest a source (RLDS/OXE dataset or the MetaWorld prior) into the store")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")

    r = kinds.add_parser("rlds", help="a TFDS RLDS dataset directory (local or s3://), e.g. an OXE dataset")
    r.add_argument("path", help="dataset directory holding dataset_info.json, features.json and the shards")
    r.add_argument("--dataset", required=True,
                   help="shipped config name (see --state-keys for a dataset without one)")
    r.add_argument("--out", "--store", dest="out", default=DEFAULT_STORE,
                   help="store URI (folder or s3://bucket/prefix)")
    r.add_argument("--source", default=None, help="source name in the store (default: the dataset name)")
    r.add_argument("--split", nargs="+", default=["train"], help="splits to read, in order (default: train)")
    r.add_argument("--state-keys", nargs="+", default=None,
                   help="generic config: step feature paths concatenated into state, e.g. observation/state")
    r.add_argument("--action-keys", nargs="+", default=None,
                   help="generic config: step feature paths concatenated into action, e.g. action")
    r.add_argument("--language-key", default=None, help="generic config: e.g. language_instruction")
    r.add_argument("--language-encoding", default="utf8", choices=("utf8", "codepoints"))
    r.add_argument("--image-keys", nargs="*", default=(), help="generic config: camera keys, first one is kept")
    r.add_argument("--control-frequency", type=float, default=None, help="generic config: Hz")
    r.add_argument("--rows-per-part", type=int, default=100_000, help="steps per Parquet part (memory bound)")
    r.add_argument("--force", action="store_true", help="re-ingest even when the committed output matches")
    r.add_argument("--no-ray", action="store_true", help="read shards in this process instead of Ray Data")
    r.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    r.set_defaults(func=run_rlds)

    m = kinds.add_parser("metaworld", help="generate the MetaWorld prior and target sets (scripted experts)")
    m.add_argument("--target", default=None, help="target task, any MetaWorld v3 task name")
    m.add_argument("--out", "--store", dest="out", default=DEFAULT_STORE,
                   help="store URI (folder or s3://bucket/prefix)")
    m.add_argument("--config", default=None, help="YAML with MetaWorldPriorConfig options")
    m.add_argument("--seed", type=int, default=None)
    m.add_argument("--prior", choices=("hard", "datamil"), default="hard",
                   help="hard (the target's successes left out) or datamil (every usable v3 task, 10 demos + 10 "
                        "failures of at least 200 steps each, the target's own demos in the prior)")
    m.add_argument("--tasks", nargs="+", default=None, help="prior tasks (default: the config's)")
    m.add_argument("--image-size", type=int, default=None,
                   help="render every step's camera frame at this size (e.g. 128) into the `image` column "
                        "(headless: MUJOCO_GL=osmesa after apt-get install libosmesa6; ~0.1-0.2 s per frame)")
    m.add_argument("--camera", default=None, help="MetaWorld camera of the rendered frames (default corner)")
    m.add_argument("--image-format", choices=("png", "jpeg"), default=None, help="encoding of the frames (default png)")
    add_rerun_options(m)
    m.add_argument("--heldout-demos", type=int, default=5,
                   help="fresh expert demos of the target, never trained on, at steps/source=target-<task>-heldout: "
                        "what `distcur evaluate` scores the proxy loss on (default 5, as `distcur demo`; 0: none)")
    m.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    m.set_defaults(func=run_metaworld)

    h = kinds.add_parser("hdf5", help="robomimic / LIBERO HDF5 files (data/demo_N/{obs,actions,rewards,dones})")
    h.add_argument("paths", nargs="+", metavar="PATH", help="HDF5 files (local or mounted paths)")
    _common_file_options(h)
    h.add_argument("--obs-keys", nargs="+", default=None,
                   help="obs keys concatenated into state, in this order (default: every non-image obs key, sorted)")
    h.add_argument("--action-key", default="actions", help="dataset of each demo holding the actions (default: actions)")
    h.add_argument("--image-keys", nargs="*", default=(),
                   help="camera obs keys (uint8 HxWx3, e.g. agentview_image); the first is kept, encoded, in image")
    h.add_argument("--image-format", default="png", choices=("png", "jpeg"))
    h.add_argument("--filter-key", default=None, help="ingest only the demos of mask/<KEY> (e.g. train, 20_percent)")
    h.add_argument("--task", default=None,
                   help="task of every demo (default: LIBERO's problem_info language_instruction, else the file name)")
    h.add_argument("--control-frequency", type=float, default=None,
                   help="Hz (default: env_args' control_freq when the file records it)")
    h.add_argument("--demos-per-shard", type=int, default=None,
                   help="demos per read task (default: one task per file)")
    h.set_defaults(func=run_hdf5)

    q = kinds.add_parser("parquet", help="your own step table: a Parquet/Arrow file or a folder of them")
    q.add_argument("path", help="a .parquet/.arrow/.feather file or a folder of them (local or s3://)")
    _common_file_options(q)
    q.add_argument("--map", nargs="+", required=True, metavar="CANONICAL=COLUMN[,COLUMN...]",
                   help="canonical column = your column (a list column) or several scalar columns joined by commas, "
                        "e.g. state=obs.state action=act episode=ep_id step=t task=instruction; episode, state and "
                        "action are required; also step, task, reward, image, is_terminal, success")
    q.set_defaults(func=run_parquet)

    lr = kinds.add_parser("lerobot", help="a LeRobot v3 dataset root (local or s3://)")
    lr.add_argument("root", help="dataset root holding meta/info.json, meta/tasks.parquet, meta/episodes/, data/")
    _common_file_options(lr)
    lr.add_argument("--state-key", default="observation.state", help="feature used as state")
    lr.add_argument("--action-key", default="action", help="feature used as action")
    lr.add_argument("--image-key", default=None, help="a camera kept (encoded) in image: an image feature, or a video feature whose mp4 frames are decoded with PyAV (the video extra)")
    lr.add_argument("--reader", default="auto", choices=("auto", "ray-lerobot", "files"),
                    help="ray-lerobot: ray.data.read_lerobot (needs the lerobot package >= 0.5, Python >= 3.12); "
                         "files: one task per data file; auto (default): ray-lerobot when it can run, else files")
    lr.set_defaults(func=run_lerobot)


def _common_file_options(p, source_required: bool = True) -> None:
    p.add_argument("--source", required=source_required, help="source name in the store")
    p.add_argument("--out", "--store", dest="out", default=DEFAULT_STORE,
                   help="store URI (folder or s3://bucket/prefix)")
    p.add_argument("--rows-per-part", type=int, default=100_000, help="steps per Parquet part (memory bound)")
    p.add_argument("--force", action="store_true", help="re-ingest even when the committed output matches")
    p.add_argument("--no-ray", action="store_true", help="read in this process instead of Ray Data (same output)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")


def _mapper(args):
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


def run_parquet(args) -> int:
    from distcur.sources.parquet import ingest_parquet, parse_mapping
    from distcur.store import Store

    t0 = time.time()
    mapping = parse_mapping(args.map)
    store = Store(args.out)
    result = ingest_parquet(args.path, store, args.source, mapping, mapper=_mapper(args), force=args.force,
                            rows_per_part=args.rows_per_part)
    return _print_result(result, store, t0)


def run_lerobot(args) -> int:
    from distcur.sources.lerobot import LeRobotConfig, ingest_lerobot
    from distcur.store import Store

    t0 = time.time()
    config = LeRobotConfig(state_key=args.state_key, action_key=args.action_key, image_key=args.image_key)
    store = Store(args.out)
    result = ingest_lerobot(args.root, store, args.source, config, mapper=_mapper(args), reader=args.reader,
                            force=args.force, rows_per_part=args.rows_per_part)
    return _print_result(result, store, t0)


def run_hdf5(args) -> int:
    from distcur.sources.hdf5 import HDF5Config, ingest_hdf5
    from distcur.store import Store

    t0 = time.time()
    config = HDF5Config(obs_keys=tuple(args.obs_keys) if args.obs_keys else None, action_key=args.action_key,
                        image_keys=tuple(args.image_keys or ()), image_format=args.image_format,
                        filter_key=args.filter_key, control_frequency=args.control_frequency, task=args.task)
    store = Store(args.out)
    result = ingest_hdf5(args.paths, store, args.source, config, mapper=_mapper(args), force=args.force,
                         demos_per_shard=args.demos_per_shard, rows_per_part=args.rows_per_part)
    return _print_result(result, store, t0)


def rlds_config_from_args(args):
    """The shipped config named by ``--dataset``, or a generic one when keys are given."""
    from distcur.sources.rlds_configs import config_from_keys, get_config

    if args.state_keys or args.action_keys:
        if not (args.state_keys and args.action_keys):
            raise ValueError("a generic RLDS config needs both --state-keys and --action-keys")
        return config_from_keys(
            args.dataset, args.state_keys, args.action_keys, language_key=args.language_key,
            image_keys=args.image_keys, language_encoding=args.language_encoding,
            control_frequency=args.control_frequency,
        )
    return get_config(args.dataset)


def run_rlds(args) -> int:
    from distcur.sources.rlds import ingest_rlds
    from distcur.store import Store

    config = rlds_config_from_args(args)
    store = Store(args.out)
    t0 = time.time()
    kwargs = dict(source=args.source, splits=args.split, force=args.force, rows_per_part=args.rows_per_part)
    if args.no_ray:
        result = ingest_rlds(args.path, config, store, **kwargs)
    else:
        from distcur.distributed.ingest import ingest_rlds_ray

        result = ingest_rlds_ray(args.path, config, store, address=args.address, **kwargs)
    return _print_result(result, store, t0)


def run_metaworld(args) -> int:
    from distcur import progress
    from distcur.config import load_config
    from distcur.sources.metaworld import MetaWorldPriorConfig, generate_metaworld

    source = args.config
    if args.prior == "datamil":  # the DataMIL-like defaults, under the YAML's own options
        import yaml

        from distcur.sources.metaworld import datamil_options

        given = {}
        if args.config:
            with open(args.config) as f:
                given = yaml.safe_load(f) or {}
        source = {**datamil_options(), **given}
    config = load_config(MetaWorldPriorConfig, source, target=args.target, seed=args.seed,
                         tasks=tuple(args.tasks) if args.tasks else None, image_size=args.image_size,
                         camera=args.camera, image_format=args.image_format)
    if args.heldout_demos < 0:
        raise ValueError(f"--heldout-demos must be >= 0, got {args.heldout_demos}")
    store = output_store(args.out, args)
    info = generate_metaworld(config, store, address=args.address, progress=progress.enabled())
    if args.heldout_demos:
        from distcur.data import heldout_source, steps_key
        from distcur.stages.demo import write_heldout_target

        write_heldout_target(store, config, args.heldout_demos)
        key = steps_key(heldout_source(config.target))
        info["heldout"] = {"key": store.uri_of(key), "rows": store.manifest(key).rows}
    print(json.dumps(info, indent=2, default=str))
    return 0
