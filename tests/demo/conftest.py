"""A small demo world: its corpus on disk, a few training jobs and their gold episodes."""

from __future__ import annotations

import pytest
import torch

from k2batch.config import load_config
from k2batch.demo.data import training_pieces
from k2batch.demo.tasks import make_jobs
from k2batch.demo.world import make_world, write_corpus


@pytest.fixture(scope="session")
def world():
    return make_world(seed=3, num_cities=40, num_companies=60, num_people=60)


@pytest.fixture(scope="session")
def corpus(world, tmp_path_factory):
    return write_corpus(world, tmp_path_factory.mktemp("demo-world") / "corpus.parquet")


@pytest.fixture(scope="session")
def episodes(world, corpus):
    jobs = make_jobs(world, 30, seed=1, held_out=False)
    return training_pieces(jobs, world, load_config(), corpus, None)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models: extra threads only contend for the box's two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
