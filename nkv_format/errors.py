"""One exception hierarchy for everything NKV raises on purpose.

Every message says where (file, key or tensor), what was expected, what was found, and
what to do. The CLI turns any `NKVError` into one `Error: ...` line with exit code 1.
"""

from __future__ import annotations


class NKVError(Exception):
    """Base class of every error NKV raises on purpose."""


class NKVFormatError(NKVError):
    """An .nkv file (or bytes claiming to be one) breaks the spec.

    `problems` lists every violation found; the message shows them all at once so a
    user fixes a file in one pass rather than one error per run.
    """

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = f"{source}: {self.problems[0]}"
        else:
            body = "\n".join(f"  - {p}" for p in self.problems)
            text = f"{source}: {len(self.problems)} problems:\n{body}"
        super().__init__(text)


class NKVVersionError(NKVFormatError):
    """The file was written by a newer major version of the format."""


class NKVFactsError(NKVError):
    """A facts input (JSONL / CounterFact / ZsRE) has a bad record."""


class NKVConflictError(NKVError):
    """A row operation would leave two facts with the same id (or an ambiguous merge)."""


class NKVCompatibilityError(NKVError):
    """Two adapters, or an adapter and a model, do not belong together."""


class NKVFingerprintError(NKVCompatibilityError):
    """The model's weights are not the checkpoint the adapter was built on."""


class NKVUnsupportedModelError(NKVCompatibilityError):
    """The model's architecture is not in the architecture table."""


class NKVHubError(NKVError):
    """Publishing to or fetching from the Hugging Face Hub failed."""


__all__ = [
    "NKVError",
    "NKVFormatError",
    "NKVVersionError",
    "NKVFactsError",
    "NKVConflictError",
    "NKVCompatibilityError",
    "NKVFingerprintError",
    "NKVUnsupportedModelError",
    "NKVHubError",
]
