"""Image embedding on CPU, and retrieval on image latents against state latents (rendered MetaWorld).

Writes the ``images`` key of ``benchmarks/results/sources.json`` (read, updated, written back
atomically: other scripts' keys are kept):

- ``throughput``: frames/s of decode + encode on this machine's CPU (torch threads as given) over
  real rendered MetaWorld frames (128 x 128 PNG, camera ``corner``), for decoding alone, the
  ``image-vae`` encoder (BehaviorRetrieval's image variant: 64 x 64 input, latent 128) and the
  ``backbone`` encoder with a DINOv2 ViT-S/14-sized model at 224 x 224 (random weights: the
  speed does not depend on them); the median of 3 runs with min and max; plus the embed stage's
  own rate through Ray Data (rows / wall time of its manifests) in the quality run.
- ``quality`` (unless ``--skip-quality``): on the image variant of one development target
  (rendered prior, the demo's hard-prior rule: the target's successes are not in the prior), BR
  and IWR on image latents (``image-vae``) against BR and IWR on state-action latents (``vae``),
  each selecting 10 % of the prior's steps, co-trained and evaluated by rollouts as ``distcur
  demo`` does (success per seed, 3 seeds), with target-only as the reference. The protocol is
  small (a few tasks, few episodes, frames rendered at 0.1-0.5 s each) and recorded beside the
  figures.

    python benchmarks/bench_images.py [--target drawer-open-v3] [--episodes 10] [--per-task 3] [--skip-quality]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.common import RESULTS_DIR, machine_facts, repeat  # noqa: E402

OUT = os.path.join(RESULTS_DIR, "sources.json")
KEY = "images"


def update_results(path: str, key: str, value: dict) -> None:
    """Read ``path`` (if any), replace its ``key``, write it back atomically."""
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data[key] = value
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def rendered_frames(n: int, unique: int = 64, size: int = 128) -> list[bytes]:
    """``n`` real PNG frames: ``unique`` frames of expert demos of two tasks replayed and rendered
    (camera corner), repeated (decoding and encoding cost per frame, not per distinct frame)."""
    from distcur.envs.generation import MetaWorldPriorConfig, generate_episode
    from distcur.envs.metaworld import render_episode
    from distcur.sources.common import encode_image
    from distcur.sources.metaworld import plan_episodes

    out: list[bytes] = []
    for task in ("drawer-open-v3", "button-press-v3"):
        cfg = MetaWorldPriorConfig(target=task, tasks=(task,), target_demos=1)
        ro, stats = generate_episode(cfg, plan_episodes(cfg)[1][0])
        ro = ro.cut(unique // 2)
        out += [encode_image(f) for f in render_episode(task, stats["seed"], ro, size)]
    return (out * (n // len(out) + 1))[:n]


def throughput(frames: list[bytes], runs: int = 3) -> dict:
    import torch

    from distcur.embed.backbone import DinoViT
    from distcur.embed.encoders import build_encoder
    from distcur.embed.images import decode_images

    n = len(frames)
    action = np.zeros((n, 4), np.float32)
    batch = {"image": np.asarray(frames, object), "action": action}
    out: dict = {"frames": n, "frame": "128x128 PNG, rendered MetaWorld (corner)", "torch_threads": torch.get_num_threads()}

    def rate(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return n / (time.perf_counter() - t0)

    out["decode_only_64"] = repeat(lambda: rate(lambda: decode_images(frames, 64)), runs)
    vae = build_encoder("image-vae", {"train_steps": 0})
    vae.fit({"image": batch["image"][:64], "action": action[:64]})  # initialised weights; speed is what counts
    out["image_vae_64_latent128"] = repeat(lambda: rate(lambda: vae.encode(batch)), runs)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "vits14.pth")
        torch.save(DinoViT(dim=384, depth=12, heads=6, patch=14, grid=37).state_dict(), path)
        vit = build_encoder("backbone", {"weights": path, "image_size": 224, "chunk": 32})
        small = {"image": batch["image"][: min(n, 64)], "action": action[: min(n, 64)]}
        t = repeat(lambda: min(n, 64) / _timed(lambda: vit.encode(small)), runs)
    out["backbone_vits14_224"] = t
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def quality(args, save=lambda partial: None) -> dict:
    """The image-vs-state comparison; ``save(partial)`` records each finished phase (a long run that is
    stopped keeps what it measured)."""
    from distcur.data import embeddings_key
    from distcur.policy.train import TrainConfig
    from distcur.select import SelectConfig
    from distcur.stages import embed, score, select
    from distcur.stages.demo import DemoConfig, DemoEvaluation, _train_evaluate_resumable, ingest
    from distcur.stages.quality import protocol_of
    from distcur.store import Store

    tasks = [args.target] + [t for t in ("drawer-close-v3", "reach-v3", "button-press-v3") if t != args.target]
    prior = {"tasks": tasks[:args.tasks], "success_per_task": args.per_task, "failed_per_task": args.per_task,
             "failed_max_steps": 40, "max_steps": 200, "image_size": args.image_size, "camera": "corner",
             "chunk_episodes": 2}
    cfg = DemoConfig(store=args.store, run="images", target=args.target, methods=("br", "iwr", "target_only"),
                     seeds=(0, 1, 2), prior=prior,
                     evaluation=DemoEvaluation(episodes=args.episodes, max_steps=300, heldout_demos=2),
                     train=TrainConfig(hidden=(256, 256), steps=args.train_steps, checkpoint_every=0))
    store = Store(cfg.store)
    t0 = time.time()
    info = ingest(cfg, store)
    timings = {"ingest_render_s": round(time.time() - t0, 1)}
    manifest = store.manifest("steps/source=metaworld")
    encoders = {"state": ("vae", {"train_steps": 1500}),
                "image": ("image-vae", {"image_size": args.vae_image_size, "channels": args.vae_channels,
                                        "batch_size": 32, "train_steps": args.vae_steps, "fit_rows": 20_000})}
    jobs, embed_rates = [], {}
    for latent, (encoder, options) in encoders.items():
        t0 = time.time()
        out = embed.run(store, embed.EmbedConfig(encoder=encoder, encoder_options=options, device="auto",
                                                 batch_size=1024, concurrency=2))
        timings[f"embed_{latent}_s"] = round(time.time() - t0, 1)
        rows = sum(m.rows for m in out.values())
        stage_s = sum(m.wall_s or 0 for m in out.values())
        embed_rates[encoder] = {"rows": rows, "embed_wall_s": round(stage_s, 2),
                                "frames_per_s": round(rows / stage_s, 1) if stage_s else None,
                                "fit_wall_s": store.manifest(f"encoders/{encoder}").wall_s}
        for method in ("br", "iwr"):
            run = f"images-{latent}-{method}"
            score.run(store, score.ScoreConfig(method=method, target=cfg.target, run=run,
                                               scorer={"encoder": encoder}))
            select.select(store, run, run, SelectConfig(budget_percent=cfg.budget_percent, level="step"))
            jobs += [(f"{method}-{latent}", run, s) for s in cfg.seeds]
        assert embeddings_key(encoder, "metaworld") in out
        save({"status": f"embedded and selected on {latent} latents", "embed_stage": embed_rates, "timings": timings})
    jobs += [("target_only", None, s) for s in cfg.seeds]
    t0 = time.time()
    rows = _train_evaluate_resumable(store, cfg, jobs)
    timings["train_evaluate_s"] = round(time.time() - t0, 1)
    by_method: dict[str, dict] = {}
    for r in rows:
        m = by_method.setdefault(r["method"], {"success_per_seed": [], "proxy_per_seed": []})
        m["success_per_seed"].append(r["success"])
        m["proxy_per_seed"].append(round(r["proxy_loss"], 4))
    for m in by_method.values():
        m["success_mean"] = round(statistics.mean(m["success_per_seed"]), 4)
    paired = {}
    for method in ("br", "iwr"):
        a, b = by_method[f"{method}-image"]["success_per_seed"], by_method[f"{method}-state"]["success_per_seed"]
        paired[f"{method}: image - state"] = round(statistics.mean(x - y for x, y in zip(a, b)), 4)
    return {"target": cfg.target, "results": by_method, "paired_success_difference": paired,
            "protocol": {**protocol_of(cfg), "prior_rendered": {**prior, "rows": info["prior"]["rows"],
                                                                "render_s": manifest.metadata.get("render_s")},
                         "encoders": {k: {"encoder": e, "options": o} for k, (e, o) in encoders.items()}},
            "embed_stage": embed_rates, "timings": timings}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=256)
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-throughput", action="store_true", help="keep the throughput figures already in the file")
    p.add_argument("--target", default="drawer-open-v3")
    p.add_argument("--tasks", type=int, default=3, help="prior tasks (the target's failures among them)")
    p.add_argument("--per-task", type=int, default=3, help="successful and failed episodes per prior task")
    p.add_argument("--episodes", type=int, default=5, help="rollouts per (method, seed)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--vae-steps", type=int, default=400, help="image-vae fit steps (batch 32)")
    p.add_argument("--vae-image-size", type=int, default=32, help="image-vae input size (frames are resized)")
    p.add_argument("--vae-channels", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--train-steps", type=int, default=800, help="policy training steps per (method, seed)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the quality run's driver")
    p.add_argument("--store", default=os.path.join(tempfile.gettempdir(), "distcur-bench-images"))
    args = p.parse_args()
    result: dict = {"machine_before": machine_facts()}
    if args.skip_throughput and os.path.exists(OUT):
        with open(OUT) as f:
            result = {k: v for k, v in json.load(f).get(KEY, {}).items() if k != "quality"} or result
    else:
        result["throughput"] = throughput(rendered_frames(args.frames))
        update_results(OUT, KEY, {**result, "machine_after": machine_facts()})
        print(json.dumps(result["throughput"], indent=2))
    if not args.skip_quality:
        import torch

        torch.set_num_threads(args.threads)  # small models on a shared machine: threads only contend
        before = machine_facts()

        def save(partial: dict) -> None:
            update_results(OUT, KEY, {**result, "quality": {**partial, "machine_before": before,
                                                            "machine_after": machine_facts()}})

        result["quality"] = {**quality(args, save), "machine_before": before, "machine_after": machine_facts()}
        update_results(OUT, KEY, result)
        print(json.dumps({k: v for k, v in result["quality"].items() if k != "protocol"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
