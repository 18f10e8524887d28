"""Pictures of a training run, drawn with Pillow alone: contact-sheet grids and the loss plot."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFont

LABEL_H = 14


def _font():
    return ImageFont.load_default()


def image_grid(rows: list[list[Image.Image]], col_labels: list[str] | None = None, row_labels: list[str] | None = None,
               cell: int | None = None) -> Image.Image:
    """Rows of equally sized images with optional column and row labels."""
    if not rows or not rows[0]:
        raise ValueError("image_grid needs at least one image")
    cell = cell or max(96, rows[0][0].width)
    left = 140 if row_labels else 0
    top = LABEL_H if col_labels else 0
    ncols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (left + ncols * cell, top + len(rows) * (cell + (LABEL_H if row_labels else 0))), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font()
    for c, label in enumerate(col_labels or []):
        draw.text((left + c * cell + 2, 1), label[:18], fill="black", font=font)
    row_h = cell + (LABEL_H if row_labels else 0)
    for r, row in enumerate(rows):
        if row_labels:
            text = row_labels[r]
            draw.text((2, top + r * row_h + cell // 2), text[:22] + ("…" if len(text) > 22 else ""), fill="black", font=font)
        for c, img in enumerate(row):
            sheet.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (left + c * cell, top + r * row_h))
    return sheet


def loss_plot_png(log: list[dict], val: list[dict], best_step: int | None = None, size=(640, 320)) -> bytes:
    """Training loss (grey, with a moving average in blue) and validation loss (red dots) against step."""
    w, h = size
    pad_l, pad_r, pad_t, pad_b = 50, 10, 20, 25
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = _font()
    if not log:
        draw.text((10, 10), "no steps logged", fill="black", font=font)
    else:
        steps = [e["step"] for e in log]
        losses = [e["loss"] for e in log]
        values = losses + [v["val_loss"] for v in val]
        lo, hi = min(values), max(values)
        hi = hi if hi > lo else lo + 1e-6
        s0 = min(steps)
        s1 = max(max(steps), s0 + 1)

        def xy(step, value):
            x = pad_l + (step - s0) / (s1 - s0) * (w - pad_l - pad_r)
            y = pad_t + (1 - (value - lo) / (hi - lo)) * (h - pad_t - pad_b)
            return x, y

        draw.line([xy(s, l) for s, l in zip(steps, losses)], fill=(190, 190, 190), width=1)
        k = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - k): i + 1]) / len(losses[max(0, i - k): i + 1]) for i in range(len(losses))]
        draw.line([xy(s, l) for s, l in zip(steps, smooth)], fill=(40, 90, 200), width=2)
        for v in val:
            x, y = xy(v["step"], v["val_loss"])
            color = (0, 150, 0) if v["step"] == best_step else (210, 40, 40)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        draw.rectangle([pad_l, pad_t, w - pad_r, h - pad_b], outline="black")
        draw.text((2, pad_t - 2), f"{hi:.3f}", fill="black", font=font)
        draw.text((2, h - pad_b - 10), f"{lo:.3f}", fill="black", font=font)
        draw.text((pad_l, h - pad_b + 5), f"step {s0}", fill="black", font=font)
        draw.text((w - pad_r - 60, h - pad_b + 5), f"step {s1}", fill="black", font=font)
        draw.text((pad_l + 5, 3), "train loss (avg blue), val loss (red; best green)", fill="black", font=font)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()
