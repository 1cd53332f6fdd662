"""The classifier task: datasets and forget splits, the ResNet-18 models, and the task adapter."""
