"""Stand-in for `trainer.train` in the SLURM launch tests (VDM_TRAIN_MODULE=slurm_probe).

Takes the trainer's CLI, records the rank/rendezvous environment it was started with, and behaves
like the trainer's signal contract: on SIGUSR1/SIGTERM it "saves" and exits EXIT_REQUEUE. Env knobs:
PROBE_SECONDS (run this long on the first start, default 0), PROBE_EXIT (exit code, default 0),
PROBE_STARTUP_S (sleep this long before installing the signal handlers, like a slow start-up),
PROBE_CRASH_RANK (this rank exits 3 at once while the others run on), PROBE_STEPS (instead of
PROBE_SECONDS: "train" this many steps, PROBE_STEP_S each on the first start and none after a
restart, appending each finished step to probe-rank<R>-steps.txt as "<step> <restart>"; a signal
stops it after the current step and saves the next step to probe-rank<R>.ckpt, where a restart
resumes), PROBE_HOLD_AT_STEP (with PROBE_STEPS, on the first start: that step writes
probe-rank<R>.held and waits for the signal, up to PROBE_HOLD_S = 120 s, like the trainer's
VDM_TEST_HOLD_AT_STEP: a test that preempts once both ranks hold knows the save lands at exactly
that step + 1, however slow the cluster is to deliver the signal).
"""

import json
import os
import signal
import sys
import time

from common.config import load_config
from common.exit_codes import EXIT_REQUEUE
from trainer.config import TrainConfig

args = sys.argv[1:]
sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
cfg = load_config(TrainConfig, args[args.index("--config") + 1], sets)
os.makedirs(cfg.run.out_dir, exist_ok=True)
if not os.environ.get("SLURM_RESTART_COUNT"):  # a slow start-up: no signal handlers yet
    open(os.path.join(cfg.run.out_dir, f"probe-rank{os.environ.get('RANK')}.booting"), "w").close()
    time.sleep(float(os.environ.get("PROBE_STARTUP_S", "0")))
got: list[str] = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append("USR1"))
signal.signal(signal.SIGTERM, lambda s, f: got.append("TERM"))
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURMD_NODENAME",
        "SLURM_RESTART_COUNT", "SLURM_JOB_ID", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "CUDA_VISIBLE_DEVICES"]
rec = {k: os.environ.get(k) for k in keys}
restart = rec["SLURM_RESTART_COUNT"] or "0"
print("PROBE start", json.dumps(rec), flush=True)
open(os.path.join(cfg.run.out_dir, f"probe-rank{rec['RANK']}-restart{restart}.started"), "w").close()
if os.environ.get("PROBE_CRASH_RANK") == rec["RANK"]:  # one rank dies, the others keep "training"
    print(f"PROBE rank {rec['RANK']} crashing", flush=True)
    sys.exit(3)
steps = int(os.environ.get("PROBE_STEPS", "0"))
if steps:
    ckpt = os.path.join(cfg.run.out_dir, f"probe-rank{rec['RANK']}.ckpt")
    step = rec["resumed_at"] = int(open(ckpt).read()) if os.path.exists(ckpt) else 0
    step_s = float(os.environ.get("PROBE_STEP_S", "0.1")) if restart == "0" else 0.0
    hold_at = int(os.environ.get("PROBE_HOLD_AT_STEP", "-1")) if restart == "0" else -1
    with open(os.path.join(cfg.run.out_dir, f"probe-rank{rec['RANK']}-steps.txt"), "a") as log:
        while step < steps and not got:
            time.sleep(step_s)
            if step == hold_at:
                open(os.path.join(cfg.run.out_dir, f"probe-rank{rec['RANK']}.held"), "w").close()
                deadline = time.monotonic() + float(os.environ.get("PROBE_HOLD_S", "120"))
                while not got and time.monotonic() < deadline:
                    time.sleep(0.05)
            log.write(f"{step} {restart}\n")
            log.flush()
            step += 1
    if got:  # the trainer's contract: finish the step, then save where to resume
        with open(ckpt + ".tmp", "w") as f:
            f.write(str(step))
        os.replace(ckpt + ".tmp", ckpt)
    rec["step"] = step
else:
    seconds = 0.0 if restart != "0" else float(os.environ.get("PROBE_SECONDS", "0"))
    t0 = time.time()
    while time.time() - t0 < seconds and not got:
        time.sleep(0.05)
rec["signals"] = got
with open(os.path.join(cfg.run.out_dir, f"probe-rank{rec['RANK']}-restart{restart}.json"), "w") as f:
    json.dump(rec, f)
if got:
    print(f"PROBE saved after {got}", flush=True)
    sys.exit(EXIT_REQUEUE)
code = int(os.environ.get("PROBE_EXIT", "0"))
print(f"PROBE done, exit {code}", flush=True)
sys.exit(code)
