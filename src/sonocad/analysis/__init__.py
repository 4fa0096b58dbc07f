"""Looking into a trained model: Grad-CAM (`explain`), lesion masks (`segment`), the overlay shortcut check
(`shortcut`), parameters and memory (`summary`)."""
