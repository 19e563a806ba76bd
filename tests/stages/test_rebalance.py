"""The rebalance stage end to end: the weights table, its resumption, k-means groups, trusted groups."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from distcur.cli import main as cli_main
from distcur.data import steps_key
from distcur.policy.train import check_selection
from distcur.rebalance.group import check_alpha
from distcur.rebalance.metagrad import MetaGradConfig
from distcur.rebalance.toy2d import make_toy2d
from distcur.schema import steps_table
from distcur.stages import rebalance
from distcur.stages.rebalance import RebalanceConfig
from distcur.stages.train import read_selection
from distcur.store import Store

torch.set_num_threads(1)  # tiny policies on a shared 2-core machine: threads only contend


@pytest.fixture(scope="module")
def toy():
    return make_toy2d(n_frequent=600, ratio=10.0, seed=1)


@pytest.fixture
def toy_store(tmp_path, toy):
    """A store holding the toy as one step source whose task column is the behaviour."""
    store = Store(tmp_path / "store")
    store.write_table(steps_key("toy2d"), steps_table(toy.steps_columns("toy2d")), stage="ingest")
    return store


# -- the stage -------------------------------------------------------------------------------
def _group_shares(store: Store, run: str, toy) -> np.ndarray:
    sel = check_selection(read_selection(store, run))
    w = sel.column("weight").to_numpy()
    episode = sel.column("episode").to_numpy()
    rare = np.isin(episode, np.unique(toy.episode[toy.behaviour == "rare"]))
    return np.array([w[~rare].sum(), w[rare].sum()]) / w.sum()


def test_cli_frequency_writes_a_balanced_weights_table_and_resumes(toy_store, toy, capsys):
    argv = ["rebalance", "--method", "frequency", "--store", toy_store.uri, "--run", "freq", "--groups", "task"]
    assert cli_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["groups"] == ["frequent", "rare"] and out["group_counts"] == [600, 60] and out["rows"] == 660
    np.testing.assert_allclose(_group_shares(toy_store, "freq", toy), [0.5, 0.5], rtol=1e-5)
    created = toy_store.manifest("selections/freq").created
    assert cli_main(argv) == 0  # same config and inputs: skipped
    assert toy_store.manifest("selections/freq").created == created


def test_run_rebalance_dro_and_metagrad_with_kmeans_groups(toy_store, toy, tmp_path):
    cfg_path = tmp_path / "rebalance.yaml"
    cfg_path.write_text(
        "groups: kmeans\nk_range: [2, 4]\nhidden: [16, 16]\n"
        "dro: {steps: 40, reference_steps: 40, batch_size: 64}\n"
        "metagrad: {outer_steps: 2, inner_steps: 3, warmup_steps: 10, batch_size: 64}\n"
    )
    from distcur.config import load_config

    cfg = load_config(RebalanceConfig, str(cfg_path))
    for method in ("dro", "metagrad"):
        m = rebalance.run(toy_store, replace(cfg, method=method), f"toy-{method}")
        meta = m.metadata
        assert meta["method"] == method and meta["k"] == 2 and sorted(meta["group_counts"]) == [60, 600]
        assert "2" in meta["silhouette"] and len(meta["alpha_trajectory"]) >= 2
        alpha = check_alpha(np.array(meta["alpha"]))
        shares = np.sort(_group_shares(toy_store, f"toy-{method}", toy))
        np.testing.assert_allclose(shares, np.sort(alpha), atol=1e-5)
    assert cli_main(["rebalance", "--method", "metagrad", "--store", toy_store.uri, "--run", "x",
                     "--groups", "source"]) == 2  # one source = one group: a clear error, exit 2
    with pytest.raises(ValueError, match="groups=kmeans only"):
        RebalanceConfig(groups="task", k=3)  # never ignore an option silently


def test_metagrad_objective_on_trusted_groups_by_name(toy_store, toy):
    small = MetaGradConfig(outer_steps=2, inner_steps=3, warmup_steps=10, batch_size=64)
    cfg = RebalanceConfig(method="metagrad", groups="task", hidden=(16, 16), metagrad=small, trusted=["rare"])
    m = rebalance.run(toy_store, cfg, "toy-trusted")
    assert m.metadata["groups"] == ["frequent", "rare"] and len(m.metadata["balanced_val_loss"]) == 2
    # The objective differs from the all-groups one, so the weights do too.
    all_groups = rebalance.run(toy_store, RebalanceConfig(method="metagrad", hidden=(16, 16), metagrad=small), "toy-all")
    assert m.metadata["alpha"] != all_groups.metadata["alpha"]
    with pytest.raises(ValueError, match=r"trusted group\(s\) \['pick'\] are not among the groups"):
        rebalance.run(toy_store, RebalanceConfig(method="metagrad", trusted=["pick"]), "bad")
    with pytest.raises(ValueError, match="RebalanceConfig.trusted"):
        RebalanceConfig(method="dro", trusted=["rare"])
