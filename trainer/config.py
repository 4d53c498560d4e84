"""The training config (`python -m trainer.train --config configs/X.yaml --set a.b=v`).

Sections map 1:1 to YAML top-level keys in configs/*.yaml; each section's schema lives next to what
it configures (model/config.py, data_pipeline/loader_config.py) and the machinery that reads YAML and
overrides in common/config.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from data_pipeline.loader_config import DataConfig
from model.config import DiffusionConfig, SamplingConfig, UNetConfig


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 1000
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    grad_accum: int = 1


@dataclass
class ParallelConfig:
    strategy: Literal["single", "ddp", "fsdp", "deepspeed"] = "single"
    zero_stage: int = 2  # deepspeed only: 1, 2 or 3
    deepspeed_config: str = ""  # optional JSON (configs/deepspeed/*.json) merged under our settings
    offload_optimizer: bool = False  # deepspeed: ZeRO optimizer offload to CPU
    backend: str = ""  # "" = nccl when CUDA is available, else gloo


@dataclass
class RunConfig:
    out_dir: str = "runs/default"  # checkpoints/, tb/, samples/ live here; rerun = resume
    steps: int = 1000
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    seed: int = 0
    ema_decay: float = 0.9999
    caption_dropout: float = 0.1  # share of captions replaced by the null embedding (CFG)
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3
    # write checkpoints in background threads: the step waits only for a CPU copy of the state, the
    # checkpoint becomes the latest once every rank's files are written (a kill before that leaves
    # the previous one); costs one extra copy of this rank's model/optimizer/EMA state in host memory
    async_save: bool = False
    # before each save the free space under out_dir/checkpoints is compared with the last checkpoint's
    # size: "stop" ends the run (exit 74, EXIT_DISK_FULL) before half a checkpoint is written, "warn"
    # logs it and tries anyway (a failed write stops the run with the same message)
    on_low_disk: Literal["stop", "warn"] = "stop"
    # resume, trainer.export and trainer.evaluate check every checkpoint file's size (always) and its
    # CRC-32 (when true) against trainer_state.json before loading (trainer/checkpoint_verify.py)
    verify_checkpoints: bool = True
    # a damaged latest checkpoint: false = resume from the newest one that verifies (with a warning),
    # true = refuse to start, naming the damaged file
    resume_strict: bool = False
    val_every: int = 0  # 0 = never
    val_batches: int = 4
    sample_every: int = 0  # 0 = never
    sample_prompts: list[str] = field(default_factory=list)
    # sampling steps of the periodic TensorBoard samples (and of evaluation when eval.steps is 0);
    # trainer.sample uses sampling.steps (model/config.py SamplingConfig says which applies when)
    sample_steps: int = 64
    max_nonfinite_in_row: int = 5  # then roll back to the last checkpoint
    text_encoder: str = ""  # encoder for sample prompts (name or local path); "" = from the shards' index
    # warm start: an exported .safetensors (or a single/ddp checkpoint) whose EMA weights become this
    # run's initial model and EMA; optimizer, step and data order start afresh. Ignored once the run
    # has its own checkpoint (a rerun resumes from that).
    init_from: str = ""
    eval_every: int = 0  # 0 = never; else the `eval:` section runs on the EMA weights every this many steps
    # peak dense TFLOP/s of one device at this run's precision, for perf/mfu. 0 = look the device up in
    # trainer.perf.PEAK_TFLOPS (H100/H200/A100/L40S/MI300X); CPUs and unknown devices need it set, else
    # MFU is not logged (model TFLOP/s still is)
    peak_tflops: float = 0.0
    # start-up check that the loader keeps up: this many batches drawn from a second, throw-away loader
    # are timed and compared with the step's consumption after the first log interval (a starved GPU is
    # flagged). -1 = 8 on CUDA, off on CPU; 0 = off
    loader_probe_batches: int = -1
    # log the plan of this run's own setting (python -m trainer.plan, computed in a subprocess at start)
    # beside what the run measures, at the first log after it is ready. -1 = on CUDA, off on CPU; 0 = off;
    # 1 = on. planned_mfu: the utilisation the plan assumes for its step time
    plan_at_start: int = -1
    planned_mfu: float = 0.4
    # regional torch.compile: each block's forward compiled once per distinct shape in the first step
    # (trainer/compile.py); compile time and any recompilation are logged. Off by default: on CPU it
    # costs minutes of compilation for no gain (see issue 11); on GPUs it fuses norms/activations/FiLM
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend ("aot_eager" compiles no kernels: tests)
    compile_mode: str = ""  # torch.compile mode ("" = default, "max-autotune-no-cudagraphs", ...)
    # extra code hooked into the loop: "package.module:ClassName" of trainer.callbacks.Callback subclasses
    callbacks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.peak_tflops < 0:
            raise ValueError(f"run.peak_tflops must be >= 0 (0 = from the device table), got {self.peak_tflops}")


@dataclass
class EvalConfig:
    """What `run.eval_every` and `python -m trainer.evaluate` measure, on the EMA weights.

    Both metrics sample with the `sampling:` section (steps: `steps`, or `run.sample_steps`).
    """

    # sample every colour x direction prompt of the synthetic captions ("a red square moving right")
    # `seeds` times and read colour, shape and direction back from the pixels (data_pipeline.synthetic_reader);
    # only meaningful for models trained on data_pipeline.synthetic videos
    synthetic: bool = False
    seeds: int = 2
    # also extend each synthetic prompt to 2x the clip length (reconstruction guidance) and score the
    # direction of motion after the window boundary
    extension: bool = False
    # also sample every colour x motion kind (directions, growing, shrinking, turning either way:
    # data_pipeline.synthetic.make_motion_kind_videos) and read the kind back (eval/kinds_motion_acc, ...)
    motion_kinds: bool = False
    # FVD: a TorchScript I3D feature extractor (local path or http(s) URL, downloaded once into
    # $VDM_CACHE or ~/.cache/vdm/fvd); "" = no FVD. Real clips and their captions come from data.val_shards.
    fvd_detector: str = ""
    fvd_clips: int = 256  # real clips (the first ones of data.val_shards) and as many generated for their captions
    steps: int = 0  # sampling steps; 0 = run.sample_steps
    batch_size: int = 32  # clips sampled per forward
    seed: int = 0  # noise seed of the generated clips (logged with the scores)
    # conditional generation scored on held-out clips of data.val_shards (trainer/conditional_eval.py):
    # any of predict, interpolate, upsample; PSNR/SSIM against the clip and the task's baseline, FVD with
    # fvd_detector
    tasks: list[str] = field(default_factory=list)
    task_clips: int = 16  # held-out clips per task (the first ones of data.val_shards)
    observed_frames: int = 0  # predict: frames observed (0 = half a clip)
    interpolate_factor: int = 2  # interpolate: every factor-th frame observed
    upsample_factor: int = 2  # upsample: observed at 1/factor of the model's size
    task_captions: bool = True  # condition on each held-out clip's caption (false: no caption)
    # read colour and direction of the completed clips against the truth's (data_pipeline.synthetic_reader):
    # only meaningful for data_pipeline.synthetic videos
    task_reader: bool = False

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in ("predict", "interpolate", "upsample")]
        if unknown:
            raise ValueError(f"eval.tasks: {unknown} not among predict, interpolate, upsample")


@dataclass
class TrainConfig:
    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
