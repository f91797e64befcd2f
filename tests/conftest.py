"""Shared test fixtures."""
from pathlib import Path

import pytest
import torch

import tuneonce

CHECKOUT_PACKAGE = Path(__file__).resolve().parents[1] / "modules"


def pytest_configure(config):
    """The package is `tuneonce`, mapped onto modules/ by the install (no sys.path entry makes it importable): a venv
    installed from another checkout would test that checkout's code, in-process and in every subprocess alike."""
    found = Path(tuneonce.__file__).resolve().parent
    if found != CHECKOUT_PACKAGE:
        pytest.exit(f"tuneonce imports from {found}, not from this checkout's {CHECKOUT_PACKAGE}: run "
                    "pip install -c requirements/lock.txt -e . in this venv", returncode=2)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors and models are op-overhead bound: a second thread only adds synchronisation (and
    oversubscription stalls on a busy 2-core machine). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---- shared inputs of training runs (module scope: built once per test module, as each module built them) -------
@pytest.fixture(scope="module")
def data_dirs(request, tmp_path_factory):
    """A concept's train and validation folders; a module that needs another number of training images sets
    ``DATA_TRAIN_IMAGES`` (default 4)."""
    from tests.builders import concept_data_dirs

    count = getattr(request.module, "DATA_TRAIN_IMAGES", 4)
    return concept_data_dirs(tmp_path_factory.mktemp("data"), train_count=count)


@pytest.fixture(scope="module")
def sd15_base(tmp_path_factory):
    from tuneonce.model.tiny import tiny_pipeline_dir

    return tiny_pipeline_dir("sd15", tmp_path_factory)


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory):
    from tuneonce.model.tiny import tiny_pipeline_dir

    return tiny_pipeline_dir("sdxl", tmp_path_factory)


@pytest.fixture(scope="module")
def flux_base(tmp_path_factory):
    """A saved tiny Flux-dev pipeline folder (built once per session, shared)."""
    from tuneonce.model.tiny_flow import tiny_flow_pipeline_dir

    return tiny_flow_pipeline_dir("flux-dev", tmp_path_factory)
