"""Helpers the tests share: the model zoo and exactness checks."""
