"""The exact judge of the procedural world: a small CNN that names an image's content class and style.

In `evaluation.world` every image's content and style are known, so quality is a measured number rather than
an opinion: `content_ok` (the prompted content is recognised) and `style_prob` (the probability of the target
style). It is trained by `scripts/pretrain_mini.py` on world images of every style (held-out ones included:
the judge must know them; the base model never sees them), half of them passed through the mini VAE so it has
seen the decoder's softness, and ships as `evaluation/world_judge.safetensors` (< 1 MB). For real Klein
weights the Gemini judge (`gemini.judge`) stays the judge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

JUDGE_PATH = Path(__file__).parent / "world_judge.safetensors"
JUDGE_SIZE = 64  # images are judged at 64x64: content and style are both plain at that size
CONTENT_OK_MIN_PROB = 0.5  # content_ok: the prompted class is the judge's top class with at least this probability


class WorldJudgeNet(nn.Module):
    """Five stride-2 conv blocks, global average pooling, two linear heads (content, style)."""

    def __init__(self, n_contents: int, n_styles: int, width: int = 48):
        super().__init__()
        chans = [3, width, 2 * width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
                       nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.content_head = nn.Linear(chans[-1], n_contents)
        self.style_head = nn.Linear(chans[-1], n_styles)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x).mean(dim=(2, 3))
        return self.content_head(h), self.style_head(h)


def images_to_batch(images: list[Image.Image]) -> torch.Tensor:
    """PIL images → [n, 3, 64, 64] in [-1, 1] (bilinear downscale, as during training)."""
    arrays = [np.asarray(im.convert("RGB").resize((JUDGE_SIZE, JUDGE_SIZE), Image.Resampling.BILINEAR), dtype=np.float32)
              for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


@dataclass
class Judgement:
    """One image's verdict."""

    content: str  # the judge's top content class
    content_prob: float  # its probability for the prompted content
    content_ok: bool
    style: str  # the judge's top style
    style_prob: float  # its probability for the target style (0 when no target)


class WorldJudge:
    def __init__(self, net: WorldJudgeNet, contents: list[str], styles: list[str], meta: dict):
        self.net = net.eval()
        self.contents = contents
        self.styles = styles
        self.meta = meta

    @classmethod
    def load(cls, path: str | Path = JUDGE_PATH) -> "WorldJudge":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"the world judge's weights are missing ({path}): they ship with the repository; "
                "`python scripts/pretrain_mini.py` trains them again"
            )
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["world_judge"])
        net = WorldJudgeNet(len(meta["contents"]), len(meta["styles"]), meta["width"])
        net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
        return cls(net, meta["contents"], meta["styles"], meta)

    def save(self, path: str | Path) -> None:
        state = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in self.net.state_dict().items()}
        save_file(state, str(path), metadata={"world_judge": json.dumps(self.meta, sort_keys=True)})

    @torch.no_grad()
    def probabilities(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """(content probabilities [n, contents], style probabilities [n, styles])."""
        content_logits, style_logits = self.net(images_to_batch(images))
        return content_logits.softmax(-1), style_logits.softmax(-1)

    def judge(self, images: list[Image.Image], contents: list[str], style: str | None = None) -> list[Judgement]:
        for name in contents:
            if name not in self.contents:
                raise ValueError(f"unknown content {name!r}; the judge knows {', '.join(self.contents)}")
        if style is not None and style not in self.styles:
            raise ValueError(f"unknown style {style!r}; the judge knows {', '.join(self.styles)}")
        content_probs, style_probs = self.probabilities(images)
        out = []
        for i, name in enumerate(contents):
            c = self.contents.index(name)
            top_content = int(content_probs[i].argmax())
            prob = float(content_probs[i, c])
            out.append(Judgement(
                content=self.contents[top_content],
                content_prob=prob,
                content_ok=top_content == c and prob >= CONTENT_OK_MIN_PROB,
                style=self.styles[int(style_probs[i].argmax())],
                style_prob=float(style_probs[i, self.styles.index(style)]) if style is not None else 0.0,
            ))
        return out

    def summary(self, images: list[Image.Image], contents: list[str], style: str | None = None) -> dict:
        """`content_ok` (fraction of images whose prompted content is recognised) and mean `style_prob`."""
        verdicts = self.judge(images, contents, style)
        return {
            "content_ok": sum(v.content_ok for v in verdicts) / len(verdicts),
            "style_prob": sum(v.style_prob for v in verdicts) / len(verdicts),
            "n": len(verdicts),
            "judge": "exact world judge (evaluation.world_judge)",
        }
