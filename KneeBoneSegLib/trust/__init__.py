"""Whether to trust a result: the input against the model's card, plausibility of each bone, the network's confidence, verdicts."""
