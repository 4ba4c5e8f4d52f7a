"""The root conftest: registers the shared fixtures of :mod:`tests.kit` once."""

pytest_plugins = ["tests.kit.fixtures"]
