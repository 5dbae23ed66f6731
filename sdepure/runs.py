"""Run directories of `sdepure certify` and `sdepure attack`: the record written at start,
resuming, shards, merging.

A run directory holds
  run.json      written atomically before the first image: the settings that decide every row,
                the config's model/classifier/data tables, the shard and the images it covers
  certify.tsv   Cohen's rows (idx label predict radius correct time), one line per image,
                appended and flushed as each image finishes
  summary.json, certified_accuracy.png   written only once every image is done.
A run under torchrun with W processes holds no rows itself: rank r writes the shard directory
shard-r-of-W/ inside it (a run directory of its own) and rank 0 merges them at the end.

A row depends only on (settings, image index) (each image's randomness is addressed by
derive_seed(seed, idx)), so rows may be produced by any shard, process or resumed run and merged.

An attack run directory holds run.json (format sdepure-attack-run) and examples.tsv, one row per
example (report.EXAMPLE_COLUMNS), appended a whole batch of examples at a time: the unit of an
attack run is its batch (experiments.attack_batch), whose rows depend only on (settings, batch).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from . import report
from .errors import SdepureError
from .report import TSV_HEADER, TSV_HEADER_COST
from .settings import Attack, Certify
from .smoothing import format_row

RUN_FILE = "run.json"
TSV_FILE = "certify.tsv"
FORMAT = "sdepure-certify-run"
ATTACK_FORMAT = "sdepure-attack-run"
KINDS = {FORMAT: ("certify", Certify), ATTACK_FORMAT: ("attack", Attack)}  # record format -> command, settings
VERSION = 1
CONFIG_TABLES = ("model", "classifier", "data")  # the config tables that decide a row
# what must agree to resume a run (all of them) or to merge shards (all but shard and images)
RESUME_KEYS = ("world_size", "shard", "settings", "config", "images", "resolved")
MERGE_KEYS = ("settings", "config", "resolved")


def _a(command: str) -> str:
    return ("an " if command[0] in "aeiou" else "a ") + command


# -- shards ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """Shard i of n: every n-th selected image, starting at the i-th (0-based)."""
    index: int
    count: int

    def select(self, indices) -> list[int]:
        return list(indices)[self.index::self.count]

    @property
    def dirname(self) -> str:
        return f"shard-{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def to_dict(self) -> dict:
        return {"index": self.index, "count": self.count}


def parse_shard(text: str) -> Shard:
    """'i/n' with integers 0 <= i < n."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise SdepureError(f"--shard must be i/n with integers 0 <= i < n (such as 0/4), got {text!r}")
    i, n = int(match.group(1)), int(match.group(2))
    if n < 1:
        raise SdepureError(f"--shard {text}: the number of shards must be >= 1")
    if i >= n:
        raise SdepureError(f"--shard {text}: shard index must be < {n} (shards are numbered 0 to {n - 1})")
    return Shard(i, n)


def shard_dirs(run_dir: Path, world_size: int) -> list[Path]:
    """The per-rank shard directories of a run made by `world_size` processes."""
    return [Path(run_dir) / Shard(r, world_size).dirname for r in range(world_size)]


# -- the record --------------------------------------------------------------------------------

def _canonical(obj):
    """As it reads back from JSON (tuples become lists, keys strings), for exact comparison."""
    return json.loads(json.dumps(obj))


def make_record(settings: dict, cfg: dict, images: list[int], shard: Shard | None = None,
                world_size: int = 1, format: str = FORMAT, **info) -> dict:
    """The run record. `settings`: the validated settings as a dict; `cfg`: the loaded config
    (only its model/classifier/data tables are compared); `format`: FORMAT (certify) or
    ATTACK_FORMAT; `info`: anything else worth keeping (device, t_star, ...), never compared."""
    return _canonical({
        "format": format, "version": VERSION, "settings": full_settings(settings, format),
        "config": {k: cfg.get(k, {}) for k in CONFIG_TABLES},
        "config_name": cfg.get("name"), "config_source": cfg.get("source"),
        "shard": shard.to_dict() if shard else None, "world_size": int(world_size),
        "images": [int(i) for i in images], **info})


def record_shard(record: dict) -> Shard | None:
    s = record.get("shard")
    return Shard(int(s["index"]), int(s["count"])) if s else None


