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
