"""Progress of a certification run, readable both in a terminal and in a log file.

In a terminal: a tqdm bar over noise draws, with one line above it per finished image.
Anywhere else (CI, nohup, SLURM logs: the stream is not a TTY) no carriage-return updates:
one line per finished image, and while images run, one status line at most every `every`
seconds (30 by default: a paper-scale image takes minutes to an hour, so per-image lines alone
would leave a log silent for that long) with images done / total, draws per second and the ETA.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from tqdm import tqdm

STATUS_EVERY = 30.0  # seconds between status lines when the stream is not a terminal


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def format_seconds(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """Counts noise draws (`draws`, the smoothing loop's progress callback) and finished images
    (`image`, with the row). `done` images were finished before (a resumed run) and count
    toward images done but not toward the draw rate. `draws_per_image` is the first estimate of
    an image's draws (the cap); once images finish, their mean takes over, so the ETA follows
    adaptive sampling (iss, sequential) and the early-stopped vote's draw counts."""

    def __init__(self, total: int, draws_per_image: int, done: int = 0, stream: TextIO | None = None,
                 tty: bool | None = None, every: float = STATUS_EVERY, prefix: str = "",
                 clock: Callable[[], float] = time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _is_tty(self.stream) if tty is None else tty
        self.total, self.done, self.every, self.prefix, self.clock = total, done, every, prefix, clock
        self.per_image = draws_per_image
        self.draws_left = (total - done) * draws_per_image
        self.draws_done = 0
        self.finished_here, self.draws_finished = 0, 0  # images finished in this process, their draws
        self.t0 = self.last = clock()
        self.bar = (tqdm(total=self.draws_left, unit="draw", desc=f"{prefix}certify", file=self.stream,
                         leave=False, dynamic_ncols=True) if self.tty else None)

    def _line(self, text: str) -> None:
        if self.bar is not None:
            tqdm.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def rate(self) -> float:
        elapsed = self.clock() - self.t0
        return self.draws_done / elapsed if elapsed > 0 else 0.0

    def remaining(self) -> float:
        """Draws still to come: the images not finished times the draws an image takes (their
        mean so far), less what the current image has drawn."""
        per = self.draws_finished / self.finished_here if self.finished_here else self.per_image
        current = self.draws_done - self.draws_finished
        return max((self.total - self.done) * per - current, 0.0)

    def status(self) -> str:
        rate = self.rate()
        eta = self.remaining() / rate if rate > 0 else None
        return (f"{self.prefix}certify: {self.done}/{self.total} images, {rate:.3g} draws/s, "
                f"ETA {format_seconds(eta)}")

    def draws(self, m: int) -> None:
        self.draws_done += m
        if self.bar is not None:
            self.bar.update(m)
            return
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self._line(self.status())

    def image(self, row: dict) -> None:
        self.done += 1
        self.finished_here += 1
        self.draws_finished = self.draws_done
        if self.bar is not None:  # the bar's total follows the draws images actually take
            self.bar.total = int(self.draws_done + self.remaining())
            self.bar.refresh()
        self._line(f"{self.prefix}image {row['idx']}: label {row['label']} predict {row['predict']} "
                   f"radius {row['radius']:.4f} correct {row['correct']} ({row['time']:.2f} s) "
                   f"[{self.done}/{self.total}]")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.draws_done:
            self._line(f"{self.prefix}certify: {self.done}/{self.total} images, {self.rate():.3g} draws/s, "
                       f"{format_seconds(self.clock() - self.t0)} in this process")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
