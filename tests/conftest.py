import pytest
import torch

import scratchformer
from scratchformer import ops


def _cuda_skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA GPU visible"
    if not scratchformer.build_info().cuda_kernels:
        return "scratchformer was built without CUDA kernels"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _cuda_skip_reason()
    if reason:
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _restore_default_backend():
    previous = ops.get_backend()
    yield
    ops.set_backend(previous)
