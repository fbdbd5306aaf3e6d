"""Text data: the training corpus and its held-out rule (`corpus`), shared by training and mean ablation."""
