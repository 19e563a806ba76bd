"""kill -9 chaos for the CLI stages: run a stage, SIGKILL its driver (and everything in its process
group: the local Ray it started) at a chosen moment, rerun it, and compare the store with an
undisturbed run's.

Used by ``tests/test_chaos.py`` (one kill per stage, at a seeded random moment) and by
``benchmarks/reliability.py`` (several kills per stage, counted in ``reliability.json``).

A store is compared table by table: every committed key, its rows sorted by the columns that
identify a row (``source, episode, step`` where the table has them), Parquet tables by value and
other parts (an encoder's bytes) by their checksum. Columns that hold a measurement of time
(``train_s``, ``eval_s``, ``wall_s``) are left out: they differ between any two runs.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc

from distcur.store import Store

TIMING_COLUMNS = ("train_s", "eval_s", "wall_s", "seconds")
ROW_KEYS = ("source", "episode", "step", "model", "method", "seed", "cluster", "key", "fold", "split", "task")

TINY_PRIOR = """\
tasks: [reach-wall-v3, reach-v3]
success_per_task: 2
failed_per_task: 2
failed_max_steps: 40
max_steps: 150
target_demos: 3
chunk_episodes: 1
"""
TINY_EMBED = """\
encoder: vae
encoder_options: {train_steps: 100, hidden: [32]}
concurrency: 1
"""
TINY_DATAMODEL = """\
hidden: [16, 16]
regression: {num_models: 24, heldout_models: 8, steps: 30, models_per_batch: 4}
metagrad: {total_steps: 20, meta_steps: 5, iterations: 4}
"""
TINY_DEMO = f"""\
prior:
{chr(10).join('  ' + line for line in TINY_PRIOR.splitlines())}
vae: {{train_steps: 100, hidden: [32]}}
evaluation: {{heldout_demos: 2}}
"""
TARGET = "reach-v3"


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    argv: tuple[str, ...]  # after ``distcur``; {store} and {dir} are filled in


# In pipeline order: each stage reads what the ones before it wrote.
STAGES = (
    Stage("ingest", ("ingest", "metaworld", "--target", TARGET, "--config", "{dir}/prior.yaml", "--out", "{store}")),
    Stage("embed", ("embed", "--store", "{store}", "--config", "{dir}/embed.yaml")),
    Stage("score", ("score", "--store", "{store}", "--method", "iwr", "--target", TARGET, "--run", "iwr",
                    "--num-shards", "4")),
    Stage("select", ("select", "--store", "{store}", "--scores", "iwr", "--run", "iwr", "--budget", "20")),
    Stage("datamodel", ("datamodel", "--store", "{store}", "--target", TARGET, "--config", "{dir}/datamodel.yaml")),
)
# The demo at toy size (its own store): every stage plus policy jobs, resumed per job.
DEMO = Stage("demo", ("demo", "--store", "{store}", "--target", TARGET, "--methods", "random", "iwr", "datamodel-regression",
                      "--seeds", "0", "--episodes", "2", "--train-steps", "60", "--max-steps", "40",
                      "--hidden", "32", "32", "--config", "{dir}/demo.yaml", "--datamodel-config",
                      "{dir}/datamodel.yaml"))
STAGE_NAMES = tuple(s.name for s in STAGES)


def write_configs(folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    for name, text in (("prior.yaml", TINY_PRIOR), ("embed.yaml", TINY_EMBED), ("datamodel.yaml", TINY_DATAMODEL),
                       ("demo.yaml", TINY_DEMO)):
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    return folder


def stage_env() -> dict[str, str]:
    """The environment of a stage's driver: this interpreter's distcur, its own local Ray."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", DISTCUR_PROGRESS="0",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    env.pop("RAY_ADDRESS", None)
    return env


@dataclasses.dataclass
class Run:
    returncode: int | None
    wall_s: float
    killed: bool  # SIGKILLed while still running
    output: str


def run_stage(stage: Stage, store: str, config_dir: str, kill_after: float | None = None,
              timeout: float = 900) -> Run:
    """Run one stage as ``python -m distcur.cli ...`` in its own process group; with ``kill_after``
    SIGKILL the group that many seconds after the start (when it is still running)."""
    argv = [a.format(store=store, dir=config_dir) for a in stage.argv]
    log = os.path.join(config_dir, f"{stage.name}-{os.getpid()}-{time.monotonic_ns()}.log")
    t0 = time.monotonic()
    with open(log, "w+") as out:
        proc = subprocess.Popen([sys.executable, "-m", "distcur.cli", *argv], stdout=out, stderr=subprocess.STDOUT,
                                env=stage_env(), start_new_session=True)
        killed = False
        try:
            proc.wait(timeout=kill_after if kill_after is not None else timeout)
        except subprocess.TimeoutExpired:
            if kill_after is None:
                kill_group(proc)
                raise
            killed = True
            kill_group(proc)
        wall = time.monotonic() - t0
        out.seek(0)
        text = out.read()
    os.unlink(log)
    return Run(proc.returncode, wall, killed, text[-4000:])


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and every process of its group (the local Ray it started), and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    # Ray's own daemons (raylet, GCS) may have left the group: they notice their driver's death
    # and exit; give them a moment so the rerun's local Ray does not share a machine with them.
    time.sleep(1.0)


