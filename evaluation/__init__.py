"""Evaluation: procedural worlds and boards, sweeps, judges, reports."""
