"""The TraceStore: append-only shards on disk, readable as tensors and as a pandas DataFrame.

Layout of a run folder::

    manifest.json                     everything needed to reproduce the run (subject, protocol, checkpoint and
                                      data fingerprints, seed, decoding, what was recorded, package versions)
    shards/<writer>-<seq>.safetensors tensors of a group of records, keyed "<record_id>/<name>"
    index/<writer>-<seq>.parquet      one row per record of the shard of the same name

A shard is written first and its index part second, each atomically, so a record is visible only once its
tensors are on disk; an interrupted run loses at most the unflushed group, and `--resume` skips every instance
that has an index row. Several writers (ranks of a distributed run) write side by side under their own names;
readers see the union as one run. Memory stays flat: a writer holds at most one group of records.

    >>> store = TraceStore("runs/tiny")                        # doctest: +SKIP
    >>> store.index()[["instance_id", "n_latent_steps"]]       # doctest: +SKIP
    >>> store.tensor(record_id, "latent")                      # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from .errors import LatentProbeError
from .fileio import atomic_write, atomic_write_json

FORMAT_NAME = "latentprobe-trace"
FORMAT_VERSION = 1


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
        existing = (self.run_dir / "manifest.json").exists()
        if existing and not resume:
            raise LatentProbeError(f"output folder {self.run_dir} already holds a run",
                                   "pass --resume to continue it, or choose a new --out folder")
        if not existing and self.run_dir.exists() and any(self.run_dir.iterdir()) and not resume:
            raise LatentProbeError(f"output folder {self.run_dir} exists and is not empty",
                                   "choose a new --out folder")
        (self.run_dir / "shards").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "index").mkdir(parents=True, exist_ok=True)
        if existing:
            previous = json.loads((self.run_dir / "manifest.json").read_text())
            if manifest is not None:
                _check_compatible(previous, manifest, self.run_dir)
            if manifest is not None and not shared:
                previous.setdefault("resumed", []).append(
                    {"at": time.time(), "data_fingerprint": manifest.get("data_fingerprint"),
                     "n_instances": manifest.get("data", {}).get("n_instances")})
                atomic_write_json(self.run_dir / "manifest.json", previous)
            self.manifest = previous
        else:
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
        from safetensors.torch import save_file

        name = f"{self.writer_id}-{self._seq:05d}"
        tensors: dict[str, torch.Tensor] = {}
        rows = []
        for i, (row, row_tensors) in enumerate(self._pending):
            record_id = f"{name}-{i:04d}"
            for key, tensor in row_tensors.items():
                tensors[f"{record_id}/{key}"] = tensor.detach().to("cpu").contiguous()
            rows.append({"record_id": record_id, "shard": name, "tensors": sorted(row_tensors), **row})
        if tensors:
            atomic_write(self.run_dir / "shards" / f"{name}.safetensors", lambda tmp: save_file(tensors, tmp))
        frame = pd.DataFrame(_jsonable_rows(rows))
        atomic_write(self.run_dir / "index" / f"{name}.parquet", lambda tmp: frame.to_parquet(tmp, index=False))
        self._pending.clear()
        self._seq += 1

    def update_manifest(self, **fields: Any):
        self.manifest.update(fields)
        atomic_write_json(self.run_dir / "manifest.json", self.manifest)

    def close(self):
        self.flush()

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
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT_NAME:
            raise LatentProbeError(f"{self.run_dir}: manifest format {self.manifest.get('format')!r} is not a trace",
                                   "point at a folder written by latentprobe")
        if self.manifest.get("version") != FORMAT_VERSION:
            raise LatentProbeError(
                f"{self.run_dir} was written by trace format version {self.manifest.get('version')}; this latentprobe "
                f"reads version {FORMAT_VERSION}", "re-run the trace with this version of latentprobe")
        self._index: pd.DataFrame | None = None
        self._handles: dict[str, Any] = {}

    def index(self, columns: list[str] | None = None) -> pd.DataFrame:
        """One row per record, sorted by record id; JSON columns are decoded back to Python objects."""
        if self._index is None or columns is not None:
            parts = sorted((self.run_dir / "index").glob("*.parquet"))
            if not parts:
                frame = pd.DataFrame(columns=["record_id", "instance_id"])
            else:
                frames = [pd.read_parquet(p, columns=columns) for p in parts]
                frame = pd.concat(frames, ignore_index=True)
            for column in [c for c in frame.columns if c.endswith("_json")]:
                frame[column[:-5]] = frame[column].map(lambda v: json.loads(v) if isinstance(v, str) else v)
            if "record_id" in frame.columns:
                frame = frame.sort_values("record_id", ignore_index=True)
            if columns is not None:
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
                raise LatentProbeError(f"{self.run_dir}: shard {name} is missing (a half-written or copied run?)",
                                       "re-run with --resume to rewrite missing records, or re-run the trace")
            self._handles[name] = safe_open(str(path), framework="pt")
        return self._handles[name]

    def tensor(self, record_id: str, name: str) -> torch.Tensor:
        shard = record_id.rsplit("-", 1)[0]
        key = f"{record_id}/{name}"
        handle = self._shard(shard)
        if key not in handle.keys():
            raise LatentProbeError(f"record {record_id} has no tensor {name!r}",
                                   "record it when tracing (see --record) or pick another representation")
        return handle.get_tensor(key)

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
            from .sites import as_site

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


    # -- readers by site (one name per place; see latentprobe.sites) ------------------------------------------
    def record_tensors(self, record_id: str) -> "RecordTensors":
        """A lazy, read-only mapping name -> tensor over one record (tensors load when first read)."""
        return RecordTensors(self, record_id)

    def site_tensor(self, record_id: str, site, image: str = "tokens") -> torch.Tensor | None:
        """One record's states at ``site`` (a `Site` or its string form, e.g. ``"latent[2].layer[14]"``).

        Shapes as in `latentprobe.recording.site_tensor`: (D,) for one latent step, answer position or the last
        prompt token; (n_steps, D) for every latent step or answer position; image tokens (n_image, D) or their
        mean (D,) with ``image="mean"``. None when the record has no such step.
        """
        from .recording import site_tensor

        return site_tensor(self.record_tensors(record_id), self.layer_ids, site, image=image)

    def site_array(self, record_ids: Iterable[str], site, image: str = "tokens") -> np.ndarray:
        """Stack `site_tensor` over records: (N, D) or (N, S, D) padded with NaN where a record has fewer steps
        (or image tokens), NaN rows where it lacks the step. The same arrays `run_with_cache` returns.

        >>> store.site_array(index.record_id, "latent[0].layer[0]").shape        # doctest: +SKIP
        (48, 64)
        """
        from .sites import as_site

        site = as_site(site)
        return stack_site_states([self.site_tensor(rid, site, image=image) for rid in record_ids],
                                 self.manifest.get("record", {}).get("hidden_size"))

    @property
    def sites(self) -> list:
        """The group-level sites this run recorded (from its manifest)."""
        from .sites import Site

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


def stack_site_states(states: Sequence[torch.Tensor | None], dim: int | None = None) -> np.ndarray:
    """Stack per-record site states into one float32 array padded with NaN (shared by the store and the cache).

    (D,) states give (N, D); (S, D) states give (N, max S, D). A None (a record without that step) is a NaN row.
    """
    present = [t for t in states if t is not None]
    if not present:
        return np.full((len(states), dim or 0), np.nan, dtype=np.float32)
    dim = present[0].shape[-1]
    if present[0].dim() == 1:
        out = np.full((len(states), dim), np.nan, dtype=np.float32)
        for i, t in enumerate(states):
            if t is not None:
                out[i] = t.float().numpy()
        return out
    steps = max(t.shape[0] for t in present)
    out = np.full((len(states), steps, dim), np.nan, dtype=np.float32)
    for i, t in enumerate(states):
        if t is not None:
            out[i, :t.shape[0]] = t.float().numpy()
    return out


def _check_compatible(previous: dict, current: dict, run_dir: Path):
    # The data may grow between sessions (a larger --limit); the model, seed and kind of run may not.
    for key in ("subject_fingerprint", "seed", "kind", "interventions"):
        if key in previous and key in current and previous[key] != current[key]:
            raise LatentProbeError(
                f"cannot resume {run_dir}: its {key} is {previous[key]!r} but this run's is {current[key]!r}",
                "resume with the same subject, data and seed, or write to a new --out folder")


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
