"""The walls between the package's layers, read from the source with `ast`.

Layers import only downward: base (`config`, `errors`, `_fs`, `_dist`, `_threads`) and `ops` <- `adapters` <-
(`actor`, `compile`, `parallel`) <- `rl` <- `cli`. `bench` may import anything but `cli`,
and nothing imports it except the one door `lora-runtime bench` needs (`ALLOWED`). Every import counts, top level and inside functions; an import inside a
function must say why it is deferred (`# deferred: ...`), so none can hide a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "lora_runtime"

# the command's `bench` subcommand hands its arguments to the harness: the one way in
ALLOWED = {("lora_runtime.cli", "lora_runtime.bench.main")}

# first matching prefix wins; a module's layer is the number
LAYERS = (
    ("lora_runtime.config", 0),
    ("lora_runtime.errors", 0),
    ("lora_runtime._fs", 0),
    ("lora_runtime._dist", 0),
    ("lora_runtime._threads", 0),
    ("lora_runtime._memory", 0),
    ("lora_runtime.ops", 0),
    ("lora_runtime.adapters", 1),
    ("lora_runtime.actor", 2),
    ("lora_runtime.compile", 2),
    ("lora_runtime.deploy", 2),
    ("lora_runtime.parallel", 2),
    ("lora_runtime.rl", 3),
    ("lora_runtime.bench", 4),
    ("lora_runtime.cli", 5),
    ("lora_runtime.__main__", 5),
    ("lora_runtime", 2),  # the public facade: re-exports layers 0-2
)


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (a package means its __init__)
    line: int
    in_function: bool
    deferred_comment: bool


def layer_of(module: str) -> int:
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    raise AssertionError(f"{module} is in no layer; add it to LAYERS")


def module_names(package_dir: Path) -> dict[str, Path]:
    """`{dotted module name: file}` for every .py file of the package."""
    root = package_dir.parent
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def read_imports(package_dir: Path) -> list[Import]:
    """Every import of the package's own modules, with where it stands."""
    modules = module_names(package_dir)
    top = package_dir.name
    found: list[Import] = []
    for name, path in modules.items():
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inside = {id(n) for f in functions for n in ast.walk(f)}
        type_checking = {
            id(n) for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in type_checking:
                continue  # never executed
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == top]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.split(".")[0] != top:
                    continue
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    sub = f"{node.module}.{alias.name}"
                    folder = package_dir.parent.joinpath(*node.module.split("."))
                    compiled = any(folder.glob(f"{alias.name}.*.so")) or any(folder.glob(f"{alias.name}.so"))
                    targets.append(sub if sub in modules or compiled else node.module)
            for target in dict.fromkeys(targets):
                found.append(Import(
                    name, target, node.lineno, id(node) in inside,
                    "# deferred:" in lines[node.lineno - 1],
                ))
    return found


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as `[a, b, ..., a]`, or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def check_imports(imports: list[Import]) -> list[str]:
    """Every broken rule, one line each (empty when the package is clean)."""
    problems = []
    edges: dict[str, set[str]] = {}
    for imp in imports:
        if imp.source == imp.target or (imp.source, imp.target) in ALLOWED:
            continue
        edges.setdefault(imp.source, set()).add(imp.target)
        where = f"{imp.source}:{imp.line} imports {imp.target}"
        src, dst = layer_of(imp.source), layer_of(imp.target)
        top = imp.source.split(".")[0]
        if dst > src:
            problems.append(f"{where}: upward (layer {src} -> {dst})")
        if imp.target == top and imp.source != top:
            problems.append(f"{where}: the package's facade is for users, not for its own modules")
        if imp.target.startswith(f"{top}.bench") and not imp.source.startswith(f"{top}.bench"):
            problems.append(f"{where}: nothing imports the benchmark harness")
        if imp.source.startswith(f"{top}.ops") and not imp.target.startswith(f"{top}.ops"):
            problems.append(f"{where}: ops/ imports nothing outside ops/")
        if imp.source == f"{top}.rl.models.vla" and imp.target.split(".")[1] in ("adapters", "ops", "actor"):
            problems.append(f"{where}: the built-in models know nothing of LoRA")
        if imp.in_function and not imp.deferred_comment:
            problems.append(f"{where} inside a function without a '# deferred: <why>' comment")
    cycle = find_cycle(edges)
    if cycle:
        problems.append("import cycle: " + " -> ".join(cycle))
    return problems


def test_the_package_keeps_its_walls():
    imports = read_imports(PACKAGE_DIR)
    assert len(imports) > 50  # the reader really sees the package's imports
    assert check_imports(imports) == []


def test_config_imports_no_torch():
    names = []
    for path in (PACKAGE_DIR / "config").glob("*.py"):
        tree = ast.parse(path.read_text())
        names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert "pydantic" in names and not [n for n in names if n.split(".")[0] == "torch"]
    code = "import sys, lora_runtime.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_every_public_name_still_imports():
    import lora_runtime

    assert {"shard_actor", "replicate_actor", "prepare_actor", "lora_linear"} <= set(lora_runtime.__all__)
    for name in lora_runtime.__all__:
        assert getattr(lora_runtime, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lora_runtime.nope  # noqa: B018


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PACKAGE_DIR)): n for p in PACKAGE_DIR.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


# ----------------------------------------------------------------------------- plug-ins own their branches

TASKS, MODELS = "lora_runtime.rl.tasks", "lora_runtime.rl.models"
# transformers' model classes a branch might test for (the families own that knowledge)
HF_MODEL_CLASSES = {"PreTrainedModel", "LlamaForCausalLM", "GenerationMixin", "PeftModel"}


