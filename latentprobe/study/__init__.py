"""`latentprobe study`: the paper's whole analysis on any subject and benchmark, as one resumable, shardable run.

`StudyConfig` holds every choice (the study file, TOML: `study_toml` writes it, `parse_study_toml` /
`load_study_file` read and check it); `run_study` runs its stages into one folder and builds the report;
`estimate_study` sizes it from a pilot; `run_demo` is the study on the shipped organisms.

The top of the library below the CLI: it may import every stage.
"""

from .config import StudyConfig, check_config, load_study_file, parse_study_toml, study_toml
from .run import StudyResult, run_study

__all__ = ["StudyConfig", "StudyResult", "check_config", "load_study_file", "parse_study_toml", "run_study",
           "study_toml", "estimate_study", "run_demo"]


def __getattr__(name):  # the estimate and the demo load on first use (they pull in planning and the organisms)
    if name == "estimate_study":
        from .estimate import estimate_study

        return estimate_study
    if name == "run_demo":
        from .demo import run_demo

        return run_demo
    raise AttributeError(name)
