"""Every third-party package a stage imports is a declared dependency (base or the stage's extra),
optional ones are imported lazily with a one-line install hint, and the Docker image installs the
extras the cluster stages need."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import sys
import tomllib

import pytest

from distcur.deps import CLUSTER_EXTRAS, EXTRA_OF, MissingDependencyError, require

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# import names whose distribution is not installed here (so packages_distributions cannot tell)
KNOWN = {"lerobot": "lerobot", "sklearn": "scikit-learn", "PIL": "pillow", "yaml": "pyyaml", "h5py": "h5py"}


def _requirement_name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def declared() -> tuple[set[str], dict[str, set[str]]]:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    base = {_requirement_name(r) for r in project["dependencies"]}
    extras = {k: {_requirement_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    return base, extras


def third_party_imports() -> dict[str, list[tuple[str, int, bool]]]:
    """{top-level import name: [(file, line, at module level)]} over distcur/, including the
    modules named in ``require("...")`` calls."""
    std = set(sys.stdlib_module_names) | {"__future__"}
    found: dict[str, list] = {}
    for dirpath, _, names in os.walk(os.path.join(REPO, "distcur")):
        for name in names:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            tree = ast.parse(open(path).read())
            top_level = {id(n) for n in tree.body}
            for node in ast.walk(tree):
                mods = []
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require" and node.args
                      and isinstance(node.args[0], ast.Constant)):
                    mods = [node.args[0].value]
                for m in mods:
                    top = m.split(".")[0]
                    if top in std or top == "distcur":
                        continue
                    found.setdefault(top, []).append((os.path.relpath(path, REPO), node.lineno, id(node) in top_level))
    return found


def distribution_of(module: str) -> set[str]:
    dists = importlib.metadata.packages_distributions().get(module)
    if dists:
        return {d.lower().replace("_", "-") for d in dists}
    return {KNOWN.get(module, module).lower()}


def test_every_import_is_a_declared_dependency():
    base, extras = declared()
    runtime_extras = {k: v for k, v in extras.items() if k != "dev"}
    problems = []
    for module, where in sorted(third_party_imports().items()):
        dists = distribution_of(module)
        if dists & base:
            continue
        in_extras = [k for k, v in runtime_extras.items() if dists & v]
        if not in_extras:
            problems.append(f"{module} ({where[0][0]}:{where[0][1]}) is in no runtime dependency or extra "
                            f"(distribution {sorted(dists)})")
            continue
        if EXTRA_OF.get(module) not in in_extras:
            problems.append(f"{module}: distcur/deps.py EXTRA_OF says {EXTRA_OF.get(module)!r}, pyproject has it in "
                            f"{in_extras}")
        eager = [f"{f}:{line}" for f, line, top in where if top]
        if eager:
            problems.append(f"{module} (extra {in_extras[0]!r}) is imported at module level in {eager}: import it "
                            "inside the function that needs it (distcur.deps.require), so the base install imports "
                            "every module")
    assert not problems, "\n".join(problems)


def test_the_stage_packages_are_in_runtime_extras_not_only_dev():
    base, extras = declared()
    assert "scikit-learn" in extras["datamodel"] and "h5py" in extras["hdf5"]
    for module, extra in EXTRA_OF.items():
        assert extra in extras, f"deps.EXTRA_OF names extra {extra!r}, which pyproject does not declare"
        assert distribution_of(module) & extras[extra], f"{module} is not in pyproject's {extra!r} extra"


def test_a_missing_package_is_one_line_naming_the_extra(capsys, monkeypatch, tmp_path):
    with pytest.raises(MissingDependencyError, match=r"^the optional package 'h5py' is not installed \(needed by "
                                                     r"x\): pip install 'distcur\[hdf5\]'$"):
        monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py now raises ModuleNotFoundError
        require("h5py", "x")
    from distcur.cli import main

    assert main(["ingest", "hdf5", "nothing.hdf5", "--source", "s", "--out", str(tmp_path / "store"), "--no-ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["distcur ingest: error: the optional package 'h5py' is not installed (needed by distcur ingest "
                   "hdf5): pip install 'distcur[hdf5]'"]


def test_sklearn_goes_through_require():
    text = open(os.path.join(REPO, "distcur", "datamodels", "regression.py")).read()
    assert 'require("sklearn.linear_model"' in text and "from sklearn" not in text


def test_dockerfile_installs_the_cluster_extras():
    text = open(os.path.join(REPO, "infra", "docker", "Dockerfile")).read()
    installs = re.findall(r'pip install "\.\[([^\]]*)\]"', text)
    assert installs, "the Dockerfile does not install the project with extras"
    extras = {e.strip() for e in installs[0].split(",")}
    _, declared_extras = declared()
    assert set(CLUSTER_EXTRAS) <= extras, f"the image lacks extras {set(CLUSTER_EXTRAS) - extras}"
    assert extras <= set(declared_extras), f"the image installs undeclared extras {extras - set(declared_extras)}"
