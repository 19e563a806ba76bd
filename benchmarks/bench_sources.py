"""Ingest of every file source (HDF5, Parquet, LeRobot, RLDS): Ray Data against one plain process, and
peak memory when the input grows 16x.

    python benchmarks/bench_sources.py [--sources hdf5 parquet lerobot rlds] [--files 8] [--runs 3]

Updates the ``ingest`` key of benchmarks/results/sources.json (read, updated, written back atomically:
other scripts' figures in that file are kept)::

    ingest.<source>.ray_vs_single_process   median over paired runs of (Ray Data steps/s) / (one plain
                                            process steps/s), both ingesting the 16x input with the same
                                            per-shard code (``mapper=None`` runs it sequentially)
    ingest.<source>.peak_rss_ratio_16x      peak RSS of the process tree (driver, raylet, Ray workers) of a
                                            Ray ingest of the 16x input / of the 1x input, fresh processes
    ingest.<source>.steps_per_s             Ray Data throughput on the 16x input (median)
    ingest.machine                          machine facts, load average included

The method is bench_ingest.py's (RLDS): every measurement is a fresh process that ingests the 1x input
once (warm-up) and then the measured one; runs are interleaved so load drifts hit both sides alike. The
16x input has the same number of files, each 16x larger (16x the demos / episodes / rows per file), so
per-shard work grows 16x and only streaming keeps memory flat. Inputs are written with each format's own
writer (h5py, pyarrow, the LeRobot v3 layout, TFDS) by the test factories, with camera images.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from common import init_local_ray, machine_facts, run_ingest_child, summarize, update_result  # noqa: E402

SOURCES = ("hdf5", "parquet", "lerobot", "rlds")
PARQUET_MAP = ["state=obs", "action=act", "episode=ep", "step=t", "task=instruction", "image=img"]


def _build_hdf5(out: str, files: int, demos_per_file: int) -> str:
    from hdf5_factory import make_hdf5

    os.makedirs(out, exist_ok=True)
    for i in range(files):
        make_hdf5(os.path.join(out, f"part-{i:03d}.hdf5"), num_demos=demos_per_file, seed=i)
    return out


def _build_parquet(out: str, files: int, episodes_per_file: int, steps: int, image: int) -> str:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distcur.sources.common import encode_image

    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(0)
    frame = encode_image(rng.integers(0, 256, (image, image, 3), dtype=np.uint8), "jpeg")
    for i in range(files):
        n = episodes_per_file * steps
        ep = np.repeat(np.arange(i * episodes_per_file, (i + 1) * episodes_per_file), steps)
        obs = rng.normal(size=(n, 9)).astype(np.float32)
        act = rng.normal(size=(n, 7)).astype(np.float32)
        table = pa.table({
            "ep": pa.array(ep, pa.int64()), "t": pa.array(np.tile(np.arange(steps), episodes_per_file), pa.int64()),
            "obs": pa.FixedSizeListArray.from_arrays(pa.array(obs.ravel()), 9),
            "act": pa.FixedSizeListArray.from_arrays(pa.array(act.ravel()), 7),
            "instruction": pa.array([f"task {e % 3}" for e in ep]), "img": pa.array([frame] * n, pa.binary()),
        })
        pq.write_table(table, os.path.join(out, f"part-{i:03d}.parquet"), row_group_size=4096)
    return out


def _build_lerobot(out: str, files: int, episodes_per_file: int, steps: int) -> str:
    from lerobot_factory import make_lerobot

    make_lerobot(out, lengths=[steps] * (files * episodes_per_file), episodes_per_file=episodes_per_file)
    return out


def build_inputs(kind: str, workdir: str, files: int, per_file: int, steps: int, image: int, scale: int) -> tuple:
    """(1x input, scale-x input, steps at 1x) of one source kind; the scale-x input has the same files,
    each ``scale`` times larger."""
    if kind == "rlds":
        from bench_ingest import build_datasets

        return build_datasets(os.path.join(workdir, "rlds"), files, per_file, steps, image, scale)
    inputs = []
    for label, n in (("x1", per_file), (f"x{scale}", per_file * scale)):
        out = os.path.join(workdir, kind, label)
        if kind == "hdf5":
            inputs.append(_build_hdf5(out, files, n))
        elif kind == "parquet":
            inputs.append(_build_parquet(out, files, n, steps, image))
        else:
            inputs.append(_build_lerobot(out, files, n, steps))
    return inputs[0], inputs[1], None


def _ingest(kind: str, path: str, store, mapper):
    """One ingest of ``path`` (a folder of the source's files) with ``mapper`` (None: this process)."""
    from distcur.stages import ingest

    kwargs = dict(force=True, progress=False)
    if kind == "hdf5":
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".hdf5"))
        return ingest.run_hdf5(store, ingest.HDF5IngestConfig(paths=tuple(files), source="bench"), mapper, **kwargs)
    if kind == "parquet":
        return ingest.run_parquet(store, ingest.ParquetIngestConfig(path=path, source="bench", map=tuple(PARQUET_MAP)),
                                  mapper, **kwargs)
    if kind == "lerobot":
        return ingest.run_lerobot(store, ingest.LeRobotIngestConfig(root=path, source="bench", reader="files"), mapper,
                                  **kwargs)
    from bench_ingest import CONFIG

    return ingest.run_rlds(store, ingest.RLDSIngestConfig(path=path, dataset=CONFIG.name, source="bench"), mapper,
                           rlds_config=CONFIG, **kwargs)


