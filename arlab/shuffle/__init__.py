"""Token-Shuffle windows: fuse s×s tokens into one before the backbone and split them after."""
