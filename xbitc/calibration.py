"""Calibration batches: windows of a text file, or sequences the float model writes itself (data-free)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

PACKAGE_TEXT = Path(__file__).parent / "data"
CALIB_FIX = "give a UTF-8 text file (more tokens than --calib-len), --calib self for a language model, or leave --calib out"


class TextError(ValueError):
    """A calibration or evaluation text cannot be used; the message names the file, the problem and what to give."""


def read_text(path: str | Path, what: str = "calibration text", fix: str = CALIB_FIX) -> str:
    """The UTF-8 text of `path` (newlines as read_text makes them), or TextError when it is missing, a folder, empty
    or binary; checked before any model is loaded."""
    path = Path(path)
    if not path.exists():
        raise TextError(f"{what} {path} does not exist; {fix}")
    if path.is_dir():
        raise TextError(f"{what} {path} is a folder, not a text file; {fix}")
    if not path.is_file():
        raise TextError(f"{what} {path} is not a regular file; {fix}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise TextError(f"cannot read {what} {path} ({err.strerror}); {fix}") from None
    if not data.strip():
        raise TextError(f"{what} {path} is empty; {fix}")
    try:
        if b"\0" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\0"), data.index(b"\0") + 1, "NUL byte")
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TextError(f"{what} {path} is not UTF-8 text (binary data at byte {err.start}); {fix}") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def token_stream(tokenizer: Any, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids.to(torch.long)


def text_windows(tokenizer: Any, path: Path, n: int, length: int, seed: int = 0) -> list[tuple[torch.Tensor]]:
    """`n` windows of `length` tokens at random offsets of the tokenized file (GPTQ's protocol)."""
    ids = token_stream(tokenizer, read_text(path))
    if len(ids) <= length:
        raise TextError(f"calibration text {path} has {len(ids)} tokens, too few for one window of {length} (it needs "
                        f"more than {length}); give a longer text or lower --calib-len")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - length, (n,), generator=gen)
    return [(ids[s : s + length].unsqueeze(0),) for s in starts.tolist()]


@torch.no_grad()
def self_windows(
    model: Callable[[torch.Tensor], torch.Tensor], vocab: int, bos: int | None, n: int, length: int, seed: int = 0,
    progress: bool = False,
) -> list[tuple[torch.Tensor]]:
    """Data-free calibration: sample `n` sequences from the float model (temperature 1), starting from BOS or a
    random token, batched over all `n`. A Hugging Face causal LM (`model.model`, as the frontend wraps it) samples
    through its own key/value cache, one new token per step; any other model re-runs the whole prefix per token."""
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    first = torch.full((n, 1), bos) if bos is not None else torch.randint(0, vocab, (n, 1), generator=gen)
    seqs, past = first, None
    hf = getattr(model, "model", None)
    cached = hasattr(getattr(hf, "config", None), "use_cache")
    for _ in tqdm(range(length - 1), desc="sampling calibration text", unit="token", leave=False, disable=not progress):
        if cached:
            out = hf(input_ids=seqs if past is None else seqs[:, -1:], cache=past, use_cache=True)
            logits, past = out.logits[:, -1], out.cache
        else:
            logits = model(seqs)[:, -1]
        nxt = torch.multinomial(torch.softmax(logits.float(), dim=-1), 1, generator=gen)
        seqs = torch.cat([seqs, nxt], dim=1)
    return [(seqs[i : i + 1],) for i in range(n)]


def random_windows(vocab: int, n: int, length: int, seed: int = 0, mask: bool = False) -> list[tuple]:
    """For language models without a tokenizer: `n` windows of `length` token ids drawn uniformly from the vocabulary
    (with an all-ones attention mask for encoders), so calibration sees as many tokens as with text."""
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, vocab, (1, length), generator=gen) for _ in range(n)]
    return [(w, torch.ones_like(w)) if mask else (w,) for w in ids]


def random_inputs(example_inputs: tuple, n: int, seed: int = 0) -> list[tuple]:
    """For models that do not read text: inputs shaped like the example, token ids drawn uniformly."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        batch = []
        for x in example_inputs:
            if x.is_floating_point():
                batch.append(torch.randn(x.shape, generator=gen))
            elif x.max() <= 1 and x.min() >= 0:
                batch.append(torch.ones_like(x))  # masks
            else:
                batch.append(torch.randint(0, int(x.max()) + 1, x.shape, generator=gen))
        out.append(tuple(batch))
    return out
