"""Exception types. Every user-facing error names the file (or option) and the fix."""


class CryoDrvaeError(Exception):
    """Base class: the CLI prints these as one line and exits with status 1."""


class InputFileError(CryoDrvaeError):
    """An input STAR file or image stack is missing, truncated or malformed."""


class ConfigError(CryoDrvaeError):
    """An option or configuration value is out of range."""


class OutputError(CryoDrvaeError):
    """The output location cannot be written."""


class AbortRequested(CryoDrvaeError):
    """The run was asked to stop (e.g. RELION's RELION_JOB_ABORT_NOW appeared)."""
