"""The layers depend only downwards: core <- models <- app.

Every module under `lorajax/_src/core` (the `lorajax` core package) imports
only jax, optax, orbax-checkpoint, safetensors, numpy and the standard
library; `_src/models` never imports the application. Checked on the source
(AST), so lazy imports inside functions count too.
"""

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "lorajax" / "_src"

# Third-party top-level modules the core may import (its dependencies in
# pyproject.toml; ml_dtypes comes with jax).
CORE_ALLOWED = {"jax", "jaxlib", "optax", "orbax", "safetensors", "numpy",
                "ml_dtypes", "jaxtyping", "lorajax"}
CORE_FORBIDDEN_LORAJAX = ("lorajax._src.models", "lorajax._src.app",
                          "lorajax.models", "lorajax.finetune")
MODELS_FORBIDDEN = ("lorajax._src.app", "lorajax.finetune", "tqdm",
                    "matplotlib", "flax")
HEAVY = ("flax", "matplotlib", "tqdm", "gguf", "tokenizers", "jinja2",
         "torch", "transformers")


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
  tree = ast.parse(path.read_text(), filename=str(path))
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # Relative: resolve against the package.
        pkg = path.relative_to(ROOT).with_suffix("").parts[:-node.level]
        base = ".".join(pkg + ((node.module,) if node.module else ()))
      else:
        base = node.module or ""
      out.append((node.lineno, base))
      # `from lorajax import finetune` imports lorajax.finetune.
      out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
  return out


def _modules(layer: str) -> list[pathlib.Path]:
  return sorted((SRC / layer).rglob("*.py"))


def _under(name: str, prefixes) -> bool:
  return any(name == p or name.startswith(p + ".") for p in prefixes)


def _violations(layer, check):
  bad = []
  for path in _modules(layer):
    for line, name in _imports(path):
      if check(name):
        bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
  return bad


def test_core_imports_only_core_dependencies():
  stdlib = set(sys.stdlib_module_names)

  def bad(name):
    top = name.split(".")[0]
    if _under(name, CORE_FORBIDDEN_LORAJAX):
      return True
    if top == "lorajax":
      # Within lorajax only the core itself: never the public packages
      # (which import the core: a cycle) nor the layers above.
      return not _under(name, ("lorajax._src.core",))
    return top not in stdlib and top not in CORE_ALLOWED

  assert _modules("core"), "no core modules found"
  assert not _violations("core", bad)


def test_models_never_import_the_application():
  assert _modules("models")
  assert not _violations("models", lambda n: _under(n, MODELS_FORBIDDEN))


def test_library_layers_do_not_import_the_public_package():
  """`_src` asks the core directly, not `import lorajax` (the finetune
  library once imported the public package to check that `lora` exists)."""
  public = ("lorajax.finetune", "lorajax.models", "lorajax.peft",
            "lorajax.optim", "lorajax.sharding")
  for layer in ("core", "models"):
    assert not _violations(layer, lambda n: n == "lorajax" or _under(
        n, public))
  # The application layer: its library part (finetune, data, run_dir).
  for path in _modules("app"):
    if path.name == "cli.py":  # The command line is a client of the API.
      continue
    for line, name in _imports(path):
      assert name != "lorajax" and not _under(name, public), (
          f"{path.relative_to(ROOT)}:{line} imports {name}")


def test_public_core_modules_import_only_the_core():
  for name in ("__init__", "peft", "optim", "sharding"):
    path = ROOT / "lorajax" / f"{name}.py"
    for line, mod in _imports(path):
      assert not _under(mod, CORE_FORBIDDEN_LORAJAX + HEAVY), (
          f"{path.name}:{line} imports {mod}")


def test_checker_catches_a_violation(tmp_path, monkeypatch):
  """The AST walk sees lazy and relative imports (so the tests above can
  fail)."""
  pkg = tmp_path / "lorajax" / "_src" / "core"
  pkg.mkdir(parents=True)
  (pkg / "bad.py").write_text(
      "def f():\n  import matplotlib.pyplot\n"
      "  from ..app import cli\n  from lorajax import finetune\n")
  monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
  names = [n for _, n in _imports(pkg / "bad.py")]
  assert "matplotlib.pyplot" in names
  assert "lorajax._src.app.cli" in names
  assert "lorajax.finetune" in names


@pytest.mark.parametrize("layer", ["core", "models", "app"])
def test_layer_packages_exist(layer):
  assert (SRC / layer / "__init__.py").exists()
