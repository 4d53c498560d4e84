"""The trainer's exit codes that its launchers act on (slurm/launch.py, slurm/train.sh).

Dependency-free so a launcher on a submit host can import it without torch.
"""

# "Requeue me": the run stopped early and its latest checkpoint is where it continues. The trainer
# exits with it after a stop signal (SIGUSR1/SIGTERM) once that step's checkpoint is written; the
# launchers also map a task killed by the signal during start-up (before its handler existed, so
# nothing new was saved) to it, since the checkpoint the run started from is still intact.
# 75 is sysexits.h's EX_TEMPFAIL ("temporary failure, retry"): it is not 1/2 (errors, usage), not
# timeout(1)'s 124-127, not a shell's 126/127 and not 128+N (killed by signal N).
EXIT_REQUEUE = 75

# "The disk is full": a write of the run failed (or a checkpoint would not fit, run.on_low_disk=stop)
# for lack of space, quota or a writable filesystem. The latest complete checkpoint is intact; rerunning
# the same command after freeing space resumes from it. Requeueing without freeing space would only
# fail again, so it is not EXIT_REQUEUE. 74 is sysexits.h's EX_IOERR ("an error while doing I/O on a
# file"); like 75 it is none of 1/2, 124-127 or 128+N.
EXIT_DISK_FULL = 74
