"""Skips of the project's own modules or of missing data fail (tests/skips.py)."""

from __future__ import annotations

from tests.skips import hides_a_guard

pytest_plugins = ["pytester"]


def test_which_skips_hide_a_guard():
    assert hides_a_guard("could not import 'irene.data.tree': No module named 'irene'")
    assert hides_a_guard("could not import 'pipelines.config': boom")
    assert hides_a_guard("published data not found at /nowhere")
    assert hides_a_guard("H200 trees not found at /x")
    assert not hides_a_guard("chromium not installed (Debian: apt-get install chromium)")
    assert not hides_a_guard("PostgreSQL is not installed here")
    assert not hides_a_guard("could not import 'plotly': No module named 'plotly'")


def test_such_skips_fail_and_others_stay_skips(pytester):
    pytester.makeconftest("from tests.skips import pytest_runtest_makereport  # noqa: F401\n")
    pytester.makepyfile(test_probe="""
        import pytest

        def test_own_module():
            pytest.importorskip("irene.no_such_module")

        def test_missing_data():
            pytest.skip("published data not found at /nowhere")

        def test_missing_tool():
            pytest.skip("chromium not installed")
    """)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=2, skipped=1)
    result.stdout.fnmatch_lines(["*a skip that hides a broken guard is a failure*"])
