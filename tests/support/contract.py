"""The platform contract's names for tests: template/utils.py, imported once, by path.

Tests take exit codes, the journal's name, metric names, ... from here rather than retyping them,
so a change to the contract changes what the tests expect. Importing utils does nothing (no env
reads, clients or threads), so one shared import is safe; tests of utils' behaviour use the
`utils_module` fixture, a fresh import per test.
"""

from __future__ import annotations

import importlib.util
import sys

from tests.support.servers import TEMPLATE_UTILS


def _import_contract():
    name = "contract_under_test"
    spec = importlib.util.spec_from_file_location(name, TEMPLATE_UTILS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


contract = _import_contract()
