"""Plan a run before launching it: per-rank memory by strategy x checkpoint policy, the largest
micro-batch that fits, step and epoch time at an assumed utilisation, and the data side.

    python -m trainer.plan --config configs/vdm_t2v_large_16x64.yaml --gpus 64 [--gpus-per-node 8]
        [--gpu-memory-gb 80] [--peak-tflops 989] [--mfu 0.4] [--videos 10000000] [--only-config] [--json]

Where each number comes from (every memory part says so in `sources`):
- single/DDP and FSDP2 memory: the real model, the real strategy's setup() and two optimizer steps run
  on fake tensors at the target world size (trainer.memory_sim). DDP adds its gradient buckets.
- DeepSpeed ZeRO 1/2/3 model states: computed with the ZeRO paper's accounting (the split behind
  DeepSpeed's own estimate_zero2/3_model_states_mem_needs, which the tests check the totals against),
  buckets from the DeepSpeed config; activations from the simulated step of the unwrapped model.
- Activations: simulated on the unwrapped model for each checkpoint policy at the config's micro-batch
  (and at twice it, or at 1, for the slope the largest micro-batch is searched along).
- Reserve: what torch's allocator and the CUDA/NCCL context take beyond live tensors (computed:
  `ALLOCATOR_SHARE` of the peak plus `CONTEXT_GIB`).
- Time: FLOPs counted on the meta device (trainer.perf). `--mfu` is taken as the share of the peak the
  GPU sustains on the work it executes, recompute included, so a checkpoint policy costs its recompute
  in time; the MFU column is then model FLOPs / hardware FLOPs x --mfu.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field

from common.config import load_config
from trainer.config import TrainConfig
from trainer.memory_sim import MemoryBreakdown, simulate_step

GiB = 2**30
ALLOCATOR_SHARE = 0.10  # caching-allocator fragmentation, as a share of the live peak (computed)
CONTEXT_GIB = 1.5  # CUDA context, cuBLAS/cuDNN workspaces and NCCL buffers per rank (computed)
POLICIES = ("none", "selective", "attention", "resblocks", "every_k", "all")
STRATEGIES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
DEEPSPEED_DEFAULTS = {"reduce_bucket_size": 5e8, "stage3_param_persistence_threshold": 1e5}  # DeepSpeed's


@dataclass
class PlanRow:
    strategy: str  # ddp | fsdp | zero1 | zero2 | zero3
    policy: str
    micro_batch: int
    memory: MemoryBreakdown  # at micro_batch
    reserve: int
    budget: int  # bytes of device memory per rank
    max_micro_batch: int  # the largest that fits (0: not even 1)
    model_flops_per_sample: int
    hardware_flops_per_sample: int
    step_seconds: float  # one optimizer step (grad_accum micro-steps) at the assumed utilisation
    clips_per_second: float  # whole job
    epoch_hours: float
    gpu_hours_per_epoch: float
    mfu: float
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.memory.peak + self.reserve

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["memory"] = self.memory.as_dict()
        d.update(total=self.total, fits=self.fits)
        return d


# ------------------------------------------------------------------------------ DeepSpeed (computed)
def deepspeed_states(sizes: list[int], world: int, stage: int, precision: str,
                     ds_config: dict | None = None) -> MemoryBreakdown:
    """ZeRO model states per rank for parameters of `sizes` elements: the ZeRO paper's accounting as
    DeepSpeed's estimators use it (16-bit: 2 bytes of parameters, and per partitioned element 2 of
    16-bit and 4 of fp32 gradients, 4 of fp32 master weights, 8 of AdamW moments; ZeRO-3 drops the
    16-bit gradients), with what measurement here added: an fp32 run keeps the fp32 master partition
    and the fp32 gradient partition as well, and ZeRO-3 keeps parameters of at most
    `stage3_param_persistence_threshold` elements whole on every rank. ZeRO-1 partitions the optimizer
    state, ZeRO-2 the gradients too, ZeRO-3 the parameters too. The trainer's EMA is fp32 over the
    parameters a rank holds. Buckets (comm) come from the DeepSpeed config (defaults: DeepSpeed's).
    Activations are filled in by the caller."""
    w = 2 if precision in ("bf16", "fp16") else 4
    zero = (ds_config or {}).get("zero_optimization") or {}
    get = lambda k: float(zero.get(k, DEEPSPEED_DEFAULTS.get(k, 0)))  # noqa: E731
    part = lambda n: int(math.ceil(n / world))  # noqa: E731
    params = sum(sizes)
    persistent = sum(n for n in sizes if n <= get("stage3_param_persistence_threshold")) if stage == 3 else 0
    held = params if stage < 3 else part(params - persistent) + persistent  # parameter elements on a rank
    gradients = (w * (params if stage == 1 else part(params)) if stage < 3 else 0) + 4 * part(params)
    # measured (trainer.memory_probe, 2 gloo ranks): every stage allocates one gradient bucket of
    # reduce_bucket_size elements up front, whatever the model's size; nothing else of its buckets
    comm = int(w * get("reduce_bucket_size"))
    why = f"computed: ZeRO-{stage} accounting (DeepSpeed's estimators, checked against measurement)"
    return MemoryBreakdown(parameters=w * held, gradients=gradients, optimizer=12 * part(params), ema=4 * held,
                           activations=0, comm=comm,
                           sources={"parameters": why, "gradients": why, "optimizer": why, "ema": why,
                                    "comm": "computed: DeepSpeed's reduce_bucket_size (its config or default)",
                                    "activations": "simulated (unwrapped model)"})


def deepspeed_estimator_total(params: int, world: int, stage: int, largest_layer: int = 0) -> int:
    """DeepSpeed's own GPU estimate of ZeRO-2/3 model states (16-bit, no offload), for comparison."""
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, gpu, _ = estimate_zero3_model_states_mem_needs(params, largest_layer, num_gpus_per_node=world,
                                                         cpu_offload=False, cpu_offload_params=False)
        return int(gpu)
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    _, gpu = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=world, cpu_offload=False)
    return int(gpu)


