"""After the network: naming the bones (components), closing and hole filling (morphology), surfaces."""
