"""Evaluation: metrics, replay of bags through the pipeline, domain-shift corruptions, reports."""
