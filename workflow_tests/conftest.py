"""Workflow runs that several test modules read, each built once per session."""
import pytest

from test_workflow import finished_run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    return finished_run(tmp_path_factory, "tiny")
