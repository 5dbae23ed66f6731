"""Results as files: certified-accuracy tables, the curve as PNG, a JSON summary."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import SdepureError

TSV_HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime"  # Cohen et al.'s columns, first in every run
# what each image cost: its noise draws (n0 + the estimation's) and score-network calls (rows fed
# to the network); runs written before issue 14 have Cohen's columns only
COST_COLUMNS = ("draws", "calls")
TSV_HEADER_COST = TSV_HEADER + "\t" + "\t".join(COST_COLUMNS)


def default_radii(sigma: float, max_radius: float | None = None) -> list[float]:
    top = max_radius if max_radius is not None else 4 * sigma
    return [round(r, 4) for r in np.arange(0.0, top + 1e-9, 0.25)]


def certified_accuracy(radius: np.ndarray, correct: np.ndarray, radii) -> list[float]:
    """Share of images that are correctly classified with certified radius >= r, for each r."""
    radius, correct = np.asarray(radius, dtype=float), np.asarray(correct, dtype=bool)
    if len(radius) == 0:
        return [float("nan") for _ in radii]
    return [float(np.mean(correct & (radius >= r))) for r in radii]


def format_table(rows: dict[str, list[float]], radii) -> str:
    """Rows of certified accuracy (one per label) at the given radii, as aligned text."""
    head = ["radius".ljust(12)] + [f"{r:>6.2f}" for r in radii]
    lines = [" ".join(head)]
    for name, accs in rows.items():
        lines.append(" ".join([name.ljust(12)] + [f"{a:>6.3f}" for a in accs]))
    return "\n".join(lines)


def read_tsv(path: Path) -> dict[str, np.ndarray]:
    cols: dict[str, list] = {}
    with open(path) as fh:
        header = fh.readline().rstrip("\n").split("\t")
        for line in fh:
            for k, v in zip(header, line.rstrip("\n").split("\t")):
                cols.setdefault(k, []).append(float(v))
    return {k: np.asarray(v) for k, v in cols.items()}


def plot_curve(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> None:
    """Certified accuracy against radius, one line per (radius, correct) pair of arrays."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for name, (radius, correct) in curves.items():
        top = max(float(np.max(radius, initial=0.0)), 1e-3)
        grid = np.linspace(0, top * 1.05, 200)
        ax.plot(grid, certified_accuracy(radius, correct, grid), label=name)
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")


def check_out(out: Path) -> Path:
    """Refuse an existing output; check the nearest existing parent is writable."""
    if out.exists():
        raise SdepureError(f"output {out} already exists; choose another --out (nothing was overwritten)")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SdepureError(f"cannot write output {out}: {parent} is not a writable directory")
    return out


def make_out(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise SdepureError(f"output {out} already exists; choose another --out (nothing was overwritten)") from None
    except OSError as e:
        raise SdepureError(f"cannot create output directory {out}: {e.strerror}") from None
    return out


# -- attack runs: examples.tsv, one row per example ------------------------------------------

EXAMPLES_FILE = "examples.tsv"
# clean_correct / robust: the attack's own flags; broken_by: the attack that broke it ("-": none);
# *_draws_correct: the share of the score draws right; *_majority / *_any_of_n: 0/1; linf, l2: the
# perturbation's size; batch: the unit the attack ran in; seconds: that batch's attack time
EXAMPLE_COLUMNS = ("idx", "label", "clean_correct", "robust", "broken_by", "adv_draws_correct", "adv_majority_correct",
                   "adv_any_of_n_correct", "clean_draws_correct", "clean_majority_correct", "clean_any_of_n_correct",
                   "linf", "l2", "batch", "seconds")
FIXED_COLUMNS = ("fixed_clean_correct", "fixed_adv_correct")  # with fixed randomness: the known draw's
_TEXT = {"broken_by"}
_FLOAT = {"adv_draws_correct", "clean_draws_correct", "linf", "l2", "seconds"}


def example_columns(fixed_randomness: bool) -> tuple[str, ...]:
    return EXAMPLE_COLUMNS + (FIXED_COLUMNS if fixed_randomness else ())


def _cell(name: str, value) -> str:
    return repr(float(value)) if name in _FLOAT else str(value)  # repr: reads back exactly


def write_example_rows(path: Path, rows: list[dict], fixed_randomness: bool) -> None:
    """examples.tsv anew: the header and `rows`."""
    cols = example_columns(fixed_randomness)
    with open(path, "w") as fh:
        fh.write("\t".join(cols) + "\n" + "".join("\t".join(_cell(c, r[c]) for c in cols) + "\n" for r in rows))
        fh.flush()
        os.fsync(fh.fileno())


def append_example_rows(path: Path, rows: list[dict], fixed_randomness: bool) -> None:
    """A finished batch's rows, appended and flushed to disk at once."""
    cols = example_columns(fixed_randomness)
    with open(path, "a") as fh:
        fh.write("".join("\t".join(_cell(c, r[c]) for c in cols) + "\n" for r in rows))
        fh.flush()
        os.fsync(fh.fileno())


def read_example_rows(path: Path) -> list[dict]:
    """The whole rows of an examples.tsv (a torn last line, as a kill leaves, is dropped)."""
    try:
        lines = Path(path).read_text().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise SdepureError(f"cannot read {path}: {e}") from None
    cols = lines[0].split("\t") if lines else []
    if tuple(cols) not in (example_columns(False), example_columns(True)):
        raise SdepureError(f"{path} is not an examples.tsv of this sdepure (its header is {lines[0][:80]!r})")
    rows = []
    for line in lines[1:-1]:  # the text after the last newline is torn or empty
        cells = line.split("\t")
        if len(cells) != len(cols):
            raise SdepureError(f"{path}: a row has {len(cells)} cells, not {len(cols)}")
        rows.append({c: v if c in _TEXT else float(v) if c in _FLOAT else int(v) for c, v in zip(cols, cells)})
    return rows
