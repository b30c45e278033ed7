"""Helpers shared by the tests (not tests themselves): `from support import fake_corpus`.

tests/ is on pytest's pythonpath (pytest.ini), so `support` imports as a top-level package.
"""
