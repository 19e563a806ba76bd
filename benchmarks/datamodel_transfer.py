"""Does a datamodel's prediction transfer to final-size policies? -> a results JSON.

The datamodel (``distcur datamodel``, either estimator) is fitted or differentiated on small
subset policies; what the selection needs is that its prediction holds for the policy that is
finally trained. This trains ``--policies`` policies with the final training loop
(:func:`distcur.policy.train.train_policy`, co-trained with the target demos as ``distcur demo``
does) on random cluster subsets of the prior drawn with their own seed (never one of the
datamodel's masks), and reports the Spearman correlation between the datamodel's prediction for
each subset (the sum of tau over its clusters: the predicted change in proxy loss, lower is
better) and

* (a) each policy's proxy on the held-out target demos: the datamodel's own proxy kind (``mse``
  or ``nll``) and the pipeline's BC NLL (:func:`distcur.stages.evaluate.proxy_loss_on_source`);
* (b) its rollout success (:func:`distcur.envs.rollouts.evaluate_success`), correlated with
  the negated prediction, so that positive means "predicted better, succeeds more".

The held-out demos are ``steps/source=target-<task>-heldout`` (written by ``distcur demo``), or
the target demos themselves when that table is absent (then the policies have trained on them).
CPU is scarce: the defaults are small; the protocol size is ``--train-steps 4000 --hidden 400 400
400 --episodes 50`` with a dozen policies or more.

Usage:
    python benchmarks/datamodel_transfer.py --store STORE --target pick-place-wall-v3 --run DATAMODEL_RUN \
        [--policies 6] [--keep-prob 0.5] [--train-steps 1000] [--hidden 256 256] [--episodes 10] \
        [--max-steps 500] [--alpha 0.5] [--seed 0] [--out benchmarks/results/datamodel_transfer.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np
import pyarrow as pa
import torch
from scipy.stats import spearmanr

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RESULTS_DIR, machine_facts  # noqa: E402

from distcur.clusters import cluster_ids  # noqa: E402
from distcur.data import (  # noqa: E402
    heldout_source,  # noqa: E402
    load_steps,
    steps_key,
    target_source,
)
from distcur.envs.rollouts import evaluate_success  # noqa: E402
from distcur.policy.functional import PolicySpec  # noqa: E402
from distcur.policy.loaded import TrainedPolicy  # noqa: E402
from distcur.policy.proxy import proxy_loss  # noqa: E402
from distcur.policy.train import TrainConfig, train_policy  # noqa: E402
from distcur.schema import SELECTION_SCHEMA  # noqa: E402
from distcur.stages.evaluate import load_heldout, proxy_loss_on_source  # noqa: E402
from distcur.stages.train import load_training_data  # noqa: E402
from distcur.store import Store  # noqa: E402

log = logging.getLogger("datamodel_transfer")


def transfer_masks(n_policies: int, n_clusters: int, keep_prob: float, seed: int) -> np.ndarray:
    """(n, C) bool random subsets, independent of the datamodel's masks (their own seed stream)."""
    return np.stack([np.random.default_rng([seed, 4242, j]).random(n_clusters) < keep_prob
                     for j in range(n_policies)])


def subset_selection(prior, cluster: np.ndarray, mask: np.ndarray) -> pa.Table:
    """The selection (SELECTION_SCHEMA, weight 1) of every prior step whose cluster ``mask`` (C,) keeps."""
    rows = np.flatnonzero(mask[cluster])
    return pa.table({"source": prior.source[rows].astype(str), "episode": prior.episode[rows].astype(np.int64),
                     "step": prior.step[rows].astype(np.int32),
                     "weight": np.ones(len(rows), np.float32)}).cast(SELECTION_SCHEMA)