def classes_defined(package_dir: Path, prefix: str) -> set[str]:
    """Names of the classes defined in the modules under `prefix`."""
    return {node.name for name, path in module_names(package_dir).items() if name.startswith(prefix)
            for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ClassDef)}


def plugin_branches(package_dir: Path) -> list[str]:
    """Every branch on a task kind or task class outside `rl/tasks/` (and the config's task
    sections), and on a model class outside `rl/models/`, one line each."""
    task_classes = classes_defined(package_dir, TASKS)
    model_classes = classes_defined(package_dir, MODELS) | HF_MODEL_CLASSES
    problems = []
    for name, path in module_names(package_dir).items():
        in_tasks = name.startswith(TASKS) or name == "lora_runtime.config.task"
        in_models = name.startswith(MODELS)
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{name}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Compare) and not in_tasks:
                operands = [node.left, *node.comparators]
                if any(isinstance(o, ast.Attribute) and o.attr == "kind" for o in operands):
                    problems.append(f"{where}: compares a task kind ({ast.unparse(node)})")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("isinstance", "issubclass"):
                tested = {n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node.args[1])
                          if isinstance(n, (ast.Name, ast.Attribute))} if len(node.args) > 1 else set()
                if tested & task_classes and not in_tasks:
                    problems.append(f"{where}: tests a task class ({ast.unparse(node)})")
                if tested & model_classes and not in_models:
                    problems.append(f"{where}: tests a model class ({ast.unparse(node)})")
    return problems


def test_only_the_plugins_branch_on_tasks_and_models():
    assert {"ReachTask", "EpisodicTask", "Task"} <= classes_defined(PACKAGE_DIR, TASKS)
    assert {"TinyVLA", "VLAFamily", "CausalLMFamily"} <= classes_defined(PACKAGE_DIR, MODELS)
    assert plugin_branches(PACKAGE_DIR) == []


def test_plugin_branch_checker_finds_planted_branches(tmp_path):
    files = dict(CLEAN)
    files["rl/tasks/__init__.py"] = "class ReachTask:\n    kind = 'reach'\n"
    files["rl/models/__init__.py"] = "class TinyVLA:\n    pass\n"
    files["rl/trainer.py"] = (
        "def f(cfg, task, model):\n"
        "    if cfg.task.kind == 'reach':\n        return 1\n"
        "    if isinstance(task, ReachTask):\n        return 2\n"
        "    return isinstance(model, (TinyVLA, int))\n"
    )
    problems = plugin_branches(_write_package(tmp_path, files))
    assert len(problems) == 3, problems
    assert "lora_runtime.rl.trainer:2: compares a task kind (cfg.task.kind == 'reach')" in problems
    assert any("tests a task class (isinstance(task, ReachTask))" in p for p in problems)
    assert any("tests a model class (isinstance(model, (TinyVLA, int)))" in p for p in problems)


# ----------------------------------------------------------------------------- the checker itself


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "lora_runtime" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "lora_runtime"


CLEAN = {
    "__init__.py": "",
    "config.py": "import os\n",
    "ops/__init__.py": "from lora_runtime.ops.kernel import op\n",
    "ops/kernel.py": "def op():\n    return 1\n",
    "adapters/__init__.py": "",
    "adapters/layer.py": "from lora_runtime.ops import op\nfrom lora_runtime.config import os\n",
    "rl/__init__.py": "",
    "rl/trainer.py": "from lora_runtime.adapters import layer\n",
}


def test_checker_passes_a_clean_package(tmp_path):
    assert check_imports(read_imports(_write_package(tmp_path, CLEAN))) == []


def test_checker_finds_a_planted_cycle_hidden_in_a_function(tmp_path):
    files = dict(CLEAN)
    files["adapters/merge.py"] = "from lora_runtime.adapters.layer import op\n"
    files["adapters/layer.py"] = """
        def remove(model):
            from lora_runtime.adapters.merge import op  # deferred: start-up time
            return op
    """
    problems = check_imports(read_imports(_write_package(tmp_path, files)))
    assert problems == [
        "import cycle: lora_runtime.adapters.layer -> lora_runtime.adapters.merge -> lora_runtime.adapters.layer"
    ]


def test_checker_finds_broken_walls(tmp_path):
    files = dict(CLEAN)
    files["ops/kernel.py"] = "from lora_runtime.config import os\n"
    files["adapters/layer.py"] = "from lora_runtime.rl import trainer\n"
    files["rl/models/vla.py"] = "from lora_runtime.adapters import layer\n"
    files["rl/trainer.py"] = "def f():\n    from lora_runtime.bench import x\n"
    files["bench/__init__.py"] = "x = 1\n"
    problems = check_imports(read_imports(_write_package(tmp_path, files)))
    text = "\n".join(problems)
    assert "lora_runtime.ops.kernel:1 imports lora_runtime.config: ops/ imports nothing outside ops/" in text
    assert "lora_runtime.adapters.layer:1 imports lora_runtime.rl.trainer: upward (layer 1 -> 3)" in text
    assert "lora_runtime.rl.models.vla:1 imports lora_runtime.adapters.layer: the built-in models know nothing of LoRA" in text
    assert "lora_runtime.rl.trainer:2 imports lora_runtime.bench: upward (layer 3 -> 4)" in text
    assert "nothing imports the benchmark harness" in text
    assert "inside a function without a '# deferred: <why>' comment" in text
    assert len(problems) == 6, problems


def test_layer_of_refuses_an_unplaced_module():
    with pytest.raises(AssertionError, match="lora_runtime_extra.x is in no layer"):
        layer_of("lora_runtime_extra.x")
