"""The TraceStore: append-only shards on disk, readable as tensors and as a pandas DataFrame.

Layout of a run folder::

    manifest.json                     everything needed to reproduce the run (subject, protocol, checkpoint and
                                      data fingerprints, seed, decoding, what was recorded, package versions)
    shards/<writer>-<seq>.safetensors tensors of a group of records, keyed "<record_id>/<name>"
    index/<writer>-<seq>.parquet      one row per record of the shard of the same name

A shard is written first and its index part second, each atomically, so a record is visible only once its
tensors are on disk; an interrupted run loses at most the unflushed group, and `--resume` skips every instance
that has an index row. Every index row carries its shard's size and SHA-256 (``shard_bytes``, ``shard_sha256``):
`--resume` verifies them and moves a damaged shard with its index part to ``damaged/``, so exactly the
instances it held are run again; readers name a damaged file instead of failing somewhere inside it. Several writers (ranks of a distributed run) write side by side under their own names;
readers see the union as one run. Memory stays flat: a writer holds at most one group of records.

    >>> store = TraceStore("runs/tiny")                        # doctest: +SKIP
    >>> store.index()[["instance_id", "n_latent_steps"]]       # doctest: +SKIP
    >>> store.tensor(record_id, "latent")                      # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Collection, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import LatentProbeError
from ..fileio import atomic_write, atomic_write_json
from ..model.recording import stack_site_states  # noqa: F401  (shared with run_with_cache; re-exported)

FORMAT_NAME = "latentprobe-trace"


def damaged_shard_fix(run_dir) -> str:
    """The one fix for a damaged or missing shard, for readers (similarity, report, probe) as for writers."""
    return (f"run the trace or intervene command that wrote {run_dir} again with --resume and the same --out: "
            "it sets damaged shards aside in damaged/ and re-runs exactly their instances")


# Shards already checked in this process, by (path, size, mtime, expected digest): each is hashed once.
_VERIFIED_SHARDS: set[tuple[str, int, int, str]] = set()
FORMAT_VERSION = 1
log = logging.getLogger(__name__)

# Settings that change what a run records: a resume must match them exactly (see `check_resume_settings`).
# The data may differ (a larger --limit adds instances); the batch size may differ (see the README's tolerance).
RESUME_SETTINGS = ("kind", "subject_name", "subject_fingerprint", "checkpoint", "protocol", "seed", "decode",
                   "record", "interventions")


def package_versions() -> dict[str, str]:
    import importlib.metadata as md
    import platform

    versions = {"python": platform.python_version()}
    for name in ("latentprobe", "torch", "transformers", "nnsight", "safetensors", "numpy", "pandas", "scikit-learn"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class TraceWriter:
    """Appends records to a run folder in groups of ``shard_size``."""

    def __init__(self, run_dir: str | Path, manifest: dict[str, Any] | None = None, *, resume: bool = False,
                 shard_size: int = 64, writer_id: str = "w0", shared: bool = False):
        self.run_dir = Path(run_dir)
        self.shard_size = shard_size
        self.writer_id = writer_id
        self._pending: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] = []
        # shared: several writers (distributed ranks) start one run together; each writes its own shards.
        resume = resume or shared
        from .folders import LOCK_NAME, RunFolderLock, is_empty_folder

        self._check_folder(resume, shared, is_empty_folder)  # before the lock: a refused folder gets no lock file
        # One writer per folder (per rank name in a distributed run): a second one stops with one line.
        self._lock = RunFolderLock(self.run_dir, LOCK_NAME if not shared else f"{LOCK_NAME}-{writer_id}")
        try:
            self._open(manifest, resume, shared, writer_id)
        except BaseException:
            self._lock.release()
            raise

    def _check_folder(self, resume: bool, shared: bool, is_empty_folder) -> None:
        existing = (self.run_dir / "manifest.json").exists()
        if existing and not resume:
            raise LatentProbeError(f"output folder {self.run_dir} already holds a run",
                                   "pass --resume to continue it, or choose a new --out folder")
        if not existing and not is_empty_folder(self.run_dir) and not shared:  # other ranks may be starting it
            raise LatentProbeError(f"output folder {self.run_dir} exists and is not empty, and holds no run that "
                                   "--resume could continue (no manifest.json)", "choose a new --out folder")
        if existing:
            kind = read_manifest(self.run_dir).get("format")
            if kind != FORMAT_NAME:
                raise LatentProbeError(f"output folder {self.run_dir} holds a {kind or 'non-trace'} run, not a "
                                       "trace or intervene run that --resume could continue",
                                       "choose a new --out folder")

    def _open(self, manifest, resume: bool, shared: bool, writer_id: str) -> None:
        existing = (self.run_dir / "manifest.json").exists()
        (self.run_dir / "shards").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "index").mkdir(parents=True, exist_ok=True)
        if existing:
            previous = read_manifest(self.run_dir)
            if manifest is not None:
                check_resume_settings(previous, manifest, self.run_dir)
            if not shared:  # other ranks may be writing their own temporary files right now
                remove_stale_temporaries(self.run_dir)
            self.damaged = verify_and_quarantine(self.run_dir, None if not shared else writer_id)
            if manifest is not None and not shared:
                previous.setdefault("resumed", []).append(
                    {"at": time.time(), "data_fingerprint": manifest.get("data_fingerprint"),
                     "n_instances": manifest.get("data", {}).get("n_instances"),
                     "batching": manifest.get("batching"), "repaired": list(self.damaged)})
                atomic_write_json(self.run_dir / "manifest.json", previous)
            self.manifest = previous
        else:
            self.damaged = []
            self.manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "created": time.time(),
                             "packages": package_versions(), **(manifest or {})}
            atomic_write_json(self.run_dir / "manifest.json", self.manifest)
        self._seq = self._next_sequence()

    def _next_sequence(self) -> int:
        taken = [int(p.stem.rsplit("-", 1)[1]) for p in (self.run_dir / "index").glob(f"{self.writer_id}-*.parquet")]
        return max(taken, default=-1) + 1

    def finished_keys(self, columns: Sequence[str] = ("instance_id",)) -> set[tuple]:
        """Keys of records already on disk (by default instance ids), to skip on resume."""
        if not any((self.run_dir / "index").glob("*.parquet")):
            return set()
        frame = TraceStore(self.run_dir).index(columns=list(columns))
        return set(map(tuple, frame[list(columns)].astype(str).itertuples(index=False, name=None)))

    def add(self, row: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None):
        self._pending.append((row, tensors or {}))
        if len(self._pending) >= self.shard_size:
            self.flush()

    def flush(self):
        if not self._pending:
            return

        name = f"{self.writer_id}-{self._seq:05d}"
        tensors: dict[str, torch.Tensor] = {}
        rows = []
        for i, (row, row_tensors) in enumerate(self._pending):
            record_id = f"{name}-{i:04d}"
            for key, tensor in row_tensors.items():
                tensors[f"{record_id}/{key}"] = tensor.detach().to("cpu").contiguous()
            rows.append({"record_id": record_id, "shard": name, "tensors": sorted(row_tensors), **row})
        size, digest = 0, ""
        if tensors:
            shard = atomic_write(self.run_dir / "shards" / f"{name}.safetensors",
                                 lambda tmp: _save_shard(tensors, tmp))
            size, digest = shard.stat().st_size, file_sha256(shard)
        for row in rows:
            row["shard_bytes"], row["shard_sha256"] = size, digest
        frame = pd.DataFrame(_jsonable_rows(rows))
        atomic_write(self.run_dir / "index" / f"{name}.parquet", lambda tmp: frame.to_parquet(tmp, index=False))
        self._pending.clear()
        self._seq += 1

    def update_manifest(self, **fields: Any):
        self.manifest.update(fields)
        atomic_write_json(self.run_dir / "manifest.json", self.manifest)

    def close(self):
        try:
            self.flush()
        finally:
            self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TraceStore:
    """Read a run folder (or the union of several writers' shards in it)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        manifest_path = self.run_dir / "manifest.json"
        if not manifest_path.exists():
            raise LatentProbeError(f"{self.run_dir} is not a latentprobe trace folder (no manifest.json)",
                                   "point at a folder written by `latentprobe trace` or `intervene`")
        self.manifest = read_manifest(self.run_dir)
        if self.manifest.get("format") != FORMAT_NAME:
            raise LatentProbeError(f"{self.run_dir}: manifest format {self.manifest.get('format')!r} is not a trace",
                                   "point at a folder written by latentprobe")
        if self.manifest.get("version") != FORMAT_VERSION:
            raise LatentProbeError(
                f"{self.run_dir} was written by trace format version {self.manifest.get('version')}; this latentprobe "
                f"reads version {FORMAT_VERSION}", "re-run the trace with this version of latentprobe")
        self._index: pd.DataFrame | None = None
        self._handles: dict[str, Any] = {}

    def index(self, columns: list[str] | None = None, *, decode: Collection[str] | None = None) -> pd.DataFrame:
        """One row per record, sorted by record id; JSON columns (``NAME_json``) become column ``NAME``, decoded
        back to Python objects. With ``decode``, only the columns it names are decoded and every other one keeps
        its JSON text (a run's answer ids, segments and attributes as Python lists and dicts are most of a large
        index's memory); such a read, like one of some ``columns``, is not cached."""
        if self._index is None or columns is not None or decode is not None:
            parts = sorted((self.run_dir / "index").glob("*.parquet"))
            if not parts:
                frame = pd.DataFrame(columns=["record_id", "instance_id"])
            else:
                frame = _concat_index_parts([_read_index_part(p, columns) for p in parts])
            encoded = [c for c in frame.columns if c.endswith("_json")]
            for column in encoded:
                name = column[:-5]
                frame[name] = decode_json(frame[column]) if decode is None or name in decode else frame[column]
            # the decoded objects replace their JSON text: holding both doubled the index's memory (a third of an
            # intervention run's peak at 1,024 instances, bench/bench_memory.py)
            frame = frame.drop(columns=encoded)
            if "record_id" in frame.columns:
                frame = frame.sort_values("record_id", ignore_index=True)
            if columns is not None or decode is not None:
                return frame
            self._index = frame
        return self._index

    def __len__(self) -> int:
        return len(self.index())

    def _shard(self, name: str):
        from safetensors import safe_open

        if name not in self._handles:
            path = self.run_dir / "shards" / f"{name}.safetensors"
            if not path.exists():
                raise LatentProbeError(f"{self.run_dir}: shard {path} is missing (a half-written or copied run?)",
                                       "run the same command again with --resume: it re-runs exactly the "
                                       "instances of a missing or damaged shard")
            self._verify_shard(name, path)
            try:
                self._handles[name] = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises its own error type for a truncated header
                raise LatentProbeError(f"shard {path} is damaged ({exc})",
                                       "run the same command again with --resume: it re-runs exactly the "
                                       "instances of a damaged shard") from None
        return self._handles[name]

    def _verify_shard(self, name: str, path: Path) -> None:
        """Check a shard's size and SHA-256 against its index rows before its first read in this process (a
        flipped byte must fail here, not turn a latent of 0.04 into 1e37 downstream)."""
        frame = self.index()
        if "shard_sha256" not in frame.columns or "shard" not in frame.columns:
            return  # written before checksums were recorded
        rows = frame[frame["shard"] == name]
        if not len(rows):
            return
        expected_size, expected = int(rows["shard_bytes"].iloc[0]), str(rows["shard_sha256"].iloc[0])
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, expected)
        if key in _VERIFIED_SHARDS:
            return
        if stat.st_size != expected_size:
            reason = f"it is {stat.st_size} bytes, its index says {expected_size}"
        elif file_sha256(path) != expected:
            reason = "its SHA-256 differs from the one its index recorded"
        else:
            _VERIFIED_SHARDS.add(key)
            return
        raise LatentProbeError(f"shard {path} is damaged ({reason})", damaged_shard_fix(self.run_dir))

    def tensor(self, record_id: str, name: str) -> torch.Tensor:
        shard = record_id.rsplit("-", 1)[0]
        key = f"{record_id}/{name}"
        handle = self._shard(shard)
        if key not in handle.keys():
            listed = self.index().set_index("record_id")["tensors"].get(record_id) \
                if "tensors" in self.index().columns else None
            if listed is not None and name in list(listed):  # the index says it was written: damage, not a choice
                raise LatentProbeError(f"shard {shard} does not hold {key} although its index lists it (a shard "
                                       "swapped or replaced by another file)", damaged_shard_fix(self.run_dir))
            raise LatentProbeError(f"record {record_id} has no tensor {name!r}",
                                   "record it when tracing (trace --layers, --image-states all|mean, --answer-states) or pick "
                                   "another representation")
        try:
            return handle.get_tensor(key)
        except Exception as exc:  # a shard truncated after its header: the data offsets point past its end
            raise LatentProbeError(f"shard {self.run_dir / 'shards' / shard}.safetensors is damaged ({exc})",
                                   "run the same command again with --resume: it re-runs exactly the "
                                   "instances of a damaged shard") from None

    def completeness(self) -> dict[str, Any]:
        """What the folder actually holds against what its manifest asked for.

        Returns ``expected`` (instances of the last session's data), ``present`` (distinct instances with a
        record), ``damaged`` (quarantined shards) and ``warnings`` (one sentence per problem, empty when the run
        is complete).
        """
        data = self.manifest.get("data", {})
        expected = int(data.get("n_instances") or 0)
        for session in self.manifest.get("resumed", []):
            expected = int(session.get("n_instances") or expected)
        frame = self.index()
        present = int(frame["instance_id"].nunique()) if "instance_id" in frame.columns else 0
        damaged = sorted(p.name for p in (self.run_dir / "damaged").glob("*.safetensors")) \
            if (self.run_dir / "damaged").exists() else []
        warnings = []
        if present < expected:
            warnings.append(f"{self.run_dir} holds {present} of the {expected} instances its run was asked for "
                            "(an interrupted run or a lost index part); `--resume` completes it")
        if damaged:
            warnings.append(f"{self.run_dir}: {len(damaged)} damaged shard(s) set aside in damaged/ "
                            f"({', '.join(damaged[:3])}); `--resume` re-runs their instances")
        return {"expected": expected, "present": present, "damaged": damaged, "warnings": warnings}

    def records(self, ok_only: bool = True, **filters: Any) -> pd.DataFrame:
        frame = self.index()
        if ok_only and "status" in frame.columns:
            frame = frame[frame["status"] == "ok"]
        for column, value in filters.items():
            if column not in frame.columns:
                raise LatentProbeError(f"the trace index has no column {column!r}",
                                       f"filter on one of {', '.join(frame.columns)}")
            frame = frame[frame[column].isin(value if isinstance(value, (list, tuple, set)) else [value])]
        return frame

    def latent_array(self, record_ids: Iterable[str], name: str = "latent", layer: int | None = None,
                     max_steps: int | None = None) -> np.ndarray:
        """Stack per-record latent tensors into (N, S, D), NaN where a record has fewer steps.

        ``name="latent"`` gives the fed-back vectors; ``name="latent_layers"`` with ``layer`` (an index into the
        recorded layers, see ``manifest['record']['layer_ids']``) gives that layer's states.
        """
        tensors = []
        for rid in record_ids:
            t = self.tensor(rid, name)
            if name == "latent_layers":
                t = t[self.layer_position(layer)]
            tensors.append(t.float().numpy())
        if not tensors:
            return np.zeros((0, 0, 0))
        steps = max(t.shape[0] for t in tensors) if max_steps is None else max_steps
        dim = tensors[0].shape[-1]
        out = np.full((len(tensors), steps, dim), np.nan, dtype=np.float32)
        for i, t in enumerate(tensors):
            n = min(steps, t.shape[0])
            out[i, :n] = t[:n]
        return out

    def state_array(self, record_ids: Iterable[str], name: str, layer: int | None = None) -> np.ndarray:
        """Stack a per-record (n_layers, D) tensor (image_mean, prompt_last) at one recorded layer into (N, D)."""
        position = self.layer_position(layer)
        return np.stack([self.tensor(rid, name)[position].float().numpy() for rid in record_ids])

    @property
    def layer_ids(self) -> list[int]:
        return list(self.manifest.get("record", {}).get("layer_ids", []))

    def layer_position(self, layer) -> int:
        """Index into recorded layers of hidden-state layer ``layer`` (an int, a `Site` or a site string; None:
        the last recorded)."""
        if layer is not None and not isinstance(layer, int):  # a Site or its string form names the layer too
            from ..model.sites import as_site

            layer = as_site(layer).layer
        ids = self.layer_ids
        if not ids:
            raise LatentProbeError(f"{self.run_dir} recorded no layer states", "re-run the trace with --layers")
        if layer is None:
            return len(ids) - 1
        if layer not in ids:
            raise LatentProbeError(f"layer {layer} was not recorded in {self.run_dir} (recorded: {ids})",
                                   "pick a recorded layer or re-run the trace with --layers")
        return ids.index(layer)


    # -- readers by site (one name per place; see latentprobe.model.sites) ------------------------------------------
    def record_tensors(self, record_id: str) -> "RecordTensors":
        """A lazy, read-only mapping name -> tensor over one record (tensors load when first read)."""
        return RecordTensors(self, record_id)

    def site_tensor(self, record_id: str, site, image: str = "tokens") -> torch.Tensor | None:
        """One record's states at ``site`` (a `Site` or its string form, e.g. ``"latent[2].layer[14]"``).

        Shapes as in `latentprobe.model.recording.site_tensor`: (D,) for one latent step, answer position or the last
        prompt token; (n_steps, D) for every latent step or answer position; image tokens (n_image, D) or their
        mean (D,) with ``image="mean"``. None when the record has no such step.
        """
        from ..model.recording import site_tensor

        return site_tensor(self.record_tensors(record_id), self.layer_ids, site, image=image)

    def site_array(self, record_ids: Iterable[str], site, image: str = "tokens") -> np.ndarray:
        """Stack `site_tensor` over records: (N, D) or (N, S, D) padded with NaN where a record has fewer steps
        (or image tokens), NaN rows where it lacks the step. The same arrays `run_with_cache` returns.

        >>> store.site_array(index.record_id, "latent[0].layer[0]").shape        # doctest: +SKIP
        (48, 64)
        """
        from ..model.sites import as_site

        site = as_site(site)
        return stack_site_states([self.site_tensor(rid, site, image=image) for rid in record_ids],
                                 self.manifest.get("record", {}).get("hidden_size"))

    @property
    def sites(self) -> list:
        """The group-level sites this run recorded (from its manifest)."""
        from ..model.sites import Site

        record = self.manifest.get("record", {})
        groups = [g for g, key in (("latent", "latent"), ("image", "image"), ("prompt_last", "prompt_last"),
                                   ("answer", "answer")) if record.get(key)]
        return [Site(g, layer) for g in groups for layer in self.layer_ids]


