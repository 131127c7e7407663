"""Fixtures of the client tests."""

from __future__ import annotations

import pytest
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture
def inside_a_flower_app(monkeypatch):
    """Flower stamps messages with the running task's identity, as its runtime does."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 11)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture
def fresh_prefix_caches():
    """No frozen-prefix cache from an earlier test, and none left for the next."""
    from fedward.client import prefix_cache

    prefix_cache.drop_prefix_caches()
    yield
    prefix_cache.drop_prefix_caches()


@pytest.fixture(scope="session", autouse=True)
def pinned_tiny_model(tiny_model_dir):
    """The site policies the tests write pin the tiny model's content (site_fixtures)."""
    import site_fixtures

    from fedward.client.policy import model_content_hash

    site_fixtures.PINNED_MODEL_HASHES[:] = [model_content_hash(tiny_model_dir)]
