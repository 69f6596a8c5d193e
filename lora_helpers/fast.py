"""The speed-ups of the training loop (``train.train``), each used where the device has it.

What a device offers is decided once, in ``device.capabilities`` (bf16 autocast included:
``Capabilities.autocast``); this module turns it into the loop's tools: fused AdamW and a
training step replayed as a CUDA graph. The other speed-ups are in the data and the model:
batches of similar length padded to their own longest message (``data.message_loaders``), the
classifier head read at the last real token only (``finetune.last_token_logits``), PyTorch's
fused attention (``model.MultiHeadAttention``).
``benchmarks/finetune_speed.py --lever-study`` measures each.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .device import capabilities


def adamw(params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel updates every parameter) on CUDA GPUs and CPUs: on a CPU it
    halves the time of a full fine-tuning step, where the update of every weight dominates."""
    fused = True if capabilities(device).fused_adamw else None
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


class GraphedStep:
    """``loss_and_grad(batch)`` captured as one CUDA graph per batch shape, then replayed.

    Replaying a graph launches the step's thousands of kernels with one call, so the GPU no
    longer waits on Python. The gradients live in fixed tensors that every graph first zeroes,
    then fills; the optimizer reads them as usual. A new shape costs ``warmup`` eager steps on
    the same batch (so the gradients they leave are the right ones) and one capture. Should a
    capture fail, that shape runs eagerly (and says so): slower, never wrong.
    """

    def __init__(
        self,
        loss_and_grad: Callable[[list[torch.Tensor]], torch.Tensor],
        params: list[torch.nn.Parameter],
        warmup: int = 1,
    ):
        self.loss_and_grad, self.params, self.warmup = loss_and_grad, params, warmup
        for p in params:
            p.grad = torch.zeros_like(p)  # fixed addresses: backward accumulates into them
        self.graphs: dict[tuple, tuple | None] = {}
        # The graphs share one memory pool: safe because they never run at the same time and
        # each replay's loss is used before the next replay.
        self.pool = torch.cuda.graph_pool_handle()

    def _step(self, batch: list[torch.Tensor]) -> torch.Tensor:
        for p in self.params:
            p.grad.zero_()
        return self.loss_and_grad(batch)

    def _capture(self, batch: list[torch.Tensor]) -> tuple:
        static_batch = [t.clone() for t in batch]
        side = torch.cuda.Stream()  # warm-up runs off the main stream, as capture requires
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._step(static_batch)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                static_loss = self._step(static_batch)
        except RuntimeError as err:
            shape = tuple(batch[0].shape)
            print(f"CUDA graph capture failed for batch shape {shape}, running it eagerly: {err}")
            return None
        return graph, static_batch, static_loss

    def __call__(self, batch: list[torch.Tensor]) -> torch.Tensor:
        """Zero the gradients, then forward and backward; the returned loss tensor is
        overwritten by the next call (use it before)."""
        key = tuple(t.shape for t in batch)
        if key not in self.graphs:
            self.graphs[key] = self._capture(batch)
        if self.graphs[key] is None:
            return self._step(batch)
        graph, static_batch, static_loss = self.graphs[key]
        for static, t in zip(static_batch, batch, strict=True):
            static.copy_(t, non_blocking=True)
        graph.replay()
        return static_loss


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    loss_and_grad: Callable[[list[torch.Tensor]], torch.Tensor],
    batch: list[torch.Tensor],
    params: list[torch.nn.Parameter],
    grad_clip: float | None,
    graphed_step: GraphedStep | None = None,
) -> torch.Tensor:
    """One training step: the gradients (replayed as a CUDA graph when ``graphed_step`` is
    given), clipping, the update; returns the loss (without waiting for the GPU)."""
    if graphed_step is not None:
        loss = graphed_step(batch)  # zeroes the gradients, then forward and backward
    else:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_and_grad(batch)
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return loss
