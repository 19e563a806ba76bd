"""The step schema's validation: every rejection names source, episode, step and column."""

import numpy as np
import pyarrow as pa
import pytest

from distcur.data import StepArrays
from distcur.schema import StepValidationError, source_metadata, steps_table, validate_steps


def make_columns(episodes=(4, 3), state_dim=3, action_dim=2, source="src", seed=0):
    rng = np.random.default_rng(seed)
    n = sum(episodes)
    return {
        "source": source,
        "episode": np.repeat(np.arange(len(episodes)), episodes),
        "step": np.concatenate([np.arange(k) for k in episodes]).astype(np.int32),
        "task": ["reach"] * n,
        "state": rng.normal(size=(n, state_dim)).astype(np.float32),
        "action": rng.uniform(-1, 1, size=(n, action_dim)).astype(np.float32),
        "reward": np.zeros(n, np.float32),
        "is_first": np.concatenate([np.arange(k) == 0 for k in episodes]),
        "is_last": np.concatenate([np.arange(k) == k - 1 for k in episodes]),
        "is_terminal": np.zeros(n, bool),
        "success": np.ones(n, bool),
    }


def test_valid_table_round_trips_to_arrays():
    cols = make_columns()
    table = validate_steps(steps_table(cols))
    arrays = StepArrays.from_table(table)
    np.testing.assert_array_equal(arrays.state, cols["state"])
    np.testing.assert_array_equal(arrays.action, cols["action"])
    assert arrays.episode_ids().tolist() == [0] * 4 + [1] * 3
    meta = source_metadata(table)["src"]
    assert (meta["state_dim"], meta["action_dim"], meta["episodes"], meta["steps"]) == (3, 2, 2, 7)


def test_nan_in_action_names_the_step():
    cols = make_columns()
    cols["action"][5, 1] = np.nan
    with pytest.raises(StepValidationError, match=r"source='src', episode=1, step=1, column='action'"):
        validate_steps(steps_table(cols), origin="shard-3.parquet")


def test_inf_reward_rejected():
    cols = make_columns()
    cols["reward"][2] = np.inf
    with pytest.raises(StepValidationError, match=r"episode=0, step=2, column='reward'"):
        validate_steps(steps_table(cols))


def test_inconsistent_action_dim_within_source():
    cols = make_columns()
    action = [list(a) for a in cols["action"]]
    action[4] = action[4] + [0.5]
    cols["action"] = action
    with pytest.raises(StepValidationError, match=r"inconsistent action dim at .*episode=1, step=0.*got 3, expected 2"):
        validate_steps(steps_table(cols))


def test_two_sources_may_have_different_dims():
    a = steps_table(make_columns(state_dim=3, source="a"))
    b = steps_table(make_columns(state_dim=5, source="b"))
    validate_steps(pa.concat_tables([a, b]))


def test_steps_out_of_order():
    cols = make_columns()
    cols["step"][1], cols["step"][2] = 2, 1
    with pytest.raises(StepValidationError, match=r"step out of order at .*episode=0, step=2"):
        validate_steps(steps_table(cols))


def test_missing_is_first_and_is_last():
    cols = make_columns()
    cols["is_first"][4] = False
    with pytest.raises(StepValidationError, match=r"is_first .*episode=1, step=0"):
        validate_steps(steps_table(cols))
    cols = make_columns()
    cols["is_last"][3] = False
    with pytest.raises(StepValidationError, match=r"is_last .*episode=0, step=3"):
        validate_steps(steps_table(cols))


def test_empty_and_missing_columns():
    cols = make_columns(episodes=(1,))
    table = steps_table(cols).slice(0, 0)
    with pytest.raises(StepValidationError, match="empty"):
        validate_steps(table)
    with pytest.raises(StepValidationError, match="missing columns.*'action'"):
        validate_steps(steps_table(make_columns()).drop(["action"]))
