"""Read W&B *offline* runs back, in-process: history, summary, config, metric definitions and tables.

wandb's Python API reads runs from the server only; wandb 0.31's command line can print a ``.wandb``
file's records (``wandb leet inspect --json``, from its Go core) and reads the history rows identically
(``tests/test_wandb_offline.py`` cross-checks the two where the installed wandb has that command).

Used by ``pf-lightning report`` to plot an offline run, and by the tests to check what was logged.

Where things land
    ``wandb.init(mode="offline", dir=D)`` (or ``WandbLogger(offline=True, save_dir=D)``) writes
    ``D/wandb/offline-run-<time>-<id>/run-<id>.wandb``; media files go under that run folder's ``files/``
    (tables: ``files/media/table/<key>_<step>_<hash>.table.json``, holding ``{"columns": [...], "data": [...]}``).

File format (checked byte by byte against files written by wandb-core 0.31)
    * A 7-byte file header ``struct "<4sHB"``: ident ``b":W&B"``, magic ``0xBEE1``, version ``0``.
    * Then the LevelDB log format, in 32 KiB blocks counted from the *start of the file* (the header
      sits inside block 0). Each chunk has a 7-byte header ``struct "<IHB"``: checksum, payload length,
      type (FULL=1, FIRST=2, MIDDLE=3, LAST=4; 0 = zero padding). A block tail shorter than 7 bytes is
      zero padding. FIRST/MIDDLE*/LAST chunks are concatenated into one payload.
    * Unlike LevelDB, the checksum is the plain (unmasked) **CRC-32/IEEE** (``zlib.crc32``) of the type
      byte followed by the payload -- not masked CRC-32C (wandb's old Python writer used zlib, and
      wandb-core kept the format). :func:`read_records` verifies it.
    * Each payload is a protobuf ``wandb.proto.wandb_internal_pb2.Record`` (the module dispatches to
      ``v5``/``v6``/``v7`` by the installed protobuf major version). ``Record.WhichOneof("record_type")``
      says what it holds: ``run`` (with the initial config), ``history``, ``summary``, ``config``,
      ``metric``, ``exit``, ...

Values
    History, summary and config items carry ``key`` or ``nested_key`` (repeated) and ``value_json``.
    wandb-core writes ``nested_key`` even for flat keys; a key containing ``/`` (``"hessian/eig_1"``)
    stays one part. Multi-part keys (a logged ``wandb.Table`` becomes ``tab -> {_type, path, ...}``)
    are rebuilt here as nested dicts. Every history row gets ``_step``, ``_runtime`` and ``_timestamp``.

How the step is recorded
    ``run.log(d, step=s)`` sets ``_step = s``; ``run.log(d)`` uses wandb's own counter (``_step`` + 1 per
    call). Lightning's ``WandbLogger.log_metrics(m, step=s)`` calls ``experiment.log({**m,
    "trainer/global_step": s})`` *without* ``step=``: the trainer step is the ``trainer/global_step``
    column of the row, while ``_step`` only counts ``log`` calls. WandbLogger also defines the metrics
    ``trainer/global_step`` and ``*`` (``step_metric="trainer/global_step"``, ``step_sync=True``).
    With ``step_sync`` wandb-core itself copies the last seen step-metric value into a row that lacks it,
    so a ``trainer/global_step`` in a history row may not have been logged by the caller.
    Off by one: Lightning logs ``self.log`` metrics of the batch that just ran at ``global_step - 1`` (rows
    0..4 for ``max_steps=5``), while ``trainer.global_step`` in ``on_train_batch_end`` is already 1..5.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

__all__ = [
    "config",
    "find_run_file",
    "find_run_files",
    "history",
    "metric_definitions",
    "read_chunks",
    "read_records",
    "summary",
    "tables",
]


FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
FILE_IDENT, FILE_MAGIC, FILE_VERSION = b":W&B", 0xBEE1, 0
CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type
BLOCK_SIZE = 32 * 1024
ZERO, FULL, FIRST, MIDDLE, LAST = range(5)


def _pb() -> Any:
    # Imported on first use: ``import wandb`` costs a second, and only reading needs it.
    try:
        from wandb.proto import wandb_internal_pb2
    except ModuleNotFoundError as err:  # an extra: the core install has no wandb
        raise ModuleNotFoundError(
            "reading an offline W&B run needs wandb, which is not installed: pip install 'pf-lightning[wandb]'",
            name=err.name,
        ) from err

    return wandb_internal_pb2


def find_run_files(root: Path) -> list[Path]:
    """Every ``run-*/run-*.wandb`` at or under ``root`` (a run file itself, a run folder or any parent), oldest first.

    The ``latest-run`` link that wandb keeps beside the run folders is not counted twice.
    """
    root = Path(root)
    if root.is_file():
        return [root] if root.suffix == ".wandb" else []
    found = {}
    for p in root.glob("**/run-*.wandb"):
        # in a run folder, wandb/offline-run-<time>-<id>/ (run-<time>-<id>/ once synced), not via latest-run
        if p.resolve().parent.name.startswith(("offline-run-", "run-")):
            if "latest-run" not in p.relative_to(root).parts:
                found[p.resolve()] = p
    return sorted(found.values(), key=lambda p: (p.stat().st_mtime, str(p)))


def find_run_file(root: Path) -> Path:
    """The newest ``run-*.wandb`` at or under ``root``."""
    files = find_run_files(root)
    if not files:
        raise FileNotFoundError(f"no wandb/offline-run-*/run-*.wandb under {root}")
    return files[-1]


def read_chunks(path: Path, strict: bool = True) -> list[tuple[int, bytes]]:
    """The raw ``(type, payload)`` log chunks of a ``.wandb`` file, checksums verified; padding skipped.

    Args:
        path: the ``.wandb`` file.
        strict: raise on a truncated last chunk; ``False`` stops before it instead (a run that is still
            being written, or was killed). A checksum mismatch raises either way.
    """
    buf = Path(path).read_bytes()
    if buf[: FILE_HEADER.size] != FILE_HEADER.pack(FILE_IDENT, FILE_MAGIC, FILE_VERSION):
        raise ValueError(f"{path}: not a wandb log (header {buf[:7]!r})")
    chunks, pos = [], FILE_HEADER.size
    while pos < len(buf):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER.size:  # block trailer
            pos += left_in_block
            continue
        if pos + CHUNK_HEADER.size > len(buf):
            if not strict:
                break
            raise ValueError(f"{path}: truncated chunk header at byte {pos}")
        crc, length, kind = CHUNK_HEADER.unpack_from(buf, pos)
        start, end = pos + CHUNK_HEADER.size, pos + CHUNK_HEADER.size + length
        if end > len(buf) and not strict:
            break
        if end > len(buf) or length > left_in_block - CHUNK_HEADER.size:
            raise ValueError(f"{path}: chunk at byte {pos} (length {length}) overruns its block or the file")
        payload = buf[start:end]
        if kind == ZERO:
            pos = end
            continue
        actual = zlib.crc32(bytes([kind]) + payload)
        if actual != crc:
            raise ValueError(
                f"{path}: checksum mismatch at byte {pos}: stored {crc:#010x}, computed {actual:#010x}"
            )
        chunks.append((kind, payload))
        pos = end
    return chunks


def read_records(path: Path, strict: bool = True) -> list[Any]:
    """All protobuf ``Record``s of a ``.wandb`` file, in order (FIRST/MIDDLE/LAST fragments reassembled).

    Args:
        path: the ``.wandb`` file.
        strict: raise on a truncated tail; ``False`` returns the complete records before it.
    """
    pb = _pb()
    records, parts = [], None
    for kind, payload in read_chunks(path, strict):
        if kind == FULL and parts is None:
            data = payload
        elif kind == FIRST and parts is None:
            parts = [payload]
            continue
        elif kind == MIDDLE and parts is not None:
            parts.append(payload)
            continue
        elif kind == LAST and parts is not None:
            data, parts = b"".join([*parts, payload]), None
        else:
            raise ValueError(
                f"{path}: unexpected chunk type {kind} (inside a fragmented record: {parts is not None})"
            )
        record = pb.Record()
        record.ParseFromString(data)
        records.append(record)
    if parts is not None and strict:
        raise ValueError(f"{path}: file ends inside a fragmented record")
    return records


def _records(path: Path, kind: str, strict: bool = True) -> list[Any]:
    return [getattr(r, kind) for r in read_records(path, strict) if r.WhichOneof("record_type") == kind]


def _key(item: Any) -> list[str]:
    return [item.key] if item.key else list(item.nested_key)


def _value(item: Any) -> Any:
    """``value_json`` decoded (what wandb-core writes); history items may instead use a typed ``value`` oneof."""
    if item.value_json or "value" not in item.DESCRIPTOR.oneofs_by_name:
        return json.loads(item.value_json or "null")
    which = item.WhichOneof("value") or "none"
    return None if which == "none" else json.loads(item.json) if which == "json" else getattr(item, which)


def _put(target: dict, parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = value


def _drop(target: dict, parts: list[str]) -> None:
    for part in parts[:-1]:
        target = target.get(part, {})
    target.pop(parts[-1], None)


def history(path: Path, strict: bool = True) -> list[dict]:
    """One dict per ``history`` record (one per ``run.log`` row), values JSON-decoded.

    Args:
        path: the ``.wandb`` file.
        strict: raise on a truncated tail; ``False`` reads what a still-running or killed run wrote.
    """
    return [_fold([rec], items="item") for rec in _records(path, "history", strict)]


def _fold(updates: list[Any], into: dict | None = None, items: str = "update") -> dict:
    """Apply the items (``update``, or ``item`` for history) and ``remove``s of records, in order."""
    out = {} if into is None else into
    for rec in updates:
        for item in getattr(rec, items):
            _put(out, _key(item), _value(item))
        for item in getattr(rec, "remove", ()):
            _drop(out, _key(item))
    return out


def summary(path: Path) -> dict:
    """The final run summary: every ``summary`` record's updates and removals, applied in order."""
    return _fold(_records(path, "summary"))


