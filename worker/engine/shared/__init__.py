"""Helpers every pass may use: its data (data.py), the weights it works on (selection.py), batch-norm statistics
(batchnorm.py) and the training loop (training.py). They import no pass, so no pass needs to import another."""
