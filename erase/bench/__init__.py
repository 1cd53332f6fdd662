"""Benchmarks: separate commands that run many unlearning runs and write results/ (JSON + markdown + PNG).

- ``python -m erase.bench.classifier`` — every registered classifier method against retrain on Fashion-MNIST;
- ``python -m erase.bench.audit`` — the NeurIPS 2023 challenge-style audit (N unlearned vs N retrained models).
"""
