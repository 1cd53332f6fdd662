"""The bundled model zoo: small real models trained on Fashion-MNIST, shipped inside the package.

Model folders (``fmnist-classifier``, ``fmnist-tiny-sd``, ``fmnist-ddpm``) sit beside this file
and are found by name through :func:`erase.storage.resolve_model_dir`. The modules here reproduce
them from scratch (``train_*``), sample from them (``sampling``) and check their quality
(``python -m erase.zoo check``).
"""
