"""Launchers: container images (docker, podman, apptainer) and SLURM jobs."""
