"""Run folders and reports: declarative experiments (``mechkit run``) and their summaries."""

from mechkit.report.experiment import METHODS, Experiment, Step, run_experiment

__all__ = ["METHODS", "Experiment", "Step", "run_experiment"]
