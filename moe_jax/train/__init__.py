"""Training: partitioner (mesh + logical axis rules), trainer, optimizers, losses, eval."""
