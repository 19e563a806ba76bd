"""Reliability figures: bad inputs and how each ended, forced concurrent writers, planted secrets.

    python benchmarks/reliability.py [--trials N]

writes ``benchmarks/results/reliability.json``:

- ``bad_inputs``: user-caused failures run through the CLI (``distcur.cli.main``, in this
  process), by class (config, store, checkpoint, s3, cli). Each ends as ``clear_error`` (exit
  code 1 or 2 with one ``error:`` line, or verify's report), ``rebuilt`` (a damaged *output*
  the rerun noticed and recomputed, equal to the undisturbed output), ``traceback`` (an
  exception escaped the CLI) or ``silent_wrong`` (exit 0 with a wrong or damaged result).
- ``concurrent_writers``: two writer processes of one key with the interleaving forced (A
  writes a part and stalls, B writes and commits a whole table, A goes on and commits), locally
  and on a loopback S3 server (moto), A stalling after its first part or just before its
  commit; plus a reader that read the manifest before B's commit. A table is lost when the
  last manifest does not read back complete. With the grace period set to 0 (the safeguard
  alone) A's commit must refuse instead of committing over deleted parts.
- ``kills``: every CLI stage (ingest, embed, score, select, datamodel; tests/chaos.py) run
  undisturbed, then killed with SIGKILL (driver and its local Ray) at a random moment of that
  duration and rerun, ``--kills`` times per stage; survived = the rerun's outputs equal the
  undisturbed run's, table by table. ``--demo-kills`` adds the same for a toy ``distcur demo``.
- ``planted_secret``: an RLDS ingest to the loopback S3 through Ray with a planted AWS secret
  key and session token; occurrences in the bucket, the outputs and Ray's session folder.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from common import write_result  # noqa: E402

from distcur.cli import main as cli_main  # noqa: E402
from distcur.data import scores_key, selection_key, steps_key  # noqa: E402
from distcur.schema import SCORE_SCHEMA  # noqa: E402
from distcur.store import MANIFEST, Store  # noqa: E402

KEY = "scores/contended"


# -- bad inputs --------------------------------------------------------------------------------------
def run_cli(argv: list[str]) -> tuple[str, int | None, str]:
    """(outcome if it failed, exit code, message) of one CLI run in this process."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli_main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = int(e.code or 0)
    except BaseException as e:  # noqa: BLE001 - whatever escapes the CLI is the finding
        return "traceback", None, f"{type(e).__name__}: {e}"[:500]
    lines = [ln for ln in err.getvalue().splitlines() if ": error: " in ln]
    report = [ln for ln in out.getvalue().splitlines() if ln.startswith("  ")]  # verify's problems
    message = (lines or report or [""])[0][:500]
    if code == 0:
        return "silent_wrong", code, out.getvalue()[-300:]
    return ("clear_error" if (len(lines) == 1 or (code == 1 and report)) else "unclear_error"), code, message


