"""One training run: settings, data batches, the flow-matching objective, the loop, previews and the failure
messages."""
