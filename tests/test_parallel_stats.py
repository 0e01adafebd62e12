"""Issue 22 (the demo's minute): the refitted collapse bootstrap and the probe cells run in threads; a result must
not depend on how many."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from latentprobe.errors import LatentProbeError
from latentprobe.stats.collapse_spread import collapse_ratio
from latentprobe.stats.parallel import map_in_threads, worker_count
from latentprobe.stats.probes import probe_table


def _collapse(monkeypatch, threads):
    monkeypatch.setenv("LATENTPROBE_THREADS", str(threads))
    rng = np.random.default_rng(3)
    latents = rng.normal(size=(60, 12)) @ rng.normal(size=(12, 12))
    return collapse_ratio(latents, rng.normal(size=(60, 12)), rng.normal(size=(200, 12)), n_boot=300, seed=1)


def _probes(monkeypatch, threads):
    monkeypatch.setenv("LATENTPROBE_THREADS", str(threads))
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, size=90)
    features = {(layer, step): rng.normal(size=(90, 8)) + labels[:, None] * (layer + step) * 0.2
                for layer in range(3) for step in range(2)}
    return probe_table(features, labels, np.arange(90), subject="s", attribute="a", representation="latent",
                       n_splits=3, n_permutations=19, n_boot=100, seed=0)


def test_the_refitted_collapse_interval_is_the_same_in_one_thread_and_in_three(monkeypatch):
    assert _collapse(monkeypatch, 1) == _collapse(monkeypatch, 3)


def test_probe_cells_are_the_same_in_one_thread_and_in_three(monkeypatch):
    pd.testing.assert_frame_equal(_probes(monkeypatch, 1), _probes(monkeypatch, 3))


def test_items_come_back_in_order_and_a_bad_thread_count_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("LATENTPROBE_THREADS", "4")
    assert worker_count() == 4
    assert map_in_threads(lambda x: -x, range(50)) == [-x for x in range(50)]
    monkeypatch.setenv("LATENTPROBE_THREADS", "zero")
    with pytest.raises(LatentProbeError, match="LATENTPROBE_THREADS='zero'.*unset it"):
        worker_count()


def _collapse_of_seed(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    latents = rng.normal(size=(40, 10)) @ rng.normal(size=(10, 10))
    return collapse_ratio(latents, rng.normal(size=(40, 10)), rng.normal(size=(100, 10)), n_boot=100, seed=seed)


def test_analyses_in_processes_equal_those_in_this_process_in_order(monkeypatch):
    from latentprobe.stats.parallel import map_in_processes

    monkeypatch.setenv("LATENTPROBE_THREADS", "2")
    in_processes = list(map_in_processes(_collapse_of_seed, [3, 1, 2]))
    monkeypatch.setenv("LATENTPROBE_THREADS", "1")
    assert in_processes == list(map_in_processes(_collapse_of_seed, [3, 1, 2]))
    assert in_processes[1] == _collapse_of_seed(1)


def test_a_script_without_a_main_guard_runs_once_when_its_analyses_run_in_processes(tmp_path):
    # A spawned worker imports the parent's __main__ again: an unguarded script (a user's study) would run again
    # in every worker, its writes included.
    import os
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "my_study.py"
    script.write_text(textwrap.dedent("""
        import pathlib
        from latentprobe.stats.parallel import map_in_processes, start_processes
        with open(pathlib.Path(__file__).with_name("ran.txt"), "a") as log:
            log.write("ran\\n")
        start_processes(3)
        print(list(map_in_processes(abs, [-1, -2, -3])))
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LATENTPROBE_THREADS": "2"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[1, 2, 3]"
    assert (tmp_path / "ran.txt").read_text() == "ran\n"


@pytest.mark.slow
def test_a_studys_report_analysed_in_processes_beside_the_decodes_equals_one_made_in_this_process(
        tmp_path, monkeypatch):
    # The study starts each subject's collapse and probes in a process as soon as its runs are decoded; the same
    # runs reported afresh in this one process must give the same tables.
    from latentprobe.report.build import build_report
    from latentprobe.study.config import StudyConfig
    from latentprobe.study.run import _probe_kwargs, probe_attributes, run_study, study_instances

    monkeypatch.setenv("LATENTPROBE_THREADS", "2")
    config = StudyConfig(subjects=["organism-bottleneck", "organism-collapsed"], n_instances=12, batch_size=12,
                         information=["patch"], disruption=["noise"], noise_scales=[3.0], bootstrap=60,
                         readout_instances=24, probe_folds=3, probe_inner_folds=2, probe_alphas=[1.0],
                         probe_permutations=9)
    result = run_study(config, tmp_path / "study", say=lambda *_: None)
    monkeypatch.setenv("LATENTPROBE_THREADS", "1")
    build_report(result.runs, tmp_path / "here", seed=config.seed, n_boot=config.bootstrap,
                 attributes=probe_attributes(config, study_instances(config, config.subjects[0])[0]),
                 probe_kwargs=_probe_kwargs(config), margins=config.margins_object())
    for name in ("verdicts.csv", "figures/similarity.csv", "figures/probes.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "here" / name),
                                      pd.read_csv(tmp_path / "study" / "report" / name), obj=name)
    assert len(list((tmp_path / "study" / "report" / "figures").glob("*-probe-heatmap.png"))) == 2
