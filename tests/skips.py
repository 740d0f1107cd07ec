"""A test that skips because the project's own code does not import, or because the
published data are missing, tests nothing while looking green: such a skip is reported as a
failure (the hook below is imported by ``conftest.py``). Skips for tools a machine may lack
(chromium, PostgreSQL outside CI) stay skips."""

from __future__ import annotations

import re

import pytest

FORBIDDEN_SKIPS = (
    re.compile(r"could not import '(irene|pipelines|tests|run)\b"),
    re.compile(r"(published|device|trees|IRENE_\w+|data\b).*(not found|missing)", re.I),
)


def hides_a_guard(reason: str) -> bool:
    """Whether a skip with this reason must fail instead."""
    return any(pattern.search(reason) for pattern in FORBIDDEN_SKIPS)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(report.longrepr, tuple) and hides_a_guard(
            str(report.longrepr[2])):
        report.outcome = "failed"
        report.longrepr = f"a skip that hides a broken guard is a failure: {report.longrepr[2]}"
