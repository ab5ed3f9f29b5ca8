"""Errors the pipeline reports instead of starting."""


class PipelineError(Exception):
    """The pipeline cannot start (corrupt store, unwritable data dir, bad setting):
    the message says what and where; the caller prints it and exits non-zero."""