# ------------------------------------------------------------------------------ the planner
@dataclass
class PlanInputs:
    gpus: int
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    peak_tflops: float = 989.0
    mfu: float = 0.4
    videos: int = 10_000_000
    only_config: bool = False
    # the data side (data_pipeline.capacity): calibration JSON ("" = the shipped default), sharding cluster
    calibration: str = ""
    shard_nodes: int = 0  # 0 = as many nodes as the training job has
    shard_cores_per_node: int = 64
    embed_captions_per_s_per_gpu: float = 0.0  # 0 = text embedding planned on the shard nodes' CPUs
    mean_tokens: float = 0.0  # 0 = the calibration's captions


def variant(cfg: TrainConfig, strategy: str | None = None, policy: str | None = None) -> TrainConfig:
    """`cfg` with a strategy (a plan name: zeroN = deepspeed at ZeRO stage N) and a checkpoint policy."""
    parallel = cfg.parallel
    if strategy is not None:
        name, stage = ("deepspeed", int(strategy[4:])) if strategy.startswith("zero") else (strategy, None)
        parallel = dataclasses.replace(parallel, strategy=name, zero_stage=stage or parallel.zero_stage)
    model = cfg.model if policy is None else dataclasses.replace(cfg.model, checkpoint_policy=policy,
                                                                  gradient_checkpointing=False)
    return dataclasses.replace(cfg, parallel=parallel, model=model)


def _config_strategy(cfg: TrainConfig) -> str:
    s = cfg.parallel.strategy
    if s == "deepspeed":
        return f"zero{cfg.parallel.zero_stage}"
    return "ddp" if s == "single" else s


