"""The house by stage: imports run one way down the pipeline, and no files import each other in a circle.

The stage order is declared once, as import-linter contracts in pyproject.toml; this test runs them, then looks
for circles among the modules themselves (strongly connected components of the import graph, by scipy).
"""

import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _graph():
    grimp = pytest.importorskip("grimp")
    return grimp.build_graph("latentprobe", cache_dir=None)


def test_the_import_linter_contracts_hold():
    pytest.importorskip("importlinter")
    from importlinter.application.use_cases import lint_imports
    from importlinter.configuration import configure

    configure()  # what the lint-imports command does before it lints
    kept = lint_imports(config_filename=str(ROOT / "pyproject.toml"), cache_dir=None, no_logo=True)
    assert kept, "an import runs up the stages: run `lint-imports` in the project root for the chain"


def test_no_circle_of_modules():
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    graph = _graph()
    modules = sorted(m for m in graph.modules if m.startswith("latentprobe"))
    index = {m: i for i, m in enumerate(modules)}
    rows, cols = [], []
    for m in modules:
        for imported in graph.find_modules_directly_imported_by(m):
            if imported in index and imported != m:
                # a package's __init__ re-exporting its children is not a circle of files: skip parent -> child
                if imported.startswith(m + "."):
                    continue
                rows.append(index[m])
                cols.append(index[imported])
    adjacency = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(modules), len(modules)))
    n, labels = connected_components(adjacency, directed=True, connection="strong")
    circles = [sorted(modules[i] for i in np.flatnonzero(labels == label))
               for label in range(n) if (labels == label).sum() > 1]
    assert circles == [], f"modules that import each other in a circle: {circles}"


def test_old_import_paths_warn_once_and_give_the_same_module():
    import importlib
    import sys

    import latentprobe.model.decoding as decoding
    import latentprobe.where.patching as patching

    for old, new in (("latentprobe.decoding", decoding), ("latentprobe.patching", patching)):
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=f"{old} moved to {new.__name__}"):
            module = importlib.import_module(old)
        assert module is new
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert importlib.import_module(old) is new  # once: the second import is silent
    from latentprobe.subjects.families import FAMILIES  # noqa: F401  (a moved package's submodule resolves too)


def test_the_round_two_shims_are_gone():
    import importlib

    for old in ("latentprobe.tracing", "latentprobe.intervening"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(old)
