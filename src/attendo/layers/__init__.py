"""Building blocks shared by every family: norms, positions, attention, feed-forward, blocks."""
