"""Exceptions raised by moe_utils; every message says what went wrong and what to do next."""


class MoEUtilsError(Exception):
    """Base class of every error raised on purpose by moe_utils."""


class NotMoEModelError(MoEUtilsError, ValueError):
    """The model has no Mixture-of-Experts layer, or its family is dense where an MoE is needed."""


class UnknownFamilyError(MoEUtilsError, ValueError):
    """No declarative family spec matches the checkpoint's config."""


class DerivationError(UnknownFamilyError):
    """A family spec could not be derived (the message says which part did not match)."""


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


class NonFiniteError(MoEUtilsError, ValueError):
    """A weight or activation an analysis uses holds NaN or infinity.

    ``layer``, ``expert`` (an index, ``"router"``, ``"SE"``, ``"F"`` or None for a whole-layer
    tensor) and ``tensor`` say where; ``n_nan`` / ``n_inf`` count the offending entries.
    """

    def __init__(
        self, layer: int | None, expert: int | str | None, tensor: str, n_nan: int, n_inf: int, hint: str = ""
    ):
        self.layer, self.expert, self.tensor, self.n_nan, self.n_inf = layer, expert, tensor, n_nan, n_inf
        where = f"layer {layer}" if layer is not None else "the model"
        who = "" if expert is None else (f", expert {expert}" if isinstance(expert, int) else f", {expert}")
        super().__init__(
            f"{where}{who}: {tensor} has {n_nan} NaN and {n_inf} infinite value(s); the numbers computed from it "
            f"would be meaningless. Check the checkpoint (a corrupt shard, an overflow when converting to a "
            f"smaller dtype){hint}."
        )


class UnsupportedQuantizationError(MoEUtilsError, ValueError):
    """config.json declares a quantization format the weight readers cannot decode."""


class ShapeError(MoEUtilsError, ValueError):
    """Arrays, tensors or configs passed in have the wrong number of dimensions, or disagree in size."""


class ArgumentError(MoEUtilsError, ValueError):
    """An argument is outside the values a function accepts (a k above the number of experts, an unknown option)."""


class UnknownActivationError(MoEUtilsError, ValueError):
    """A config names an activation function moe_utils cannot resolve (an unknown name or bad parameters)."""


class UnsupportedRoutingError(MoEUtilsError, ValueError):
    """An analysis cannot handle the model's routing function (e.g. interventions on group-limited routers)."""


class ReplicateError(MoEUtilsError, ValueError):
    """A replicate of the organism study lacks what was asked of it (a parent to upcycle, a shipped organism)."""


class EnvironmentMismatchError(MoEUtilsError, RuntimeError):
    """This machine builds something other than the shipped files (another tokenizer from the same corpus)."""


class UnstorableValueError(MoEUtilsError, TypeError):
    """A value a results file cannot hold (not a number, string, list, mapping or None)."""


class ParameterDeclarationError(MoEUtilsError, ValueError):
    """A notebook's parameters cell declares a type the runner does not understand."""
