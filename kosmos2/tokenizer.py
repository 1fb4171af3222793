"""Dictionary and tokenizer: sentencepiece pieces + grounding tags + location tokens
(docs/official_behaviour.md#vocabulary).

The vocabulary is built exactly like the official code (fairseq `Dictionary.load(dict.txt)` followed by
`add_location_symbols`):

    0 <s>   1 <pad>   2 </s>   3 <unk>
    4 ...   one entry per dict.txt line, i.e. sentencepiece pieces 3..N-1 -> fairseq id = spm id + 1
    then    <mask> </doc> <image> </image> </chunk> </line> <phrase> </phrase> <object> </object>
            </delimiter_of_multi_objects/> <grounding> <patch_index_0000> ... <patch_index_{P*P-1:04d}>

With the released files (64000 pieces, P = 32) that is 65037 entries, `<grounding>` = 64012 and
`<patch_index_0000>` = 64013. A smaller sentencepiece model (the tiny preset) gives a smaller vocabulary with the
same layout, which is why every id is looked up by symbol and never hard-coded.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from .sequence_layout import image_text_layout

SPM_FILE = "sentencepiece.bpe.model"
DICT_FILE = "dict.txt"

BOS, PAD, EOS, UNK = "<s>", "<pad>", "</s>", "<unk>"
MASK = "<mask>"
EOD, BOI, EOI, EOC, EOL = "</doc>", "<image>", "</image>", "</chunk>", "</line>"
PHRASE_START, PHRASE_END = "<phrase>", "</phrase>"
OBJECT_START, OBJECT_END = "<object>", "</object>"
DELIMITER = "</delimiter_of_multi_objects/>"
GROUNDING = "<grounding>"
# Order matters: it fixes the ids (official unilm/data/utils.py `add_location_symbols`).
TAG_SYMBOLS = (MASK, EOD, BOI, EOI, EOC, EOL, PHRASE_START, PHRASE_END, OBJECT_START, OBJECT_END, DELIMITER, GROUNDING)
DEFAULT_LOCATION_BIN_SIZE = 32


def patch_index_token(i: int) -> str:
    """The location token of grid cell i (row-major): `<patch_index_0044>`. The one place that spells the name."""
    return f"<patch_index_{i:04d}>"


class Dictionary:
    """fairseq `Dictionary`: symbol <-> id with <s>, <pad>, </s>, <unk> at 0..3; unknown symbols map to <unk>."""

    def __init__(self):
        self.symbols: list[str] = []
        self.indices: dict[str, int] = {}
        self.bos_index, self.pad_index, self.eos_index, self.unk_index = (self.add_symbol(s) for s in (BOS, PAD, EOS, UNK))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Dictionary":
        """Read a fairseq dict.txt (`symbol count [#fairseq:overwrite]` per line) and append its symbols in order."""
        d = cls()
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                symbol, sep, rest = line.rpartition(" ")
                overwrite = rest == "#fairseq:overwrite"
                if overwrite:
                    symbol, sep, rest = symbol.rpartition(" ")
                if not sep or not symbol or not rest.lstrip("-").isdigit():
                    raise ValueError(f"{path}:{line_no}: expected '<symbol> <count>' (fairseq dict.txt format), got {line!r}")
                if symbol in d.indices and not overwrite:
                    raise ValueError(f"{path}:{line_no}: duplicate symbol {symbol!r} (fairseq would refuse this dict.txt too)")
                d.add_symbol(symbol, overwrite=overwrite)
        return d

    def add_symbol(self, symbol: str, overwrite: bool = False) -> int:
        if symbol in self.indices and not overwrite:
            return self.indices[symbol]
        self.indices[symbol] = len(self.symbols)
        self.symbols.append(symbol)
        return self.indices[symbol]

    def index(self, symbol: str) -> int:
        return self.indices.get(symbol, self.unk_index)

    def __getitem__(self, i: int) -> str:
        return self.symbols[i] if 0 <= i < len(self.symbols) else UNK

    def __contains__(self, symbol: str) -> bool:
        return symbol in self.indices

    def __len__(self) -> int:
        return len(self.symbols)

    def string(self, ids: Iterable[int], bpe_symbol: str | None = "sentencepiece") -> str:
        """fairseq `Dictionary.string`: drop bos and eos (not pad), join symbols with spaces, then `post_process`."""
        drop = {self.bos_index, self.eos_index}
        sentence = " ".join(self[int(i)] for i in ids if int(i) not in drop)
        if bpe_symbol == "sentencepiece":
            # fairseq data_utils.post_process: the spaces between pieces go, '▁' becomes the real word boundary.
            sentence = sentence.replace(" ", "").replace("\u2581", " ").strip()
        return sentence


def add_kosmos2_symbols(dictionary: Dictionary, location_bin_size: int = DEFAULT_LOCATION_BIN_SIZE) -> None:
    """Append the tags and P*P location tokens in the official order (nothing else: the released model was run with
    --required-batch-size-multiple 1, so fairseq's pad_to_multiple_ adds no `madeupword` entries)."""
    for symbol in TAG_SYMBOLS:
        dictionary.add_symbol(symbol)
    for i in range(location_bin_size ** 2):
        dictionary.add_symbol(patch_index_token(i))


def _load_spm(spm_model: str | os.PathLike):
    import sentencepiece as spm

    path = Path(spm_model)
    if not path.is_file():
        raise FileNotFoundError(f"sentencepiece model not found: {path} (expected the file {SPM_FILE} released with Kosmos-2)")
    processor = spm.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path} is not a valid sentencepiece model: {e}") from e
    return processor


