"""Errors the CLI reports in one line. Free of numpy and torch: the CLI imports this before it pins
the numerical runtime (dodlib/runtime.py), which must happen before either is imported."""


class DataError(ValueError):
    """The raw data set is malformed (missing root, empty class, class mismatch between splits...)."""
