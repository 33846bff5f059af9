"""The public exception types: defined once, in `lora_runtime.errors` (torch-free), and the
same classes wherever they are imported from."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lora_runtime
from lora_runtime import errors

PACKAGE_DIR = Path(lora_runtime.__file__).parent


def test_every_exception_class_is_defined_in_errors_py():
    defined = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                ast.unparse(b).endswith(("Error", "Exception")) for b in node.bases
            ):
                defined[node.name] = str(path.relative_to(PACKAGE_DIR))
    assert defined and set(defined.values()) == {"errors.py"}, defined
    assert sorted(defined) == sorted(errors.__all__)


def test_the_package_and_the_old_homes_hand_out_the_same_classes():
    from lora_runtime.adapters import AdapterError, MergeError
    from lora_runtime.config import ConfigError
    from lora_runtime.rl.outputs import UsageError

    for cls in (AdapterError, ConfigError, MergeError, UsageError):
        assert getattr(errors, cls.__name__) is cls is getattr(lora_runtime, cls.__name__)
        assert cls.__name__ in lora_runtime.__all__
    assert issubclass(errors.ConfigError, ValueError) and issubclass(errors.MergeError, RuntimeError)


def test_errors_and_the_config_load_no_torch():
    code = "import sys, lora_runtime.errors, lora_runtime.config; from lora_runtime import ConfigError; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
