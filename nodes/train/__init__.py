"""Nodes of the Train job: album, encoding, training, the loss curve."""