def _check_spm_layout(processor, spm_path) -> None:
    """fairseq id = spm id + 1 only holds if spm ids 0, 1, 2 are <unk>, <s>, </s> (sentencepiece's default)."""
    specials = [processor.id_to_piece(i) for i in range(min(3, processor.vocab_size()))]
    if specials != [UNK, BOS, EOS]:
        raise ValueError(f"{spm_path}: spm ids 0,1,2 are {specials}, expected ['<unk>', '<s>', '</s>'] "
                         "(train with unk_id=0 bos_id=1 eos_id=2 pad_id=-1 so that fairseq id = spm id + 1)")


def _check_dictionary_matches_spm(dictionary: Dictionary, processor, dict_path, spm_path) -> None:
    """dict.txt must list spm pieces 3..N-1 in spm order, otherwise text would be mapped to the wrong embeddings."""
    expected = processor.vocab_size() - 3
    found = len(dictionary) - 4
    if found != expected:
        raise ValueError(f"{dict_path} has {found} symbols but {spm_path} has {processor.vocab_size()} pieces "
                         f"(a matching dict.txt lists pieces 3..{processor.vocab_size() - 1}, i.e. {expected} lines). "
                         "Use the dict.txt released with this sentencepiece model, or write one with "
                         "Kosmos2Tokenizer.build_dictionary_file(spm_model, out).")
    for spm_id in range(3, processor.vocab_size()):
        piece, symbol = processor.id_to_piece(spm_id), dictionary.symbols[spm_id + 1]
        if piece != symbol:
            raise ValueError(f"{dict_path} line {spm_id - 2} is {symbol!r} but spm piece {spm_id} of {spm_path} is {piece!r}: "
                             "the two files do not belong together.")


