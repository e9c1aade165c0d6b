"""sentence-transformers folders: the pooling (and normalisation) their ``modules.json`` declares.

A folder whose ``modules.json`` lists ``sentence_transformers.models.Pooling`` (config in that
module's folder, e.g. ``1_Pooling/config.json``) and optionally ``…models.Normalize`` gets a second
graph output ``sentence_embedding`` [batch, hidden]: the masked mean (or CLS token, or masked max)
of ``last_hidden_state``, L2-normalised when Normalize is declared — what
``SentenceTransformer.encode`` returns.  Other pooling modes are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import ModelLoadError, UnsupportedModelError

__all__ = ["Pooling", "read_pooling", "pool"]


@dataclass(frozen=True)
class Pooling:
    mode: str  # "mean" | "cls" | "max"
    normalize: bool


def read_pooling(folder: Path) -> Pooling | None:
    """The folder's declared pooling, or None when it is not a sentence-transformers folder."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        types = {m["type"].rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"{modules_file}: not a sentence-transformers modules list ({exc})") from exc
    if "Pooling" not in types:
        return None
    cfg_file = folder / types["Pooling"] / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{cfg_file}: unreadable pooling config ({exc})") from exc
    modes = [m for m in ("mean", "cls", "max", "mean_sqrt_len", "weightedmean", "lasttoken")
             if cfg.get(f"pooling_mode_{m}_tokens" if m not in ("weightedmean", "lasttoken", "cls") else
                        {"weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken",
                         "cls": "pooling_mode_cls_token"}[m])]
    if len(modes) != 1 or modes[0] not in ("mean", "cls", "max"):
        raise UnsupportedModelError(f"{cfg_file}: pooling {modes or 'none'} is not supported",
                                    hint="supported: exactly one of mean, cls, max")
    extra = set(types) - {"Transformer", "Pooling", "Normalize"}
    if extra:
        raise UnsupportedModelError(f"{modules_file}: modules {sorted(extra)} after pooling are not supported")
    return Pooling(modes[0], "Normalize" in types)


def pool(hidden, mask, p: Pooling):
    """torch: [batch, seq, hidden] + [batch, seq] mask → [batch, hidden] sentence embedding."""
    import torch

    m = mask.unsqueeze(-1).to(hidden.dtype)
    if p.mode == "mean":
        e = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    elif p.mode == "cls":
        e = hidden[:, 0]
    else:
        e = hidden.masked_fill(m == 0, -1e9).max(1).values
    if p.normalize:
        e = torch.nn.functional.normalize(e, p=2.0, dim=1)
    return e
