"""Which source files shape a stage's results, derived from imports, and a digest of them.

A stage's code is its entry module plus every `dodlib` module it imports, directly or through
others, at module level or inside a function (read from the source with `ast`, nothing is
imported), plus the `__init__.py` of each package on the way (importing a submodule runs them); this
module itself is left out.
So an edit of the SDE (dodlib/samplers.py) reruns sampling but not training, and an edit of a
model file reruns everything that builds the network.

The files are the stages' code dependencies in Snakemake and DVC (dodlib/pipeline.py), and the two
stages with resumable state (training, sampling) fold `code_digest` into their state key: after a
code edit a rerun starts over instead of resuming (or reusing) checkpoints and shards made by the
old code.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent

# Entry modules of the stages with resumable state.
TRAIN_CODE = ("train",)
SAMPLE_CODE = ("sample",)


def _module_file(package: Path, dotted: str) -> Path | None:
    """The file of `dodlib.<dotted>` (a module or a package's __init__), or None outside dodlib."""
    base = package.joinpath(*dotted.split(".")) if dotted else package
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _dotted(package: Path, path: Path) -> str:
    rel = path.relative_to(package).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(package: Path, path: Path) -> set[Path]:
    st = path.stat()
    return _parsed_imports(package, path, (st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=None)
def _parsed_imports(package: Path, path: Path, stamp: tuple[int, int]) -> frozenset[Path]:
    """dodlib files that `path` imports (each `from X import name` also tries X.name, a submodule);
    cached per file version (`stamp`), so the pipeline parses each file once."""
    here = _dotted(package, path)
    current = here if path.name == "__init__.py" else here.rpartition(".")[0]
    targets: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets += [a.name.removeprefix("dodlib.") for a in node.names
                        if a.name == "dodlib" or a.name.startswith("dodlib.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `level - 1` packages up from the current one
                parts = current.split(".") if current else []
                base, rest = ".".join(parts[: len(parts) - node.level + 1]), node.module or ""
            elif node.module == "dodlib" or (node.module or "").startswith("dodlib."):
                base, rest = "", node.module.removeprefix("dodlib").lstrip(".")
            else:
                continue
            module = ".".join(p for p in (base, rest) if p)
            targets.append(module)
            targets += [f"{module}.{a.name}" if module else a.name for a in node.names]
    found = set()
    for dotted in targets:
        parts = dotted.split(".") if dotted else []
        for i in range(len(parts) + 1):  # the module and every package above it
            f = _module_file(package, ".".join(parts[:i]))
            if f is not None:
                found.add(f)
    return frozenset(found)


def _closure(package: Path, entries: tuple[str, ...]) -> tuple[str, ...]:
    todo = []
    for entry in entries:
        f = _module_file(package, entry.replace("/", "."))
        if f is None:
            raise FileNotFoundError(f"code_deps: no module dodlib.{entry}")
        todo.append(f)
    seen: set[Path] = set()
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo += _imports(package, f) - seen
    # This module is bookkeeping, not a stage's code: editing it must not rerun the pipeline.
    return tuple(sorted(str(f.relative_to(package.parent)) for f in seen if f.name != "code_deps.py"))


def source_files(*entries: str) -> list[str]:
    """Source files (relative to the repository) of the entry modules `entries` (e.g. "sample",
    "metrics/evaluate") and of every dodlib module they import."""
    return list(_closure(PACKAGE, tuple(entries)))


def code_digest(entries: tuple[str, ...]) -> str:
    """sha256 over the source files of `entries` and their imports (paths and bytes)."""
    h = hashlib.sha256()
    for rel in source_files(*entries):
        h.update(rel.encode() + b"\0" + (PACKAGE.parent / rel).read_bytes() + b"\0")
    return h.hexdigest()[:16]


__all__ = ["PACKAGE", "SAMPLE_CODE", "TRAIN_CODE", "code_digest", "source_files"]
