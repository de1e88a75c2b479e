"""The package's floors, read from its own imports (ast): they stay true because this test fails otherwise.

    cli -> train (the loop, evaluation, export, galleries, pairs) -> objectives -> methods -> base
    (sampler, steps, families, denoising, scorers, data, models, ...)

Imports go down or sideways within a floor, never up, never in a cycle; library code never imports the
CLI; package-internal imports sit at module top (only heavy optional third-party packages may load lazily).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "diffalign"

#: Floors, highest first: (module or package prefix, floor). The longest matching prefix wins.
FLOOR_NAMES = ["base", "methods", "objectives", "train", "cli"]
FLOORS = {
    "diffalign.cli": 4, "diffalign.commands": 4, "diffalign.__main__": 4, "diffalign.gallery.cli": 4,
    "diffalign.toy.cli": 4,
    "diffalign.train": 3, "diffalign.evaluation": 3, "diffalign.export": 3, "diffalign.run_state": 3,
    "diffalign.gallery": 3, "diffalign.pairs": 3, "diffalign.toy.pretrain": 3,
    "diffalign.toy.video_pretrain": 3, "diffalign.toy.flow_pretrain": 3,
    "diffalign.distributed": 3, "diffalign.config": 3,
    "diffalign.objectives": 2,
    "diffalign.methods": 1,
    "diffalign": 0,
}

#: Third-party packages heavy or optional enough to import inside the function that needs them.
LAZY_THIRD_PARTY = {"accelerate", "av", "bitsandbytes", "datasets", "deepspeed", "diffusers", "hpsv2",
                    "huggingface_hub", "imageio", "ImageReward", "matplotlib", "open_clip", "peft", "pyarrow",
                    "scipy", "tensorboard", "tokenizers", "transformers", "wandb"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def floor_of(module: str) -> int:
    best = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len)
    return FLOORS[best]


def read_imports() -> tuple[dict[str, set[str]], list[str]]:
    """``module -> package modules it imports`` and the list of imports found inside functions."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    nested: list[str] = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        top_level = {id(node) for node in tree.body}
        for stmt in tree.body:  # `if TYPE_CHECKING:` / try-blocks at module top count as top level
            if isinstance(stmt, ast.If | ast.Try):
                top_level |= {id(n) for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parents + [base]).strip(".")
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] == "diffalign":
                    while target not in modules:
                        target = target.rpartition(".")[0]
                    # importing a.b.c runs the packages a.b and a first (unless they are this module's own)
                    parts = target.split(".")
                    for prefix in (".".join(parts[:i]) for i in range(2, len(parts) + 1)):
                        if prefix != module and not module.startswith(prefix + "."):
                            edges[module].add(prefix)
                    if id(node) not in top_level:
                        nested.append(f"{module} imports {target} inside a function (line {node.lineno})")
                elif id(node) not in top_level and target.split(".")[0] not in LAZY_THIRD_PARTY:
                    nested.append(f"{module} imports {target} inside a function (line {node.lineno}); "
                                  "only heavy optional third-party packages may load lazily")
    return edges, nested


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, first == last), or None. A package's ``__init__`` importing
    its own submodules is not a cycle unless a submodule imports the package back."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


EDGES, NESTED = read_imports()


def test_no_import_cycle():
    cycle = find_cycle(EDGES)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_go_down_the_floors():
    upward = [f"{a} ({FLOOR_NAMES[floor_of(a)]}) imports {b} ({FLOOR_NAMES[floor_of(b)]})"
              for a, targets in EDGES.items() for b in targets if floor_of(b) > floor_of(a)]
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_library_never_imports_the_cli():
    cli = {m for m in EDGES if floor_of(m) == 4}
    bad = [f"{a} imports {b}" for a, targets in EDGES.items() if a not in cli for b in targets if b in cli]
    assert not bad, "\n".join(bad)


def test_package_imports_at_module_top():
    assert not NESTED, "\n".join(NESTED)


def test_the_checker_sees_cycles_and_upward_edges():
    """The graph reader itself: a planted cycle is found, a planted upward edge has the floors it needs."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert floor_of("diffalign.methods.dpo") < floor_of("diffalign.objectives.pairs") \
        < floor_of("diffalign.train")
    assert floor_of("diffalign.prompt_sets") == 0 and floor_of("diffalign.gallery.cli") == 4
    assert "diffalign.objectives" in EDGES["diffalign.train"]  # the reader sees the real edges
    assert "diffalign.families" in EDGES["diffalign.sampler"]


@pytest.mark.parametrize("module", sorted(EDGES))
def test_every_module_is_under_600_lines(module):
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= 600, f"{module} has {lines} lines (keep modules under ~600)"
