"""PyTorch weight files as numpy arrays, without torch: safetensors and torch.save zips.

safetensors: u64 little-endian header length, a JSON header ({name: {dtype, shape,
data_offsets}}, plus `__metadata__`), then the raw little-endian buffers.
torch.save (torch >= 1.6, also HF's `pytorch_model.bin`): a zip with `<stem>/data.pkl`
and `<stem>/data/<key>` (the stem is the file's name at save time, `archive` in older
files). data.pkl rebuilds each tensor with `torch._utils._rebuild_tensor_v2` from a
persistent id `('storage', <torch.XStorage>, key, location, numel)`; the restricted
unpickler below maps exactly those globals to numpy and refuses every other one, so a
file can build nothing but arrays, tuples and dicts.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from perceiver_ar_t5x import fileio
from perceiver_ar_t5x.convert.model_dir import ConversionError

_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "bf16", "I64": "<i8",
                       "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}
_STORAGES = {"DoubleStorage": "f8", "FloatStorage": "f4", "HalfStorage": "f2",
             "BFloat16Storage": "bf16", "LongStorage": "i8", "IntStorage": "i4",
             "ShortStorage": "i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?"}


_MAX_HEADER = 100 * 1024 * 1024  # the safetensors package's limit


class WeightsError(ConversionError):
  """A file that is not a weights file this reader knows, or one it refuses to unpickle."""


def _frombuffer(buf: bytes, dtype: str, byteorder: str = "<") -> np.ndarray:
  """A flat array of `buf`; bfloat16 (no numpy dtype) widened exactly to float32."""
  if dtype == "bf16":
    bits = np.frombuffer(buf, byteorder + "u2").astype(np.uint32) << 16
    return bits.view(np.float32)
  if dtype[0] in "<>":
    dtype = dtype[1:]
  return np.frombuffer(buf, np.dtype(dtype).newbyteorder(byteorder))


def read_safetensors(data: bytes, name: str = "safetensors") -> dict[str, np.ndarray]:
  """{tensor name: array} from the bytes of a .safetensors file (bf16 widened to float32).

  The one safetensors reader (krasserm imports and our own exports): every entry's dtype,
  shape and data offsets are checked against the data, so a truncated or corrupt file is
  one error naming the tensor.
  """
  if len(data) < 8:
    raise WeightsError(f"{name}: too short for a safetensors file ({len(data)} bytes)")
  (size,) = struct.unpack("<Q", data[:8])
  what = f"{name} is neither a safetensors file nor a torch.save zip"
  if size > min(len(data) - 8, _MAX_HEADER):
    raise WeightsError(f"{what}: its header length {size} exceeds the file ({len(data)} bytes;"
                       f" truncated or corrupt?)")
  try:
    header = json.loads(data[8:8 + size])
  except (UnicodeDecodeError, json.JSONDecodeError):
    raise WeightsError(f"{what}: its header is not JSON") from None
  if not isinstance(header, dict):
    raise WeightsError(f"{what}: its header is a JSON {type(header).__name__}, not an object")
  body = memoryview(data)[8 + size:]
  return {key: _safetensor(body, key, info, name) for key, info in header.items()
          if key != "__metadata__"}


def _safetensor(body: memoryview, key: str, info: Any, name: str) -> np.ndarray:
  try:
    dtype, shape = _SAFETENSORS_DTYPES[info["dtype"]], tuple(int(n) for n in info["shape"])
    begin, end = (int(n) for n in info["data_offsets"])
  except (KeyError, TypeError, ValueError):
    raise WeightsError(f"{name}: tensor {key} has the entry {str(info)[:80]} (expected dtype "
                       f"one of {sorted(_SAFETENSORS_DTYPES)}, shape, data_offsets)") from None
  itemsize = 2 if dtype == "bf16" else np.dtype(dtype).itemsize
  count = int(np.prod(shape, dtype=np.int64))
  if not 0 <= begin <= end <= len(body) or end - begin != count * itemsize:
    raise WeightsError(f"{name}: tensor {key} {info['dtype']}{list(shape)} has data_offsets "
                       f"{[begin, end]}, the data is {len(body)} bytes")
  return _frombuffer(body[begin:end], dtype).reshape(shape).copy()


class _StorageType:
  """What the unpickler returns for the global `torch.FloatStorage` etc.: a numpy dtype."""

  def __init__(self, dtype: str) -> None:
    self.dtype = dtype


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple[int, ...],
                    stride: tuple[int, ...], *unused: Any) -> np.ndarray:
  """torch._utils._rebuild_tensor_v2: a (possibly strided) view of a flat storage, copied."""
  if not size:
    return np.array(storage[offset])
  needed = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
  if min(size) > 0 and needed > storage.size:
    raise WeightsError(f"a tensor {list(size)} reads past its storage of {storage.size}")
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=[s * storage.itemsize for s in stride])
  return np.array(view)


def _rebuild_parameter(data: np.ndarray, *unused: Any) -> np.ndarray:
  return data  # torch._utils._rebuild_parameter: an nn.Parameter is its data here


class _TorchUnpickler(pickle.Unpickler):
  """data.pkl of a torch.save zip: tensors as numpy arrays; any other global is refused."""

  _GLOBALS: dict[tuple[str, str], Any] = {
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("collections", "OrderedDict"): collections.OrderedDict,
      **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGES.items()}}

  def __init__(self, file: io.BytesIO, archive: zipfile.ZipFile, stem: str, byteorder: str,
               name: str) -> None:
    super().__init__(file)
    self._archive, self._stem, self._byteorder, self._name = archive, stem, byteorder, name
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in self._GLOBALS:
      raise WeightsError(f"{self._name}: refusing to unpickle the global {module}.{name} "
                         f"(only tensors, storages and dicts are read)")
    return self._GLOBALS[(module, name)]

  def persistent_load(self, pid: Any) -> np.ndarray:
    if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
        or not isinstance(pid[1], _StorageType)):
      raise WeightsError(f"{self._name}: unknown persistent id {str(pid)[:80]}")
    _, kind, key, _, numel = pid
    if key not in self._storages:
      try:
        buf = self._archive.read(f"{self._stem}/data/{key}")
      except KeyError:
        raise WeightsError(f"{self._name}: storage {key} is missing") from None
      flat = _frombuffer(buf, kind.dtype, self._byteorder)
      if flat.size < numel:
        raise WeightsError(f"{self._name}: storage {key} has {flat.size} of {numel} elements")
      self._storages[key] = flat
    return self._storages[key]


def read_torch_zip(data: bytes, name: str = "torch file") -> dict[str, Any]:
  """The unpickled object of a torch.save zip (a state_dict: {name: array})."""
  archive = zipfile.ZipFile(io.BytesIO(data))
  pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
  if len(pickles) != 1:
    raise WeightsError(f"{name}: a zip without exactly one <stem>/data.pkl; not a torch.save "
                       f"file (found {pickles[:3]})")
  stem = pickles[0].split("/")[0]
  byteorder = "<"
  if f"{stem}/byteorder" in archive.namelist():
    byteorder = {b"little": "<", b"big": ">"}[archive.read(f"{stem}/byteorder").strip()]
  try:
    return _TorchUnpickler(io.BytesIO(archive.read(pickles[0])), archive, stem, byteorder,
                           name).load()
  except (pickle.UnpicklingError, EOFError) as e:
    raise WeightsError(f"{name}: damaged data.pkl ({type(e).__name__}: {e})") from None


def read_weights(data: bytes, name: str) -> dict[str, np.ndarray]:
  """{tensor name: array} from the bytes of a safetensors file or a torch.save'd state_dict."""
  if data[:4] == b"PK\x03\x04":
    state = read_torch_zip(data, name)
    if not isinstance(state, dict):
      raise WeightsError(f"{name}: holds a {type(state).__name__}, not a state_dict")
    for key, value in state.items():
      if not isinstance(value, np.ndarray):
        raise WeightsError(f"{name}: {key} is a {type(value).__name__}, not a tensor")
    return dict(state)
  if data[:2] == b"\x80\x02" or data[:1] == b"\x8a":
    raise WeightsError(f"{name}: a legacy (torch < 1.6, non-zip) torch file; re-save it with "
                       f"torch.save from torch >= 1.6 or as safetensors")
  return read_safetensors(data, name)


HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # the first present is read


def locate_hub(path: str, config: Mapping[str, Any] | str | None, what: str
               ) -> tuple[str, Mapping[str, Any] | str]:
  """(weights file, config) of a hub folder, or of a weights file with config.json beside it
  (`what` names the source in errors)."""
  if not fileio.gfile.exists(path):
    raise ConversionError(f"{path} does not exist")
  if fileio.gfile.isdir(path):
    sharded = [n for n in HUB_WEIGHTS if fileio.gfile.exists(os.path.join(path, n + ".index.json"))]
    if sharded:
      raise ConversionError(f"{path}: sharded weights ({sharded[0]}.index.json) are not "
                            f"supported; save the model unsharded "
                            f"(save_pretrained(max_shard_size='100GB'))")
    found = [os.path.join(path, n) for n in HUB_WEIGHTS
             if fileio.gfile.exists(os.path.join(path, n))]
    if not fileio.gfile.exists(os.path.join(path, "config.json")) or not found:
      raise ConversionError(f"{path} is not a {what} hub folder (config.json and one of "
                            f"{', '.join(HUB_WEIGHTS)})")
    return found[0], config if config is not None else os.path.join(path, "config.json")
  if config is None:
    config = os.path.join(os.path.dirname(path), "config.json")
    if not fileio.gfile.exists(config):
      raise ConversionError(f"{path}: no config.json beside it; pass config=")
  return path, config
