"""The chaos tests run real workers with the integration suite's fixtures."""

from tests.integration.conftest import worker_factory  # noqa: F401