class Planner:
    """Runs the simulations a plan needs once each and combines them per strategy x policy."""

    def __init__(self, cfg: TrainConfig, inputs: PlanInputs, log=print):
        self.cfg, self.inputs, self.log = cfg, inputs, log
        self.text_len = cfg.data.max_text_len
        self._sims: dict[tuple, MemoryBreakdown] = {}

    def _sim(self, strategy: str, policy: str, batch: int, states: bool = True) -> MemoryBreakdown:
        """A simulated step, cached. `states=False`: forward and backward only (activations); a cached
        whole step serves such a request too."""
        key = (strategy, policy, batch)
        if key not in self._sims and not states and key + ("activations",) in self._sims:
            return self._sims[key + ("activations",)]
        if key not in self._sims:
            t0 = time.perf_counter()
            world = self.inputs.gpus if strategy == "fsdp" else 1
            step = simulate_step(variant(self.cfg, strategy, policy), world, batch, self.text_len, states=states)
            if not states:
                key = key + ("activations",)
            self._sims[key] = step.breakdown
            self.log(f"[plan] simulated {strategy} x {world}, policy {policy}, micro-batch {batch}: peak "
                     f"{step.breakdown.peak / GiB:.2f} GiB ({time.perf_counter() - t0:.1f} s)")
        return self._sims[key]

    def activations(self, policy: str, batch: int) -> int:
        """Activations of the unwrapped model under `policy` at `batch`: simulated at the config's
        micro-batch b0, and linear from there (slope from b0 to 2 b0; below b0, from 1 to b0). Not
        from micro-batch 1 up: at small batches the peak is set by single large temporaries (a block's
        recompute, the text projection), so the first clips cost less than the later ones."""
        b0 = self.cfg.data.batch_size
        a0 = self._sim("single", policy, b0, states=False).activations
        if batch == b0:
            return a0
        if batch > b0:
            slope = (self._sim("single", policy, 2 * b0, states=False).activations - a0) / b0
            return int(a0 + (batch - b0) * slope)
        a1 = self._sim("single", policy, 1, states=False).activations
        return int(a1 + (batch - 1) * (a0 - a1) / max(b0 - 1, 1))

    def memory(self, strategy: str, policy: str, batch: int) -> MemoryBreakdown:
        cfg_policy = self.cfg.model.activation_checkpointing
        if strategy == "ddp":  # the whole step first: its activations serve `activations` too
            self._sim("single", cfg_policy, self.cfg.data.batch_size)
        acts = self.activations(policy, batch)
        if strategy == "fsdp":
            b0 = self.cfg.data.batch_size
            sim = self._sim("fsdp", cfg_policy, b0)
            # FSDP's own activation overhead (mixed-precision casts at unit boundaries) at the config policy
            extra = sim.activations - self._sim("single", cfg_policy, b0, states=False).activations
            m = dataclasses.replace(sim, activations=max(0, acts + extra), sources=dict(sim.sources))
            if policy != cfg_policy or batch != b0:
                m.sources["activations"] = "simulated (unwrapped model at this policy, scaled to the micro-batch)"
            return m
        if strategy == "ddp":
            sim = self._sim("single", cfg_policy, self.cfg.data.batch_size)
            buckets = sim.gradients if self.inputs.gpus > 1 else 0  # one process runs unwrapped
            m = dataclasses.replace(sim, activations=acts, comm=buckets, sources=dict(sim.sources))
            m.sources["comm"] = "computed: DDP gradient buckets (one copy of the gradients)"
            if batch != self.cfg.data.batch_size:
                m.sources["activations"] = "simulated (at this policy, scaled to the micro-batch)"
            return m
        m = deepspeed_states(self._param_sizes(), self.inputs.gpus, int(strategy[-1]), self.cfg.run.precision,
                             self._ds_config())
        return dataclasses.replace(m, activations=acts)

    def _ds_config(self) -> dict:
        from trainer.strategies.deepspeed import load_json_config

        return load_json_config(self.cfg.parallel.deepspeed_config)

    def parameter_count(self) -> int:
        return sum(n for n in self._param_sizes())

    def _param_sizes(self) -> list[int]:
        if not hasattr(self, "_sizes"):
            import torch

            from model.unet import SpaceTimeUNet

            with torch.device("meta"):
                self._sizes = [p.numel() for p in SpaceTimeUNet(self.cfg.model).parameters()]
        return self._sizes

    def flops_per_sample(self, policy: str) -> tuple[int, int]:
        from trainer.perf import BatchGeometry, count_step_flops

        d = self.cfg.data
        g = BatchGeometry(batch=1, frames=d.num_frames + d.num_image_frames, num_video_frames=d.num_frames,
                          height=d.image_size, width=d.image_size, text_len=self.text_len)
        if not hasattr(self, "_flops"):
            self._flops: dict[str, int] = {}
        for p in ("none", policy):
            if p not in self._flops:
                self._flops[p] = count_step_flops(self.cfg.model, g, p)
        return self._flops["none"], self._flops[policy]

    def row(self, strategy: str, policy: str) -> PlanRow:
        inp, cfg = self.inputs, self.cfg
        batch = cfg.data.batch_size
        budget = int(inp.gpu_memory_gb * 1e9)
        m = self.memory(strategy, policy, batch)

        def total(mem: MemoryBreakdown) -> int:
            return mem.peak + reserve(mem.peak)

        max_b = 0
        if total(self.memory(strategy, policy, 1)) <= budget:
            lo, hi = 1, max(2, batch)
            while total(self.memory(strategy, policy, hi)) <= budget and hi < 4096:
                lo, hi = hi, hi * 2
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if total(self.memory(strategy, policy, mid)) <= budget else (lo, mid)
            max_b = lo
        model_f, hw_f = self.flops_per_sample(policy)
        accum = cfg.optim.grad_accum
        step = accum * batch * hw_f / (inp.mfu * inp.peak_tflops * 1e12)
        clips_s = inp.gpus * accum * batch / step
        epoch_h = inp.videos / clips_s / 3600
        return PlanRow(strategy=strategy, policy=policy, micro_batch=batch, memory=m, reserve=reserve(m.peak),
                       budget=budget, max_micro_batch=max_b, model_flops_per_sample=model_f,
                       hardware_flops_per_sample=hw_f, step_seconds=step, clips_per_second=clips_s,
                       epoch_hours=epoch_h, gpu_hours_per_epoch=epoch_h * inp.gpus, mfu=inp.mfu * model_f / hw_f)

    def rows(self) -> list[PlanRow]:
        if self.inputs.only_config:
            combos = [(_config_strategy(self.cfg), self.cfg.model.activation_checkpointing)]
        else:
            combos = [(s, p) for s in STRATEGIES for p in POLICIES]
        return [self.row(s, p) for s, p in combos]


