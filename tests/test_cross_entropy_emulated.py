"""The cross-entropy chunk kernel's own CUDA source (csrc/kernels/cross_entropy.cu) on the CPU
emulator (tests/emulator), against the float64 formula: each row's loss and the gradient it
writes over the logits, with the 2x rule (the kernel's error at most twice that of the same math in
PyTorch at the logits' precision, plus a floor)."""

import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def truth(logits, targets, row_scale, scale, ignore_index, label_smoothing, softcap, stat):
    """Loss per row and d(sum(row_scale * scale * loss)) / d logits, by autograd of the formula in `stat`."""
    z = logits.to(stat).detach().requires_grad_()
    capped = softcap * torch.tanh(z / softcap) if softcap else z
    log_probs = torch.log_softmax(capped, dim=1)
    counted = targets != ignore_index
    picked = log_probs.gather(1, torch.where(counted, targets, 0)[:, None])[:, 0]
    loss = -(1 - label_smoothing) * picked - label_smoothing * log_probs.mean(1)
    loss = torch.where(counted, loss, torch.zeros_like(loss))
    weights = (row_scale.to(stat) if row_scale is not None else torch.ones_like(loss)) * scale
    (loss * weights).sum().backward()
    return loss.detach(), z.grad


def within_twice(got, low, exact, name):
    assert torch.isfinite(got).all(), f"{name}: not finite"
    err = (got.double() - exact.double()).abs().max().item()
    err_low = (low.double() - exact.double()).abs().max().item()
    floor = 1e-6 * (1 + exact.abs().max().item())
    assert err <= 2 * err_low + floor, f"{name}: kernel error {err:.3g} > 2 x PyTorch's {err_low:.3g} + {floor:.2g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("rows, vocab", [(3, 1), (5, 7), (9, 512), (4, 1000), (2, 50257)])
@pytest.mark.parametrize("label_smoothing, softcap", [(0.0, 0.0), (0.1, 0.0), (0.1, 30.0)])
def test_emulated_cross_entropy_chunk_against_float64(emulated, rows, vocab, dtype, label_smoothing, softcap):
    g = torch.Generator().manual_seed(rows * 7919 + vocab)
    logits = (torch.randn(rows, vocab, generator=g) * 4).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[rows // 2] = -100  # an ignored row: loss and gradient 0
    row_scale = torch.rand(rows, generator=g) + 0.5
    args = (targets, row_scale, 0.25, -100, label_smoothing, softcap)
    exact_loss, exact_grad = truth(logits, *args, torch.float64)
    low_loss, low_grad = truth(logits, *args, torch.float32)  # PyTorch's float32 math on the same logits
    buffer = logits.clone()
    loss = emulated.cross_entropy_chunk(buffer, targets, row_scale, 0.25, -100, label_smoothing, softcap)
    within_twice(loss, low_loss, exact_loss, "loss")
    within_twice(buffer, low_grad.to(dtype), exact_grad, "gradient")  # written in the logits' dtype
    assert loss[rows // 2] == 0 and torch.equal(buffer[rows // 2], torch.zeros_like(buffer[rows // 2]))


def test_emulated_loss_only_leaves_the_logits_and_strided_rows_work(emulated):
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(6, 104, generator=g).to(torch.bfloat16)
    logits = wide[:, :100]  # rows 104 apart: the element-wise path
    targets = torch.randint(0, 100, (6,), generator=g)
    before, gaps = logits.clone(), wide[:, 100:].clone()
    loss = emulated.cross_entropy_chunk(logits, targets, grad=False)
    assert torch.equal(logits, before)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(before.float(), targets, reduction="none"))
    emulated.cross_entropy_chunk(logits, targets, scale=0.5)
    expected = truth(before, targets, None, 0.5, -100, 0.0, 0.0, torch.float64)[1]
    torch.testing.assert_close(logits.double(), expected, rtol=2e-2, atol=2e-3)
    assert torch.equal(wide[:, 100:], gaps)  # between the rows: untouched


def test_emulated_target_out_of_range_gives_nan_not_a_read_past_the_row(emulated):
    logits = torch.randn(3, 10)
    targets = torch.tensor([2, 10, -5])  # 10 and -5: outside [0, 10), not the ignore_index
    loss = emulated.cross_entropy_chunk(logits, targets)
    assert torch.isfinite(loss[0]) and loss[1:].isnan().all()
    assert torch.isfinite(logits[0]).all() and logits[1:].isnan().all()
