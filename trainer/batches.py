"""From the loader's batch to the step's inputs: the batch stream, the batch hooks that run before a
batch is used, and the conditioning built from it.

The training step draws `Batches.next()`, passes the batch through `prepare_batch(hooks, batch)` and
conditions on `Conditioning.for_training(batch, x)`. What the hooks and the conditions are is decided
once, where the trainer is assembled (trainer/builder.py): padding captions for a compiled model
(`StaticTextLength`), the FLOP count of the first batch (trainer/throughput.py), the conditions the
model measures on the clip (model/conditioning.py). The step itself never asks which options are on.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from model.conditioning import ClipCondition
from trainer.seeding import preserved_rng


def batch_keys(batch: dict) -> list[str]:
    """The sample keys a batch consumed: its clips and the clips its joint image frames came from
    (a loader without keys, such as the tests' in-memory one, contributes none)."""
    keys = list(batch.get("keys") or [])
    for sources in batch.get("image_keys") or []:
        keys += sources
    return keys


def batch_digest(keys: list[str]) -> str:
    """sha256 hex of the step's global batch: every rank's keys, sorted (duplicates kept). The same on
    every rank and for any number of ranks, since the global batch is (data_pipeline.loader)."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


class Batches:
    """The training loader's batches, endlessly (a finite loader starts its next pass).

    The data loader must not touch the training RNG streams: torch's DataLoader draws a base seed from
    the global RNG whenever an iterator starts (lazily, at the first next()), and a resumed run starts
    its iterator at a different step than an uninterrupted one. Fencing the loader off keeps
    t/noise/caption-dropout draws identical (exact resume)."""

    def __init__(self, loader: Iterable):
        self.loader = loader
        self._iter = None

    def next(self) -> dict:
        with preserved_rng():
            if self._iter is None:
                self._iter = iter(self.loader)
            try:
                return next(self._iter)
            except StopIteration:  # a finite loader: start the next pass
                self._iter = iter(self.loader)
                return next(self._iter)

    def restart(self) -> None:
        """After the loader's position was loaded (resume, rollback) or to stop a multi-process
        loader's workers now rather than at interpreter exit: the next batch starts a new iterator."""
        self._iter = None


class BatchHook:
    """One change to (or look at) each loader batch before the step uses it; returns the batch.

    `counts_as_step_time = False` marks start-up work (the first batch's FLOP count) whose seconds the
    step reports as overhead, kept out of the step time and the throughput."""

    counts_as_step_time = True

    def __call__(self, batch: dict) -> dict:
        return batch


def prepare_batch(hooks: Sequence[BatchHook], batch: dict) -> tuple[dict, float]:
    """The batch through every hook in order, and the seconds spent in start-up hooks."""
    overhead = 0.0
    for hook in hooks:
        t0 = time.perf_counter()
        batch = hook(batch)
        if not hook.counts_as_step_time:
            overhead += time.perf_counter() - t0
    return batch, overhead


class StaticTextLength(BatchHook):
    """Captions padded (masked) to data.max_text_len, for compiled runs: the loader pads each batch to
    its longest caption, and every new length would recompile the cross-attention blocks. Masked
    tokens change nothing (the pooling and the cross-attention ignore them)."""

    def __init__(self, max_text_len: int):
        self.max_text_len = max_text_len

    def __call__(self, batch: dict) -> dict:
        emb, mask = batch["text_emb"], batch["text_mask"]
        pad = self.max_text_len - emb.shape[1]
        if pad <= 0:
            return batch
        return {**batch, "text_emb": torch.nn.functional.pad(emb, (0, 0, 0, pad)),
                "text_mask": torch.nn.functional.pad(mask, (0, pad), value=False)}


class Conditioning:
    """The denoiser's keyword arguments for a batch: the caption (dropped at `caption_dropout` in
    training, for classifier-free guidance) and the conditions the model measures on the clean clip;
    and the weights of the auxiliary losses the model returns in training (`aux_weights`, from
    model.conditioning.aux_loss_weights), which `denoiser` collects."""

    def __init__(self, device: torch.device, caption_dropout: float = 0.0,
                 from_clip: Sequence[ClipCondition] = (), aux_weights: Mapping[str, float] | None = None):
        self.device = device
        self.caption_dropout = caption_dropout
        self.from_clip = tuple(from_clip)
        self.aux_weights = dict(aux_weights or {})

    def text(self, batch: dict, drop_captions: bool = False) -> dict:
        """Caption embeddings and mask on the device; `drop_captions` draws from the training RNG."""
        dev = self.device
        emb = batch["text_emb"].to(dev, non_blocking=True)
        mask = batch["text_mask"].to(dev, non_blocking=True).bool()
        if drop_captions and self.caption_dropout > 0:
            drop = torch.rand(mask.shape[0]) < self.caption_dropout
            mask = mask & ~drop.to(dev)[:, None]  # an all-False row = the model's null embedding
        return {"text_emb": emb, "text_mask": mask, "num_video_frames": int(batch["num_video_frames"])}

    def for_training(self, batch: dict, x: torch.Tensor, drop_captions: bool = True) -> dict:
        """Captions (with dropout unless `drop_captions` is False: validation), then each clip condition
        measured on `x` (the clean batch trained on) or read from the batch."""
        cond = self.text(batch, drop_captions=drop_captions)
        for measure in self.from_clip:
            cond.update(measure(batch, x, cond))
        return cond

    def denoiser(self, forward: Callable) -> AuxLosses:
        """`forward` as a denoiser for the diffusion loss that keeps the model's auxiliary losses."""
        return AuxLosses(forward, self.aux_weights)


class AuxLosses:
    """A denoiser around the model's forward that keeps the auxiliary losses the model returns next to
    its output (`return_aux_losses=True`; asked only when there are weights, so a model without such
    losses is called as before). `weighted()` is what the step adds to the diffusion loss, inside the
    same division by grad_accum and the same loss scaling; `values` are logged unweighted."""

    def __init__(self, forward: Callable, weights: Mapping[str, float]):
        self.forward, self.weights = forward, dict(weights)
        self.losses: dict[str, torch.Tensor] = {}

    def __call__(self, z: torch.Tensor, logsnr: torch.Tensor, **cond) -> torch.Tensor:
        if not self.weights:
            return self.forward(z, logsnr, **cond)
        out, self.losses = self.forward(z, logsnr, return_aux_losses=True, **cond)
        unknown = sorted(set(self.losses) - set(self.weights))
        if unknown:
            raise KeyError(f"the model returned auxiliary losses {unknown} with no weight "
                           f"(model.conditioning.aux_loss_weights names {sorted(self.weights)})")
        return out

    def weighted(self) -> torch.Tensor | float:
        """sum of weight x loss over the losses of the last forward (0.0 when none)."""
        return sum((self.weights[name] * loss.float() for name, loss in self.losses.items()), 0.0)

    def values(self) -> dict[str, float]:
        """The last forward's auxiliary losses, unweighted (one device sync each; the step logs them)."""
        return {name: float(loss.detach()) for name, loss in self.losses.items()}
