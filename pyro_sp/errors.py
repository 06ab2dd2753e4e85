# SPDX-License-Identifier: Apache-2.0
"""The error raised on the ranks that did *not* fail when another rank did.

A distributed computation in pyro_sp runs locally on every rank, then agrees
in one collective on whether every rank succeeded (see
:func:`pyro_sp.collectives.step_check`). If some rank failed:

- a rank that failed re-raises its **own** exception (same type, message and
  traceback), so code that catches ``ValueError`` or ``NotImplementedError``
  works as it does with Pyro; when every rank fails with the same type, every
  rank raises that type;
- a rank that did not fail raises :class:`RankError`, which names the failing
  ranks and their exception types and messages.

No rank is left waiting in a later collective.
"""

from __future__ import annotations

__all__ = ["RankError"]


class RankError(RuntimeError):
    """
    Another rank failed in a distributed computation that this rank completed.

    :param str what: the computation (e.g. ``"DistributedTrace_ELBO.loss"``).
    :param dict failures: ``{rank: (exception type name, message)}`` of every
        rank that failed.
    :param int world: number of ranks taking part.
    :param str hint: an optional sentence on the likely fix.
    """

    def __init__(self, what: str, failures: dict[int, tuple[str, str]], world: int, hint: str = "") -> None:
        self.what = what
        self.failures = dict(failures)
        self.world = world
        text = "; ".join(f"rank {r}: {t}: {m}" for r, (t, m) in sorted(self.failures.items()))
        ranks = sorted(self.failures)
        message = (
            f"{what} failed on {len(ranks)} of {world} ranks ({text}). This rank completed its "
            f"part but stops too; the original exception is raised on rank"
            f"{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}."
        )
        super().__init__(message + (f" {hint}" if hint else ""))

    @property
    def ranks(self) -> list[int]:
        """The ranks that failed."""
        return sorted(self.failures)

    @property
    def types(self) -> set[str]:
        """Names of the exception types raised on the failing ranks."""
        return {t for t, _ in self.failures.values()}
