"""Errors of the data stages, each reported to the user as one line that says what to do."""


class DataError(RuntimeError):
    """Missing or unusable input data."""


class PreprocessError(RuntimeError):
    """Input the Spark job cannot use."""
