"""Hugging Face `tokenizers` tokenizers as seqio vocabularies.

A Hugging Face checkpoint ships its tokenizer as ``tokenizer.json``, with its
special tokens named in a few other JSON files next to it.
`HFTokenizerVocabulary` puts that tokenizer behind the `seqio.Vocabulary`
contract, so seqio tasks, preprocessors and feature converters use it the way
they use `seqio.SentencePieceVocabulary`:

* ``encode`` / ``encode_tf`` never add special tokens. seqio appends EOS
  itself (``seqio.preprocessors.append_eos``), and BOS is the model's business.
* ``decode`` / ``decode_tf`` stop at the first EOS (seqio's base class does
  that) and drop PAD, EOS and BOS ids, as SentencePiece drops its control
  symbols.
* ``encode_tf`` / ``decode_tf`` call the Rust tokenizer through
  `tf.numpy_function`, so they work eagerly and inside `tf.data` maps (but not
  in a graph serialised without Python, e.g. a SavedModel or tf.data service).

Special token ids are resolved per token (pad, eos, bos, unk), first match
wins:

1. the constructor argument (an id, or a token string looked up in the vocab);
2. ``tokenizer_config.json``, then ``special_tokens_map.json``: ``eos_token``
   etc., a string or an ``{"content": ...}`` object;
3. ``generation_config.json``, then ``config.json``: ``eos_token_id`` etc.
   (for a list of EOS ids, the first one);
4. unk only: the ``unk_token`` / ``unk_id`` of the model in ``tokenizer.json``;
5. pad falls back to seqio's ``PAD_ID`` (0); the others to None.

Files 2-3 are read from the tokenizer's directory, so a vocabulary built from a
`tokenizers.Tokenizer` object only has 1, 4 and 5.

seqio pads with id 0 whatever the vocabulary says (feature converters, loss
weights), so a pad id other than 0 is honoured only when decoding, and logged.
"""

import hashlib
import json
import logging
import os
from typing import (Any, Dict, FrozenSet, List, Mapping, Optional, Sequence,
                    Tuple, Union)

import numpy as np
import seqio
import tensorflow as tf
import tokenizers

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
# Files naming special tokens by string, then by id; earlier files win.
_TOKEN_STRING_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_TOKEN_ID_FILES = ("generation_config.json", "config.json")
_SPECIAL_NAMES = ("pad", "eos", "bos", "unk")

PathLike = Union[str, os.PathLike]
TokenSpec = Union[int, str, None]


class TokenizerNotFoundError(FileNotFoundError):
  """The tokenizer directory or its ``tokenizer.json`` does not exist."""


class InvalidTokenizerError(ValueError):
  """A tokenizer or special-token file is unreadable, not JSON, or invalid."""


# ----------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------


def _tokenizer_file(path: str) -> str:
  """Returns the ``tokenizer.json`` file for a directory or file ``path``."""
  if tf.io.gfile.isdir(path):
    file = os.path.join(path, TOKENIZER_FILE)
    if not tf.io.gfile.exists(file):
      raise TokenizerNotFoundError(
          f"Tokenizer directory {path!r} has no {TOKENIZER_FILE}.")
    return file
  if not tf.io.gfile.exists(path):
    raise TokenizerNotFoundError(
        f"Tokenizer path {path!r} does not exist; expected a directory "
        f"containing {TOKENIZER_FILE}, or that file itself.")
  return path


def _read_text(path: str) -> str:
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      data = f.read()
    return data.decode("utf-8")
  except (tf.errors.OpError, OSError, UnicodeDecodeError) as err:
    raise InvalidTokenizerError(f"Could not read {path!r}: {err}") from err


def _parse_json_object(text: str, source: str) -> Dict[str, Any]:
  try:
    value = json.loads(text)
  except json.JSONDecodeError as err:
    raise InvalidTokenizerError(f"Invalid JSON in {source!r}: {err}") from err
  if not isinstance(value, dict):
    raise InvalidTokenizerError(
        f"{source!r} holds a JSON {type(value).__name__}, expected an object.")
  return value


def _read_json_object(path: str) -> Optional[Dict[str, Any]]:
  """Parses the JSON object in ``path``; None if there is no such file."""
  if not tf.io.gfile.exists(path):
    return None
  return _parse_json_object(_read_text(path), path)


