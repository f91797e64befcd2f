"""Shared test fixtures."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors and models are op-overhead bound: a second thread only adds synchronisation (and
    oversubscription stalls on a busy 2-core machine). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
