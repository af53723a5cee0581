"""Loss curves of a training run as a PNG (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

#: The curves' colours (RGB).
TRAINING_COLOUR, VALIDATION_COLOUR = (31, 119, 180), (230, 110, 0)


def write_loss_curves(history: list[dict], path) -> Path:
    """Plot training and validation loss per epoch (logarithmic loss axis) as a PNG; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display: training runs on servers
    from matplotlib import pyplot

    epochs = [entry["epoch"] for entry in history]
    figure, axes = pyplot.subplots(figsize=(6, 3.6), dpi=100)
    try:
        for key, label, colour in (
            ("loss", "training", TRAINING_COLOUR),
            ("validation_loss", "validation", VALIDATION_COLOUR),
        ):
            axes.plot(
                epochs, [entry[key] for entry in history], label=label, color=[c / 255 for c in colour], linewidth=2
            )
        axes.set(xlabel="epoch", ylabel="loss", yscale="log")
        axes.grid(True, which="both", color="0.9")
        axes.legend()
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        pyplot.close(figure)
    return Path(path)
