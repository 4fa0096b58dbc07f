"""What a user runs: `train.fit`, `evaluate.evaluate_run`, `calibrate.calibrate_run`, `cv.cross_validate`."""