def child(kind: str, mode: str, dataset: str, warmup: str, store_dir: str) -> None:
    """One ingest in this (fresh) process; prints {"steps", "wall_s"} of the timed ingest."""
    from distcur.store import Store

    mapper = None
    if mode == "ray":
        from distcur.distributed.ingest import ray_mapper

        init_local_ray()
        mapper = ray_mapper(progress=False)
    _ingest(kind, warmup, Store(os.path.join(store_dir, "warmup")), mapper)
    t0 = time.perf_counter()
    result = _ingest(kind, dataset, Store(os.path.join(store_dir, "timed")), mapper)
    print(json.dumps({"steps": result.manifest.rows, "wall_s": time.perf_counter() - t0}))


def run_child(kind: str, mode: str, dataset: str, warmup: str, workdir: str) -> dict:
    def make_cmd(store_dir: str) -> list[str]:
        return [sys.executable, os.path.abspath(__file__), "--child", kind, mode, dataset, warmup, store_dir]

    return run_ingest_child(make_cmd, workdir, f"{kind}-{mode}")


def measure(kind: str, args, workdir: str) -> dict:
    per_file = {"hdf5": args.demos_per_file, "rlds": args.episodes_per_file}.get(kind, args.episodes_per_file)
    t0 = time.time()
    x1, big, _ = build_inputs(kind, workdir, args.files, per_file, args.steps, args.image, args.scale)
    print(f"{kind}: inputs built in {time.time() - t0:.0f}s", flush=True)
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs: dict[str, list[dict]] = {"ray_x1": [], "ray_big": [], "single_big": []}
    for i in range(args.runs):  # interleaved, so machine load drifts hit every side alike
        for mode, label, path in (("ray", "big", big), ("single", "big", big), ("ray", "x1", x1)):
            r = run_child(kind, mode, path, x1, workdir)
            runs[f"{mode}_{label}"].append(r)
            print(f"{kind} run {i} {mode} {label}: {r['steps']} steps, {r['steps_per_s']:.0f} steps/s, peak rss "
                  f"{r['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    ratios = [a["steps_per_s"] / b["steps_per_s"] for a, b in zip(runs["ray_big"], runs["single_big"])]

    def rss(key: str, field: str = "peak_rss_bytes") -> dict:
        return summarize([r[field] for r in runs[key]])

    ray_sps = summarize([r["steps_per_s"] for r in runs["ray_big"]])
    return {
        "ray_vs_single_process": round(summarize(ratios)["median"], 3),
        "peak_rss_ratio_16x": round(rss("ray_big")["median"] / rss("ray_x1")["median"], 3),
        "steps_per_s": round(ray_sps["median"], 1),
        "goals": {"ray_vs_single_process": ">= 0.8", "peak_rss_ratio_16x": "<= 1.5"},
        "figures": {
            "ray_vs_single_process": summarize(ratios),
            "ray_steps_per_s": ray_sps,
            "single_process_steps_per_s": summarize([r["steps_per_s"] for r in runs["single_big"]]),
            "ray_peak_rss_bytes_1x": rss("ray_x1"),
            f"ray_peak_rss_bytes_x{args.scale}": rss("ray_big"),
            "ray_largest_process_peak_rss_bytes_1x": rss("ray_x1", "peak_single_rss_bytes"),
            f"ray_largest_process_peak_rss_bytes_x{args.scale}": rss("ray_big", "peak_single_rss_bytes"),
            f"single_process_peak_rss_bytes_x{args.scale}": rss("single_big"),
        },
        "inputs": {"files": args.files, "per_file_1x": per_file, "scale": args.scale,
                   "steps_1x": runs["ray_x1"][0]["steps"], f"steps_{args.scale}x": runs["ray_big"][0]["steps"],
                   "runs": args.runs},
        "load_average_1_5_15": {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES))
    parser.add_argument("--files", type=int, default=8, help="files (shards) per input")
    parser.add_argument("--episodes-per-file", type=int, default=8, help="Parquet / LeRobot / RLDS episodes per file at 1x")
    parser.add_argument("--demos-per-file", type=int, default=40, help="HDF5 demos (3-6 steps each) per file at 1x")
    parser.add_argument("--steps", type=int, default=25, help="steps per episode (Parquet / LeRobot / RLDS)")
    parser.add_argument("--image", type=int, default=32, help="image side (Parquet, RLDS)")
    parser.add_argument("--scale", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    workdir = tempfile.mkdtemp(prefix="bench-sources-")
    try:
        figures = {}
        for kind in args.sources:
            figures[kind] = measure(kind, args, workdir)
            print(json.dumps({kind: {k: figures[kind][k] for k in ("ray_vs_single_process", "peak_rss_ratio_16x",
                                                                    "steps_per_s")}}), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    try:
        with open(os.path.join(HERE, "results", "sources.json")) as f:
            previous = json.load(f).get("ingest", {})
    except (FileNotFoundError, json.JSONDecodeError):
        previous = {}
    ingest = {**{k: v for k, v in previous.items() if k in SOURCES}, **figures}
    ingest["method"] = (
        "Per source: fresh processes, each ingesting the 1x input (warm-up) then the measured input; Ray Data "
        "(one task per file) against the same per-file code run sequentially in one process (mapper=None), on "
        "the 16x input; memory is the peak summed RSS of the process tree sampled every 50 ms (Ray's fixed "
        "footprint dominates it at these sizes). The machine is shared (see load averages), so absolute rates "
        "are noisy; the ratios are paired within a run.")
    ingest["machine"] = machine_facts()
    ingest["written"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path = update_result("sources", {"ingest": ingest})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
