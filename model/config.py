"""Model and diffusion settings as typed dataclasses (the `model:` and `diffusion:` config sections).

Kept apart from the modules that use them so that configs, the trainer and the CLIs can read and
validate settings without building a network.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from common.config import warn_renamed


@dataclass
class UNetConfig:
    """SpaceTimeUNet shape. Defaults are the paper's small text-to-video model (16x64x64)."""

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mults: tuple[int, ...] = (1, 2, 4, 8)
    num_res_blocks: int = 2
    image_size: int = 64  # spatial side of the input; attention placement is derived from it
    attention_resolutions: tuple[int, ...] = (32, 16, 8)  # feature-map sides (px) with attention
    head_dim: int = 64
    cond_dim: int = 1024  # conditioning embedding (timestep/log-SNR + pooled text)
    text_dim: int = 1024  # width of the text encoder's token embeddings (BERT-large: 1024)
    cross_attention: bool = True  # text cross-attention inside the attention blocks
    dropout: float = 0.0
    groups: int = 32  # GroupNorm groups (clipped to divide the channel count)
    rel_pos_buckets: int = 32  # T5-style relative position buckets for temporal attention
    rel_pos_max_distance: int = 64
    # relative position embeddings added to the temporal attention's values as well (Shaw et al. 2018),
    # not only a bias on its weights: lets the model tell forward from backward motion (docs/model.md)
    rel_pos_values: bool = False
    # add an embedding of the frame index to each video frame's conditioning (docs/model.md, "Learning
    # the direction of motion"): without it the frames of pure noise are exchangeable and the sign of
    # the captioned motion is left to chance
    frame_position_embedding: bool = False
    # kernel (frames) of a residual temporal convolution after every residual block; 0 = none (the paper's
    # pure 1x3x3 + attention design). Lets a small model learn the direction of motion (docs/model.md)
    temporal_conv_kernel: int = 0
    # condition every video frame on the clip's global motion (measured in training, predicted from the
    # caption at sampling; model/motion.py, docs/motion.md): how a small model learns the captioned
    # direction of motion. motion_scale maps the measured motion (share of the frame crossed per clip,
    # relative zoom, radians turned) to O(1). motion_loss_weight: the weight of the caption->motion
    # head's regression loss (train/motion_loss) added to the diffusion loss
    motion_conditioning: bool = False
    motion_scale: float = 7.0
    motion_loss_weight: float = 1.0
    # caption x frame position without a measured motion (docs/motion.md, "A general network"): "cross" adds a
    # learned embedding of the frame index to the queries of the text cross-attention, so each frame reads the
    # caption tokens in its own way (the product the plain network lacks); "none" = the plain network
    frame_text_attention: Literal["none", "cross"] = "none"
    # activation checkpointing (docs/model.md, "Activation checkpointing"): which blocks keep only their
    # inputs in forward and recompute the rest in backward. none | all (every block) | attention (the
    # SpaceTimeAttention blocks) | resblocks (the ResBlocks) | every_k (1 block in checkpoint_every_k, in
    # forward order) | selective (every block, but matmul/conv/SDPA outputs are kept: only the cheap
    # elementwise ops, norms and activations are recomputed)
    checkpoint_policy: Literal["none", "all", "attention", "resblocks", "every_k", "selective"] = "none"
    checkpoint_every_k: int = 2
    # the old switch: true = checkpoint_policy "all" (read with a RenamedWarning)
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.gradient_checkpointing:
            if self.checkpoint_policy not in ("none", "all"):
                raise ValueError(f"model.gradient_checkpointing=true and model.checkpoint_policy="
                                 f"{self.checkpoint_policy!r} disagree; gradient_checkpointing is the old form of "
                                 f"checkpoint_policy: all, keep only checkpoint_policy")
            warn_renamed("model.gradient_checkpointing: true", "model.checkpoint_policy: all",
                         "more policies than on/off", stacklevel=4)
        if self.checkpoint_every_k < 1:
            raise ValueError(f"model.checkpoint_every_k must be >= 1, got {self.checkpoint_every_k}")
        if self.motion_loss_weight < 0:
            raise ValueError(f"model.motion_loss_weight must be >= 0, got {self.motion_loss_weight}")

    @property
    def activation_checkpointing(self) -> str:
        """The policy in effect: `checkpoint_policy`, or "all" when only the old switch is on (a config
        may also be edited after construction, as tests and scripts do, so this is read at use)."""
        if self.checkpoint_policy == "none" and self.gradient_checkpointing:
            return "all"
        return self.checkpoint_policy


