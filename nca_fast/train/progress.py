"""A progress bar with the loss: tqdm when installed (the ``media`` extra), else a line every 10 %."""
from __future__ import annotations

import importlib.util
import sys


class Progress:
    def __init__(self, total: int, *, initial: int = 0, enabled: bool = True):
        self.total, self.n, self.enabled, self.bar = total, initial, enabled, None
        if enabled and importlib.util.find_spec("tqdm") is not None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="it", dynamic_ncols=True)

    def update(self, loss: float) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3e}", refresh=False)
            self.bar.update(1)
        elif self.enabled and (self.n % max(1, self.total // 10) == 0 or self.n == self.total):
            print(f"iteration {self.n}/{self.total}: loss {loss:.3e}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
