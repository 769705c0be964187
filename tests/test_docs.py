"""The documentation: every public name is documented and the site builds.

A public module is `lorajax` or any submodule whose dotted path has no part
starting with `_`. Each must define `__all__`; each name in it must have a
docstring and appear in the API reference pages (docs/api/*.md, rendered by
mkdocstrings), and `mkdocs build --strict` (warnings are errors) must pass.
"""

import dataclasses
import importlib
import inspect
import os
import pathlib
import pkgutil
import subprocess
import sys

import pytest

import lorajax

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _public_modules() -> list[str]:
  names = ["lorajax"]
  for info in pkgutil.walk_packages(lorajax.__path__, "lorajax."):
    if not any(part.startswith("_") for part in info.name.split(".")):
      names.append(info.name)
  return sorted(names)


PUBLIC_MODULES = _public_modules()


def _is_auto_doc(obj, doc: str) -> bool:
  """The docstring dataclasses and NamedTuples make up for a bare class."""
  name = getattr(obj, "__name__", "")
  return (inspect.isclass(obj) and doc.startswith(f"{name}(")
          and (dataclasses.is_dataclass(obj) or hasattr(obj, "_fields")))


@pytest.fixture(scope="module")
def griffe_package():
  griffe = pytest.importorskip("griffe", reason="griffe comes with the docs "
                               "tools (mkdocstrings[python])")
  return griffe.load("lorajax", search_paths=[str(ROOT)],
                     resolve_aliases=True, resolve_external=False)


def _docstring(module_name: str, name: str, griffe_package) -> str:
  obj = getattr(importlib.import_module(module_name), name)
  if (inspect.ismodule(obj) or inspect.isclass(obj)
      or inspect.isroutine(obj)):
    doc = obj.__doc__ or ""
    return "" if _is_auto_doc(obj, doc) else doc.strip()
  # A constant or alias: its docstring is the string literal after the
  # assignment, which only static analysis (griffe) sees.
  member = griffe_package
  for part in [*module_name.split(".")[1:], name]:
    member = member[part]
  return member.docstring.value.strip() if member.docstring else ""


def test_public_modules_found():
  for expected in ("lorajax", "lorajax.peft", "lorajax.models.llama",
                   "lorajax.finetune"):
    assert expected in PUBLIC_MODULES


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_public_module_has_all_and_docstring(module_name):
  module = importlib.import_module(module_name)
  assert (module.__doc__ or "").strip(), (
      f"Public module {module_name} has no docstring; add one at the top of"
      f" {module.__file__}.")
  assert isinstance(getattr(module, "__all__", None), tuple | list), (
      f"Public module {module_name} has no `__all__`; list its public names"
      " in a sorted `__all__` tuple.")


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_has_a_docstring(module_name, griffe_package):
  module = importlib.import_module(module_name)
  missing = [n for n in getattr(module, "__all__", ())
             if not _docstring(module_name, n, griffe_package)]
  assert not missing, (
      f"{module_name}.__all__ names without a docstring: {missing}. Add a"
      " Google-style docstring (Args/Returns/Raises) where each is defined;"
      " for a constant, a string literal on the line after the assignment.")


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_module_has_an_api_page(module_name):
  directives = {
      line.strip()[4:].strip()
      for page in (DOCS / "api").glob("*.md")
      for line in page.read_text().splitlines()
      if line.strip().startswith(":::")}
  stem = module_name.rsplit(".", 1)[-1]
  assert module_name in directives, (
      f"No API reference page renders {module_name}. Create"
      f" docs/api/{stem}.md containing\n\n# `{module_name}`\n\n::: "
      f"{module_name}\n\nand add `- {module_name}: api/{stem}.md` under"
      " `API reference:` in the nav of mkdocs.yml.")


def test_every_docs_page_is_in_the_nav():
  yaml = pytest.importorskip("yaml")
  config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

  def pages(node):
    if isinstance(node, str):
      yield node
    elif isinstance(node, list):
      for x in node:
        yield from pages(x)
    elif isinstance(node, dict):
      for x in node.values():
        yield from pages(x)

  listed = set(pages(config["nav"]))
  on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
  unlisted = sorted(on_disk - listed)
  assert not unlisted, (
      f"docs pages missing from the nav in mkdocs.yml: {unlisted}. Add one"
      " line per page, e.g. `      - Quantized bases: quantized.md` under"
      " `Guides:`.")
  assert not listed - on_disk, (
      f"mkdocs.yml lists pages that do not exist: {sorted(listed - on_disk)}")


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
  pytest.importorskip("mkdocstrings", reason="the docs tools are in the test"
                      " extra")
  site = tmp_path_factory.mktemp("site")
  env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep
             + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run(
      [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
       str(site)], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=300, check=False)
  assert out.returncode == 0, (
      "`mkdocs build --strict` failed (warnings are errors):\n"
      + out.stdout[-4000:] + out.stderr[-4000:])
  return site


def test_mkdocs_build_strict(built_site):
  assert (built_site / "index.html").is_file()
  assert (built_site / "api" / "lorajax" / "index.html").is_file()


def test_every_public_name_is_in_the_api_reference(built_site):
  html = "\n".join(p.read_text(errors="replace")
                   for p in (built_site / "api").rglob("*.html"))
  missing = []
  for module_name in PUBLIC_MODULES:
    module = importlib.import_module(module_name)
    for name in getattr(module, "__all__", ()):
      obj = getattr(module, name)
      anchor = (obj.__name__ if inspect.ismodule(obj)
                else f"{module_name}.{name}")
      if f'id="{anchor}"' not in html:
        missing.append(f"{module_name}.{name}")
  assert not missing, (
      f"public names missing from the API reference pages: {missing}. Each"
      " public module needs a docs/api/<name>.md page with `::: <module>`;"
      " a name that is there but not rendered is usually missing from the"
      " module's `__all__` or defined under another name.")
