"""Which run a folder holds: a fingerprint of its manifest, so that the same run given twice (the same folder, a
copy of it, or a link to it) is counted once, and runs of one subject on different data are named as such.

``report RUN RUN`` used to duplicate every effect row (and so flip a verdict) and ``plan RUN RUN`` to ask for
fewer instances than were already run; both now go through `distinct_runs`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

# The fields that make a run this run: written once when it starts (``created`` differs between two runs of the
# same settings), never changed by a resume.
IDENTITY_FIELDS = ("format", "kind", "created", "subject_name", "subject_fingerprint", "checkpoint", "protocol",
                   "seed", "decode", "record", "interventions", "data_fingerprint")
MANIFEST_NAMES = ("manifest.json", "patching_manifest.json")


def run_fingerprint(run_dir: str | Path) -> str | None:
    """A short fingerprint of the run in ``run_dir`` (None when it holds no manifest)."""
    for name in MANIFEST_NAMES:
        path = Path(run_dir) / name
        if path.is_file():
            try:
                manifest = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            if not isinstance(manifest, dict):
                return None
            identity = {k: manifest.get(k) for k in IDENTITY_FIELDS if k in manifest} or manifest
            text = json.dumps(identity, sort_keys=True, default=str)
            return hashlib.sha256(f"{name}\n{text}".encode()).hexdigest()[:16]
    return None


def distinct_runs(run_dirs: Sequence[str | Path]) -> tuple[list[str], list[str]]:
    """(the run folders with each run once, in the order given; one line per folder left out, saying why).

    >>> distinct_runs([])
    ([], [])
    """
    kept: list[str] = []
    notes: list[str] = []
    first_of: dict[str, str] = {}
    for run_dir in map(str, run_dirs):
        key = run_fingerprint(run_dir) or f"path:{Path(run_dir).resolve()}"
        if key in first_of:
            notes.append(f"{run_dir} is the same run as {first_of[key]} (manifest fingerprint "
                         f"{key.removeprefix('path:')[:16]}); counted once")
            continue
        first_of[key] = run_dir
        kept.append(run_dir)
    return kept, notes


def data_mismatch_notes(manifests: Sequence[tuple]) -> list[str]:
    """One line per subject whose runs were made on different data (their findings are merged as one subject).

    ``manifests`` are (run folder, manifest) or (run folder, manifest, instance ids) triples of trace and intervene
    runs. Runs whose instance ids nest (a study's readout trace of 240 questions and its edits on the first 80 of
    them) are not different data: each finding's row states its own n.

    >>> a, b = {"data_fingerprint": "x"}, {"data_fingerprint": "y"}
    >>> data_mismatch_notes([("r1", a, {"q1", "q2", "q3"}), ("r2", b, {"q1", "q2"})])
    []
    >>> len(data_mismatch_notes([("r1", a, {"q1", "q3"}), ("r2", b, {"q1", "q2"})]))
    1
    """
    by_subject: dict[str, list[tuple]] = {}
    for entry in manifests:
        by_subject.setdefault(str(entry[1].get("subject_name")), []).append(entry)
    notes = []
    for subject, runs in by_subject.items():
        prints = {m.get("data_fingerprint") for _, m, *_ in runs if m.get("data_fingerprint")}
        if len(prints) > 1 and not _nested([entry[2] if len(entry) > 2 else None for entry in runs]):
            parts = ", ".join(f"{d} ({m.get('kind', 'run')}, {m.get('data', {}).get('n_instances', '?')} instances "
                              f"of {m.get('data', {}).get('source', '?')})" for d, m, *_ in runs)
            notes.append(f"subject {subject}: its runs are on different data and are merged as one subject: {parts}")
    return notes


def _nested(id_sets: list) -> bool:
    """Whether every set of instance ids lies inside the largest (None: not known, so not nested)."""
    if any(ids is None for ids in id_sets):
        return False
    largest = max(id_sets, key=len)
    return all(set(ids) <= set(largest) for ids in id_sets)
