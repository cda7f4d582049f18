"""`import locas`: the public names load on first use, whatever was imported before."""

from __future__ import annotations

import subprocess
import sys

import pytest

import locas


def test_every_public_name_resolves_to_its_module() -> None:
    from locas.config import MEMORY_INITS
    from locas.initialization import memorize
    from locas.model import LocasModel

    assert all(hasattr(locas, name) for name in locas.__all__)
    assert (locas.memorize, locas.LocasModel, locas.MEMORY_INITS) == (memorize, LocasModel, MEMORY_INITS)
    assert set(locas.__all__) <= set(dir(locas))
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        locas.nosuch  # noqa: B018


@pytest.mark.parametrize("first", ["import locas.initialization", "import locas.training.online", "pass"])
def test_memorize_is_the_function_whatever_was_imported_first(first: str) -> None:
    code = f"{first}\nimport locas\nfrom locas import memorize\nprint(callable(locas.memorize), callable(memorize))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]


def test_import_locas_and_the_configs_need_no_torch() -> None:
    code = (
        "import sys, locas, locas.config, locas.training.config, locas.evaluation.config\n"
        "print(sorted(name for name in ('torch', 'transformers') if name in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_submodules_and_lazy_names_are_listed_and_reachable_after_import_locas() -> None:
    code = (
        "import locas, locas.training\n"
        "print(locas.model.token_nll.__name__, locas.training.online.run_online.__name__)\n"
        "print('train_on_windows' in dir(locas.training), 'memorize' in dir(locas))\n"
        "print(hasattr(locas, 'no_such_module'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["token_nll", "run_online", "True", "True", "False"]
