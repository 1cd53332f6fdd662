"""An exact ``transformers.CLIPTokenizer`` derived from the BPE file that open_clip ships.

No CLIP tokenizer can be downloaded here, but open_clip's wheel carries
``bpe_simple_vocab_16e6.txt.gz``, the same merges OpenAI's CLIP (and so SD 1.x/2.x) was trained
with. The vocabulary is rebuilt exactly as ``open_clip.tokenizer.SimpleTokenizer`` does it
(256 byte symbols, the same with ``</w>``, one token per merge, then start/end of text), so the
ids are identical; the special tokens take the names transformers uses (``<|startoftext|>``
49406, ``<|endoftext|>`` 49407). Padding follows SD 1.x (``<|endoftext|>``), not open_clip's id 0:
a ``!`` pad token would become a special token that the backend splits out of ordinary text
("top!!" -> two pad ids), breaking exactness. So ids agree with open_clip's ``tokenize`` up to and
including the end-of-text token (the only positions the causal text encoder reads before it).

Text cleaning: open_clip runs ``ftfy.fix_text`` and ``html.unescape`` before BPE; the tokenizers
backend only does NFC, whitespace folding and lower-casing. :func:`clean_text` applies open_clip's
cleaning for callers that see arbitrary user text; captions in this project are plain ASCII, where
both agree (tests check both paths).
"""

from __future__ import annotations

import gzip
import html
import json
from pathlib import Path

MODEL_MAX_LENGTH = 77
NUM_MERGES = 49152 - 256 - 2  # the slice SimpleTokenizer takes: lines 1 .. 48894 of the file


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def open_clip_bpe_path() -> Path:
    # lazy: open_clip is optional and slow to import
    import open_clip.tokenizer

    return Path(open_clip.tokenizer.default_bpe())


def vocab_and_merges(bpe_path: str | Path | None = None) -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(bpe_path or open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1:NUM_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def build_tokenizer(bpe_path: str | Path | None = None):
    # lazy: transformers takes seconds to import
    from transformers import CLIPTokenizer

    vocab, merges = vocab_and_merges(bpe_path)
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], pad_token="<|endoftext|>",
                         model_max_length=MODEL_MAX_LENGTH)


def save_tokenizer(directory: str | Path, bpe_path: str | Path | None = None) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer config into ``directory``.

    Only the two classic files plus configs are written (not ``tokenizer.json``): every
    transformers version builds the fast tokenizer from them, and they are half the size.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges(bpe_path)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "do_lower_case": True, "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    specials = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return directory


def clean_text(text: str) -> str:
    """open_clip's cleaning (ftfy, double HTML unescape, whitespace) before tokenization."""
    # lazy: ftfy is only needed to rebuild the tokenizer
    import ftfy

    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split())


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="write the derived CLIP tokenizer into a folder")
    ap.add_argument("output")
    print(save_tokenizer(ap.parse_args().output))