def find_tokenizer_files(checkpoint_path: str | os.PathLike | None, tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding `sentencepiece.bpe.model` and `dict.txt`.

    An explicit `tokenizer_dir` is used if given (a user's explicit choice is never silently overridden, and a
    folder that lacks the files is an error rather than a reason to fall back). Otherwise the files are expected
    next to the checkpoint: inside it when it is a folder (HF-style or our own), beside it when it is a file
    (kosmos-2.pt).
    """
    if tokenizer_dir is not None:
        candidates = [Path(tokenizer_dir)]
    elif checkpoint_path is not None:
        ckpt = Path(checkpoint_path)
        candidates = [ckpt if ckpt.is_dir() else ckpt.parent]
    else:
        raise ValueError("no checkpoint path and no tokenizer folder given: cannot locate sentencepiece.bpe.model and dict.txt")
    for folder in candidates:
        if all((folder / name).is_file() for name in (SPM_FILE, DICT_FILE)):
            return folder
    looked = "; ".join(f"{folder / SPM_FILE} ({'found' if (folder / SPM_FILE).is_file() else 'missing'}), "
                       f"{folder / DICT_FILE} ({'found' if (folder / DICT_FILE).is_file() else 'missing'})" for folder in candidates)
    hint = "pass --tokenizer DIR / tokenizer_dir=DIR pointing at a folder with both files (microsoft/unilm kosmos-2/data/)"
    raise FileNotFoundError(f"Kosmos-2 tokenizer files not found. Looked for: {looked}. {hint}")


def is_released_vocabulary(spm_processor) -> bool:
    """True for the sentencepiece model released with Kosmos-2 (64000 pieces ending in '⟨')."""
    return spm_processor.vocab_size() == 64000 and spm_processor.id_to_piece(63999) == "\u27e8"


class Kosmos2Tokenizer:
    """sentencepiece + fairseq dictionary with the Kosmos-2 tags; see module docstring for the id layout."""

    def __init__(self, spm_processor, dictionary: Dictionary, location_bin_size: int = DEFAULT_LOCATION_BIN_SIZE,
                 prompt_split_quirk: bool | None = None):
        self.sp = spm_processor
        self.dictionary = dictionary
        self.location_bin_size = location_bin_size
        self.bos, self.pad, self.eos, self.unk = dictionary.bos_index, dictionary.pad_index, dictionary.eos_index, dictionary.unk_index
        self.boi, self.eoi = self.index(BOI), self.index(EOI)
        self.grounding = self.index(GROUNDING)
        self.phrase_start, self.phrase_end = self.index(PHRASE_START), self.index(PHRASE_END)
        self.object_start, self.object_end = self.index(OBJECT_START), self.index(OBJECT_END)
        self.delimiter = self.index(DELIMITER)
        self._first_patch_index = self.index(patch_index_token(0))
        # The official demo splits prompts on every symbol from fairseq id spm.vocab_size() on. Off by one, that
        # includes the last ordinary spm piece ('⟨' in the released vocabulary), which is then kept verbatim and
        # starts a new spm chunk. Harmless there, so we keep it for identical ids; in a small new vocabulary the last
        # piece can be a letter ('w') and the quirk would cut words apart, so by default it applies only to the
        # released vocabulary (the only one the official demo ever ran with).
        if prompt_split_quirk is None:
            prompt_split_quirk = is_released_vocabulary(spm_processor)
        first_split_id = spm_processor.vocab_size() + (0 if prompt_split_quirk else 1)
        self._prompt_symbols = dictionary.symbols[first_split_id:]
        self._prompt_splitter = re.compile("(" + "|".join(re.escape(s) for s in self._prompt_symbols) + ")")
        self._prompt_symbol_set = set(self._prompt_symbols)

    # ---- construction
    @classmethod
    def from_files(cls, spm_model: str | os.PathLike, dict_txt: str | os.PathLike,
                   location_bin_size: int = DEFAULT_LOCATION_BIN_SIZE, prompt_split_quirk: bool | None = None) -> "Kosmos2Tokenizer":
        processor = _load_spm(spm_model)
        _check_spm_layout(processor, spm_model)
        if not Path(dict_txt).is_file():
            raise FileNotFoundError(f"dictionary not found: {dict_txt} (expected the {DICT_FILE} that belongs to {spm_model})")
        dictionary = Dictionary.load(dict_txt)
        _check_dictionary_matches_spm(dictionary, processor, dict_txt, spm_model)
        add_kosmos2_symbols(dictionary, location_bin_size)
        return cls(processor, dictionary, location_bin_size, prompt_split_quirk)

    @classmethod
    def from_dir(cls, path: str | os.PathLike, location_bin_size: int = DEFAULT_LOCATION_BIN_SIZE,
                 prompt_split_quirk: bool | None = None) -> "Kosmos2Tokenizer":
        folder = find_tokenizer_files(None, path)
        return cls.from_files(folder / SPM_FILE, folder / DICT_FILE, location_bin_size, prompt_split_quirk)

    @staticmethod
    def build_dictionary_file(spm_model: str | os.PathLike, out_dict_txt: str | os.PathLike) -> Path:
        """Write the dict.txt that belongs to a (newly trained) sentencepiece model: pieces 3..N-1, one `piece 1` per
        line, exactly the layout of the released file. The count column is unused by Kosmos-2."""
        processor = _load_spm(spm_model)
        _check_spm_layout(processor, spm_model)
        out = Path(out_dict_txt)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            for spm_id in range(3, processor.vocab_size()):
                piece = processor.id_to_piece(spm_id)
                if " " in piece or "\n" in piece:
                    raise ValueError(f"spm piece {spm_id} {piece!r} contains whitespace and cannot be written to a fairseq dict.txt")
                f.write(f"{piece} 1\n")
        return out

    # ---- lookups
    def __len__(self) -> int:
        return len(self.dictionary)

    @property
    def vocab_size(self) -> int:
        return len(self.dictionary)

    @property
    def num_location_tokens(self) -> int:
        return self.location_bin_size ** 2

    def index(self, symbol: str) -> int:
        """Id of a symbol; unlike `Dictionary.index` a missing symbol is an error (a silent <unk> would hide bugs)."""
        if symbol not in self.dictionary:
            raise KeyError(f"{symbol!r} is not in the Kosmos-2 dictionary ({len(self.dictionary)} entries)")
        return self.dictionary.indices[symbol]

    def patch_index_id(self, i: int) -> int:
        if not 0 <= i < self.num_location_tokens:
            raise ValueError(f"patch index {i} outside 0..{self.num_location_tokens - 1} (grid {self.location_bin_size}x{self.location_bin_size})")
        return self._first_patch_index + i

    @property
    def grounding_markup_ids(self) -> frozenset[int]:
        """Ids of the tags of grounded text (`<grounding>`, `<phrase>`, `</phrase>`, `<object>`, `</object>`, the
        multi-box delimiter) and of every location token."""
        tags = (self.grounding, self.phrase_start, self.phrase_end, self.object_start, self.object_end, self.delimiter)
        return frozenset(tags) | frozenset(range(self._first_patch_index, self._first_patch_index + self.num_location_tokens))

    def is_patch_index_id(self, token_id: int) -> bool:
        return self._first_patch_index <= token_id < self._first_patch_index + self.num_location_tokens

    # ---- encoding
    def spm_pieces(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def encode_text(self, text: str) -> list[int]:
        """Training encoding (official loaders): spm pieces -> dictionary ids, unknown pieces -> <unk>; no eos."""
        return [self.dictionary.index(p) for p in self.spm_pieces(text)]

    def prompt_pieces(self, text: str) -> list[str]:
        """Official demo prompt split: tags and location tokens verbatim, every other chunk spm-encoded on its own
        (so the text after a tag starts a new word with '▁', and whitespace-only chunks vanish)."""
        pieces: list[str] = []
        for chunk in self._prompt_splitter.split(text):
            if not chunk:
                continue
            pieces.extend([chunk] if chunk in self._prompt_symbol_set else self.spm_pieces(chunk))
        return pieces

    def encode_prompt(self, text: str) -> list[int]:
        """Prompt text -> ids as the official demo/eval does it (no bos/eos; see `image_prompt` for the full layout)."""
        return [self.dictionary.index(p) for p in self.prompt_pieces(text)]

    def image_prompt(self, text: str, num_image_slots: int = 64) -> tuple[list[int], list[bool]]:
        """Inference layout `[<s>, <image>, 4..4+n-1, </image>] + encode_prompt(text)` and the slot mask (True on the
        n image slots); `kosmos2.sequence_layout` says why the slots hold 4, 5, …."""
        return image_text_layout(self.bos, self.boi, self.eoi, num_image_slots, [self.encode_prompt(text)])

    # ---- decoding
    def decode(self, ids: Sequence[int]) -> str:
        """Official `Dictionary.string(ids, 'sentencepiece')`: bos/eos dropped, pieces joined, '▁' -> ' ', stripped.
        Tags stay in the text, e.g. '<grounding> An image of<phrase> a snowman</phrase><object>...'."""
        return self.dictionary.string(ids, "sentencepiece")

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.dictionary[int(i)] for i in ids]
