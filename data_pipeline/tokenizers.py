"""Tokenizers: a Hugging Face ``tokenizer.json`` (e.g. LLaDA-MoE's), or the built-in byte-level vocabulary.

Both are the same ``Tokenizer`` type over a ``tokenizers.Tokenizer`` backend, so saving, loading and the
fingerprint written into shard manifests and model folders work one way. The byte-level vocabulary needs no files:
ids 0..255 are the UTF-8 bytes, then ``<|eos|>`` 256, ``<|pad|>`` 257 and ``<|mask|>`` 258 (the ids the small model
flavors are built for, see ``dlmoe.model.config``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from dlmoe.errors import DataError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

BYTE_SPECIAL_TOKENS = {"eos": "<|eos|>", "pad": "<|pad|>", "mask": "<|mask|>"}
# Names that mark a special token in common vocabularies, the LLaDA family's first.
WELL_KNOWN_SPECIALS = {
    "mask": ("<|mdm_mask|>", "<|mask|>", "[MASK]", "<mask>"),
    "eos": ("<|endoftext|>", "<|eos|>", "</s>", "<eos>", "<|end_of_text|>"),
}


@dataclass(frozen=True)
class SpecialIds:
    """The ids the objective and the sampler need: end of text, padding and the diffusion mask."""

    eos: int
    pad: int
    mask: int


class Tokenizer:
    """Text ↔ token ids with the special ids attached."""

    def __init__(self, backend: Backend, special: SpecialIds, name: str) -> None:
        self.backend = backend
        self.special = special
        self.name = name
        for role, token_id in (("eos", special.eos), ("pad", special.pad), ("mask", special.mask)):
            if backend.id_to_token(token_id) is None:
                raise DataError(f"tokenizer '{name}': {role} id {token_id} is not in its vocabulary "
                                f"of {backend.get_vocab_size(with_added_tokens=True)} tokens")

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    @property
    def fingerprint(self) -> str:
        """sha256 of the serialised vocabulary, rules and special ids: equal fingerprints tokenize alike."""
        digest = hashlib.sha256(self.backend.to_str().encode())
        digest.update(json.dumps([self.special.eos, self.special.pad, self.special.mask]).encode())
        return digest.hexdigest()

    def encode(self, text: str) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode(ids, skip_special_tokens=skip_special_tokens))

    def save(self, out_dir: str | Path) -> None:
        """Write ``tokenizer.json`` plus the ``tokenizer_config.json`` that ``AutoTokenizer`` reads."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / TOKENIZER_FILE))
        tokens = {f"{role}_token": self.backend.id_to_token(getattr(self.special, role))
                  for role in ("eos", "pad", "mask")}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **tokens}
        (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (out / SPECIAL_TOKENS_MAP_FILE).write_text(json.dumps(tokens, indent=2) + "\n")


def _bytes_to_symbols() -> dict[int, str]:
    """The byte-level pre-tokenizer's alphabet: printable Latin-1 bytes stand for themselves, the other bytes are
    shifted to code points from 256 up, in byte order, so every byte is one visible symbol."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    symbols: dict[int, str] = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + shifted)
            shifted += 1
    return symbols


def byte_tokenizer() -> Tokenizer:
    """The built-in byte-level tokenizer: id = byte value, then the three specials at 256, 257, 258."""
    vocab = {symbol: byte for byte, symbol in _bytes_to_symbols().items()}
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(BYTE_SPECIAL_TOKENS[r], special=True, normalized=False)
                                for r in ("eos", "pad", "mask")])
    eos, pad, mask = (_token_id(backend, BYTE_SPECIAL_TOKENS[r], "the byte vocabulary") for r in ("eos", "pad", "mask"))
    return Tokenizer(backend, SpecialIds(eos=eos, pad=pad, mask=mask), name="bytes")


def _token_id(backend: Backend, token: str, where: str) -> int:
    token_id = backend.token_to_id(token)
    if token_id is None:
        raise DataError(f"{where}: token '{token}' is not in the vocabulary")
    return int(token_id)


def _config_token(config: dict[str, Any], role: str) -> str | None:
    value = config.get(f"{role}_token")
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(path: str | Path, *, eos_id: int | None = None, pad_id: int | None = None,
                   mask_id: int | None = None) -> Tokenizer:
    """Load ``tokenizer.json`` from a file or a folder.

    Special ids given here win; otherwise they come from the folder's ``tokenizer_config.json`` (``eos_token``,
    ``pad_token``, ``mask_token``), else from the well-known token names in the vocabulary (LLaDA's
    ``<|mdm_mask|>``, ``<|endoftext|>``, ...); the pad id falls back to the EOS id (the LLaDA convention of
    padding with EOS).
    """
    location = Path(path)
    file = location / TOKENIZER_FILE if location.is_dir() else location
    if not file.is_file():
        raise DataError(f"no tokenizer: {file} does not exist")
    try:
        backend = Backend.from_file(str(file))
    except Exception as exc:
        raise DataError(f"cannot read tokenizer {file}: {exc}") from exc
    config: dict[str, Any] = {}
    config_file = file.parent / TOKENIZER_CONFIG_FILE
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"cannot parse {config_file}: {exc}") from exc

    def resolve(role: str, given: int | None) -> int | None:
        if given is not None:
            return given
        token = _config_token(config, role)
        if token is not None:
            return _token_id(backend, token, f"{config_file} ({role}_token), vocabulary {file}")
        known = [t for t in WELL_KNOWN_SPECIALS.get(role, ()) if backend.token_to_id(t) is not None]
        return None if not known else _token_id(backend, known[0], str(file))

    eos, mask, pad = resolve("eos", eos_id), resolve("mask", mask_id), resolve("pad", pad_id)
    if eos is None or mask is None:
        role = "eos" if eos is None else "mask"
        raise DataError(f"tokenizer {file}: the {role} id is unknown; pass it explicitly or set "
                        f"'{role}_token' in {config_file}")
    return Tokenizer(backend, SpecialIds(eos=eos, pad=eos if pad is None else pad, mask=mask), name=str(file))
