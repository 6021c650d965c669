"""Slurm: rendering `slurm/templates/*` into sbatch scripts, submitting them as a chain, and their states.

quoting (what may reach sbatch and the shell) -> settings (per-stage resources) -> render (Jinja2)
-> submit (a dependent pipeline, recorded in jobs.json) -> jobs (states from squeue, sacct, scontrol).
"""
