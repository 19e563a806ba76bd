"""RLDS ingest: Ray Data against the same parsing in one process, and peak memory at 1x vs 16x.

    python benchmarks/bench_ingest.py [--shards 16] [--episodes-per-shard 8] [--steps 25] [--scale 16]

Writes benchmarks/results/ingest.json::

    ray_vs_single_process  median over paired runs of (Ray Data steps/s) / (one plain process steps/s),
                           both reading the 16x dataset with the same code (distcur.sources.rlds.ingest_shard)
    peak_rss_ratio_16x     peak RSS (summed over the process tree: driver, raylet, Ray workers) of a Ray
                           ingest of the 16x dataset / of the 1x dataset, each in a fresh process
    steps_per_s            Ray Data ingest throughput on the 16x dataset (median)

The 1x dataset is written by TFDS (tests/rlds_factory.py: OXE-like features, jpeg + png images);
the 16x dataset repeats each TFRecord shard file 16 times (same shard count, 16x episodes per
shard), so per-shard work grows 16x and only streaming keeps memory flat. Every process runs its
own local Ray (num_cpus = usable cores) and a warm-up ingest of the 1x dataset before the timed one.
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

from common import init_local_ray, machine_facts, run_ingest_child, summarize, write_result  # noqa: E402

from distcur.sources.rlds_configs import OXE_DICT_ACTION, RLDSConfig  # noqa: E402

CONFIG = RLDSConfig(
    name="bench_rlds",
    state_keys=("observation/state",),
    action_keys=OXE_DICT_ACTION,
    language_key="language_instruction",
    image_keys=("observation/image", "observation/wrist_image"),
)


def build_datasets(workdir: str, shards: int, episodes_per_shard: int, steps: int, image: int, scale: int):
    """(1x dataset dir, scale-x dataset dir, steps at 1x)."""
    from rlds_factory import make_rlds_dataset

    one = make_rlds_dataset(os.path.join(workdir, "x1"), name="bench_rlds", file_format="tfrecord",
                            num_episodes=shards * episodes_per_shard, num_shards=shards, steps=(steps, steps),
                            image_hw=(image, image), seed=0)
    big = os.path.join(workdir, f"x{scale}", "bench_rlds", "1.0.0")
    os.makedirs(big, exist_ok=True)
    info = json.load(open(os.path.join(one.path, "dataset_info.json")))
    for split in info["splits"]:
        split["shardLengths"] = [str(int(n) * scale) for n in split["shardLengths"]]
        split["numBytes"] = str(int(split.get("numBytes", 0)) * scale)
    json.dump(info, open(os.path.join(big, "dataset_info.json"), "w"))
    shutil.copy(os.path.join(one.path, "features.json"), big)
    for name in os.listdir(one.path):
        if ".tfrecord-" in name:
            data = open(os.path.join(one.path, name), "rb").read()
            with open(os.path.join(big, name), "wb") as f:
                for _ in range(scale):  # TFRecord files concatenate: records are self-framed
                    f.write(data)
    return one.path, big, one.num_steps


def child(mode: str, dataset: str, warmup: str | None, store_dir: str) -> None:
    """One ingest in this (fresh) process; prints {"steps", "wall_s"} of the timed ingest."""
    from distcur.stages.ingest import RLDSIngestConfig, run_rlds
    from distcur.store import Store

    executor = None
    if mode == "ray":
        from distcur.distributed.ingest import ray_mapper

        init_local_ray()
        executor = ray_mapper(progress=False)

    def run(path: str, store: Store):
        return run_rlds(store, RLDSIngestConfig(path=path, dataset=CONFIG.name, source="bench"), executor,
                        rlds_config=CONFIG, force=True, progress=False)

    if warmup:
        run(warmup, Store(os.path.join(store_dir, "warmup")))
    t0 = time.perf_counter()
    result = run(dataset, Store(os.path.join(store_dir, "timed")))
    wall = time.perf_counter() - t0
    print(json.dumps({"steps": result.manifest.rows, "wall_s": wall}))


def run_child(mode: str, dataset: str, warmup: str | None, workdir: str) -> dict:
    """One measurement in a fresh process; retried when Ray fails to start on a loaded machine."""
    def make_cmd(store_dir: str) -> list[str]:
        return [sys.executable, os.path.abspath(__file__), "--child", mode, dataset, store_dir, *([warmup] if warmup else [])]

    return run_ingest_child(make_cmd, workdir, mode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--episodes-per-shard", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25, help="steps per episode")
    parser.add_argument("--image", type=int, default=32, help="image side (two images per step)")
    parser.add_argument("--scale", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, dataset, store_dir, *warmup = args.child
        child(mode, dataset, warmup[0] if warmup else None, store_dir)
        return

    facts = machine_facts()
    workdir = tempfile.mkdtemp(prefix="bench-ingest-")
    try:
        t0 = time.time()
        x1, big, steps_1x = build_datasets(workdir, args.shards, args.episodes_per_shard, args.steps, args.image,
                                           args.scale)
        print(f"datasets built in {time.time() - t0:.0f}s: {steps_1x} steps at 1x", flush=True)
        big_label = f"x{args.scale}"
        runs: dict[str, list[dict]] = {"ray_x1": [], f"ray_{big_label}": [], "single_x1": [], f"single_{big_label}": []}
        for i in range(args.runs):  # interleaved, so machine load drifts hit every side alike
            for mode, label, path in (("ray", big_label, big), ("single", big_label, big),
                                      ("ray", "x1", x1), ("single", "x1", x1)):
                r = run_child(mode, path, x1, workdir)
                runs[f"{mode}_{label}"].append(r)
                print(f"run {i} {mode} {label}: {r['steps_per_s']:.0f} steps/s, "
                      f"peak rss {r['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    ray_big, single_big = runs[f"ray_{big_label}"], runs[f"single_{big_label}"]
    ratios = [a["steps_per_s"] / b["steps_per_s"] for a, b in zip(ray_big, single_big)]

    def rss(key: str, field: str = "peak_rss_bytes") -> dict:
        return summarize([r[field] for r in runs[key]])

    ray_sps = summarize([r["steps_per_s"] for r in ray_big])
    payload = {
        "ray_vs_single_process": round(summarize(ratios)["median"], 3),
        "peak_rss_ratio_16x": round(rss(f"ray_{big_label}")["median"] / rss("ray_x1")["median"], 3),
        "steps_per_s": round(ray_sps["median"], 1),
        "figures": {
            "ray_vs_single_process": summarize(ratios),
            "ray_steps_per_s": ray_sps,
            "single_process_steps_per_s": summarize([r["steps_per_s"] for r in single_big]),
            "ray_peak_rss_bytes_1x": rss("ray_x1"),
            f"ray_peak_rss_bytes_{big_label}": rss(f"ray_{big_label}"),
            "ray_largest_process_peak_rss_bytes_1x": rss("ray_x1", "peak_single_rss_bytes"),
            f"ray_largest_process_peak_rss_bytes_{big_label}": rss(f"ray_{big_label}", "peak_single_rss_bytes"),
            "single_process_peak_rss_bytes_1x": rss("single_x1"),
            f"single_process_peak_rss_bytes_{big_label}": rss(f"single_{big_label}"),
            "single_process_peak_rss_ratio_16x": round(
                rss(f"single_{big_label}")["median"] / rss("single_x1")["median"], 3),
        },
        "inputs": {
            "format": "tfrecord (TFDS-written, OXE-like: jpeg + png images, dict action, language)",
            "shards": args.shards, "episodes_per_shard_1x": args.episodes_per_shard,
            "steps_per_episode": args.steps, "image_side": args.image, "scale": args.scale,
            "steps_1x": steps_1x, f"steps_{args.scale}x": steps_1x * args.scale, "runs": args.runs,
            "rows_per_part": 100_000, "ray_num_cpus": len(os.sched_getaffinity(0)),
        },
        "method": (
            "Each measurement is a fresh process that ingests the 1x dataset once (warm-up: Ray workers "
            "started, imports done) and then the measured dataset (1x or 16x); throughput is the wall time of "
            "the measured ingest call; 'single' runs the same per-shard code sequentially without Ray. "
            "Memory: peak of the summed RSS over the process tree (driver + raylet/GCS + Ray workers) sampled "
            "every 50 ms over the whole process; Ray's fixed footprint dominates it, so the largest single "
            "process and the no-Ray process are reported too. The machine is shared with other engineers' "
            "jobs (see machine.load_average_1_5_15), so absolute rates are low and noisy."
        ),
        "machine": facts,
    }
    path = write_result("ingest", payload)
    print(json.dumps({k: payload[k] for k in ("ray_vs_single_process", "peak_rss_ratio_16x", "steps_per_s")}))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
