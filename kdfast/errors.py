"""Typed exceptions. Every message names the argument, the value received and what was expected."""


class KDFastError(Exception):
    """Base class of kdfast's own errors."""


class InvalidArgumentError(KDFastError, ValueError):
    """A user-supplied argument is out of its documented domain."""


class BackendUnavailableError(KDFastError, RuntimeError):
    """The requested backend cannot run here (not built, no GPU, no Triton)."""


class UnsupportedModuleError(KDFastError, NotImplementedError):
    """A model contains layers an engine has no rule for."""


class DataError(KDFastError, ValueError):
    """A data set root is missing or malformed, an image is unreadable, or a label is out of range."""


class SlowFallbackWarning(UserWarning):
    """Work runs on a much slower path than this machine could offer (the reference instead of the C++ kernels)."""


def first_names(names, limit: int = 5) -> str:
    """The first `limit` names, comma-separated, then " and K more": how error messages list what differs."""
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
