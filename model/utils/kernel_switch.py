"""A process-wide choice of kernels for one kind of layer, as the ``torch.backends`` flags are.

``model/utils/cpu_linear.py`` (fc6/fc7 on oneDNN or the default BLAS) and ``model/utils/cpu_conv.py`` (3x3
convolutions by Winograd or the stock kernels) each hold one; ``train.py`` sets it from the options, the
benchmarks and tests switch it for a ``with`` block.
"""

import contextlib
from collections.abc import Iterator

__all__ = ["KernelSwitch"]


class KernelSwitch:
    """One of ``choices`` (``'auto'`` by default), for the whole process.

    Args:
        owner: the module's name, for the error message.
        choices: the allowed names.
    """

    def __init__(self, owner: str, choices: tuple[str, ...]):
        self.owner, self.choices, self._name = owner, choices, "auto"

    def set(self, name: str) -> str:
        """Make ``name`` the choice; returns the previous one. Raises ``ValueError`` for another name."""
        if name not in self.choices:
            raise ValueError(f"{self.owner} backend must be one of {self.choices}, got {name!r}")
        previous, self._name = self._name, name
        return previous

    def get(self) -> str:
        """The current choice."""
        return self._name

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        """:meth:`set` for a ``with`` block (the previous choice restored on exit)."""
        previous = self.set(name)
        try:
            yield
        finally:
            self.set(previous)
