"""Helpers the tests share (importable from every test folder: pyproject's pytest
`pythonpath` puts `tests/` on the path). Fixtures live in `tests/conftest.py`."""
