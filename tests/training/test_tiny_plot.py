"""The demo's plot: a 2 x 3 grid of 1500 x 900 pixels, one colour per method in every panel."""

import json
import os

from PIL import Image

from onmerge_megatron.training.tiny_pipeline import plot_curves

BLUE, ORANGE = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's C0 and C1


def write_metrics(directory, rows):
    os.makedirs(directory)
    with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_plot_has_a_sane_size_and_one_colour_per_method(tmp_path):
    out = str(tmp_path)
    write_metrics(os.path.join(out, "sft"), [{"split": s, "step": k, "loss": 6.0 / (k + 1)}
                                             for s in ("train", "eval") for k in range(0, 12, 3)])
    for directory, scale in (("dpo", 1.0), ("dpo_adamw", 0.5)):
        write_metrics(os.path.join(out, directory), [
            {"split": "eval", "step": k, "loss": 0.69 - 0.02 * k * scale, "rewards/accuracy": 0.1 * k * scale,
             "rewards/margins": 0.2 * k * scale, "sft_nll": 0.6 + 0.01 * k / scale} for k in range(0, 8, 2)])
    path = plot_curves(out, [("DPO+OnDARE", "dpo"), ("DPO AdamW", "dpo_adamw")])
    image = Image.open(path).convert("RGB")
    assert image.size == (1500, 900)
    # Each method's colour is drawn in every DPO panel: DPO loss (top middle), reward accuracy (top
    # right), margin (bottom left), NLL of chosen (bottom middle); the SFT panel (top left) has neither.
    cells = {"sft": (0, 0), "loss": (1, 0), "accuracy": (2, 0), "margin": (0, 1), "nll": (1, 1)}
    for name, (col, row) in cells.items():
        colours = set(image.crop((col * 500, row * 450, (col + 1) * 500, (row + 1) * 450)).getdata())
        expected = name != "sft"
        assert (BLUE in colours) == expected and (ORANGE in colours) == expected, name
