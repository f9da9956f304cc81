"""Exceptions raised by moe_utils; every message says what went wrong and what to do next."""


class MoEUtilsError(Exception):
    """Base class of every error raised on purpose by moe_utils."""


class NotMoEModelError(MoEUtilsError, ValueError):
    """The model has no Mixture-of-Experts layer, or its family is dense where an MoE is needed."""


class UnknownFamilyError(MoEUtilsError, ValueError):
    """No declarative family spec matches the checkpoint's config."""


class CheckpointError(MoEUtilsError, FileNotFoundError):
    """Weight files are missing, partial or inconsistent with their index."""


class PickleRefusedError(MoEUtilsError, PermissionError):
    """Only pickle-based weights exist and the caller did not pass allow_pickle=True."""


class RemoteCodeRequiredError(MoEUtilsError, PermissionError):
    """The checkpoint needs its publisher's code and trust_remote_code was not given."""


class LayerIndexError(MoEUtilsError, IndexError):
    """A layer index does not exist in the model or is not a layer of the requested kind."""


class InputTooLongError(MoEUtilsError, ValueError):
    """A token sequence is longer than the model's context window."""


class OfflineError(MoEUtilsError, ConnectionError):
    """A resource would have to be downloaded and the machine is offline."""


class ResultsFileError(MoEUtilsError, ValueError):
    """A results file is missing, truncated, or does not follow the results schema."""


class InputSpecError(MoEUtilsError, ValueError):
    """An inputs spec names no known preset, readable file or dataset, or yields no text."""


class UsageError(MoEUtilsError, ValueError):
    """The command line or a notebook parameter is wrong (unknown name, wrong type, missing file).

    ``moe-book`` exits with code 2 for these, before any model is loaded.
    """


class RunInterrupted(MoEUtilsError, KeyboardInterrupt):
    """A run was stopped (Ctrl-C); the message says what was kept."""


class OutputFolderError(MoEUtilsError, OSError):
    """The output folder cannot be written (read-only, full, or not a folder)."""
