"""Training side: data readers, augmentation, PFLD model, losses, metrics, training loop.

train.data, train.metrics and train.augment are torch-free; the rest needs torch.
"""