def reserve(peak: int) -> int:
    return int(ALLOCATOR_SHARE * peak + CONTEXT_GIB * GiB)


# Gradient/parameter traffic per step relative to DDP's all-reduce (2x the gradients): ZeRO-1/2 move the
# same (reduce-scatter + all-gather); FSDP2 and ZeRO-3 gather the parameters again for backward (1.5x).
# The planner does not time communication; among settings of equal compute it prefers less traffic.
COMM_VOLUME = {"ddp": 1.0, "zero1": 1.0, "zero2": 1.0, "fsdp": 1.5, "zero3": 1.5}


def recommend(rows: list[PlanRow], cfg: TrainConfig) -> tuple[PlanRow | None, str]:
    """The fastest row that fits at the config's micro-batch (ties: less communication, then less
    memory); or why none does."""
    fitting = [r for r in rows if r.fits]
    if fitting:
        best = min(fitting, key=lambda r: (round(r.step_seconds, 6), COMM_VOLUME[r.strategy], r.total))
        why = (f"fits at micro-batch {best.micro_batch} ({best.total / GiB:.1f} of {best.budget / GiB:.1f} GiB) "
               f"with the least recompute ({best.hardware_flops_per_sample / best.model_flops_per_sample - 1:.0%} "
               f"extra FLOPs), and among equally fast settings the least communication "
               f"({COMM_VOLUME[best.strategy]:g}x DDP's traffic), then memory")
        return best, why
    some = [r for r in rows if r.max_micro_batch > 0]
    if some:
        best = max(some, key=lambda r: (r.max_micro_batch, -r.step_seconds))
        accum = math.ceil(cfg.data.batch_size / best.max_micro_batch)
        return best, (f"nothing fits at micro-batch {cfg.data.batch_size}; {best.strategy} with policy {best.policy} "
                      f"fits {best.max_micro_batch}: set data.batch_size={best.max_micro_batch} and "
                      f"optim.grad_accum={accum} to keep the global batch")
    worst = min(rows, key=lambda r: r.total)
    parts = {k: getattr(worst.memory, k) for k in ("parameters", "gradients", "optimizer", "ema", "activations",
                                                  "comm")}
    big = max(parts, key=parts.get)
    return None, (f"nothing fits even at micro-batch 1: the smallest plan ({worst.strategy}, {worst.policy}) needs "
                  f"{worst.total / GiB:.1f} GiB, most of it {big} ({parts[big] / GiB:.1f} GiB); use more GPUs with "
                  f"fsdp/zero3 (model states divide by the world size), a smaller model, or fewer frames")


# ------------------------------------------------------------------------------ output
def _gib(b: int) -> str:
    return f"{b / GiB:.1f}" if b >= GiB / 10 or b == 0 else f"{b / GiB:.3f}"


