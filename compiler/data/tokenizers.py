"""The llama2.c tokenizer (``tok512.bin``): SentencePiece-style BPE by merge score.

File layout: ``int32 max_token_length`` then, for each token, ``float32 score, int32 len,
bytes[len]``.  Encoding follows llama2.c's ``encode``: optional BOS, a dummy-prefix space,
one token per UTF-8 code point (byte fallback ``<0xXX>`` = id byte+3 otherwise), then repeatedly
merge the adjacent pair whose concatenation has the highest score (leftmost on ties).  The
merge loop uses a heap, so encoding is O(n log n) rather than llama2.c's O(n²).
"""

from __future__ import annotations

import heapq
import struct
from pathlib import Path

from lowbit.errors import ModelLoadError

__all__ = ["Llama2cTokenizer", "BOS", "EOS"]

BOS, EOS = 1, 2


class Llama2cTokenizer:
    def __init__(self, path: str | Path, vocab_size: int | None = None):
        path = Path(path)
        from lowbit.files import read_bytes

        data = read_bytes(path, "tokenizer", limit=256 << 20)  # regular files only, bounded (not /dev/zero, a FIFO)
        self.path = path
        self.pieces: list[bytes] = []
        self.scores: list[float] = []
        try:
            (self.max_token_length,) = struct.unpack_from("<i", data, 0)
            off = 4
            while off < len(data) and (vocab_size is None or len(self.pieces) < vocab_size):
                score, n = struct.unpack_from("<fi", data, off)
                off += 8
                if n < 0 or off + n > len(data):
                    raise ValueError(f"token {len(self.pieces)} has length {n} past the end of the file")
                self.pieces.append(data[off : off + n])
                self.scores.append(score)
                off += n
        except (struct.error, ValueError) as exc:
            raise ModelLoadError(f"{path}: not a llama2.c tokenizer file ({exc})",
                                 hint="pass the tok*.bin that belongs to the checkpoint") from exc
        if vocab_size is not None and len(self.pieces) != vocab_size:
            raise ModelLoadError(f"{path}: holds {len(self.pieces)} tokens, the checkpoint expects {vocab_size}",
                                 hint="pass the tokenizer that belongs to the checkpoint")
        self.lookup = {p: i for i, p in enumerate(self.pieces)}

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids: list[int] = [BOS] if bos else []
        if text:
            sym = [self.lookup[b" "]] if b" " in self.lookup else []
            for ch in text:
                b = ch.encode("utf-8")
                if b in self.lookup:
                    sym.append(self.lookup[b])
                else:
                    sym.extend(x + 3 for x in b)
            ids.extend(self._merge(sym))
        if eos:
            ids.append(EOS)
        return ids

    def _merge(self, sym: list[int]) -> list[int]:
        n = len(sym)
        if n < 2:
            return sym
        tok = list(sym)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap: list[tuple[float, int, int, int]] = []

        def push(i: int) -> None:
            j = nxt[i]
            if j >= n:
                return
            merged = self.pieces[tok[i]] + self.pieces[tok[j]]
            t = self.lookup.get(merged)
            if t is not None:
                heapq.heappush(heap, (-self.scores[t], i, tok[i], tok[j]))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, ti, tj = heapq.heappop(heap)
            j = nxt[i] if alive[i] else n
            if j >= n or tok[i] != ti or tok[j] != tj:
                continue  # stale entry
            tok[i] = self.lookup[self.pieces[ti] + self.pieces[tj]]
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)
        return [tok[i] for i in range(n) if alive[i]]

    def decode_piece(self, prev: int, token: int) -> bytes:
        piece = self.pieces[token]
        if prev == BOS and piece.startswith(b" "):
            piece = piece[1:]
        if piece.startswith(b"<0x") and piece.endswith(b">") and len(piece) == 6:
            return bytes([int(piece[3:5], 16)])
        return piece

    def decode(self, ids: list[int]) -> str:
        out = bytearray()
        prev = BOS
        for t in ids:
            if t in (BOS, EOS) and not out:
                prev = t
                continue
            out += self.decode_piece(prev, t)
            prev = t
        return out.decode("utf-8", errors="replace")
