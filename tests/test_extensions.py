"""The compiled extensions load and report what was built."""

import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

import scratchformer
from scratchformer import cli


def gpt2_byte_alphabet():
    """GPT-2's bytes_to_unicode, from its published definition (openai/gpt-2 encoder.py)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    shifted, n = {}, 0
    for b in range(256):
        if b not in keep:
            shifted[b] = 256 + n
            n += 1
    return [chr(b) if b in keep else chr(shifted[b]) for b in range(256)]


def test_bpe_core_loads_and_has_gpt2_byte_alphabet():
    from scratchformer import _bpe

    alphabet = _bpe.byte_alphabet()
    assert alphabet == gpt2_byte_alphabet()
    assert alphabet[ord(" ")] == "Ġ" and alphabet[ord("\n")] == "Ċ"  # GPT-2's familiar tokens
    assert len(set(alphabet)) == 256
    assert all(len(s) == 1 and unicodedata.category(s)[0] in "LNPS" for s in alphabet)


def test_build_info_reports_what_loaded():
    info = scratchformer.build_info()
    assert info.bpe and info.kernels and not info.problems
    assert info.torch == torch.__version__
    assert info.torch_cuda == torch.version.cuda
    assert info.kernels_torch and info.version == "0.1.0"
    if info.cuda_kernels:
        assert info.cuda_archs and all(a >= 70 for a in info.cuda_archs)
        assert info.kernels_cuda.split(".")[0] == torch.version.cuda.split(".")[0]
    else:
        assert info.cuda_archs == () and info.kernels_cuda is None
    text = str(info)
    assert "C++ tokenizer    yes" in text
    assert ("CUDA kernels     yes" in text) == info.cuda_kernels


def test_cuda_version_mismatch_is_detected():
    from scratchformer._extensions import cuda_mismatch

    assert cuda_mismatch(None, "12.8") is None  # no CUDA kernels: nothing to mismatch
    assert cuda_mismatch("13.0", "13.2") is None  # same major version: compatible
    assert "compiled with CUDA 13.0" in cuda_mismatch("13.0", "12.8")
    assert "uses no CUDA" in cuda_mismatch("13.0", None)


def test_info_command(capsys):
    assert cli.main(["info"]) == 0
    assert capsys.readouterr().out.startswith("scratchformer 0.1.0\n")


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("scratchformer")
    result = subprocess.run([str(script), "info"], capture_output=True, text=True, check=True)
    assert str(scratchformer.build_info()) in result.stdout
    bad = subprocess.run([str(script), "nonsense"], capture_output=True, text=True)
    # A usage mistake is one line and exit status 1, like any other bad input.
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "invalid choice: 'nonsense'" in bad.stderr


def test_the_arch_list_builds_hopper_as_sm_90a(monkeypatch):
    """wgmma needs the sm_90a target: the default list has it, and a bare 9.0 becomes 9.0a (same GPUs)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import cuda_toolkit

    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert cuda_toolkit.arch_list() == "8.0;9.0a;10.0;12.0+PTX"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0 9.0;12.0+PTX")
    assert cuda_toolkit.arch_list() == "8.0;9.0a;12.0+PTX"
    # compute_90a PTX loads on 9.0 alone, where the sm_90a cubin runs anyway: no later GPU gains.
    assert cuda_toolkit.ptx_arch("8.0;9.0a+PTX") == 0 and cuda_toolkit.ptx_arch("8.6+PTX") == 86
    for bad in ("Hopper", "native", "8.0+ptx", "sm_80"):
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", bad)
        with pytest.raises(ValueError, match=f"TORCH_CUDA_ARCH_LIST: '{re.escape(bad)}' is not a compute capability"):
            cuda_toolkit.arch_list()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", " ; ")
    assert cuda_toolkit.arch_list() == cuda_toolkit.DEFAULT_ARCH_LIST


def test_the_default_arch_list_compiles_blackwell_from_one_ptx():
    """A cubin for each of the four capabilities; sm_100 and sm_120 from one compute_100 pass,
    whose PTX is the one embedded (loadable from 10.0 on); sm_90a from its own."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import cuda_toolkit

    assert cuda_toolkit.gencode_flags("8.0;9.0a;10.0;12.0+PTX") == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_100,code=sm_100", "-gencode=arch=compute_100,code=sm_120",
        "-gencode=arch=compute_100,code=compute_100",
    ]
    assert cuda_toolkit.real_archs("8.0;9.0a;10.0;12.0+PTX") == [80, 90, 100, 120]
    assert cuda_toolkit.ptx_arch("8.0;9.0a;10.0;12.0+PTX") == 100
    assert cuda_toolkit.gencode_flags("8.6+PTX") == ["-gencode=arch=compute_86,code=sm_86", "-gencode=arch=compute_86,code=compute_86"]
    # torch adds no -gencode flags of its own beside them.
    from torch.utils import cpp_extension

    assert cpp_extension._get_cuda_arch_flags(["-O3", *cuda_toolkit.gencode_flags(cuda_toolkit.DEFAULT_ARCH_LIST)]) == []


def test_check_ptxas_fails_on_the_notes_that_undo_the_hopper_kernel():
    """ptxas prints these as info lines; each means setmaxnreg or the wgmma overlap is lost."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import check_ptxas

    seen = [
        "ptxas info    : (C7508) Potential Performance Loss: 'setmaxnreg' ignored; unable to determine register count at entry.",
        "ptxas info    : (C7519) warpgroup.arrive is injected in around line 10608 by compiler to allow use of registers in GMMA",
        "ptxas info    : (C7520) Potential Performance Loss: wgmma.mma_async instructions are serialized due to program "
        "dependence on compiler-inserted WG.AR in divergent path",
    ]
    assert all(check_ptxas.HOPPER_WARNING.search(line) for line in seen)
    assert not check_ptxas.HOPPER_WARNING.search("ptxas info    : Used 168 registers, used 16 barriers")