class RecordTensors:
    """Read-only mapping over one stored record's tensors, loaded on first access."""

    def __init__(self, store: TraceStore, record_id: str):
        self.store, self.record_id = store, record_id
        shard = store._shard(record_id.rsplit("-", 1)[0])
        prefix = f"{record_id}/"
        self._names = {k[len(prefix):] for k in shard.keys() if k.startswith(prefix)}

    def __contains__(self, name) -> bool:
        return name in self._names

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.store.tensor(self.record_id, name)

    def keys(self):
        return sorted(self._names)


def check_resume_settings(previous: dict, current: dict, run_dir: Path):
    """Refuse to resume when any setting that changes what is recorded differs, naming it and both values.

    The data may grow between sessions (a larger --limit); the subject, protocol, seed, decoding, what is
    recorded (layers, image states...) and the interventions may not: their records would mix two runs.
    """
    for key in RESUME_SETTINGS:
        if key not in previous and key not in current:
            continue
        for path, old, new in _differences(previous.get(key), current.get(key), key):
            raise LatentProbeError(
                f"cannot resume {run_dir}: its {path} is {old!r} but this run's is {new!r}",
                "resume with the same settings as the original run, or write to a new --out folder")


_check_compatible = check_resume_settings  # the old name


def _differences(old, new, path: str):
    """(dotted path, old value, new value) of every leaf that differs between two JSON-like values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            yield from _differences(old.get(key), new.get(key), f"{path}.{key}")
    elif isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            yield from _differences(a, b, f"{path}[{i}]")
    elif _normalise(old) != _normalise(new):
        yield path, old, new


def _normalise(value):
    # JSON turns tuples into lists; compare what a manifest written to disk would hold.
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def read_manifest(run_dir: Path) -> dict:
    """The run folder's manifest.json, or a one-line error naming it when it is damaged."""
    path = Path(run_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LatentProbeError(f"{path} is damaged (not valid JSON: {exc})",
                               "restore it from a copy, or run again into a new --out folder") from None
    if not isinstance(manifest, dict):
        raise LatentProbeError(f"{path} is damaged (not a JSON object)",
                               "restore it from a copy, or run again into a new --out folder")
    return manifest


def _read_index_part(path: Path, columns):
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a truncated file
        raise LatentProbeError(f"index part {path} is damaged ({type(exc).__name__}: {str(exc)[:120]})",
                               "run the same command again with --resume: it re-runs exactly that part's "
                               "instances") from None


def decode_json(column: pd.Series) -> pd.Series:
    """A column of JSON text as Python objects (a missing value stays as it is)."""
    return column.map(lambda v: json.loads(v) if isinstance(v, str) else v)


def _concat_index_parts(tables: list) -> pd.DataFrame:
    """One DataFrame of the index parts' Arrow tables, rows in the parts' order: the parts of one schema are joined
    in Arrow and converted once, and the few frames (one per schema) joined in pandas, as ``pd.concat`` of the
    parts' own frames would (a column a part lacks is NaN there). Converting each of hundreds of small parts to
    pandas first held about twice the memory at the end of a 1,024-instance run (bench/bench_memory.py)."""
    import pyarrow as pa

    starts = np.cumsum([0] + [t.num_rows for t in tables])
    groups: dict = {}
    for number, table in enumerate(tables):  # keyed by the schema without its pandas metadata
        groups.setdefault(table.schema.remove_metadata(), []).append(number)
    frames, origin = [], []
    for numbers in groups.values():
        frames.append(pa.concat_tables([tables[n] for n in numbers]).to_pandas())
        origin.extend(np.arange(starts[n], starts[n + 1]) for n in numbers)
        for n in numbers:
            tables[n] = None  # each part's buffers go as soon as its schema's frame exists
    if len(frames) == 1:
        return frames[0]
    frame = pd.concat(frames, ignore_index=True)
    return frame.iloc[np.argsort(np.concatenate(origin), kind="stable")].reset_index(drop=True)


def _save_shard(tensors: dict[str, torch.Tensor], path: str) -> None:
    """safetensors' ``save_file``, with its I/O errors (its own ``SafetensorError``, e.g. "No space left on device
    (os error 28)") raised as the OSError they are, so the command's one-line message (disk full: free space,
    then --resume) fires instead of a traceback."""
    import re

    from safetensors.torch import save_file

    try:
        save_file(tensors, path)
    except OSError:
        raise
    except Exception as exc:
        found = re.search(r"os error (\d+)", str(exc))
        if found is None or type(exc).__name__ != "SafetensorError":
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), path) from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the ``.*.tmp`` files that writes killed mid-way left behind (atomic writes never expose them)."""
    removed = []
    for folder in (run_dir, run_dir / "shards", run_dir / "index"):
        for tmp in folder.glob(".*.tmp"):
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed


def verify_and_quarantine(run_dir: Path, writer_id: str | None = None) -> list[str]:
    """Check every index part against its shard (present, same size, same SHA-256); move a damaged pair to
    ``damaged/`` so that a resume re-runs exactly their instances. Returns the names of the parts moved.

    An unreadable index part is moved too (with its shard): its instances are unknown until they run again.
    """
    moved = []
    pattern = f"{writer_id}-*.parquet" if writer_id else "*.parquet"
    for part in sorted((run_dir / "index").glob(pattern)):
        name = part.stem
        shard = run_dir / "shards" / f"{name}.safetensors"
        reason = None
        try:
            frame = pd.read_parquet(part)
        except Exception as exc:
            frame, reason = None, f"index part unreadable ({type(exc).__name__})"
        if frame is not None:
            has_tensors = "tensors" in frame.columns and any(len(t) for t in frame["tensors"])
            if has_tensors and not shard.exists():
                reason = "shard missing"
            elif has_tensors and "shard_bytes" in frame.columns:
                size, digest = int(frame["shard_bytes"].iloc[0]), str(frame["shard_sha256"].iloc[0])
                actual = shard.stat().st_size
                if actual != size:
                    reason = f"shard is {actual} bytes, its index says {size}"
                elif file_sha256(shard) != digest:
                    reason = "shard checksum differs from its index"
        if reason is None:
            continue
        target = run_dir / "damaged"
        target.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for path in (part, shard):
            if path.exists():
                os.replace(path, target / f"{stamp}-{path.name}")
        n = len(frame) if frame is not None else "its"
        log.warning("%s: %s (%s); moved to %s, its %s records will be run again", run_dir, name, reason, target, n)
        moved.append(f"{name}: {reason}")
    return moved


def _jsonable_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Nested values (dicts, lists of mixed things) become JSON strings in a '<name>_json' column."""
    out = []
    for row in rows:
        flat = {}
        for key, value in row.items():
            if isinstance(value, dict) or (isinstance(value, (list, tuple)) and key != "tensors"):
                flat[f"{key}_json"] = json.dumps(value, default=_json_default)
            elif isinstance(value, (np.generic,)):
                flat[key] = value.item()
            else:
                flat[key] = value
        out.append(flat)
    return out


def _json_default(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)