def table(rows: list[PlanRow]) -> str:
    head = ("| strategy | policy | params | grads | optim | EMA | activations | comm | reserve | total GiB | fits "
            "| max micro-batch | step s | clips/s | epoch h | GPU-h/epoch | MFU |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        m = r.memory
        lines.append(f"| {r.strategy} | {r.policy} | {_gib(m.parameters)} | {_gib(m.gradients)} | {_gib(m.optimizer)} "
                     f"| {_gib(m.ema)} | {_gib(m.activations)} | {_gib(m.comm)} | {_gib(r.reserve)} | {_gib(r.total)} "
                     f"| {'yes' if r.fits else 'NO'} | {r.max_micro_batch} | {r.step_seconds:.3g} "
                     f"| {r.clips_per_second:.4g} | {r.epoch_hours:.3g} | {r.gpu_hours_per_epoch:.4g} | {r.mfu:.2f} |")
    return "\n".join(lines)


def plan(cfg: TrainConfig, inputs: PlanInputs, log=print) -> tuple[dict, list[PlanRow]]:
    planner = Planner(cfg, inputs, log)
    rows = planner.rows()
    best, why = recommend(rows, cfg)
    out = {"config": {"model_parameters": planner.parameter_count(), "micro_batch": cfg.data.batch_size,
                      "grad_accum": cfg.optim.grad_accum,
                      "global_batch": cfg.data.batch_size * cfg.optim.grad_accum * inputs.gpus,
                      "precision": cfg.run.precision, "clip": [cfg.data.num_frames, cfg.data.num_image_frames,
                                                                cfg.data.image_size]},
           "inputs": dataclasses.asdict(inputs), "rows": [r.as_dict() for r in rows],
           "recommended": None if best is None else {"strategy": best.strategy, "policy": best.policy},
           "why": why, "assumptions": {"allocator_share": ALLOCATOR_SHARE, "context_gib": CONTEXT_GIB}}
    row = best or next((r for r in rows if (r.strategy, r.policy) == (_config_strategy(cfg),
                                                                      cfg.model.activation_checkpointing)), rows[0])
    data = plan_data_side(cfg, inputs, row.clips_per_second / inputs.gpus)
    out["data"] = data.as_dict()
    out["data_lines"] = data.lines()
    return out, rows


def plan_data_side(cfg: TrainConfig, inputs: PlanInputs, clips_per_s_per_gpu: float):
    """Storage, sharding time and loader cores (data_pipeline.capacity) at the planned step rate."""
    from data_pipeline.capacity import load_calibration, plan_data

    cal = load_calibration(inputs.calibration or None)
    nodes = inputs.shard_nodes or max(1, math.ceil(inputs.gpus / inputs.gpus_per_node))
    return plan_data(cal, videos=inputs.videos, frames=cfg.data.num_frames, height=cfg.data.image_size,
                     width=cfg.data.image_size, text_dim=cfg.model.text_dim, clips_per_s_per_gpu=clips_per_s_per_gpu,
                     gpus=inputs.gpus, shard_nodes=nodes, shard_cores_per_node=inputs.shard_cores_per_node,
                     mean_tokens=inputs.mean_tokens or None, shard_gpus_per_node=inputs.gpus_per_node,
                     embed_captions_per_s_per_gpu=inputs.embed_captions_per_s_per_gpu or None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gb", type=float, default=80.0)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak per GPU at the run's precision")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--videos", type=int, default=10_000_000, help="clips per epoch")
    p.add_argument("--only-config", action="store_true", help="only the config's strategy and checkpoint policy")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--calibration", default="", help="JSON of python -m data_pipeline.calibrate (default: shipped)")
    p.add_argument("--shard-nodes", type=int, default=0, help="nodes sharding the data (default: the job's)")
    p.add_argument("--shard-cores-per-node", type=int, default=64)
    p.add_argument("--embed-captions-per-s-per-gpu", type=float, default=0.0,
                   help="text-encoder throughput per GPU while sharding (default: embed on CPU cores)")
    p.add_argument("--mean-tokens", type=float, default=0.0, help="caption tokens (default: the calibration's)")
    a = p.parse_args(argv)
    if a.gpus < 1 or not 0 < a.mfu <= 1:
        p.error("--gpus must be >= 1 and --mfu in (0, 1]")
    cfg = load_config(TrainConfig, a.config, a.set)
    inputs = PlanInputs(gpus=a.gpus, gpus_per_node=a.gpus_per_node, gpu_memory_gb=a.gpu_memory_gb,
                        peak_tflops=a.peak_tflops, mfu=a.mfu, videos=a.videos, only_config=a.only_config,
                        calibration=a.calibration, shard_nodes=a.shard_nodes,
                        shard_cores_per_node=a.shard_cores_per_node,
                        embed_captions_per_s_per_gpu=a.embed_captions_per_s_per_gpu, mean_tokens=a.mean_tokens)
    log = (lambda s: print(s, file=sys.stderr)) if a.json else print
    result, rows = plan(cfg, inputs, log)
    if a.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"\nPlan for {a.config}: {result['config']['model_parameters'] / 1e6:.1f} M parameters, "
          f"{a.gpus} GPUs x {a.gpu_memory_gb:g} GB, micro-batch {cfg.data.batch_size} (global "
          f"{result['config']['global_batch']}), {cfg.run.precision}, {a.peak_tflops:g} TFLOP/s peak at "
          f"{a.mfu:g} utilisation, {a.videos:,} clips per epoch (GiB per rank; planned, not measured)\n")
    print(table(rows))
    rec = result["recommended"]
    print(f"\nrecommended: {rec['strategy']} with checkpoint policy {rec['policy']}: {result['why']}" if rec
          else f"\nno setting fits: {result['why']}")
    print("\ndata side, at the step rate of " + ("that setting" if rec else "the config's setting") + ":")
    for line in result["data_lines"]:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ------------------------------------------------------------------------------ plan vs measurement
