"""The launchers, as modules of the installed package:

    python -m prime_scale.launch.local  [--nproc K] config=NAME [key=value ...]   # this machine (torchrun)
    python -m prime_scale.launch.slurm  --nodes N [options] config=NAME ...       # SLURM via submitit
    python -m prime_scale.launch.sweep  sweep=NAME [--slurm] ...                  # scaling-law sweeps

``slurm_tools`` holds what every SLURM submission shares (training, sweeps, data prep): the SLURM options, the
submitit executor, and the squeue/scontrol/sinfo queries. The scripts in launchers/ of a checkout (``python
launchers/local.py ...``) run the same ``main`` functions.
"""
