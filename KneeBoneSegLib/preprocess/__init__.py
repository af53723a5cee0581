"""Before the network: intensity normalisation and resampling to the model's grid (and back)."""
