"""The worker fixtures (a real host, in-process and process workers, Docker) for these tests."""

from tests.worker.conftest import *  # noqa: F403
