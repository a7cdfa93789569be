"""The house rules of docs/DESIGN.md, read from the source: every project import is at the top of its
module (no back edge hidden in a function; a module needing an optional extra is imported where used), rooms only import rooms below them, and no module
imports itself round a circle."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("video_io", "memory", "streamer")
# Lowest first: a module may import its own room and the rooms before it, never one after it.
ROOMS = ("streamer.text", "video_io", "memory", "streamer.config", "streamer.engine", "streamer.builtin", "streamer.evaluation",
         "streamer.service", "streamer.cli", "streamer")


# modules that need an optional extra (pyproject.toml): imported where they are used, so that the rest
# runs without it; their edges still count for the rooms and circles below
OPTIONAL = {"streamer.service.ray_serve": "ray"}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def project_imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported project module, whether the import is a top-level statement) for each import."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" for alias in node.names]  # a submodule, or a name in `base`
        else:
            continue
        found += [(target, node in tree.body) for target in targets if target.split(".")[0] in PACKAGES]
    return found


def room(module: str) -> int:
    return max(i for i, prefix in enumerate(ROOMS) if module == prefix or module.startswith(prefix + "."))


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {}
    for name, path in known.items():
        targets = set()
        for target, _ in project_imports(name, path):
            while target not in known:  # `from memory.probe import X` names the module memory.probe
                target = target.rpartition(".")[0]
            targets.add(target)
        edges[name] = targets - {name}
    return edges


def test_project_imports_are_top_level_statements():
    hidden = [f"{name} imports {target}" for name, path in modules().items()
              for target, top in project_imports(name, path)
              if not top and target.rpartition(".")[0] not in OPTIONAL and target not in OPTIONAL]
    assert hidden == []


def test_rooms_only_import_rooms_below_them():
    upward = [f"{name} imports {target}" for name, targets in graph().items() for target in targets
              if room(target) > room(name)]
    assert upward == []
    assert all(not target.startswith("streamer") for name, targets in graph().items() if not name.startswith("streamer")
               for target in targets), "memory/ and video_io/ must not import streamer/"


def test_no_import_circles():
    edges, state, circles = graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                circles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert circles == []


def test_the_client_imports_without_torch_or_pyav():
    """A program that only talks to a server (streamer.service.client) needs websockets, numpy and Pillow: not
    torch and not PyAV (they were pulled in through video_io/__init__.py)."""
    import subprocess
    import sys

    code = "import sys, streamer.service.client; print(sorted({'torch', 'av', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
