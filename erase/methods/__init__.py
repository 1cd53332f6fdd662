"""Built-in methods: importing this package registers each one-file method."""

from erase.methods import ft, ga, retrain, rl, salun  # noqa: F401