def config_from_record(record: dict) -> dict:
    """The config the run was started with, as far as it decides rows: its model, classifier and
    data tables (the settings come from the record itself: settings.Certify.from_dict)."""
    return {"name": record.get("config_name") or "run", "source": record.get("config_source") or "",
            **json.loads(json.dumps(record["config"]))}


def write_record(run_dir: Path, record: dict) -> None:
    """run.json, atomically (a kill leaves either no record or a whole one)."""
    path = Path(run_dir) / RUN_FILE
    tmp = path.with_name(RUN_FILE + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(record, fh, indent=1)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_record(run_dir: Path, format: str | None = FORMAT) -> dict:
    """The record of a run directory of `format`'s command (None: of either); anything else is
    refused, naming it."""
    run_dir = Path(run_dir)
    command = KINDS[format][0] if format else "certify or attack"
    if not run_dir.exists():
        raise SdepureError(f"{run_dir} does not exist; it is not a run directory")
    if not run_dir.is_dir():
        raise SdepureError(f"{run_dir} is not a directory, so not a run directory")
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise SdepureError(f"{run_dir} is not a sdepure {command} run (it has no {RUN_FILE}); nothing was changed")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SdepureError(f"{path} is unreadable or not JSON ({e}); not a sdepure {command} run") from None
    if not isinstance(record, dict) or record.get("format") not in KINDS:
        raise SdepureError(f"{path} is not a sdepure {command} run record")
    if format and record["format"] != format:
        raise SdepureError(f"{run_dir} is a sdepure {KINDS[record['format']][0]} run, not {_a(command)} run; "
                           f"nothing was changed")
    if record.get("version") != VERSION:
        raise SdepureError(f"{path} has run-record version {record.get('version')}; "
                           f"this sdepure reads version {VERSION}")
    try:
        record["settings"] = full_settings(record.get("settings"), record["format"])
    except SdepureError as e:
        raise SdepureError(f"{path}: its settings do not read as a {command} run's ({e})") from None
    return record


def full_settings(settings: dict, format: str = FORMAT) -> dict:
    """Every setting, as JSON reads it back; those a record from an older sdepure lacks take the
    values that run had (settings.record_defaults)."""
    return _canonical(KINDS[format][1].from_dict(settings).to_dict())


def _diff(a, b, name: str, out: list) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            _diff(a.get(k, "<unset>"), b.get(k, "<unset>"), f"{name}.{k}", out)
    elif a != b:
        out.append((name, a, b))


def differences(a: dict, b: dict, keys) -> list[tuple[str, object, object]]:
    """(dotted name, value in a, value in b) for every setting under `keys` that differs;
    "resolved" (what settings such as variance auto meant when the run began) only where both
    records have it (older ones do not)."""
    out: list = []
    for key in keys:
        if key == "resolved" and not (key in a and key in b):
            continue
        _diff(_canonical(a.get(key)), _canonical(b.get(key)), key, out)
    return out


def _show(name: str, value) -> str:
    if name == "images" and isinstance(value, list):
        return f"{len(value)} images" + (f" from {value[0]} to {value[-1]}" if value else "")
    return json.dumps(value)


def _setting_name(name: str) -> str:
    return name.removeprefix("settings.")


def check_world_size(run_dir: Path, recorded: dict, world_size: int) -> None:
    """A run started by W processes (its shard files are shard-r-of-W) resumes with W processes."""
    old = recorded.get("world_size")
    if old != world_size:
        files = f"its shard files are for {old} processes" if old != 1 else "it has no per-process shard files"
        raise SdepureError(f"cannot resume {run_dir}: it was started by {old} process(es) ({files}); this run has "
                           f"WORLD_SIZE={world_size}: resume it with {old} process(es); nothing was changed")


def check_resumable(run_dir: Path, recorded: dict, current: dict) -> None:
    """Refuse to resume with anything that changes a row; names the first differing setting."""
    check_world_size(run_dir, recorded, current["world_size"])
    diff = differences(recorded, current, RESUME_KEYS)
    if not diff:
        return
    name, old, new = diff[0]
    more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
    raise SdepureError(f"cannot resume {run_dir}: setting {_setting_name(name)} differs: the run has "
                       f"{_show(name, old)}, this command {_show(name, new)}{more}; nothing was changed")


# -- certify.tsv --------------------------------------------------------------------------------

def _parse_row(line: bytes, cost: bool) -> dict | None:
    try:
        fields = line.decode("utf-8").split("\t")
        if len(fields) != (8 if cost else 6):
            return None
        row = {"idx": int(fields[0]), "label": int(fields[1]), "predict": int(fields[2]),
               "radius": float(fields[3]), "correct": int(fields[4]), "time": float(fields[5])}
        if cost:
            row.update(draws=int(fields[6]), calls=int(fields[7]))
    except (UnicodeDecodeError, ValueError):
        return None
    return row if row["correct"] in (0, 1) and row["idx"] >= 0 else None


def _header(data: bytes, path: Path) -> tuple[bytes, bool] | None:
    """(the header line, whether it has the cost columns); None for a torn header."""
    for header, cost in ((TSV_HEADER_COST, True), (TSV_HEADER, False)):  # Cohen's six alone: before issue 14
        head = (header + "\n").encode()
        if data.startswith(head):
            return head, cost
    if (TSV_HEADER_COST + "\n").encode().startswith(data):
        return None
    raise SdepureError(f"{path} does not start with the header of a certify.tsv; not a run's table")


def has_cost_columns(path: Path) -> bool:
    """Whether a run's certify.tsv has the draws and calls columns (a new or empty one has)."""
    path = Path(path)
    found = _header(path.read_bytes(), path) if path.exists() else None
    return found is None or found[1]


def read_rows(path: Path) -> tuple[list[dict], int, bool]:
    """The complete rows of a certify.tsv (Cohen's six columns, or those and the cost columns),
    the number of bytes they take (header included), and whether a torn last line (no trailing
    newline, or an unparsable last line) follows them. A missing file or a torn header reads as
    no rows. Any other malformed line is an error."""
    path = Path(path)
    data = path.read_bytes() if path.exists() else b""
    found = _header(data, path)
    if found is None:
        return [], 0, bool(data)
    head, cost = found
    lines = data[len(head):].split(b"\n")
    tail = lines.pop()  # what follows the last newline: empty unless the last line is torn
    rows, pos = [], len(head)
    for k, line in enumerate(lines):
        row = _parse_row(line, cost)
        if row is None:
            if k == len(lines) - 1 and not tail:
                return rows, pos, True
            raise SdepureError(f"{path}: line {k + 2} is malformed ({line[:60]!r}); "
                               f"only a torn last line can be repaired")
        rows.append(row)
        pos += len(line) + 1
    return rows, pos, bool(tail)


def check_rows(path: Path, rows: list[dict], images: list[int]) -> None:
    allowed, seen = set(images), set()
    for row in rows:
        if row["idx"] not in allowed:
            raise SdepureError(f"{path} has a row for image {row['idx']}, which is not among this run's images")
        if row["idx"] in seen:
            raise SdepureError(f"{path} has two rows for image {row['idx']}")
        seen.add(row["idx"])


def write_rows(path: Path, rows: list[dict]) -> None:
    """certify.tsv with the cost columns, unless a row lacks them (rows of a run from before)."""
    cost = all("draws" in r for r in rows)
    with open(path, "w") as fh:
        fh.write((TSV_HEADER_COST if cost else TSV_HEADER) + "\n")
        fh.writelines(format_row(r, cost) for r in rows)


# -- starting and resuming --------------------------------------------------------------------

def start(run_dir: Path, record: dict) -> None:
    """A new run directory (must not exist): run.json, then the header of certify.tsv."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise SdepureError(f"output {run_dir} already exists; choose another --out or --resume it "
                           f"(nothing was overwritten)") from None
    except OSError as e:
        raise SdepureError(f"cannot create output directory {run_dir}: {e.strerror}") from None
    write_record(run_dir, record)
    if record["format"] == ATTACK_FORMAT:
        report.write_example_rows(run_dir / report.EXAMPLES_FILE, [], record["settings"]["fixed_randomness"])
    elif record["world_size"] == 1:
        write_rows(run_dir / TSV_FILE, [])


def resume(run_dir: Path, record: dict) -> list[dict]:
    """Check that `run_dir` is a run with exactly the settings in `record`, drop a torn last
    line of its certify.tsv, and return the rows already done (in file order). Nothing is
    changed unless every check passes."""
    run_dir = Path(run_dir)
    check_resumable(run_dir, load_record(run_dir), record)
    if record["world_size"] != 1:
        return []
    path = run_dir / TSV_FILE
    rows, good, _ = read_rows(path)
    check_rows(path, rows, record["images"])
    size = path.stat().st_size if path.exists() else -1
    if good == 0:
        write_rows(path, [])
    elif size != good:
        os.truncate(path, good)
    return rows


def attack_batches(record: dict) -> dict[int, list[int]]:
    """An attack run's own batches, b -> its examples: the run's examples in runs of
    settings.batch, and of a shard i/n every n-th batch from the i-th."""
    images, size = record["images"], record["settings"]["batch"]
    batches = {b: images[i:i + size] for b, i in enumerate(range(0, len(images), size))}
    shard = record_shard(record)
    return {b: ids for b, ids in batches.items() if shard is None or b % shard.count == shard.index}


def finished_batch_rows(record: dict, rows: list[dict]) -> list[dict]:
    """The rows of the record's own batches that hold exactly their examples (a batch cut short
    by a kill, or another shard's, is left out), batch by batch."""
    have: dict[int, list[dict]] = {}
    for r in rows:
        have.setdefault(r["batch"], []).append(r)
    return [r for b, ids in attack_batches(record).items() if [r["idx"] for r in have.get(b, [])] == ids
            for r in have[b]]


def resume_attack(run_dir: Path, record: dict) -> list[dict]:
    """Check that `run_dir` is an attack run with exactly the settings in `record` and return the
    rows of its finished batches; examples.tsv is rewritten (atomically) to hold just those, so a
    batch cut short by a kill is redone whole. Nothing is changed unless every check passes."""
    run_dir = Path(run_dir)
    check_resumable(run_dir, load_record(run_dir, ATTACK_FORMAT), record)
    path = run_dir / report.EXAMPLES_FILE
    done = finished_batch_rows(record, report.read_example_rows(path) if path.exists() else [])
    fixed = record["settings"]["fixed_randomness"]
    tmp = path.with_name(path.name + ".tmp")
    report.write_example_rows(tmp, done, fixed)
    os.replace(tmp, path)
    return done


def pending(record: dict, done: list[dict]) -> list[int]:
    """The record's images without a row yet, in the record's order."""
    have = {r["idx"] for r in done}
    return [i for i in record["images"] if i not in have]


def finished_rows(run_dir: Path, record: dict) -> list[dict]:
    """load_rows of a run that must be finished (merging, plotting): an unfinished one is refused."""
    rows = load_rows(run_dir)
    if len(rows) < len(record["images"]):
        raise SdepureError(f"{run_dir} is unfinished ({len(rows)} of {len(record['images'])} images); "
                           f"finish it with sdepure certify --resume {run_dir}")
    return rows


def load_rows(run_dir: Path) -> list[dict]:
    """The rows of a run directory, checked against its record."""
    run_dir = Path(run_dir)
    record = load_record(run_dir)
    rows, _, _ = read_rows(run_dir / TSV_FILE)
    check_rows(run_dir / TSV_FILE, rows, record["images"])
    return rows


# -- merging shards ------------------------------------------------------------------------------

def expand(dirs) -> list[Path]:
    """Run directories to merge: a torchrun run stands for its shard-r-of-W directories."""
    out = []
    for d in map(Path, dirs):
        record = load_record(d, None)
        out.extend(shard_dirs(d, record["world_size"]) if record["world_size"] > 1 else [d])
    return out


def collect(dirs) -> tuple[dict, list[dict]]:
    """Check that `dirs` are all the shards of one run, each finished, and return the record of
    the whole run (no shard) and all rows sorted by idx. Refuses shards of different runs (naming
    the differing setting), overlaps, missing shards and unfinished shards."""
    dirs = expand(dirs)
    if not dirs:
        raise SdepureError("nothing to merge: give the shard directories")
    seen_paths: dict[Path, Path] = {}
    for d in dirs:
        key = d.resolve()
        if key in seen_paths:
            raise SdepureError(f"{d} is given twice")
        seen_paths[key] = d
    records = [load_record(d, None) for d in dirs]
    first, base = dirs[0], records[0]
    for d, rec in zip(dirs[1:], records[1:]):
        if rec["format"] != base["format"]:
            raise SdepureError(f"cannot merge {first} and {d}: one is {_a(KINDS[base['format']][0])} run, the other "
                               f"{_a(KINDS[rec['format']][0])} run")
        diff = differences(base, rec, MERGE_KEYS)
        if diff:
            name, a, b = diff[0]
            raise SdepureError(f"cannot merge {first} and {d}: they are from different runs: setting "
                               f"{_setting_name(name)} differs ({_show(name, a)} against {_show(name, b)})")
    shards = [record_shard(r) for r in records]
    if any(s is None for s in shards):
        if len(dirs) > 1:
            whole = dirs[[s is None for s in shards].index(True)]
            raise SdepureError(f"cannot merge {whole}: it is a whole run, not a shard")
    else:
        counts = sorted({s.count for s in shards})
        if len(counts) > 1:
            raise SdepureError(f"cannot merge shards of different splits (into {counts[0]} and {counts[1]} shards)")
        by_index: dict[int, Path] = {}
        for d, s in zip(dirs, shards):
            if s.index in by_index:
                raise SdepureError(f"shard {s} is given twice ({by_index[s.index]} and {d})")
            by_index[s.index] = d
        missing = [f"{i}/{counts[0]}" for i in range(counts[0]) if i not in by_index]
        if missing:
            raise SdepureError(f"shard(s) {', '.join(missing)} missing: give all {counts[0]} shards of the run")
    if base["format"] == ATTACK_FORMAT:
        return _collect_attack(dirs, records)
    rows = _gather(dirs, records, finished_rows, "image")
    images = sorted(i for rec in records for i in rec["images"])
    for s, rec in zip(shards, records):
        if s is not None and s.select(images) != sorted(rec["images"]):
            raise SdepureError(f"shard {s} does not hold every {s.count}-th image of the merged selection")
    merged = {**base, "shard": None, "world_size": 1, "images": images}
    return merged, rows


def _gather(dirs: list[Path], records: list[dict], rows_of, what: str) -> list[dict]:
    """Every shard's rows (rows_of(dir, record) refuses an unfinished one), no `what` in two
    shards, sorted by idx."""
    seen: dict[int, Path] = {}
    rows = []
    for d, rec in zip(dirs, records):
        for r in rows_of(d, rec):
            if r["idx"] in seen:
                raise SdepureError(f"{what} {r['idx']} appears in both {seen[r['idx']]} and {d}")
            seen[r["idx"]] = d
            rows.append(r)
    return sorted(rows, key=lambda r: r["idx"])


def _collect_attack(dirs: list[Path], records: list[dict]) -> tuple[dict, list[dict]]:
    """collect's rows for attack shards (each record holds the whole selection; a shard owns
    every n-th batch of it): every own batch finished, no example twice."""
    base = records[0]

    def finished_attack_rows(d, rec):
        if rec["images"] != base["images"]:
            raise SdepureError(f"cannot merge {dirs[0]} and {d}: they attack different examples")
        have = report.read_example_rows(Path(d) / report.EXAMPLES_FILE)
        finished = {r["batch"] for r in finished_batch_rows(rec, have)}
        own = attack_batches(rec)
        if finished != set(own):
            raise SdepureError(f"{d} is unfinished ({len(finished)} of {len(own)} batches); "
                               f"finish it with sdepure attack --resume {d}")
        return have
    rows = _gather(dirs, records, finished_attack_rows, "example")
    return {**base, "shard": None, "world_size": 1}, rows


def certified_curve(run_dir: Path) -> tuple[str, list[float], list[int]]:
    """(label, radius, correct) of a finished certify run directory (any sdepure run: CIFAR-10,
    ImageNet, a merged or torchrun run), to draw several runs together with report.plot_curve.
    The label names the method, its votes and solver where it has them, and sigma."""
    record = load_record(run_dir)
    rows = finished_rows(run_dir, record)
    p = record["settings"]["purifier"]
    label = p["method"] + (f" K={p['votes']}" if p["method"] == "densepure" else "")
    label += f" {p['solver']} b={p['steps']}" if p["method"] in ("diffpure", "densepure") else ""
    return f"{label}, sigma {p['sigma']:g}", [r["radius"] for r in rows], [r["correct"] for r in rows]
