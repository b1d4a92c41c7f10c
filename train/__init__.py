"""Training side: data readers, augmentation, PFLD model, losses, metrics, training loop.

evaluation.data, evaluation.metrics and train.augment are torch-free; the rest needs torch.
"""
