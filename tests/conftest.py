import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # Built-in images and organism caches go to a per-session folder, never the user's home.
    os.environ["LATENTPROBE_CACHE"] = str(tmp_path_factory.mktemp("latentprobe-cache"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: tiny models run several times faster on one thread of a shared 2-core
    machine, and the organisms were trained on one."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_subject():
    from latentprobe.model.subjects import load_subject

    return load_subject("tiny")