def _tokenizer_from_json(text: str, source: str) -> tokenizers.Tokenizer:
  try:
    return tokenizers.Tokenizer.from_str(text)
  except Exception as err:  # tokenizers raises a bare Exception.
    raise InvalidTokenizerError(
        f"{source!r} is not a valid Hugging Face tokenizer: {err}") from err


def load_tokenizer(path: PathLike) -> tokenizers.Tokenizer:
  """Loads a Hugging Face tokenizer, exactly as saved.

  Args:
    path: a directory containing ``tokenizer.json``, or that file itself.
      Anything `tf.io.gfile` reads works, e.g. ``gs://`` paths.

  Returns:
    The `tokenizers.Tokenizer`, with whatever truncation and padding it was
    saved with (`HFTokenizerVocabulary` turns both off).

  Raises:
    TokenizerNotFoundError: ``path`` or its ``tokenizer.json`` does not exist.
    InvalidTokenizerError: the file is unreadable, not JSON, or not a
      tokenizer.
  """
  file = _tokenizer_file(os.fspath(path))
  text = _read_text(file)
  _parse_json_object(text, file)  # A clearer message for broken JSON.
  return _tokenizer_from_json(text, file)


# ----------------------------------------------------------------------------
# Special tokens.
# ----------------------------------------------------------------------------


def _token_content(value: Any) -> Optional[str]:
  """The token string of a config value: a string or an AddedToken dict."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _model_unk_id(spec: Mapping[str, Any],
                  tokenizer: tokenizers.Tokenizer) -> Optional[int]:
  """The unk id the ``model`` section of a tokenizer.json declares, if any."""
  model = spec.get("model")
  if not isinstance(model, dict):
    return None
  unk_token = model.get("unk_token")
  if isinstance(unk_token, str):
    return tokenizer.token_to_id(unk_token)
  unk_id = model.get("unk_id")  # Unigram models.
  if isinstance(unk_id, int) and not isinstance(unk_id, bool):
    return unk_id
  return None


class _SpecialTokenResolver:
  """Resolves pad/eos/bos/unk ids in the order the module docstring gives."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, size: int,
               config_dir: Optional[str], model_unk_id: Optional[int]):
    self._tokenizer = tokenizer
    self._size = size
    self._model_unk_id = model_unk_id
    self._configs: List[Tuple[str, Dict[str, Any], str]] = []
    if config_dir is not None:
      for names, suffix in ((_TOKEN_STRING_FILES, "_token"),
                            (_TOKEN_ID_FILES, "_token_id")):
        for name in names:
          file = os.path.join(config_dir, name)
          config = _read_json_object(file)
          if config is not None:
            self._configs.append((file, config, suffix))

  def _check_id(self, token_id: Any, what: str) -> int:
    if (isinstance(token_id, bool) or
        not isinstance(token_id, (int, np.integer)) or
        not 0 <= token_id < self._size):
      raise InvalidTokenizerError(
          f"{what} is {token_id!r}, not a token id in [0, {self._size}).")
    return int(token_id)

  def _lookup(self, token: str, what: str) -> int:
    token_id = self._tokenizer.token_to_id(token)
    if token_id is None:
      raise InvalidTokenizerError(
          f"{what} is {token!r}, which is not in the tokenizer's vocabulary.")
    return token_id

  def resolve(self, name: str, override: TokenSpec) -> Tuple[Optional[int],
                                                             str]:
    """Returns (id or None, where it came from) for special token ``name``."""
    if override is not None:
      what = f"{name}_id argument"
      if isinstance(override, str):
        return self._lookup(override, what), what
      return self._check_id(override, what), what
    for file, config, suffix in self._configs:
      key = name + suffix
      value = config.get(key)
      what = f"{key!r} in {file!r}"
      if suffix == "_token":
        token = _token_content(value)
        if token is not None:
          return self._lookup(token, what), file
      else:
        if isinstance(value, list):  # e.g. Llama 3: several EOS ids.
          value = value[0] if value else None
        if value is not None:
          return self._check_id(value, what), file
    if name == "unk" and self._model_unk_id is not None:
      return self._check_id(self._model_unk_id, "model unk token"), (
          TOKENIZER_FILE)
    if name == "pad":
      return seqio.vocabularies.PAD_ID, "seqio default"
    return None, "not found"


# ----------------------------------------------------------------------------
# The vocabulary.
# ----------------------------------------------------------------------------


