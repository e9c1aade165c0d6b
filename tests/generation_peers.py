"""Greedy generation through lowbit's runtime and through onnxruntime-genai's ``Generator``, for tests that
check a compiled ``--format genai`` folder produces the same tokens in both."""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["lowbit_tokens", "genai_tokens"]


def lowbit_tokens(folder: Path, prompt: str, n: int) -> tuple[list[int], list[int], str]:
    """(prompt ids, the n greedy new ids, their text) from ``lowbit.runtime.generate``."""
    from lowbit.runtime import generate

    gen = generate(str(folder / "model.onnx"), prompt, tokenizer=str(folder), max_new_tokens=n)
    list(gen)
    return gen.prompt_ids, gen.ids, gen.text


def genai_tokens(og, folder: Path, prompt: str, n: int) -> tuple[list[int], list[int], str]:
    """(prompt ids, the n greedy new ids, their text) from onnxruntime-genai (module ``og``) on ``folder``."""
    model = og.Model(str(folder))
    tok = og.Tokenizer(model)
    ids = list(tok.encode(prompt))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(ids, np.int32))
    new = []
    while not gen.is_done():
        gen.generate_next_token()
        new.append(int(gen.get_next_tokens()[0]))
    return ids, new, tok.decode(np.array(new, np.int32))
