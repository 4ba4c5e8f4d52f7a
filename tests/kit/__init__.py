"""The one test kit: the helpers and fixtures every test folder shares.

Test modules import helpers from here, never from each other; the fixtures are
registered once, by ``tests/conftest.py`` (``pytest_plugins``), so no test imports a
fixture by name.
"""