class HFTokenizerVocabulary(seqio.Vocabulary):
  """A Hugging Face `tokenizers.Tokenizer` as a `seqio.Vocabulary`.

  Encoding adds no special tokens and ignores any truncation or padding saved
  in ``tokenizer.json`` (seqio trims, pads and appends EOS itself). Special
  tokens written literally in the text ("</s>") are still matched, as in
  Hugging Face. Decoding drops PAD, EOS and BOS ids; other special tokens
  (unk, sentinels) stay in the text unless ``skip_special_tokens`` is set.

  ``extra_ids`` appends sentinel tokens ``<extra_id_{i}>`` to the tokenizer in
  T5's order (``<extra_id_0>`` gets the highest id), for span corruption on a
  tokenizer that has none; a T5 tokenizer.json already has them, so keep it
  at 0 there. As in `seqio.SentencePieceVocabulary`, the sentinels are real
  tokens: ``vocab_size`` and ``_base_vocab_size`` both count them, and they
  encode from and decode to their text.

  Instances pickle and deep-copy (gin and seqio copy vocabularies) by keeping
  the tokenizer JSON and rebuilding the Rust tokenizer.
  """

  def __init__(
      self,
      tokenizer: Union[PathLike, tokenizers.Tokenizer],
      *,
      eos_id: TokenSpec = None,
      pad_id: TokenSpec = None,
      bos_id: TokenSpec = None,
      unk_id: TokenSpec = None,
      extra_ids: int = 0,
      skip_special_tokens: bool = False,
  ):
    """Creates the vocabulary.

    Args:
      tokenizer: a directory containing ``tokenizer.json`` (and optionally
        the special-token files listed in the module docstring), that file
        itself, or a `tokenizers.Tokenizer` (copied, never mutated).
      eos_id: EOS, as an id or a token string; None reads the files.
      pad_id: PAD, likewise; 0 (seqio's PAD_ID) when nothing names one.
      bos_id: BOS, likewise. seqio never adds it.
      unk_id: UNK, likewise. seqio's ``decode`` maps ids past the vocabulary
        to it.
      extra_ids: number of ``<extra_id_{i}>`` sentinels to append.
      skip_special_tokens: also drop every other special token when decoding.

    Raises:
      TokenizerNotFoundError: the path or its ``tokenizer.json`` is missing.
      InvalidTokenizerError: a file is unreadable or invalid, a special token
        is not in the vocabulary, or an id is out of range.
      ValueError: ``extra_ids`` is negative or the sentinels already exist.
    """
    if isinstance(tokenizer, tokenizers.Tokenizer):
      self._path = None
      self._source = "<tokenizers.Tokenizer>"
      self._tokenizer_json = tokenizer.to_str()
      config_dir = None
    elif isinstance(tokenizer, (str, os.PathLike)):
      path = os.fspath(tokenizer)
      file = _tokenizer_file(path)
      self._path = path
      self._source = file
      self._tokenizer_json = _read_text(file)
      config_dir = path if file != path else os.path.dirname(path)
    else:
      raise TypeError(
          "HFTokenizerVocabulary needs a path or a tokenizers.Tokenizer, got "
          f"{type(tokenizer).__name__}.")
    if isinstance(extra_ids, bool) or not isinstance(extra_ids, int) or (
        extra_ids < 0):
      raise ValueError(f"extra_ids must be an int >= 0, got {extra_ids!r}.")
    super().__init__(extra_ids=extra_ids)
    self._skip_special_tokens = bool(skip_special_tokens)

    spec = _parse_json_object(self._tokenizer_json, self._source)
    self._tokenizer = self._build_tokenizer()
    self._json_md5 = hashlib.md5(
        self._tokenizer_json.encode("utf-8")).hexdigest()

    resolver = _SpecialTokenResolver(
        self._tokenizer, self._size, config_dir,
        _model_unk_id(spec, self._tokenizer))
    overrides = dict(pad=pad_id, eos=eos_id, bos=bos_id, unk=unk_id)
    ids, sources = {}, {}
    for name in _SPECIAL_NAMES:
      ids[name], sources[name] = resolver.resolve(name, overrides[name])
    self._special_ids: Dict[str, Optional[int]] = ids
    self._drop_on_decode: FrozenSet[int] = frozenset(
        ids[name] for name in ("pad", "eos", "bos") if ids[name] is not None)
    self._warn_about_padding(ids["pad"], sources["pad"])

  # -- construction ----------------------------------------------------------

  def _build_tokenizer(self) -> tokenizers.Tokenizer:
    """Rebuilds the Rust tokenizer from JSON; sets ``_size``."""
    tokenizer = _tokenizer_from_json(self._tokenizer_json, self._source)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    size = _id_bound(tokenizer, self._source)
    if self._extra_ids:
      names = [f"<extra_id_{i}>" for i in reversed(range(self._extra_ids))]
      present = [n for n in names if tokenizer.token_to_id(n) is not None]
      if present:
        raise ValueError(
            f"{self._source!r} already has sentinel token {present[-1]!r}; "
            "use extra_ids=0 to keep the tokenizer's own sentinels.")
      tokenizer.add_special_tokens([
          tokenizers.AddedToken(n, normalized=False, special=True)
          for n in names])
      got = [tokenizer.token_to_id(n) for n in names]
      if got != list(range(size, size + self._extra_ids)):
        raise InvalidTokenizerError(
            f"Appending {self._extra_ids} sentinels to {self._source!r} "
            f"gave ids {got[:3]}..., expected {size}, {size + 1}, ...")
      size += self._extra_ids
    self._size = size
    return tokenizer

  def _warn_about_padding(self, pad_id: int, source: str) -> None:
    if pad_id != seqio.vocabularies.PAD_ID:
      logger.warning(
          "%s: pad id %d (from %s) is not seqio's PAD_ID %d. seqio pads with "
          "%d regardless; %d is only dropped when decoding.", self._source,
          pad_id, source, seqio.vocabularies.PAD_ID, seqio.vocabularies.PAD_ID,
          pad_id)
      return
    added = self._tokenizer.get_added_tokens_decoder().get(pad_id)
    if source == "seqio default" and not (added is not None and added.special):
      logger.warning(
          "%s names no pad token, so id %d (%r, not a special token) is "
          "treated as seqio padding and dropped when decoding.", self._source,
          pad_id, self._tokenizer.id_to_token(pad_id))

  # -- pickling --------------------------------------------------------------

  def __getstate__(self):
    state = self.__dict__.copy()
    del state["_tokenizer"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._tokenizer = self._build_tokenizer()

  # -- properties ------------------------------------------------------------

  @property
  def tokenizer(self) -> tokenizers.Tokenizer:
    """The wrapped tokenizer (no truncation or padding, sentinels added)."""
    return self._tokenizer

  @property
  def path(self) -> Optional[str]:
    """The path the vocabulary was loaded from; None for a Tokenizer."""
    return self._path

  @property
  def pad_id(self) -> int:
    return self._special_ids["pad"]

  @property
  def eos_id(self) -> Optional[int]:
    return self._special_ids["eos"]

  @property
  def bos_id(self) -> Optional[int]:
    return self._special_ids["bos"]

  @property
  def unk_id(self) -> Optional[int]:
    return self._special_ids["unk"]

  @property
  def _base_vocab_size(self) -> int:
    """One past the largest id, sentinels included (as SentencePiece)."""
    return self._size

  @property
  def vocab_size(self) -> int:
    return self._base_vocab_size

  # -- Python encode / decode ------------------------------------------------

  def _encode(self, s: str) -> List[int]:
    if not isinstance(s, str):
      raise TypeError(
          f"{type(self).__name__}.encode needs a str, got {type(s).__name__}.")
    return self._tokenizer.encode(s, add_special_tokens=False).ids

  def _decode(self, ids: Sequence[int]) -> str:
    kept = []
    for token_id in ids:
      token_id = int(token_id)
      if token_id in self._drop_on_decode:
        continue
      if not 0 <= token_id < self._size:
        if self.unk_id is None:
          raise ValueError(
              f"Token id {token_id} is outside the vocabulary [0, "
              f"{self._size}) of {self._source!r}, which has no unk token.")
        token_id = self.unk_id
      kept.append(token_id)
    return self._tokenizer.decode(
        kept, skip_special_tokens=self._skip_special_tokens)

  # -- TensorFlow encode / decode --------------------------------------------

  def _encode_bytes(self, s: Union[bytes, np.ndarray]) -> np.ndarray:
    if isinstance(s, np.ndarray):
      s = s.item()
    return np.asarray(self._encode(s.decode("utf-8")), dtype=np.int32)

  def _encode_batch_bytes(
      self, strings: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    encoded = [self._encode(s.decode("utf-8")) for s in strings.tolist()]
    lengths = np.asarray([len(e) for e in encoded], dtype=np.int64)
    values = np.fromiter((i for e in encoded for i in e), dtype=np.int32,
                         count=int(lengths.sum()))
    return values, lengths

  def _encode_tf(self, s: tf.Tensor) -> Union[tf.Tensor, tf.RaggedTensor]:
    """Encodes a string tensor in TensorFlow (eager or graph).

    Args:
      s: a tf.string tensor of known rank.

    Returns:
      For a scalar, a 1-D tf.int32 tensor of ids. For rank R > 0, a
      tf.int32 RaggedTensor of shape ``s.shape + [None]``, as tf_text's
      tokenizers give.
    """
    s = tf.convert_to_tensor(s, dtype=tf.string)
    rank = s.shape.rank
    if rank is None:
      raise ValueError("encode_tf needs a string tensor of known rank.")
    if rank == 0:
      ids = tf.numpy_function(self._encode_bytes, [s], tf.int32,
                              stateful=False, name="hf_tokenizer_encode")
      ids.set_shape([None])
      return ids
    values, lengths = tf.numpy_function(
        self._encode_batch_bytes, [tf.reshape(s, [-1])], [tf.int32, tf.int64],
        stateful=False, name="hf_tokenizer_encode_batch")
    values.set_shape([None])
    lengths.set_shape([s.shape.num_elements()])
    ids = tf.RaggedTensor.from_row_lengths(values, lengths, validate=False)
    outer = tf.shape(s, out_type=tf.int64)
    for axis in range(rank - 1, 0, -1):  # Restore the leading dimensions.
      ids = tf.RaggedTensor.from_uniform_row_length(
          ids, outer[axis], nrows=tf.reduce_prod(outer[:axis]), validate=False)
    return ids

  def _decode_rows(self, ids: np.ndarray) -> np.ndarray:
    rows = ids.reshape(int(np.prod(ids.shape[:-1])), ids.shape[-1])
    text = [self._decode(row.tolist()).encode("utf-8") for row in rows]
    return np.asarray(text, dtype=object).reshape(ids.shape[:-1])

  def _decode_tf(self, ids: Union[tf.Tensor, tf.RaggedTensor]) -> tf.Tensor:
    """Decodes id tensors in TensorFlow (eager or graph).

    Args:
      ids: a tf.int32/int64 tensor (or RaggedTensor) of rank >= 1; the last
        axis is the sequence.

    Returns:
      A tf.string tensor of shape ``ids.shape[:-1]``.
    """
    if isinstance(ids, tf.RaggedTensor):
      ids = ids.to_tensor(default_value=self.pad_id)
    ids = tf.convert_to_tensor(ids)
    if ids.shape.rank == 0:
      raise ValueError("decode_tf needs ids of rank >= 1, got a scalar.")
    text = tf.numpy_function(self._decode_rows, [ids], tf.string,
                             stateful=False, name="hf_tokenizer_decode")
    if ids.shape.rank is not None:
      text.set_shape(ids.shape[:-1])
    return text

  # -- identity --------------------------------------------------------------

  def _identity(self) -> Tuple[Any, ...]:
    return (self._json_md5, self._extra_ids, self._skip_special_tokens,
            tuple(self._special_ids[n] for n in _SPECIAL_NAMES))

  def __eq__(self, other):
    if not isinstance(other, HFTokenizerVocabulary):
      return False
    return (self._identity() == other._identity() and
            self._tokenizer_json == other._tokenizer_json)

  def __hash__(self):
    return hash(self._identity())

  def __str__(self) -> str:
    ids = ", ".join(f"{n}_id={self._special_ids[n]}" for n in _SPECIAL_NAMES)
    return (f"HFTokenizerVocabulary(source={self._source!r}, "
            f"vocab_size={self.vocab_size}, {ids}, "
            f"extra_ids={self._extra_ids}, md5={self._json_md5})")

  __repr__ = __str__


def _id_bound(tokenizer: tokenizers.Tokenizer, source: str) -> int:
  """One past the largest id of ``tokenizer``, added tokens included."""
  vocab = tokenizer.get_vocab(with_added_tokens=True)
  if not vocab:
    raise InvalidTokenizerError(f"{source!r} has an empty vocabulary.")
  return max(vocab.values()) + 1
