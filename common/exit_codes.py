"""The trainer's exit codes that its launchers act on (slurm/launch.py, slurm/train.sh).

Dependency-free so a launcher on a submit host can import it without torch.
"""

EXIT_REQUEUE = 124  # "checkpoint saved after SIGUSR1/SIGTERM, requeue me to continue"
