"""Training a model: data preparation shared by fit and cv (`prepare`), the starting model (`starting`),
the two phases with checkpoints and resume (`trainer`), losses, optimisers and schedules (`optim`)."""
