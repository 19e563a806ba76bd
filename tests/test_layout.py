"""The package layout's import directions: every arrow points down.

- the maths packages work on arrays: they never import the store, Ray, the executors
  (``distcur.distributed``), the stages or the CLI;
- the executors (``distcur.distributed``) import nothing of the domain: they run callables they are
  handed, over Ray tasks, Ray Data, Tune or a TorchTrainer;
- the stages never import the CLI.
Imports inside functions count as much as those at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "distcur"
MATHS = ("score", "datamodels", "rebalance", "policy", "embed", "envs", "sources")
# what an executor may import: the store and the leaf helpers every layer shares
FOUNDATION = ("distcur.store", "distcur.schema", "distcur.data", "distcur.config", "distcur.progress", "distcur.logs", "distcur.deps",
              "distcur.devices", "distcur.torchio", "distcur.distributed")
NOT_IN_MATHS = ("ray", "distcur.store", "distcur.distributed", "distcur.stages", "distcur.commands",
                "distcur.cli")


def _imports(path: Path) -> list[tuple[int, str]]:
    module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out += [(node.lineno, name)] if node.module else [(node.lineno, f"{name}.{a.name}") for a in node.names]
    return out


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _modules(package: str) -> list[Path]:
    where = ROOT / package
    return sorted(where.rglob("*.py")) if where.is_dir() else [where.with_suffix(".py")]


@pytest.mark.parametrize("package", MATHS)
def test_maths_packages_never_see_the_store_ray_or_the_stages(package):
    bad = [f"{p.relative_to(ROOT.parent)}:{line} imports {name}"
           for p in _modules(package) if p.exists() for line, name in _imports(p) if _under(name, NOT_IN_MATHS)]
    assert not bad, "\n".join(bad)


def test_executors_import_nothing_of_the_domain():
    bad = [f"{p.relative_to(ROOT.parent)}:{line} imports {name}"
           for p in _modules("distributed") for line, name in _imports(p)
           if name.startswith("distcur") and not _under(name, FOUNDATION)]
    assert not bad, "\n".join(bad)


def test_stages_never_import_the_cli():
    bad = [f"{p.relative_to(ROOT.parent)}:{line} imports {name}"
           for p in _modules("stages") for line, name in _imports(p) if _under(name, ("distcur.commands", "distcur.cli"))]
    assert not bad, "\n".join(bad)