def score_table(n: int = 40) -> pa.Table:
    return pa.Table.from_pydict({"source": ["prior"] * n, "episode": [i // 8 for i in range(n)],
                                 "step": [i % 8 for i in range(n)], "score": [float(i % 7) for i in range(n)],
                                 "method": ["random"] * n}, schema=SCORE_SCHEMA)


def scored_store(root: str) -> Store:
    store = Store(root)
    store.write_table(scores_key("run"), score_table(), stage="score", config={"method": "random"}, rows_per_part=16)
    steps = score_table().select(["source", "episode", "step"])
    steps = steps.append_column("task", pa.array(["reach-v3"] * steps.num_rows)).append_column(
        "success", pa.array([e % 2 == 0 for e in steps.column("episode").to_pylist()]))
    store.write_table(steps_key("prior"), steps, stage="ingest")
    return store


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def page_offset(data: bytes) -> int:
    return pq.read_metadata(pa.BufferReader(data)).row_group(0).column(1).data_page_offset + 1


def damage_part(how: str) -> Callable[[Store, str], None]:
    def apply(store: Store, key: str) -> None:
        rel = store.manifest(key).files[0]
        data = store.read_bytes(rel)
        if how == "deleted":
            store.fs.delete_file(store.path(rel))
        else:
            store.write_bytes(rel, {"truncated": data[: len(data) // 2], "footer": data[:-12] + b"\0" * 12,
                                    "flipped_byte": flip(data, page_offset(data))}[how])
    return apply


def damage_manifest(how: str) -> Callable[[Store, str], None]:
    def apply(store: Store, key: str) -> None:
        d = json.loads(store.read_text(f"{key}/{MANIFEST}"))
        text = {"invalid_json": json.dumps(d)[:-20], "unknown_key": json.dumps({**d, "colour": "red"}),
                "wrong_rows": json.dumps({**d, "rows": d["rows"] + 1}),
                "missing_keys": json.dumps({"stage": d["stage"]})}[how]
        store.write_text(f"{key}/{MANIFEST}", text)
    return apply


DAMAGES = {f"part_{h}": damage_part(h) for h in ("truncated", "deleted", "footer", "flipped_byte")}
DAMAGES.update({f"manifest_{h}": damage_manifest(h) for h in ("invalid_json", "unknown_key", "wrong_rows",
                                                              "missing_keys")})
SELECT = ["select", "--scores", "run", "--run", "sel", "--top", "50"]


def store_cases(work: str) -> list[dict]:
    """A damaged input (select must stop, naming it), a damaged output (the rerun must rebuild it), verify."""
    cases = []
    for name, damage in DAMAGES.items():
        store = scored_store(os.path.join(work, f"in-{name}"))
        damage(store, scores_key("run"))
        for what, argv in (("select_over_damaged_input", SELECT), ("verify", ["verify"])):
            outcome, code, message = run_cli([argv[0], "--store", store.uri, *argv[1:]])
            cases.append({"class": "store", "case": f"{what}:{name}", "outcome": outcome, "exit_code": code,
                          "message": message})
        for rerun, extra in (("rerun", []), ("rerun_with_verify", ["--verify"])):
            store = scored_store(os.path.join(work, f"{rerun}-{name}"))
            run_cli(["select", "--store", store.uri, *SELECT[1:]])
            expected = store.read_table(selection_key("sel"))
            damage(store, selection_key("sel"))
            outcome, code, message = run_cli(["select", "--store", store.uri, *SELECT[1:], *extra])
            if outcome == "silent_wrong":  # exit 0: right when the output was rebuilt intact
                outcome, message = rerun_outcome(store, selection_key("sel"), expected)
            cases.append({"class": "store", "case": f"{rerun}_over_damaged_output:{name}", "outcome": outcome,
                          "exit_code": code, "message": message})
    return cases


def rerun_outcome(store: Store, key: str, expected: pa.Table) -> tuple[str, str]:
    """After a rerun that exited 0 over a damaged output: rebuilt, or left damaged (then: do reads
    fail clearly, or return other data?)."""
    if not store.verify(key) and store.read_table(key).equals(expected):
        return "rebuilt", ""
    try:
        same = store.read_table(key).equals(expected)
    except ValueError as e:
        return "skipped_but_reads_fail_clearly", f"rerun said up to date (sizes match); a read says: {e}"[:500]
    return ("silent_wrong", "output still damaged") if not same else ("rebuilt", "")


def config_cases(work: str) -> list[dict]:
    store = os.path.join(work, "cfg-store")
    ingest = ["ingest", "metaworld", "--out", store, "--config"]
    train = ["train", "--store", store, "--target", "reach-v3", "--selection", "none", "--out", "p", "--config"]
    cases = {
        "append_task_onehot_string": (ingest, 'append_task_onehot: "false"\n'),
        "seed_string": (ingest, 'seed: "0"\n'),
        "tasks_string": (ingest, "tasks: reach-v3\n"),
        "max_steps_string": (ingest, 'max_steps: "200"\n'),
        "task_counts_value": (ingest, "task_counts: {reach-v3: many}\n"),
        "unknown_key": (ingest, "sucess_per_task: 3\n"),
        "malformed_yaml": (ingest, "seed: 0\n  tasks: [reach-v3\n"),
        "top_level_list": (ingest, "- seed\n"),
        "lr_string": (train, "lr: fast\n"),
        "hidden_element": (train, "hidden: [400, wide]\n"),
        "embed_malformed_yaml": (["embed", "--store", store, "--config"], "encoder: vae\nencoder_options: {a: 1\n"),
        "datamodel_seed_string": (["datamodel", "--store", store, "--target", "reach-v3", "--config"], 'seed: "0"\n'),
    }
    out = []
    for name, (argv, text) in cases.items():
        path = os.path.join(work, f"{name}.yaml")
        with open(path, "w") as f:
            f.write(text)
        outcome, code, message = run_cli([*argv, path])
        out.append({"class": "config", "case": name, "outcome": outcome, "exit_code": code, "message": message})
    return out


def checkpoint_cases(work: str) -> list[dict]:
    import torch

    from distcur.policy.checkpoint import FORMAT, to_bytes

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    buf = io.BytesIO()
    torch.save({"evil": Evil()}, buf)
    real = to_bytes({"format": FORMAT, "step": 0, "params": {"w": torch.zeros(64, 64)}, "meta": {}})
    blobs = {"garbage": b"\x80\x04garbage, not a checkpoint" * 20, "truncated": real[: len(real) // 2],
             "malicious_pickle": buf.getvalue(), "not_a_policy": to_bytes({"weights": torch.zeros(3)}),
             "empty": b""}
    out = []
    for name, blob in blobs.items():
        store = Store(os.path.join(work, f"ckpt-{name}"))
        store.write_bytes("policies/p/policy.pt", blob)
        outcome, code, message = run_cli(["evaluate", "p", "--task", "reach-v3", "--store", store.uri,
                                          "--episodes", "0", "--no-ray"])
        out.append({"class": "checkpoint", "case": f"evaluate:{name}", "outcome": outcome, "exit_code": code,
                    "message": message})
    return out


def s3_cases(endpoint: str, bucket: str) -> list[dict]:
    from conftest import free_port

    out = []
    dead = f"http://127.0.0.1:{free_port()}"
    for name, env, uri in (("no_server", {"DISTCUR_S3_ENDPOINT": dead}, f"{bucket}/store"),
                           ("missing_bucket", {}, "s3://no-such-bucket-here/store")):
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            for argv in (["verify", "--store", uri], ["select", "--store", uri, *SELECT[1:]]):
                outcome, code, message = run_cli(argv)
                out.append({"class": "s3", "case": f"{argv[0]}:{name}", "outcome": outcome, "exit_code": code,
                            "message": message})
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return out


def cli_cases(work: str) -> list[dict]:
    store = scored_store(os.path.join(work, "cli-store"))
    cases = {"random_unknown_target": ["score", "--store", store.uri, "--method", "random", "--target",
                                       "no-such-task", "--run", "r"],
             "option_of_another_method": ["score", "--store", store.uri, "--method", "random", "--target", "x",
                                          "--run", "r", "--k", "3"],
             "select_missing_scores": ["select", "--store", store.uri, "--scores", "nope", "--run", "s"],
             "verify_missing_key": ["verify", "--store", store.uri, "no/such/table"]}
    out = []
    for name, argv in cases.items():
        outcome, code, message = run_cli(argv)
        out.append({"class": "cli", "case": name, "outcome": outcome, "exit_code": code, "message": message})
    return out


# -- concurrent writers ------------------------------------------------------------------------------
WRITER = """
import json, os, sys, time
import pyarrow as pa
uri, key, rows, ready, go, stall, baseline = sys.argv[1:8]
if baseline == "-":
    from distcur.store import Store
else:  # the store module of the baseline commit, copied to a folder of its own
    sys.path.insert(0, baseline)
    from store_baseline import Store
store = Store(uri)
w = store.writer(key, "test", {"rows": int(rows)})
def wait():
    open(ready, "w").close()
    while go != "-" and not os.path.exists(go):
        time.sleep(0.02)
w.write(pa.table({"x": list(range(int(rows)))}))
if stall == "mid-write":
    wait()
w.write(pa.table({"x": [-1]}))
if stall == "before-commit":
    wait()
print(json.dumps({"rows": w.commit().rows}))
"""


def baseline_store(work: str) -> tuple[str, str] | None:
    """(commit, folder holding its store.py as store_baseline.py): the store before this commit protocol
    (the parent of the commit that introduced ``_alive``), or None outside a git checkout."""
    try:
        found = subprocess.run(["git", "-C", REPO, "log", "--format=%H", "-S", 'ALIVE = "_alive"', "--",
                                "distcur/store.py"], capture_output=True, text=True, check=True).stdout.split()
        if not found:
            return None
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", f"{found[-1]}^"], capture_output=True, text=True,
                                check=True).stdout.strip()
        source = subprocess.run(["git", "-C", REPO, "show", f"{commit}:distcur/store.py"], capture_output=True,
                                text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    folder = os.path.join(work, "baseline")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "store_baseline.py"), "w") as f:
        f.write(source)
    return commit, folder


def writer(uri: str, rows: int, ready: str, go: str = "-", stall: str = "none", grace: str | None = None,
           baseline: str = "-"):
    env = {**os.environ, "PYTHONPATH": REPO, **({"DISTCUR_GC_GRACE_S": grace} if grace is not None else {})}
    return subprocess.Popen([sys.executable, "-c", WRITER, uri, KEY, str(rows), ready, go, stall, baseline],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def writer_trial(uri: str, work: str, stall: str, grace: str | None, baseline: str = "-") -> dict:
    """A stalls (mid-write or before commit); B commits a whole table; A commits. Lost: the last
    manifest does not read back complete; refused: A's commit stopped with an error."""
    ready, go = os.path.join(work, "a-ready"), os.path.join(work, "a-go")
    a = writer(uri, 10, ready, go, stall, baseline=baseline)
    t0 = time.time()
    while not os.path.exists(ready):
        if a.poll() is not None or time.time() - t0 > 120:
            return {"lost": True, "refused": False, "error": a.communicate()[1][-300:]}
        time.sleep(0.02)
    b = writer(uri, 5, os.path.join(work, "b-ready"), grace=grace, baseline=baseline)
    b_err = b.communicate(timeout=120)[1]
    open(go, "w").close()
    _, a_err = a.communicate(timeout=120)
    store = Store(uri)
    expected = 11 if a.returncode == 0 else 6
    read_error = ""
    try:
        intact = store.read_table(KEY).num_rows == expected and not store.verify(KEY)
    except Exception as e:  # noqa: BLE001 - an unreadable table is the loss being counted
        intact, read_error = False, f"reading the table back: {type(e).__name__}: {e}"
    error = a_err if a.returncode else b_err if b.returncode else read_error
    return {"lost": not intact or b.returncode != 0, "refused": a.returncode != 0,
            "error": (error.strip().splitlines() or [""])[-1][:400]}


def reader_trial(uri: str, store_class: type = Store) -> bool:
    """A reader took the manifest's files, then another commit landed: do they still read? (True: yes.)"""
    store = store_class(uri)
    store.write_table(KEY, pa.table({"x": list(range(7))}), stage="test", config={"v": 1})
    paths = store.files(KEY)
    store.write_table(KEY, pa.table({"x": [1]}), stage="test", config={"v": 2})
    try:
        return sum(pq.read_metadata(p, filesystem=store.fs).num_rows for p in paths) == 7
    except OSError:
        return False


def concurrent_writers(s3_bucket: Callable[[], str], trials: int, baseline: tuple[str, str] | None) -> dict:
    """Trials of this store's protocol (default grace, and grace 0: the commit check alone) and,
    for comparison, of the baseline commit's store (``baseline:`` rows)."""
    import importlib.util

    settings = [("", None, "-", trials), (":grace=0", "0", "-", max(1, trials // 2))]
    base_class = None
    if baseline is not None:
        settings.append((":baseline", None, baseline[1], trials))
        spec = importlib.util.spec_from_file_location("store_baseline", os.path.join(baseline[1], "store_baseline.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["store_baseline"] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
        base_class = module.Store
    results = {}
    for backend in ("local", "s3"):
        for stall in ("mid-write", "before-commit"):
            for label, grace, folder, n in settings:
                runs = []
                for _ in range(n):
                    work = tempfile.mkdtemp(prefix="distcur-rel-")
                    uri = os.path.join(work, "store") if backend == "local" else f"{s3_bucket()}/store"
                    runs.append(writer_trial(uri, work, stall, grace, folder))
                    shutil.rmtree(work, ignore_errors=True)
                results[f"{backend}:{stall}{label}"] = {
                    "trials": n, "tables_lost": sum(r["lost"] for r in runs),
                    "commits_refused": sum(r["refused"] for r in runs),
                    "example_error": next((r["error"] for r in runs if r["error"]), "")}
        for label, cls in (("", Store), (":baseline", base_class)):
            if cls is None:
                continue
            reads = []
            for _ in range(trials):
                work = tempfile.mkdtemp(prefix="distcur-rel-")
                uri = os.path.join(work, "store") if backend == "local" else f"{s3_bucket()}/r"
                reads.append(reader_trial(uri, cls))
                shutil.rmtree(work, ignore_errors=True)
            results[f"{backend}:reader-across-commit{label}"] = {"trials": trials, "reads_failed": reads.count(False)}
    return results


# -- planted secret ----------------------------------------------------------------------------------
def planted_secret(endpoint: str, bucket: str, work: str) -> dict:
    import boto3
    import pyarrow.fs as pafs
    import ray
    from rlds_factory import make_rlds_dataset

    from distcur.distributed.ingest import ray_mapper
    from distcur.sources.rlds_configs import OXE_DICT_ACTION, RLDSConfig
    from distcur.stages.ingest import RLDSIngestConfig, run_rlds

    secret, token = f"planted-secret-{uuid.uuid4().hex}", f"planted-token-{uuid.uuid4().hex}"
    os.environ.update({"AWS_SECRET_ACCESS_KEY": secret, "AWS_SESSION_TOKEN": token})
    config = RLDSConfig(name="factory_rlds", state_keys=("observation/state",), action_keys=OXE_DICT_ACTION,
                        language_key="language_instruction", image_keys=("observation/image",), action_dim=7)
    ds = make_rlds_dataset(os.path.join(work, "rlds"), num_episodes=4, num_shards=2)
    store = Store(f"{bucket}/distcur")
    remote = f"{bucket}/oxe/factory_rlds/1.0.0"
    pafs.copy_files(ds.path, remote[len("s3://"):], source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=store.fs)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            rows = run_rlds(store, RLDSIngestConfig(path=remote, dataset=config.name, source="factory"),
                            ray_mapper(progress=False), rlds_config=config, progress=False).manifest.rows
        session = ray._private.worker._global_node.get_session_dir_path()
        time.sleep(2)  # let Ray's agents flush their logs
        where: Counter = Counter()
        for folder, label in ((session, "ray_session"), (work, "outputs")):
            for root, _, names in os.walk(folder):
                for name in names:
                    path = os.path.join(root, name)
                    if os.path.isfile(path) and not os.path.islink(path):
                        with open(path, "rb") as f:
                            data = f.read()
                        where[label + "_files"] += 1
                        where[label] += data.count(secret.encode()) + data.count(token.encode())
    finally:
        ray.shutdown()
    s3 = boto3.client("s3", endpoint_url=endpoint)
    name = bucket[len("s3://"):]
    for obj in s3.list_objects_v2(Bucket=name)["Contents"]:
        data = s3.get_object(Bucket=name, Key=obj["Key"])["Body"].read()
        where["store_objects"] += 1
        where["store"] += data.count(secret.encode()) + data.count(token.encode())
    where["driver_output"] = captured.getvalue().count(secret) + captured.getvalue().count(token)
    return {"rows_ingested": rows, "searched": {k: where[k] for k in ("ray_session_files", "outputs_files",
                                                                      "store_objects")},
            "occurrences": {k: where[k] for k in ("store", "outputs", "ray_session", "driver_output")},
            "occurrences_total": sum(where[k] for k in ("store", "outputs", "ray_session", "driver_output"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=6, help="forced trials per concurrent-writer setting")
    parser.add_argument("--kills", type=int, default=3, help="kill -9 trials per CLI stage")
    parser.add_argument("--demo-kills", type=int, default=2, help="kill -9 trials of a toy distcur demo")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    args = parser.parse_args()

    import boto3
    from conftest import free_port
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                       "DISTCUR_S3_ENDPOINT": endpoint, "AWS_ENDPOINT_URL": endpoint})
    s3 = boto3.client("s3", endpoint_url=endpoint)

    def new_bucket() -> str:
        name = f"distcur-rel-{uuid.uuid4().hex[:8]}"
        s3.create_bucket(Bucket=name)
        return f"s3://{name}"

    work = tempfile.mkdtemp(prefix="distcur-reliability-")
    t0 = time.time()
    try:
        bucket = new_bucket()
        cases = [*config_cases(work), *store_cases(work), *checkpoint_cases(work), *s3_cases(endpoint, bucket),
                 *cli_cases(work)]
        t_bad = time.time() - t0
        baseline = baseline_store(work)
        writers = concurrent_writers(new_bucket, args.trials, baseline)
        t_writers = time.time() - t0 - t_bad
        secret = planted_secret(endpoint, new_bucket(), os.path.join(work, "secret"))
        t_kills0 = time.time()
        import chaos

        kills = chaos.kill_trials(os.path.join(work, "kills"), args.kills, args.seed)
        if args.demo_kills:
            demo = chaos.kill_trials(os.path.join(work, "demo-kills"), args.demo_kills, args.seed + 1,
                                     stages=(chaos.DEMO,))
            kills["walls"].update(demo["walls"])
            kills["trials"] += demo["trials"]
        t_kills = time.time() - t_kills0
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    by_class: dict[str, Counter] = {}
    for c in cases:
        by_class.setdefault(c["class"], Counter())[c["outcome"]] += 1
    totals = Counter(c["outcome"] for c in cases)
    current = {k: v for k, v in writers.items() if not k.endswith(":baseline")}
    base = {k: v for k, v in writers.items() if k.endswith(":baseline")}

    def total(rows: dict, kind: str, field: str = "trials") -> int:  # kind: tables_lost or reads_failed rows
        return sum(v[field] for v in rows.values() if kind in v)

    payload = {
        "summary": {
            "bad_input_cases": len(cases),
            "outcomes": {o: totals[o] for o in ("clear_error", "rebuilt", "skipped_but_reads_fail_clearly",
                                                "unclear_error", "traceback", "silent_wrong")},
            "concurrent_writer_trials": total(current, "tables_lost"),
            "tables_lost": total(current, "tables_lost", "tables_lost"),
            "reader_trials_across_a_commit": total(current, "reads_failed"),
            "reads_failed": total(current, "reads_failed", "reads_failed"),
            "baseline_store_commit": baseline[0] if baseline else None,
            "baseline_tables_lost": f"{total(base, 'tables_lost', 'tables_lost')} of {total(base, 'tables_lost')}",
            "baseline_reads_failed": f"{total(base, 'reads_failed', 'reads_failed')} of {total(base, 'reads_failed')}",
            "planted_secret_occurrences": secret["occurrences_total"],
            "kills": len(kills["trials"]),
            "kills_mid_run": sum(t["killed"] for t in kills["trials"]),
            "kills_survived_identical": sum(t["killed"] and t["identical"] for t in kills["trials"]),
            "kills_by_stage": {st: f"{sum(t['identical'] for t in kills['trials'] if t['stage'] == st)} of "
                                   f"{sum(t['stage'] == st for t in kills['trials'])}"
                               for st in kills["walls"]},
        },
        "bad_inputs_by_class": {k: dict(v) for k, v in sorted(by_class.items())},
        "bad_inputs": cases,
        "concurrent_writers": writers,
        "planted_secret": secret,
        "kills": kills,
        "fuzzing": "property-based (hypothesis) in tests/test_fuzz.py, run by make test",
        "wall_s": {"bad_inputs": round(t_bad, 1), "concurrent_writers": round(t_writers, 1), "kills": round(t_kills, 1),
                   "total": round(time.time() - t0, 1)},
    }
    print(json.dumps(payload["summary"], indent=2))
    print("wrote", write_result("reliability", payload))


if __name__ == "__main__":
    main()