def canonical(table: pa.Table) -> pa.Table:
    """A table in a form two equal outputs share: no timing columns, rows in key order."""
    table = table.drop_columns([c for c in TIMING_COLUMNS if c in table.column_names])
    keys = [c for c in ROW_KEYS if c in table.column_names]
    if keys:
        table = table.take(pc.sort_indices(table, sort_keys=[(k, "ascending") for k in keys]))
    return table.combine_chunks().replace_schema_metadata(None)


def snapshot(uri: str) -> dict[str, object]:
    """Every committed key of the store: its canonical table, or its parts' checksums when it is
    not Parquet (an encoder)."""
    store = Store(uri)
    out: dict[str, object] = {}
    for key in store.keys():
        m = store.manifest(key)
        if all(f.endswith(".parquet") for f in m.files):
            out[key] = canonical(store.read_table(key))
        else:
            out[key] = sorted(info["sha256"] for info in m.parts.values())
    return out


def differences(expected: dict[str, object], got: dict[str, object]) -> list[str]:
    """What differs between two snapshots (empty when they are equal)."""
    problems = [f"missing {k}" for k in sorted(set(expected) - set(got))]
    problems += [f"unexpected {k}" for k in sorted(set(got) - set(expected))]
    for key in sorted(set(expected) & set(got)):
        a, b = expected[key], got[key]
        if isinstance(a, pa.Table) and isinstance(b, pa.Table):
            if a.schema != b.schema:
                problems.append(f"{key}: schema {b.schema} != {a.schema}")
            elif not a.equals(b):
                problems.append(f"{key}: {b.num_rows} rows differ from the undisturbed {a.num_rows}")
        elif a != b:
            problems.append(f"{key}: parts differ ({b} != {a})")
    return problems


def keys_of(snap: dict[str, object], prefixes: tuple[str, ...]) -> dict[str, object]:
    return {k: v for k, v in snap.items() if k.startswith(prefixes)}


# The keys each stage writes (so a comparison after stage N looks at stages 1..N).
STAGE_OUTPUTS = {
    "ingest": ("steps/",),
    "embed": ("encoders/", "embeddings/"),
    "score": ("scores/iwr",),
    "select": ("selections/",),
    "datamodel": ("datamodels/", "scores/datamodel-"),
    "demo": ("",),  # every key of its store
}


def kill_trials(work: str, trials_per_stage: int, seed: int, stages: tuple[Stage, ...] = STAGES) -> dict:
    """Run ``stages`` undisturbed (copying the store after each), then for each stage and trial: a
    copy of the store as it stood before that stage, the stage killed at a random moment of its
    undisturbed duration (halved, up to twice, when the run ends before it), a rerun, and a
    comparison of every output up to that stage.

    Returns {"walls": {stage: s}, "trials": [{stage, kill_at_s, killed, rerun_returncode,
    identical, differences}]}."""
    import random
    import shutil

    config_dir = write_configs(os.path.join(work, "configs"))
    reference = os.path.join(work, "undisturbed")
    before: dict[str, str] = {}
    walls: dict[str, float] = {}
    for i, stage in enumerate(stages):
        before[stage.name] = os.path.join(work, f"before-{i}-{stage.name}")
        if os.path.isdir(reference):
            shutil.copytree(reference, before[stage.name])
        run = run_stage(stage, reference, config_dir)
        if run.returncode != 0:
            raise RuntimeError(f"{stage.name} failed undisturbed ({run.returncode}):\n{run.output}")
        walls[stage.name] = run.wall_s
    expected = snapshot(reference)
    rng = random.Random(seed)
    trials, done = [], ()
    for stage in stages:
        done += STAGE_OUTPUTS[stage.name]
        for t in range(trials_per_stage):
            store = os.path.join(work, f"killed-{stage.name}-{t}")
            at = rng.uniform(0.15, 0.85) * walls[stage.name]
            attempts = 0
            while attempts < 3:  # a run faster than the undisturbed one may end before its kill
                attempts += 1
                shutil.rmtree(store, ignore_errors=True)
                if os.path.isdir(before[stage.name]):
                    shutil.copytree(before[stage.name], store)
                killed = run_stage(stage, store, config_dir, kill_after=at)
                if killed.killed:
                    break
                at /= 2
            rerun = run_stage(stage, store, config_dir)
            diff = (differences(keys_of(expected, done), keys_of(snapshot(store), done))
                    if rerun.returncode == 0 else [f"rerun failed ({rerun.returncode}): {rerun.output[-1500:]}"])
            trials.append({"stage": stage.name, "kill_at_s": round(at, 2), "killed": killed.killed,
                           "attempts": attempts,
                           "rerun_returncode": rerun.returncode, "identical": not diff, "differences": diff[:10]})
            shutil.rmtree(store, ignore_errors=True)
    return {"walls": {k: round(v, 1) for k, v in walls.items()}, "trials": trials}
