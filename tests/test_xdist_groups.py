"""``--dist loadgroup`` on pytest 9.2 (pytest-xdist#1386): a group runs on one worker again."""

from __future__ import annotations

import re

import pytest

from pytest_hotswap.plugin.xdist_groups import has_group_suffix, strip_group_suffix

CONFTEST = """
import pytest
from pytest_hotswap.plugin.xdist_groups import restore_group_suffixes

@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    result = yield
    restore_group_suffixes(config, items)
    return result
"""

TESTS = """
import time
import pytest

@pytest.mark.parametrize("i", range(6))
@pytest.mark.xdist_group("one")
def test_one(i):
    time.sleep(0.05)

@pytest.mark.parametrize("i", range(6))
@pytest.mark.xdist_group("two")
def test_two(i):
    time.sleep(0.05)
"""


def _workers(result: pytest.RunResult) -> dict[str, set[str]]:
    """Test function -> the workers that ran its cases, from ``-v`` lines."""
    seen: dict[str, set[str]] = {}
    for worker, name in re.findall(r"\[(gw\d)\] .*PASSED \S*::(test_\w+)\[", result.stdout.str()):
        seen.setdefault(name, set()).add(worker)
    return seen


@pytest.fixture
def grouped(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_groups=TESTS)
    return pytester


def test_each_group_runs_on_one_worker(grouped):
    result = grouped.runpytest_subprocess(
        "-n", "2", "--dist", "loadgroup", "-v", "-p", "no:randomly"
    )
    result.assert_outcomes(passed=12)
    workers = _workers(result)
    assert {name: len(found) for name, found in workers.items()} == {"test_one": 1, "test_two": 1}
    result.stdout.fnmatch_lines(["*PASSED test_groups.py::test_one[[]0[]]@one*"])


def test_without_groups_the_cases_spread_over_workers(grouped):
    """The negative control: ``--dist load`` ignores the groups, and the check above sees it."""
    result = grouped.runpytest_subprocess("-n", "2", "--dist", "load", "-v", "-p", "no:randomly")
    result.assert_outcomes(passed=12)
    assert any(len(found) == 2 for found in _workers(result).values())


def test_the_suffix_is_told_from_an_at_sign_in_a_parameter():
    assert has_group_suffix("t.py::test[a]@one")
    assert has_group_suffix("t.py::test@one")
    assert not has_group_suffix("t.py::test[a@b]")
    assert not has_group_suffix("t.py::test[a]")
    assert strip_group_suffix("t.py::test[sd-diffusers]@sd-diffusers") == "t.py::test[sd-diffusers]"
    assert strip_group_suffix("t.py::test[a@b]") == "t.py::test[a@b]"
