"""Scoring predictions: metrics with CIs (`metrics`), operating points with a margin (`operating`), the
readers' BI-RADS beside the model (`reader`), plots and HTML (`report`), run result files (`results`)."""
