"""The package's shape, read from its source: no import circles, and modules of a readable size."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "flower_classifier"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, where: str = "all") -> set[str]:
    """The package's modules that `path` imports, at the top or inside functions (a lazy import is an
    import too); not those under `if TYPE_CHECKING:`, which never run. `where`: "top" for the
    module-level imports only, "lazy" for those inside functions only."""
    tree = ast.parse(path.read_text())
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for n in ast.walk(node)}
    inside = {id(n) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped or (where == "top" and id(node) in inside) or (where == "lazy" and id(node) not in inside):
            continue
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if not node.level and not target.startswith("flower_classifier"):
                continue
            for alias in node.names:  # `from . import x` imports the module x
                candidate = f"{target}.{alias.name}"
                found.add(candidate if (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists() else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("flower_classifier")}
    return found - {module_name(path), "flower_classifier"}


def graph(where: str = "all") -> dict[str, set[str]]:
    return {module_name(p): imports(p, where) for p in PACKAGE.rglob("*.py")}


def levels(edges: dict[str, set[str]]) -> dict[str, int]:
    """Each module's level: 0 for one that imports none of the package, else one above the highest it imports."""
    found = {}

    def level(node):
        if node not in found:
            found[node] = 0  # a circle (refused by the test below) cannot recurse forever
            found[node] = 1 + max((level(n) for n in edges.get(node, ())), default=-1)
        return found[node]

    for node in edges:
        level(node)
    return found


def climbs(top: dict[str, set[str]], lazy: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Lazy imports (`lazy`: inside functions) of a module at the importer's level or above, the levels
    drawn from the module-level imports (`top`) alone: each is a call that climbs back up the stages."""
    level = levels(top)
    return sorted((a, b) for a, targets in lazy.items() for b in targets if level.get(b, 0) >= level.get(a, 0))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_the_package_has_no_import_circles():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


# The run's stages: each about 400 lines at most, or a reason stated at its top.
STAGES = ("training", "fitting", "calibrating", "calibration", "unknown", "record", "evaluation", "checkpoint",
          "runfolder", "search", "model", "plots", "distributed")


def test_the_run_s_modules_stay_readable():
    long = [name for name in STAGES if len((PACKAGE / f"{name}.py").read_text().splitlines()) > 400
            and "long because" not in (PACKAGE / f"{name}.py").read_text()[:2000]]
    assert long == []


def test_every_name_the_package_exports_resolves_to_its_home():
    """`fc.NAME` is looked up lazily in the module `_EXPORTS` names: a function moved to another
    module must move there too, or `import flower_classifier as fc; fc.NAME` breaks for users."""
    import flower_classifier as fc

    missing = [name for name in fc.__all__ if getattr(fc, name, None) is None]
    assert missing == []


# The command line sits above every stage and imports each lazily (so that --help, check-data and an
# .onnx model's predict load no torch): its lazy imports go down, whatever the module-level levels say.
FACES = "flower_classifier.cli"
# The calls that climb back up, each with its reason; docs/code-map.md states their number.
JUSTIFIED_CLIMBS = {
    ("flower_classifier.predictor", "flower_classifier.checkpoint"):
        "torch and the checkpoint format load only for a .pth model: an .onnx one predicts without torch",
}


def test_calls_climb_back_up_the_stages_only_where_a_reason_is_stated():
    found = [c for c in climbs(graph("top"), graph("lazy")) if not c[0].startswith(FACES)]
    assert found == sorted(JUSTIFIED_CLIMBS)


def test_the_climb_finder_finds_a_lazy_import_of_a_higher_module():
    top = {"run": {"fit"}, "fit": {"store"}, "store": set()}
    assert climbs(top, {"store": {"fit"}, "run": {"store"}}) == [("store", "fit")]  # up: found; down: not
    assert levels(top) == {"run": 2, "fit": 1, "store": 0}
