"""Reading runs: the loss curve, the clinic's measurements, the sweet spot, scrub planning and grids."""
