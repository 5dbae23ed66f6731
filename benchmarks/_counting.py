"""Rows and calls seen by a network (a forward pre-hook), shared by the benchmarks."""
from __future__ import annotations


class Counter:
    def __init__(self, module):
        self.rows = self.calls = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.rows += args[0].shape[0]
        self.calls += 1

    def take(self) -> tuple[int, int]:
        out = (self.rows, self.calls)
        self.rows = self.calls = 0
        return out
