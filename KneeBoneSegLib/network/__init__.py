"""The network stage: U-Net architectures, model files and cards, engines and devices, tiled inference, projections, export."""
