"""The match stage: LESS scores from gradient stores, the baselines, and the selection files they write."""