class BackgroundPlan:
    """The plan of a run's own setting, computed in a subprocess while the run starts, so a user sees
    in its first minutes whether it behaves as planned (`comparison` at each log until it is printed).

    A subprocess, not a thread: the simulation needs a fake process group of its own, and the run's
    real one must not be touched. Started by rank 0 only; a failed plan is reported, never fatal.
    """

    def __init__(self, config_file: str, world: int, peak_tflops: float, mfu: float, gpu_memory_gb: float):
        import subprocess
        import tempfile

        self._config_file = config_file  # removed with the plan's output in close()
        self._out = tempfile.NamedTemporaryFile(prefix="vdm-plan-", suffix=".json", delete=False)
        self._err = tempfile.TemporaryFile()
        cmd = [sys.executable, "-m", "trainer.plan", "--config", config_file, "--gpus", str(world), "--only-config",
               "--json", "--mfu", str(mfu), "--gpu-memory-gb", str(gpu_memory_gb)]
        if peak_tflops:
            cmd += ["--peak-tflops", str(peak_tflops)]
        self._proc = subprocess.Popen(cmd, stdout=self._out, stderr=self._err)
        self.done = False

    def comparison(self, measured_peak_gib: float, step_seconds: float, mfu: float | None) -> list[str] | None:
        """Lines comparing plan and measurement once the plan is ready (then None ever after)."""
        if self.done or self._proc.poll() is None:
            return None
        self.done = True
        if self._proc.returncode != 0:
            self._err.seek(0)
            tail = self._err.read().decode(errors="replace").strip().splitlines()[-1:]
            self.close()
            return [f"[plan] the start-up plan failed ({' '.join(tail)}); run python -m trainer.plan to see why"]
        with open(self._out.name) as f:
            row = json.load(f)["rows"][0]
        self.close()
        m = row["memory"]
        lines = [f"[plan] planned per-rank peak {m['peak'] / GiB:.2f} GiB of tensors (parameters "
                 f"{m['parameters'] / GiB:.2f}, gradients {m['gradients'] / GiB:.2f}, optimizer "
                 f"{m['optimizer'] / GiB:.2f}, EMA {m['ema'] / GiB:.2f}, activations {m['activations'] / GiB:.2f}, "
                 f"comm {m['comm'] / GiB:.2f}); measured peak {measured_peak_gib:.2f} GiB (perf/peak_mem_gb)",
                 f"[plan] planned step {row['step_seconds']:.3g} s at MFU {row['mfu']:.2f}; measured "
                 f"{step_seconds:.3g} s" + (f" at MFU {mfu:.2f}" if mfu is not None else "")]
        return lines

    def close(self) -> None:
        """Stop a plan still running (the run ended first) and remove its files."""
        import os

        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._out.close()
        self._err.close()
        for path in (self._out.name, self._config_file):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def start_background_plan(cfg: TrainConfig, dist_env, peak_tflops: float | None) -> BackgroundPlan | None:
    """run.plan_at_start for a run about to train: the plan of its own setting, started in the
    background on rank 0 (None where it is off: other ranks, CPU runs unless asked)."""
    on = cfg.run.plan_at_start
    if dist_env.rank != 0 or not (on > 0 or (on < 0 and dist_env.device.type == "cuda")):
        return None
    import tempfile

    import torch
    import yaml

    from common.config import to_dict

    memory_gb = (torch.cuda.get_device_properties(dist_env.device).total_memory / 1e9
                 if dist_env.device.type == "cuda" else 80.0)
    with tempfile.NamedTemporaryFile("w", prefix="vdm-plan-", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)  # this run's settings, overrides included
    return BackgroundPlan(f.name, dist_env.world_size, peak_tflops or 0.0, cfg.run.planned_mfu, memory_gb)