def config(path: Path) -> dict:
    """The run config: the ``run`` record's initial config, then every ``config`` record (includes ``_wandb``)."""
    out: dict = {}
    for rec in read_records(path):
        kind = rec.WhichOneof("record_type")
        if kind in ("run", "config"):
            _fold([rec.run.config if kind == "run" else rec.config], out)
    return out


def metric_definitions(path: Path) -> list[dict]:
    """What ``run.define_metric`` wrote, one dict per ``metric`` record, in order.

    Keys: ``name`` or ``glob_name`` (the other is ``None``), ``step_metric`` (``None`` if unset),
    ``summary`` (sorted aggregations, e.g. ``["max", "min"]``), ``goal``, ``step_sync``, ``hidden``,
    ``expanded_from_glob``.
    """
    pb = _pb()
    return [
        dict(
            name=m.name or None,
            glob_name=m.glob_name or None,
            step_metric=m.step_metric or None,
            summary=sorted(f.name for f, on in m.summary.ListFields() if on),
            goal=pb.MetricRecord.MetricGoal.Name(m.goal),
            step_sync=m.options.step_sync,
            hidden=m.options.hidden,
            expanded_from_glob=m.expanded_from_glob,
        )
        for m in _records(path, "metric")
    ]


def tables(run_dir: Path) -> dict[str, dict]:
    """Every logged ``wandb.Table`` of a run folder (or of the folder holding a ``.wandb`` file).

    Keyed by the path relative to ``files/`` (``"media/table/<key>_<step>_<hash>.table.json"``), which is
    the ``path`` field that history and summary record for the table; values hold ``columns`` and ``data``.
    """
    run_dir = Path(run_dir)
    files = (run_dir.parent if run_dir.is_file() else run_dir) / "files"
    return {
        p.relative_to(files).as_posix(): json.loads(p.read_text())
        for p in sorted(files.glob("media/table/**/*.table.json"))
    }
