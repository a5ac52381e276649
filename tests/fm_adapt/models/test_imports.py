"""Models know nothing of adaptation: no module under fm_adapt/models imports fm_adapt.adapt."""
import ast
import pathlib

import fm_adapt.models

MODELS_DIR = pathlib.Path(fm_adapt.models.__file__).parent


def _imported_modules(path: pathlib.Path) -> set[str]:
  """Every module a file imports, absolute (`from . import x` resolved against fm_adapt.models)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # Relative: fm_adapt.models (level 1), fm_adapt (level 2), ...
        package = 'fm_adapt.models'.split('.')[:3 - node.level]
        base = '.'.join([*package, base] if base else package)
      names.add(base)
      names.update(f'{base}.{alias.name}' for alias in node.names)
  return names


def test_models_import_nothing_from_adapt():
  files = sorted(MODELS_DIR.rglob('*.py'))
  assert len(files) >= 4  # vit, resnet, efficientnet, the registry at least.
  offenders = {str(f.relative_to(MODELS_DIR)): sorted(
      n for n in _imported_modules(f) if n == 'fm_adapt.adapt' or n.startswith('fm_adapt.adapt.'))
               for f in files}
  assert not {f: n for f, n in offenders.items() if n}, offenders


def test_the_check_sees_each_import_form(tmp_path):
  forms = ['from fm_adapt.adapt import prompts', 'import fm_adapt.adapt.lora',
           'from fm_adapt import adapt', 'from ..adapt import masks', 'from .. import adapt']
  for i, form in enumerate(forms):
    path = tmp_path / f'm{i}.py'
    path.write_text(f'{form}\n')
    found = _imported_modules(path)
    assert any(n == 'fm_adapt.adapt' or n.startswith('fm_adapt.adapt.') for n in found), form
