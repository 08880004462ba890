"""The documentation stays true to the tree: every `path.py:name` that docs/ARCHITECTURE.md cites
is defined there, every module has a row in its table, the README stays a short door (10 KB),
nothing sends a reader to a file outside the repository, and every docs page is in mkdocs' nav.

Static checks only (file reads and ``ast``), so they run in well under a second; ``make test``
also builds the site with ``mkdocs build --strict``, which catches broken links between pages.
"""

from __future__ import annotations

import ast
import functools
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
ARCHITECTURE = DOCS / "ARCHITECTURE.md"
README_MAX_BYTES = 10 * 1024

# `aimkp/method/step.py:aimkp_step`, `aimkp/engine/gram.py:GradGram.reweight(...)`
CITATION = re.compile(r"`([\w./-]+\.py):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
# Strings that point at files outside the repository (the project's private notes, a sibling
# checkout, the development machine's paths).
OUTSIDE = ("../shared", "/work/", "ENGINE_NOTES", "METHOD.md", "STYLE.md")
# Where such a pointer must not appear: what users and readers of the code see. tests/ may read
# ../shared (and skip without it), so it is not scanned.
SCANNED = ("README.md", "docs", "aimkp", "benchmarks", "kernels", "csrc", "Makefile", "setup.py")
SCANNED_SUFFIXES = {".md", ".py", ".cpp", ".cu", ".h", ".yml", ".yaml", ""}
CODE_DIRS = ("aimkp", "kernels", "benchmarks")


@functools.cache
def _defined_names(body: tuple[ast.stmt, ...]) -> dict[str, ast.stmt]:
    """Names a module or class body defines: functions, classes, assigned and annotated names."""
    names: dict[str, ast.stmt] = {}
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for t in ast.walk(target):
                    if isinstance(t, ast.Name):
                        names[t.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
    return names


@functools.cache
def _module_body(path: pathlib.Path) -> tuple[ast.stmt, ...]:
    return tuple(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body)


def _resolves(path: pathlib.Path, dotted: str) -> bool:
    body = _module_body(path)
    for part in dotted.split("."):
        node = _defined_names(body).get(part)
        if node is None:
            return False
        body = tuple(node.body) if isinstance(node, ast.ClassDef) else ()
    return True


def _citations() -> list[tuple[int, str, str]]:
    found = []
    for lineno, line in enumerate(ARCHITECTURE.read_text(encoding="utf-8").splitlines(), 1):
        found += [(lineno, m.group(1), m.group(2)) for m in CITATION.finditer(line)]
    return found


def test_architecture_cites_only_names_that_exist() -> None:
    citations = _citations()
    assert len(citations) >= 30, "docs/ARCHITECTURE.md should cite the code as path.py:name"
    wrong = []
    for lineno, rel, name in citations:
        path = REPO / rel
        if not path.is_file():
            wrong.append(f"docs/ARCHITECTURE.md:{lineno}: {rel} does not exist")
        elif not _resolves(path, name):
            wrong.append(f"docs/ARCHITECTURE.md:{lineno}: {rel} defines no {name}")
    assert not wrong, "\n".join(wrong)


def _module_rows() -> list[str]:
    """The files named in the first cell of the rows of the "Modules" section's tables."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    section = text.split("## Modules", 1)[1].split("\n## ", 1)[0]
    files = []
    for line in section.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            files += re.findall(r"`([^`]+)`", first_cell)
    return files


def test_architecture_has_one_row_per_module() -> None:
    rows = _module_rows()
    listed = {r for r in rows if "<" not in r}  # `tests/<area>/test_*.py` names a pattern
    missing_files = sorted(r for r in listed if not (REPO / r).exists())
    assert not missing_files, f"docs/ARCHITECTURE.md lists files that do not exist: {missing_files}"
    modules = {
        p.relative_to(REPO).as_posix()
        for d in CODE_DIRS
        for p in (REPO / d).rglob("*.py")
        if p.name != "__init__.py"
    }
    unlisted = sorted(modules - listed)
    assert not unlisted, f"modules without a row in docs/ARCHITECTURE.md: {unlisted}"
    repeated = sorted({r for r in rows if rows.count(r) > 1})
    assert not repeated, f"modules with more than one row: {repeated}"


def test_architecture_has_no_repeated_section() -> None:
    headings = [
        line for line in ARCHITECTURE.read_text(encoding="utf-8").splitlines() if line[:3] == "## "
    ]
    assert len(headings) == len(set(headings)), sorted(h for h in headings if headings.count(h) > 1)


def test_readme_is_a_short_door() -> None:
    size = (REPO / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail into docs/"


def _scanned_files() -> list[pathlib.Path]:
    files = []
    for name in SCANNED:
        path = REPO / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [
                p
                for p in sorted(path.rglob("*"))
                if p.is_file() and p.suffix in SCANNED_SUFFIXES and "__pycache__" not in p.parts
            ]
    return files


def test_nothing_points_outside_the_repository() -> None:
    wrong = []
    for path in _scanned_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a binary file (an image without suffix) holds no pointer
        for lineno, line in enumerate(text.splitlines(), 1):
            wrong += [
                f"{path.relative_to(REPO)}:{lineno}: {needle}"
                for needle in OUTSIDE
                if needle in line
            ]
    assert not wrong, "\n".join(wrong)


MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", ["README.md", *(f"docs/{p.name}" for p in DOCS.glob("*.md"))])
def test_relative_links_stay_inside_and_exist(page: str) -> None:
    source = REPO / page
    wrong = []
    for target in MARKDOWN_LINK.findall(source.read_text(encoding="utf-8")):
        if "://" in target or target.startswith(("#", "mailto:")):
            continue
        resolved = (source.parent / target.split("#", 1)[0]).resolve()
        if REPO not in resolved.parents or not resolved.exists():
            wrong.append(target)
        elif page.startswith("docs/") and DOCS not in resolved.parents:
            wrong.append(f"{target} (a docs page may link only to docs/: mkdocs --strict)")
    assert not wrong, f"{page}: links that leave the repository or do not resolve: {wrong}"


def _nav_pages(node: object) -> list[str]:
    if isinstance(node, str):
        return [node] if node.endswith(".md") else []
    if isinstance(node, dict):
        return [p for v in node.values() for p in _nav_pages(v)]
    if isinstance(node, list):
        return [p for v in node for p in _nav_pages(v)]
    return []


def test_every_docs_page_is_in_the_nav() -> None:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = _nav_pages(config["nav"])
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert sorted(set(nav)) == pages, {
        "not in the nav": sorted(set(pages) - set(nav)),
        "in the nav, no such page": sorted(set(nav) - set(pages)),
    }


def _readme_python_blocks() -> list[str]:
    return re.findall(
        r"```python\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S
    )


def test_readme_ops_example_runs() -> None:
    """The README's third way in (the two ops) runs as written and means what it says."""
    torch = pytest.importorskip("torch")
    (block,) = [b for b in _readme_python_blocks() if "per_sample_grad_gram" in b]
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)  # noqa: S102
    assert ns["out"].shape == (2, 16, 64)
    assert ns["packed"].values.shape[0] == int(ns["keep"].sum())
    gram, model = ns["gram"], ns["model"]
    assert gram.norms.shape == (4,) and gram.cosines.shape == (2,)
    reweighted = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():  # .grad after reweight == the gradient without row 2
        p.grad = None
    x, y, rows = ns["x"], ns["y"], [0, 1, 3]
    ((model(x[rows]) - y[rows]) ** 2).sum().backward()
    for got, p in zip(reweighted, model.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-6)


def test_readme_trainer_example_runs(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's second way in trains (8 posts of the default data, batch 4: 2 steps)."""
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    (block,) = [b for b in _readme_python_blocks() if "AimKPTrainer" in b]
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)  # noqa: S102
    assert ns["trainer"].state.global_step == 2
