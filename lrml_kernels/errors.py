"""The package's exception types, importable by every backend without the backend registry."""


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why."""
