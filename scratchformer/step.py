"""One optimizer step: Vaswani's schedule, Adam, the label-smoothed loss, mixed precision.

A loop of your own is these calls (see README, "Training from Python"):

    opt = Optimization.for_model(model, model_config, train_config, device)
    for step in range(steps):
        batches = [sample_windows(tokens, batch_size, context, sampler) for _ in range(grad_accum)]
        loss = forward_backward(model, batches, opt, train_config, device)
        lr = update(model, opt, train_config.clip)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ModelConfig, TrainConfig


class TrainingDiverged(RuntimeError):
    """The loss became inf or NaN."""


def vaswani_lr(step: int, d_model: int, warmup: int, scale: float = 1.0) -> float:
    """lr = scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), steps counted from 1."""
    step = max(step, 1)
    return scale * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


def autocast(device: torch.device, amp: str):
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@dataclass
class Optimization:
    """Adam with Vaswani's learning-rate schedule (lr = 1 scaled by the schedule), and the fp16
    loss scaler (a no-op unless amp is fp16)."""

    optimizer: torch.optim.Adam
    schedule: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler

    @classmethod
    def for_model(cls, model: torch.nn.Module, model_config: ModelConfig, train_config: TrainConfig,
                  device: torch.device) -> Optimization:
        optimizer = torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda i: vaswani_lr(i + 1, model_config.d_model, train_config.warmup, train_config.lr_scale)
        )
        return cls(optimizer, schedule, torch.amp.GradScaler(device.type, enabled=train_config.amp == "fp16"))

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])


def forward_backward(net: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], opt: Optimization,
                     train_config: TrainConfig, device: torch.device, world: int = 1) -> float:
    """Gradients of the mean loss over `batches` (the step's micro-batches, already on `device`);
    returns that loss, averaged over the `world` processes. Under DDP (`net` wrapped), gradients
    are all-reduced once, after the last micro-batch."""
    total = torch.zeros((), device=device)
    for m, (x, y) in enumerate(batches):
        last = m == len(batches) - 1
        sync = net.no_sync() if hasattr(net, "no_sync") and not last else contextlib.nullcontext()
        with sync:
            with autocast(device, train_config.amp):
                loss = net(x, targets=y, label_smoothing=train_config.label_smoothing) / len(batches)
            opt.scaler.scale(loss).backward()
        total += loss.detach()
    if world > 1:
        dist.all_reduce(total)
        total /= world
    return total.item()


def update(model: torch.nn.Module, opt: Optimization, clip: float) -> float:
    """Clip, take the optimizer step, advance the schedule; returns the learning rate used."""
    opt.scaler.unscale_(opt.optimizer)
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    lr = opt.optimizer.param_groups[0]["lr"]
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.optimizer.zero_grad(set_to_none=True)
    opt.schedule.step()
    return lr