def spearman(x, y) -> float | None:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(spearmanr(x, y).statistic)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--target", required=True, help="target task (its demos at steps/source=target-<task>)")
    p.add_argument("--run", required=True, help="the datamodel run whose datamodels/<run>/tau is tested")
    p.add_argument("--policies", type=int, default=6)
    p.add_argument("--keep-prob", type=float, default=0.5)
    p.add_argument("--train-steps", type=int, default=1000)
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--alpha", type=float, default=0.5, help="share of each batch from the target demos")
    p.add_argument("--episodes", type=int, default=10, help="rollouts per policy (0: no rollouts)")
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(RESULTS_DIR, "datamodel_transfer.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)

    store = Store(args.store)
    tau_manifest = store.manifest(f"datamodels/{args.run}/tau")
    if tau_manifest is None:
        raise FileNotFoundError(f"no datamodel at {store.uri_of(f'datamodels/{args.run}/tau')}; run distcur datamodel")
    dm = tau_manifest.config
    tau_table = store.read_table(f"datamodels/{args.run}/tau")
    tau = tau_table.column("tau").to_numpy()
    prior = load_steps(store, list(dm["prior_sources"]))
    clusters = cluster_ids(prior, dm["cluster"], dm["horizon"])
    if clusters.n_clusters != len(tau) or list(clusters.keys.astype(str)) != tau_table.column("key").to_pylist():
        raise ValueError(f"the prior's {clusters.n_clusters} {dm['cluster']} clusters are not those of "
                         f"datamodels/{args.run}/tau ({len(tau)}): the prior changed since the datamodel ran")
    held = heldout_source(args.target)
    if store.manifest(steps_key(held)) is None:
        log.warning("no %s: the proxy is on the target demos the policies train on", held)
        held = target_source(args.target)
    held_steps = load_heldout(store, held)

    masks = transfer_masks(args.policies, len(tau), args.keep_prob, args.seed)
    prediction = masks.astype(np.float64) @ tau
    records = []
    for j, mask in enumerate(masks):
        t0 = time.time()
        data = load_training_data(store, target_source(args.target), subset_selection(prior, clusters.ids, mask))
        cfg = TrainConfig(hidden=tuple(args.hidden), lr=args.lr, batch_size=args.batch_size, steps=args.train_steps,
                          alpha=args.alpha, seed=args.seed + j, checkpoint_every=0)
        params, normalizer, _ = train_policy(data, cfg)
        spec = PolicySpec(data.obs.shape[1], data.act.shape[1], cfg.hidden)
        policy = TrainedPolicy(params, spec, normalizer)
        with torch.no_grad():
            own = float(proxy_loss(params, spec, torch.from_numpy(normalizer.state(held_steps.state)),
                                   torch.from_numpy(normalizer.action(held_steps.action)), dm["proxy"]))
        rec = {"policy": j, "clusters": int(mask.sum()), "prior_steps": int(data.n_prior),
               "prediction": float(prediction[j]), f"proxy_{dm['proxy']}": own,
               "heldout_nll": proxy_loss_on_source(policy, store, held), "train_s": round(time.time() - t0, 1)}
        if args.episodes:
            res = evaluate_success(policy, args.target, episodes=args.episodes, seeds=(args.seed + j,),
                                   max_steps=args.max_steps, envs_per_worker=args.episodes)[0]
            rec["success"] = res["success"]
        log.info("policy %d: %s", j, rec)
        records.append(rec)

    pred = [r["prediction"] for r in records]
    summary = {
        f"spearman_prediction_proxy_{dm['proxy']}": spearman(pred, [r[f"proxy_{dm['proxy']}"] for r in records]),
        "spearman_prediction_heldout_nll": spearman(pred, [r["heldout_nll"] for r in records]),
    }
    if args.episodes:
        summary["spearman_neg_prediction_success"] = spearman(-np.asarray(pred), [r["success"] for r in records])
    out = {"target": args.target, "datamodel_run": args.run, "estimator": dm.get("estimator"),
           "datamodel_metadata": {k: tau_manifest.metadata.get(k) for k in
                                  ("lds", "lds_independent_seeds", "recipe", "inject_target")},
           "heldout_source": held, "args": vars(args), "summary": summary, "policies": records,
           "machine": machine_facts()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