@dataclass
class DiffusionConfig:
    """Continuous-time Gaussian diffusion (paper section 2).

    The one source of the diffusion settings a user configures; `GaussianDiffusion.from_config`
    builds the diffusion of every run, CLI and checkpoint from it, and `GaussianDiffusion`'s own keyword
    defaults for the λ range, loss weighting and shift are these fields. `prediction` defaults to
    "eps" here (the paper's text-to-video setting, like every default of this module's dataclasses);
    `GaussianDiffusion` itself has no default for it, so a direct caller always names it.
    """

    prediction: Literal["eps", "v", "x"] = "eps"
    logsnr_min: float = -20.0
    logsnr_max: float = 20.0
    # "eps_mse": ||eps - eps_hat||^2 (paper's default for eps-prediction);
    # "v_mse": ||v - v_hat||^2 = (1 + SNR) ||x - x_hat||^2; "x_mse": ||x - x_hat||^2.
    loss_weighting: Literal["eps_mse", "v_mse", "x_mse"] = "eps_mse"
    # shifted cosine schedule (Hoogeboom et al. 2023): λ(t) + shift, in training and sampling alike;
    # negative = more time at low SNR, where a clip's layout and motion are decided
    logsnr_shift: float = 0.0


# The samplers of model.sampling.sample, listed once: the config's Literal, the tuple the library and
# the CLIs' --sampler choices read (typing.get_args of it)
SamplerName = Literal["ancestral", "ddim", "pc"]
SAMPLERS: tuple[str, ...] = typing.get_args(SamplerName)


@dataclass
class SamplingConfig:
    """Defaults for sampling during training and in `trainer.sample` (paper: 256 steps, gamma 0.3).

    The one source of the sampling defaults: `model.sampling.sample` and `extend`,
    `model.guidance.frame_guide` and `trainer.generate.generate` take theirs from these fields, and
    the CLIs fill unset flags from the loaded config's section. One deliberate exception, `clip_x`:
    `sample()` is the exact sampler (the closed-form Gaussian tests check it unclipped), so it clips
    x̂ only when asked (`clip_x=False` there); clipping to the data range [-1, 1] is a policy of the
    callers that make images and videos, and this config turns it on for them (`generate`, the
    training samples, `trainer.sample`, `trainer.evaluate`): with ε-prediction the 1/α at high noise
    otherwise gives huge x̂.

    Three step counts, each for its own use: `sampling.steps` is what a user's sampling takes
    (`python -m trainer.sample`, whose --steps overrides it; the paper's 256); `run.sample_steps` is
    for the samples a run writes to TensorBoard while it trains (cheaper, every `run.sample_every`);
    `eval.steps` is for evaluation, in the loop (`run.eval_every`) and `python -m trainer.evaluate`
    (0 = `run.sample_steps`, so a run's evaluations cost what its samples do). Everything else (the
    sampler, gamma, guidance) comes from this section in all three.
    """

    sampler: SamplerName = "ancestral"
    steps: int = 256
    gamma: float = 0.3
    langevin_delta: float = 0.1
    guidance_weight: float = 0.0
    clip_x: bool = True
    # reconstruction guidance weight w_r (eqs. 7/8) when extending videos window by window
    reconstruction_weight: float = 4.0

    # old keys still read, with a RenamedWarning (common.config.from_dict and --set): old -> new
    RENAMED: ClassVar[dict[str, str]] = {"guide_weight": "reconstruction_weight"}
    RENAMED_WHY: ClassVar[str] = "guide_weight read like guidance_weight, the classifier-free guidance weight"

    def with_overrides(self, **values: Any) -> SamplingConfig:
        """A copy with the given fields replaced; a None value keeps this config's (an unset CLI flag)."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})

    def sample_kwargs(self) -> dict[str, Any]:
        """The keywords of `model.sampling.sample` this config sets, its clipping policy included."""
        return dict(sampler=self.sampler, steps=self.steps, gamma=self.gamma, langevin_delta=self.langevin_delta,
                    guidance_weight=self.guidance_weight, clip_x=self.clip_x)
