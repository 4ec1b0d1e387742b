import os
import sys
import tempfile
import zlib
from pathlib import Path

import pytest
import torch

# `python -m pytest` puts the checkout first on sys.path, where `scratchformer` is the source tree:
# without its compiled extensions unless built in place. Then test the installed package instead.
_checkout = Path(__file__).resolve().parent.parent
if not list((_checkout / "scratchformer").glob("_bpe*.so")):
    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _checkout]
try:
    import scratchformer  # noqa: E402
except ImportError:
    raise pytest.UsageError(
        "scratchformer is not installed: run `pip install --no-build-isolation .` first "
        "(or `python setup.py build_ext --inplace` to test the checkout itself)"
    ) from None

# Token caches and downloads of the test run stay out of the user's cache.
os.environ["SCRATCHFORMER_CACHE"] = tempfile.mkdtemp(prefix="scratchformer-test-cache-")

from scratchformer import ops  # noqa: E402


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
def _seeded(request):
    """Every test draws from torch's global RNG seeded by its own name: a failure reproduces."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _restore_default_backend():
    previous = ops.get_backend()
    yield
    ops.set_backend(previous)


@pytest.fixture(scope="session")
def small_text(tmp_path_factory):
    """A few WikiText articles as a user text file: enough to train on in seconds."""
    from scratchformer import data

    articles = data.wikitext_articles(data._shipped("wiki.valid.raw.xz"))[:3]
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text("".join(articles)[:60000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def emulated(tmp_path_factory):
    """The CUDA kernels' source built for the CPU emulator (tests/emulated_kernels.py)."""
    import shutil

    from emulated_kernels import EmulatedKernels, build

    if shutil.which("g++") is None:
        pytest.skip("needs g++ to build the emulated kernels")
    return EmulatedKernels(build(tmp_path_factory.mktemp("emulated")))
