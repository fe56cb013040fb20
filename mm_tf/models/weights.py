"""Save and load backbone weights, checking layer names and shapes before loading.

Two formats hold the same thing, the variables of every layer of a flat model (a
backbone), keyed by layer name:

* Keras `.weights.h5` (`model.save_weights`). Keras 3 stores each layer's variables as
  `layers/<class_name>[_k]/vars/<i>` with the layer's name in the `name` attribute of the
  `vars` group; we read those names with h5py to check the file, then assign the arrays
  by layer name (not by position, as `model.load_weights` would).
* `.npz` of named arrays: key `"<layer_name>/<variable_name>"`, e.g. `conv1_1/kernel`
  [3,3,C,64], `conv1_1_bn/gamma`, `conv1_1_bn/beta`, `conv1_1_bn/moving_mean`,
  `conv1_1_bn/moving_variance` (all [64]). Kernels are in Keras layout
  [kh, kw, in, out]. This is the format to target when converting weights from another
  framework.

Both savers write atomically (a temporary file in the destination folder, then
`os.replace`), so a crash never leaves a truncated weight file. Both loaders raise
`WeightsMismatchError` naming the first layer (in model order) that is missing from the
file or has a different shape, and the first unexpected layer of the file, before any
variable is changed. A file that is missing, of another format or unreadable (a
truncated copy) raises `WeightsFileError` (a WeightsMismatchError) naming it, from
`check_weights_file`, which binaries also call on `--weights`.

Example:
    save_backbone_weights(backbone, "/tmp/mm.weights.h5")
    load_backbone_weights(model.backbone, "/tmp/mm.weights.h5")
"""

import os
import tempfile
import zipfile

import h5py
import numpy as np

H5_SUFFIX = ".weights.h5"
NPZ_SUFFIX = ".npz"


class WeightsMismatchError(ValueError):
    """A weight file does not fit the model; `layer`, `expected`, `found` say where and how."""

    def __init__(self, message, layer=None, expected=None, found=None):
        super().__init__(message)
        self.layer = layer
        self.expected = expected
        self.found = found


class WeightsFileError(WeightsMismatchError):
    """A weight file is missing, not HDF5 (.weights.h5) or zip (.npz), or unreadable."""


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"
# Errors of h5py and zipfile on a damaged or cut-short file.
_READ_ERRORS = (OSError, EOFError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile)


def _reason(error: Exception) -> str:
    """An exception's message on one line (h5py's span several)."""
    return " ".join(str(error).split())[:300] or type(error).__name__


def check_weights_file(path) -> None:
    """Raises WeightsFileError naming `path` unless it exists, starts like its format
    (`.npz`: zip; anything else: HDF5, as Keras writes .weights.h5) and opens (a
    truncated file fails here: both formats keep their index at its end)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsFileError(f"{path}: weights file not found")
    npz = path.endswith(NPZ_SUFFIX)
    signature, what = (ZIP_SIGNATURE, "an .npz (zip) of named arrays") if npz else (
        HDF5_SIGNATURE, "a Keras .weights.h5 (HDF5) file")
    with open(path, "rb") as f:
        head = f.read(len(signature))
    if head != signature:
        raise WeightsFileError(f"{path}: not {what} (it starts with {head!r})")
    try:
        if npz:
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        else:
            with h5py.File(path, "r") as f:
                f.visit(lambda name: None)
    except _READ_ERRORS as e:
        raise WeightsFileError(f"{path}: cannot read {what}, truncated or damaged? "
                               f"({_reason(e)})") from None


def _model_layers(model):
    """Ordered dict layer name -> list of (variable name, variable) of layers with weights."""
    layers = {}
    for layer in model.layers:
        variables = list(layer.weights)
        if not variables:
            continue
        if getattr(layer, "layers", None):
            # A nested model/layer would be stored one level deeper by Keras; backbones
            # are flat, and guessing a nested layout would hide real mismatches.
            raise ValueError(
                f"layer {layer.name!r} of {model.name!r} has sub-layers; weight files hold "
                "flat models (a backbone): pass model.backbone, not the segmentation model")
        names = [v.name for v in variables]
        if len(set(names)) != len(names):
            raise ValueError(f"layer {layer.name!r} has duplicate variable names {names}")
        layers[layer.name] = list(zip(names, variables))
    return layers


def _check(model_layers, file_shapes, path):
    """Raise WeightsMismatchError unless `file_shapes` (name -> [shape]) fits the model."""
    for layer_name, variables in model_layers.items():
        expected = [tuple(v.shape) for _, v in variables]
        if layer_name not in file_shapes:
            raise WeightsMismatchError(
                f"{path}: layer {layer_name!r} is missing from the file (expected variables "
                f"{[n for n, _ in variables]} of shapes {expected})",
                layer=layer_name, expected=expected, found=None)
        found = [tuple(s) if s is not None else None for s in file_shapes[layer_name]]
        for (var_name, _), want, got in zip(variables, expected, found + [None] * len(expected)):
            if want != got:
                what = "nothing" if got is None else f"shape {got}"
                raise WeightsMismatchError(
                    f"{path}: layer {layer_name!r} variable {var_name!r}: expected shape "
                    f"{want}, found {what}", layer=layer_name, expected=want, found=got)
        if len(found) > len(expected):
            raise WeightsMismatchError(
                f"{path}: layer {layer_name!r} has {len(found)} variables in the file, the "
                f"model has {len(expected)}", layer=layer_name, expected=expected, found=found)
    for layer_name in file_shapes:
        if layer_name not in model_layers:
            raise WeightsMismatchError(
                f"{path}: the file has layer {layer_name!r} which the model lacks "
                "(a different architecture?)", layer=layer_name, expected=None,
                found=file_shapes[layer_name])


def _assign(model_layers, arrays):
    """Assign arrays (layer name -> list of arrays, model order) to the model's variables."""
    for layer_name, variables in model_layers.items():
        for (_, variable), value in zip(variables, arrays[layer_name]):
            variable.assign(value)


