"""A small demo world: its corpus on disk, a few training jobs and their gold episodes. The training recipe's
modules (workspace/training/, run as a script beside the model it trains) import as the script imports them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

TRAINING = Path(__file__).resolve().parents[2] / "workspace" / "training"
sys.path.insert(0, str(TRAINING))

from demo_episodes import training_pieces  # noqa: E402

from k2batch.config import load_config  # noqa: E402
from k2batch.demo.tasks import make_jobs  # noqa: E402
from k2batch.demo.world import make_world, write_corpus  # noqa: E402


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
