"""The PNGs a training run logs to MLflow: its loss curve and, at each checkpoint, a sample's rounds
side by side (the run itself is handled by :mod:`irg.tracking`)."""

from __future__ import annotations

import io

from PIL import Image

from irg.tracking import RunLogger

LOSS_METRICS = ("loss_ce", "loss_mse")


def log_loss_curve(logger: RunLogger, metrics: tuple[str, ...] = LOSS_METRICS) -> Image.Image | None:
    """A PNG of the run's loss history (the latest value per step, so a resumed run draws one line)."""
    history = {}
    for name in metrics:
        points = {}
        for m in sorted(logger.metric_history(name), key=lambda m: m.timestamp):
            points[m.step] = m.value
        if points:
            history[name] = sorted(points.items())
    if not history:
        return None
    image = loss_curve(history)
    logger.log_image(image, "loss_curve.png")
    return image


def loss_curve(history: dict[str, list[tuple[int, float]]]) -> Image.Image:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(history), figsize=(5 * len(history), 3.5), squeeze=False)
    for ax, (name, points) in zip(axes[0], history.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, linewidth=1.2)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def image_strip(images: list[Image.Image]) -> Image.Image:
    """Rounds side by side, so one PNG shows the draft and its correction."""
    width = sum(i.width for i in images)
    strip = Image.new("RGB", (width, max(i.height for i in images)), "white")
    x = 0
    for image in images:
        strip.paste(image, (x, 0))
        x += image.width
    return strip