def _atomic_write(path, suffix, write):
    """Call write(tmp_path) on a temp file beside `path` (same suffix), then os.replace it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _h5_layers(f, path):
    """Dict layer name -> list of h5py datasets in variable order, from an open Keras file."""
    layers = {}
    groups = []
    # Keras writes each layer's variables as datasets "0", "1", ... of a `vars` group whose
    # `name` attribute is the layer's name.
    f.visititems(lambda key, obj: groups.append(key) if (
        isinstance(obj, h5py.Group) and key.split("/")[-1] == "vars") else None)
    for key in groups:
        group = f[key]
        datasets = sorted((k for k in group if isinstance(group[k], h5py.Dataset)), key=int)
        if not datasets:
            continue
        name = group.attrs.get("name", key)
        name = name.decode() if isinstance(name, bytes) else str(name)
        if name in layers:
            raise WeightsMismatchError(f"{path}: layer name {name!r} appears twice", layer=name)
        layers[name] = [group[k] for k in datasets]
    return layers


def save_backbone_weights(model, path):
    """Write `model`'s weights to `path` (`.weights.h5`, or `.npz` via save_npz) atomically."""
    path = os.fspath(path)
    if path.endswith(NPZ_SUFFIX):
        return save_npz(model, path)
    if not path.endswith(H5_SUFFIX):
        raise ValueError(f"weight file {path!r} must end with {H5_SUFFIX} or {NPZ_SUFFIX}")
    _model_layers(model)  # Refuse nested models before writing anything.
    _atomic_write(path, H5_SUFFIX, model.save_weights)


def load_backbone_weights(model, path):
    """Check then load `path` (`.weights.h5` or `.npz`) into `model`, matching layers by name."""
    path = os.fspath(path)
    if path.endswith(NPZ_SUFFIX):
        return load_npz(model, path)
    check_weights_file(path)
    model_layers = _model_layers(model)
    with h5py.File(path, "r") as f:
        datasets = _h5_layers(f, path)
        # Shapes first: nothing is read into memory or assigned unless the file fits.
        _check(model_layers, {k: [d.shape for d in v] for k, v in datasets.items()}, path)
        try:
            arrays = {k: [d[()] for d in v] for k, v in datasets.items()}
        except _READ_ERRORS as e:
            raise WeightsFileError(f"{path}: cannot read the weights, truncated or damaged? "
                                   f"({_reason(e)})") from None
    _assign(model_layers, arrays)


def blend_with_weights(model, path, fraction: float) -> None:
    """Set each variable v of `model` to fraction * (its array in `path`) + (1 - fraction)
    * v: weight-space ensembling of two networks of one architecture (WiSE-FT, Wortsman
    et al. 2022). The file is checked as by `load_backbone_weights` before any change."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"blend fraction {fraction}: expected a value in [0, 1]")
    current = [np.asarray(v.numpy()) for v in model.weights]
    load_backbone_weights(model, path)
    for variable, own in zip(model.weights, current):
        variable.assign(fraction * np.asarray(variable.numpy()) + (1.0 - fraction) * own)


def save_npz(model, path):
    """Write `model`'s weights as an .npz of "<layer>/<variable>" -> array, atomically."""
    path = os.fspath(path)
    if not path.endswith(NPZ_SUFFIX):
        raise ValueError(f"npz weight file {path!r} must end with {NPZ_SUFFIX}")
    arrays = {f"{layer}/{var}": np.asarray(v.numpy())
              for layer, variables in _model_layers(model).items() for var, v in variables}

    def write(tmp):
        # A file object: np.savez would append ".npz" to a name.
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    _atomic_write(path, NPZ_SUFFIX, write)


def load_npz(model, path):
    """Check then load an .npz of "<layer>/<variable>" arrays into `model`."""
    path = os.fspath(path)
    check_weights_file(path)
    model_layers = _model_layers(model)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (*_READ_ERRORS, ValueError) as e:  # ValueError: a member that is no array.
        raise WeightsFileError(f"{path}: cannot read the arrays, truncated or damaged? "
                               f"({_reason(e)})") from None
    by_layer = {}
    for key, array in arrays.items():
        layer, _, var = key.rpartition("/")
        if not layer:
            raise WeightsMismatchError(f"{path}: key {key!r} is not '<layer>/<variable>'",
                                       layer=key)
        by_layer.setdefault(layer, {})[var] = array
    # Shapes in the model's variable order (None where the file lacks a variable).
    file_shapes = {}
    for layer, stored in by_layer.items():
        names = [n for n, _ in model_layers[layer]] if layer in model_layers else list(stored)
        file_shapes[layer] = [stored[n].shape if n in stored else None for n in names]
    _check(model_layers, file_shapes, path)
    for layer, stored in by_layer.items():
        extra = sorted(set(stored) - {n for n, _ in model_layers[layer]})
        if extra:
            raise WeightsMismatchError(f"{path}: unexpected variable '{layer}/{extra[0]}'",
                                       layer=layer, found=stored[extra[0]].shape)
    _assign(model_layers, {layer: [by_layer[layer][n] for n, _ in variables]
                           for layer, variables in model_layers.items()})
