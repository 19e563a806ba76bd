"""Every failure a user can cause is one clear line and exit code 2 (``--debug``: the traceback);
``distcur verify`` checks committed tables; ``--force`` recomputes a stage."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import free_port

from distcur.cli import main
from distcur.data import scores_key, selection_key
from distcur.schema import SCORE_SCHEMA
from distcur.store import MANIFEST, Store


def scores(n: int = 20) -> pa.Table:
    return pa.Table.from_pydict({"source": ["prior"] * n, "episode": [i // 5 for i in range(n)],
                                 "step": [i % 5 for i in range(n)], "score": [float(i) for i in range(n)],
                                 "method": ["random"] * n}, schema=SCORE_SCHEMA)


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store(tmp_path / "store")
    s.write_table(scores_key("run"), scores(), stage="score", config={"method": "random"}, rows_per_part=8)
    return s


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"distcur {command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_verify_reports_intact_and_damaged_tables(store, capsys):
    assert main(["select", "--store", store.uri, "--scores", "run", "--run", "sel", "--top", "50"]) == 0
    code, out, err = run_cli(capsys, "verify", "--store", store.uri)
    assert code == 0 and "2 of 2 tables intact" in err
    assert f"ok      {scores_key('run')} (20 rows, 3 files)" in out and selection_key("sel") in out
    part = store.manifest(scores_key("run")).files[1]
    store.write_bytes(part, store.read_bytes(part)[:-1] + b"!")
    code, out, err = run_cli(capsys, "verify", "--store", store.uri, scores_key("run"))
    assert code == 1 and f"DAMAGED {scores_key('run')}" in out and store.uri_of(part) in out
    assert "sha256 is" in out and "with --force" in out and "0 of 1 tables intact" in err
    code, _, err = run_cli(capsys, "verify", "--store", store.uri, "no/such-key")
    assert code == 1 and "0 of 1" in err


def assert_force_recomputes(store: Store, args: list[str], key: str) -> None:
    """A rerun of ``args`` leaves ``key`` up to date; with --force it is recommitted, same fingerprint."""
    assert main(args) == 0
    first = store.manifest(key)
    assert main(args) == 0 and store.manifest(key).created == first.created  # up to date
    assert main([*args, "--force"]) == 0
    again = store.manifest(key)
    assert again.created > first.created and again.fingerprint == first.fingerprint


def test_force_recomputes_a_stage(store, capsys):
    assert_force_recomputes(store, ["select", "--store", store.uri, "--scores", "run", "--run", "sel", "--top", "50"],
                            selection_key("sel"))
    capsys.readouterr()


def test_verify_option_rebuilds_a_same_size_corrupted_output(store, capsys):
    args = ["select", "--store", store.uri, "--scores", "run", "--run", "sel", "--top", "50"]
    assert main(args) == 0
    good = store.read_table(selection_key("sel"))
    part = store.manifest(selection_key("sel")).files[0]
    data = store.read_bytes(part)
    store.write_bytes(part, data[:-12] + b"\0" * 12)  # same size, broken footer: a plain rerun reads footers
    assert main(args) == 0 and store.verify(selection_key("sel")) == []
    part = store.manifest(selection_key("sel")).files[0]  # the rebuilt version's
    data = store.read_bytes(part)
    at = pq.read_metadata(pa.BufferReader(data)).row_group(0).column(1).data_page_offset + 1
    store.write_bytes(part, data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])  # same size, a data page flipped
    assert main(args) == 0 and store.verify(selection_key("sel"))  # only the checksums can tell: still damaged
    assert main([*args, "--verify"]) == 0
    assert store.verify(selection_key("sel")) == [] and store.read_table(selection_key("sel")).equals(good)
    capsys.readouterr()


def test_damaged_input_manifest_names_its_path(store, capsys):
    store.write_text(f"{scores_key('run')}/{MANIFEST}", "{truncated")
    code, _, err = run_cli(capsys, "select", "--store", store.uri, "--scores", "run", "--run", "sel")
    line = one_error_line(err, "select")
    assert code == 2 and store.uri_of(f"{scores_key('run')}/{MANIFEST}") in line and "invalid manifest JSON" in line


def test_truncated_input_part_names_key_and_file(store, capsys):
    part = store.manifest(scores_key("run")).files[0]
    store.write_bytes(part, store.read_bytes(part)[:100])
    code, _, err = run_cli(capsys, "select", "--store", store.uri, "--scores", "run", "--run", "sel")
    line = one_error_line(err, "select")
    assert code == 2 and store.uri_of(part) in line and "('score') with --force" in line


def test_config_type_error_and_debug_traceback(tmp_path, capsys):
    bad = tmp_path / "prior.yaml"
    bad.write_text('seed: "0"\n')
    argv = ["ingest", "metaworld", "--out", str(tmp_path / "store"), "--config", str(bad)]
    code, _, err = run_cli(capsys, *argv)
    line = one_error_line(err, "ingest")
    assert code == 2 and f"{bad}: seed = '0' is a str, but MetaWorldPriorConfig.seed expects int" in line
    code, _, err = run_cli(capsys, "--debug", *argv)
    assert code == 2 and "Traceback (most recent call last)" in err and "ConfigError" in err


def test_garbage_checkpoint_names_the_file_and_fresh(tmp_path, capsys):
    store = Store(tmp_path / "store")
    store.write_bytes("policies/p/policy.pt", b"\x80\x04garbage, not a checkpoint" * 10)
    code, _, err = run_cli(capsys, "evaluate", "p", "--task", "reach-v3", "--store", store.uri, "--episodes", "0",
                           "--no-ray")
    line = one_error_line(err, "evaluate")
    assert code == 2 and store.uri_of("policies/p/policy.pt") in line and "--fresh" in line
    assert "weights_only=False" not in line


def test_s3_network_error_names_endpoint_and_bucket(monkeypatch, capsys):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("DISTCUR_S3_ENDPOINT", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    code, _, err = run_cli(capsys, "verify", "--store", "s3://some-bucket/prefix")
    line = one_error_line(err, "verify")
    assert code == 2 and f"S3 endpoint {endpoint}, bucket 'some-bucket'" in line


def test_force_retrains_a_finished_policy_and_evaluate_takes_it(tmp_path, capsys):
    import numpy as np

    from distcur.data import eval_key, policy_key, steps_key
    from distcur.schema import steps_table

    store = Store(tmp_path / "store")
    rng = np.random.default_rng(0)
    step = np.tile(np.arange(10), 2)
    store.write_table(steps_key("target-reach-v3"), steps_table({
        "source": "target-reach-v3", "episode": np.repeat([0, 1], 10), "step": step,
        "state": rng.normal(size=(20, 4)), "action": rng.normal(size=(20, 2)), "is_first": step == 0,
        "is_last": step == 9, "is_terminal": step == 9}), "ingest", {})
    assert_force_recomputes(store, ["train", "--store", store.uri, "--target", "reach-v3", "--selection", "none",
                                    "--out", "p", "--steps", "3"], policy_key("p"))
    evaluate = ["evaluate", "p", "--task", "reach-v3", "--store", store.uri, "--episodes", "0", "--no-ray",
                "--in-sample-proxy"]
    assert main([*evaluate, "--force"]) == 0
    assert "force" not in store.manifest(eval_key("p")).config["methods"]["p"]
    capsys.readouterr()


def test_select_and_score_take_a_config_file_the_flags_winning(store, tmp_path, capsys):
    cfg = tmp_path / "select.yaml"
    cfg.write_text("selection: {level: episode, budget_percent: 40, tie_seed: 3}\n")
    assert main(["select", "--store", store.uri, "--scores", "run", "--run", "sel", "--config", str(cfg),
                 "--tie-seed", "5"]) == 0
    m = store.manifest(selection_key("sel"))
    assert m.config["level"] == "episode" and m.config["budget_percent"] == 40 and m.config["tie_seed"] == 5
    assert m.rows == 8  # the 2 best of 4 five-step episodes
    cfg.write_text("selection: {level: episodes}\n")
    code, _, err = run_cli(capsys, "select", "--store", store.uri, "--scores", "run", "--run", "sel2", "--config",
                           str(cfg))
    assert code == 2 and "level must be one of" in one_error_line(err, "select")
    cfg.write_text("selection: {budget_percent: 40}\n")
    code, _, err = run_cli(capsys, "select", "--store", store.uri, "--scores", "run", "--run", "sel2", "--config",
                           str(cfg), "--top", "10")
    assert code == 2 and "at most one of" in one_error_line(err, "select")
    cfg.write_text("budget_percent: 40\n")  # a SelectConfig option outside `selection:` names the known keys
    code, _, err = run_cli(capsys, "select", "--store", store.uri, "--scores", "run", "--run", "sel2", "--config",
                           str(cfg))
    assert code == 2 and "unknown option(s) ['budget_percent'] for SelectStageConfig" in one_error_line(err, "select")
    opts = tmp_path / "iwr.yaml"
    opts.write_text("bandwidth: 0.4\nk: 3\n")
    code, _, err = run_cli(capsys, "score", "--store", store.uri, "--method", "iwr", "--target", "t", "--run", "s",
                           "--config", str(opts))
    assert code == 2 and str(opts) in (line := one_error_line(err, "score")) and "unknown option(s) ['k']" in line
    assert store.manifest(selection_key("sel2")) is None
