"""scn-eval: decode a .scn file, rebuild the model, and measure it on its dataset.

    scn-eval model.scn                      accuracy, file size, bits/weight, channels left
    scn-eval model.scn --json               the same as one JSON object
    scn-eval model.scn --dataset synthetic  evaluate on another dataset (same input shape)
    scn-eval model.scn --export out.safetensors   a plain float state_dict of the shrunk model
    scn-eval model.scn --onnx out.onnx      ONNX with integer weights (--onnx-form float: floats),
                                            checked against scn on the test set (onnxruntime)
    scn-eval model.scn --entropy-code out.scn   the same model, its payload entropy coded

The model is evaluated with the normalisation it was trained with (the mean and std in the
file's header), on the test split of the dataset its header names.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn

from scn import format as scn_format
from scn import io, size
from scn.data import ImageData
from scn.errors import DataError, ScnError
from scn.evaluation import evaluate
from scn.quant import sc_layers

DATASETS = ("fashion_mnist", "cifar10", "image_folder", "synthetic")
_BY_NAME = {"fashion_mnist": "fashion_mnist", "synthetic": "synthetic", "cifar10": "cifar10",
            "cifar10-jpeg": "cifar10"}  # dataset names of files written before `loader` was recorded
SYNTHETIC_LIMITS = {"classes": 1000, "image_elements": 1 << 14, "images": 200_000}


def _check_synthetic(info: dict, kwargs: dict) -> None:
    """The synthetic dataset is generated to the header's shape: keep that shape small, so a
    file cannot make scn-eval allocate gigabytes."""
    shape, classes = info.get("input_shape") or [1, 28, 28], info.get("classes") or []
    try:
        elements = math.prod(int(s) for s in shape)
        images = int(kwargs.get("num_train", 512)) + int(kwargs.get("num_test", 256))
    except (TypeError, ValueError):
        elements = images = -1
    if (not 0 < elements <= SYNTHETIC_LIMITS["image_elements"] or len(classes) > SYNTHETIC_LIMITS["classes"]
            or not 0 < images <= SYNTHETIC_LIMITS["images"]):
        raise DataError(f"the file asks for a synthetic dataset of {len(classes)} classes, {images} "
                        f"images and inputs of shape {shape}, beyond what scn-eval generates (at most "
                        f"{SYNTHETIC_LIMITS['classes']} classes, {SYNTHETIC_LIMITS['images']:,} images and "
                        f"{SYNTHETIC_LIMITS['image_elements']:,} values per image). Evaluate it on its "
                        "real dataset with --dataset NAME.")


def _loader(info: dict, override: str | None) -> tuple[str, dict]:
    """Which scn loader rebuilds the file's test split, and its recorded arguments."""
    recorded = info.get("loader") if isinstance(info.get("loader"), dict) else {}
    kwargs = recorded.get("kwargs") if isinstance(recorded.get("kwargs"), dict) else {}
    name = override or recorded.get("name") or _BY_NAME.get(info.get("name"))
    if name is None and info.get("name"):
        name = "image_folder"  # an image-folder run of a file written before `loader`
    if name not in DATASETS:
        raise DataError(f"dataset {name!r} is not one scn-eval can load; known datasets are "
                        f"{', '.join(DATASETS)}. Pass one with --dataset NAME.")
    if name != recorded.get("name"):
        kwargs = {}  # another loader's arguments do not apply
    if not all(isinstance(v, int | str) and not isinstance(v, bool) or v is None
               or isinstance(v, list) for v in kwargs.values()):
        raise DataError("the file's dataset loader arguments are malformed; the file is corrupt.")
    return name, kwargs


def load_dataset(name: str | None, header: dict, root: str | None = None):
    """The test data as scn's loaders give it, shaped like the file's dataset.

    name: a loader (DATASETS) to use instead of the one the header records.
    """
    from scn import data

    info = header.get("dataset") or {}
    shape = info.get("input_shape")
    loader, kwargs = _loader(info, name)
    if loader == "fashion_mnist":
        dataset = data.fashion_mnist(root=root)
    elif loader == "cifar10":
        if root is None and info.get("name") == "cifar10-jpeg" and name is None:
            raise DataError("this model was trained on CIFAR-10 (JPEG copy), an image folder tree; "
                            "pass --root DIR, the folder holding its train/ and test/.")
        dataset = data.cifar10(root=root, download=root is None)
    elif loader == "image_folder":
        if root is None:
            raise DataError(f"this model was trained on the image folder dataset "
                            f"{info.get('name') or '(unnamed)'!r}; pass --root DIR, the folder "
                            "holding its train/<class>/ and test/<class>/.")
        if shape and not info.get("loader"):  # files written before `loader`
            kwargs = {**kwargs, "channels": int(shape[0]), "image_size": [int(s) for s in shape[1:]]}
        dataset = data.image_folder(root, **kwargs)
        if info.get("classes") and dataset.classes != list(info["classes"]):
            raise DataError(f"{root} holds the classes {dataset.classes[:5]}, but the model was "
                            f"trained on {list(info['classes'])[:5]}; point --root at its dataset.")
    else:
        _check_synthetic(info, kwargs)
        if not kwargs:  # files written before `loader`: their classes and shape, default sizes
            if info.get("classes"):
                kwargs["num_classes"] = len(info["classes"])
            if shape:
                kwargs.update(channels=int(shape[0]), image_size=int(shape[1]))
        dataset = data.synthetic(**kwargs)
    if shape and list(dataset.input_shape) != [int(s) for s in shape]:
        raise DataError(f"dataset {dataset.name} has inputs of shape {list(dataset.input_shape)} but "
                        f"the model was trained on {list(shape)}; pick a matching --dataset.")
    if info.get("mean") and info.get("std") and len(info["mean"]) == dataset.input_shape[0]:
        dataset.mean = torch.tensor(info["mean"], dtype=torch.float32)  # the model's preprocessing
        dataset.std = torch.tensor(info["std"], dtype=torch.float32)
    return dataset


def _num_outputs(model: nn.Module) -> int:
    return sc_layers(model)[-1][1].weight.shape[0]


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The decoded model's state as a plain torch model would name it, weights as floats.

    Each Conv2d/Linear weight is its effective (quantized, dead inputs zeroed) float weight;
    `b`, `e` and `in_alive` are dropped. A layer that carries folded constants of removed
    inputs keeps them as `<layer>.input_offset` (a plain model needs to add them itself).
    """
    state = {}
    layers = dict(sc_layers(model))
    for key, value in model.state_dict().items():
        owner, _, attr = key.rpartition(".")
        layer = layers.get(owner)
        if layer is not None:
            if attr in ("b", "e", "in_alive"):
                continue
            if attr == "input_offset" and not value.numel():
                continue
            if attr == "weight":
                value = layer.effective_weight()
        state[key] = value.detach().cpu().contiguous()
    return state


def export(model: nn.Module, header: dict, path: str | Path) -> list[str]:
    """Write `plain_state_dict(model)` as safetensors; returns the layers with input offsets."""
    state = plain_state_dict(model)
    offsets = [k.rpartition(".")[0] for k in state if k.endswith(".input_offset")]
    meta = {"scn_export": json.dumps({"model": header.get("model"), "dataset": header.get("dataset"),
                                      "input_offset_layers": offsets})}
    io.write_bytes(path, save(state, metadata=meta))
    return offsets


def measure(path: str | Path, dataset: str | None = None, root: str | None = None,
            device: str = "cpu", batch_size: int = 1000,
            channels_last: bool = True) -> tuple[dict, nn.Module, dict, ImageData]:
    """Decode `path`, evaluate it; returns (results, model, header, test data).

    Evaluation runs as scn-train's does (channels-last layout, batches of 1000 by default), so
    the same arithmetic gives the same predictions the run reported, bit for bit.
    """
    model, header = scn_format.load(path, device=device)
    if not dataset and not (header.get("dataset") or {}).get("name"):
        raise DataError(f"{path} does not name the dataset it was trained on; pass --dataset NAME "
                        f"({', '.join(DATASETS)}).")
    data = load_dataset(dataset, header, root)
    name = data.name
    if data.num_classes != _num_outputs(model):
        raise DataError(f"dataset {name} has {data.num_classes} classes but the model has "
                        f"{_num_outputs(model)} outputs; pick the dataset it was trained on.")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    acc, _ = evaluate(model, data.to(device), batch_size=batch_size, channels_last=channels_last)
    rep = size.report(model)
    stats = scn_format.file_stats(path)
    results = {
        "path": str(path),
        "model": (header.get("model") or {}).get("name"),
        "scheme": (header.get("scheme") or {}).get("kind"),
        "dataset": name,
        "test_images": len(data.test_y),
        "test_accuracy": acc,
        **stats,
        "bits_per_weight": rep.bits_per_weight,
        "file_bits_per_weight": 8 * stats["file_bytes"] / rep.reference_scalars,
        "ideal_bytes": rep.ideal_bytes,
        "payload_ideal_bytes": rep.payload_ideal_bytes,
        "float32_bytes": rep.float32_bytes,
        "compression": rep.float32_bytes / stats["file_bytes"],
        "channels_left": {k: v[0] for k, v in rep.channels.items()},
        "channels_original": {k: v[1] for k, v in rep.channels.items()},
    }
    return results, model, header, data


def _text(r: dict) -> str:
    channels = ", ".join(f"{k} {r['channels_left'][k]}/{r['channels_original'][k]}"
                         for k in r["channels_left"])
    return "\n".join([
        f"{r['path']}: {r['model']} ({r['scheme']}) on {r['dataset']}",
        f"  test accuracy  {r['test_accuracy']:.2f}% on {r['test_images']} images",
        f"  file           {r['file_bytes']:,} bytes (ideal {r['ideal_bytes']:,.0f}; float32 "
        f"{r['float32_bytes']:,}: {r['compression']:.1f}x smaller)",
        f"  bits/weight    {r['bits_per_weight']:.3f} counted, {r['file_bits_per_weight']:.3f} "
        "in the file",
        f"  channels left  {channels}",
    ])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scn-eval", description="Decode a packed .scn model and evaluate it on its dataset.")
    p.add_argument("path", help="a .scn file (written by scn.save)")
    p.add_argument("--dataset", metavar="NAME",
                   help=f"evaluate on this dataset instead of the one the file names ({', '.join(DATASETS)})")
    p.add_argument("--root", metavar="DIR",
                   help="where the data is: the Fashion-MNIST IDX files, the CIFAR-10 copy, or the "
                        "image folder holding train/ and test/ (needed for image folders)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=1000, help="test batch size (default 1000)")
    p.add_argument("--nchw", action="store_true",
                   help="evaluate in NCHW layout (default: channels-last, as scn-train evaluates)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--export", metavar="OUT.safetensors",
                   help="also write a plain float state_dict of the shrunk model")
    p.add_argument("--onnx", metavar="OUT.onnx", help="also write the shrunk network as ONNX and "
                   "compare it with scn on the test set (needs the onnx extra)")
    p.add_argument("--onnx-form", choices=("qdq", "float"), default="qdq",
                   help="qdq (default): integer codes and power-of-two scales through "
                        "DequantizeLinear; float: float32 weights, BatchNorm folded")
    p.add_argument("--onnx-normalize", action="store_true",
                   help="fold the dataset's normalisation into the ONNX graph (it then takes pixel "
                        "values in [0, 1]); default: it takes what the model takes, normalised images")
    p.add_argument("--entropy-code", metavar="OUT.scn",
                   help="also write the model as a .scn file with an entropy-coded payload")
    p.add_argument("--force", action="store_true",
                   help="let --export, --onnx and --entropy-code replace an existing file (never "
                        "the file being read)")
    return p


def _check_export(source: str, target: str | None, force: bool, option: str = "--export") -> None:
    """An output never replaces the file being read, and replaces another only with --force."""
    if target is None:
        return
    out, src = Path(target), Path(source)
    if out.resolve() == src.resolve() or (out.exists() and src.exists() and out.samefile(src)):
        raise ScnError(f"{option} {target} is the file being read; scn-eval never overwrites its "
                       "input. Give another output path.")
    if out.exists() and not force:
        raise ScnError(f"{option} {target} already exists; scn-eval does not replace files unless "
                       "asked. Give another path, or add --force to replace it.")


def _write(target: str, write) -> int:
    try:
        return write()
    except OSError as exc:
        raise ScnError(f"cannot write {target}: {exc.strerror or exc}.") from None


def _deploy(args: argparse.Namespace, results: dict, model: nn.Module, header: dict,
            data: ImageData) -> None:
    """--onnx and --entropy-code: write the file, and say how it compares."""
    info = header.get("dataset") or {}
    if args.onnx:
        from scn import onnx_export

        norm = {"mean": data.mean.tolist(), "std": data.std.tolist()} if args.onnx_normalize else None
        nbytes = _write(args.onnx, lambda: onnx_export.export_onnx(
            model, args.onnx, args.onnx_form, tuple(data.input_shape), norm))
        inputs = data.normalize(data.test_x)
        raw = data.test_x.float() / 255 if norm else None
        results.update(onnx=str(args.onnx), onnx_form=args.onnx_form, onnx_bytes=nbytes,
                       **onnx_export.compare(args.onnx, model.to(memory_format=torch.contiguous_format),
                                             inputs, raw))
    if args.entropy_code:
        nbytes = _write(args.entropy_code, lambda: scn_format.save(model, args.entropy_code, info or None,
                                                                   entropy_coded=True))
        coded = scn_format.read_header(args.entropy_code).get("coding") is not None
        results.update(entropy_coded=str(args.entropy_code), entropy_coded_bytes=nbytes,
                       entropy_coded_vs_ideal=nbytes / results["ideal_bytes"], entropy_coding_used=coded)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.batch_size <= 0:
            raise ScnError(f"--batch-size={args.batch_size} must be a positive integer.")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ScnError(f"--device={args.device} but CUDA is not available here; use --device cpu.")
        if args.onnx:
            from scn import onnx_export

            onnx_export.require()
        for option, target in (("--export", args.export), ("--onnx", args.onnx),
                               ("--entropy-code", args.entropy_code)):
            _check_export(args.path, target, args.force, option)
        results, model, header, data = measure(args.path, args.dataset, args.root, args.device,
                                               args.batch_size, channels_last=not args.nchw)
        _deploy(args, results, model.cpu(), header, data.to("cpu"))
        if args.export:
            results["export"] = str(args.export)
            try:
                results["input_offset_layers"] = export(model, header, args.export)
            except OSError as exc:
                raise ScnError(f"cannot write {args.export}: {exc.strerror or exc}.") from None
    except ScnError as exc:
        print(f"scn-eval: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(results) if args.json else _text(results))
    if not args.json:
        _print_outputs(args, results)
    return 0


def _print_outputs(args: argparse.Namespace, r: dict) -> None:
    if args.export:
        print(f"  exported       {args.export}" + (
            f" (layers {', '.join(r['input_offset_layers'])} keep an input_offset)"
            if r["input_offset_layers"] else ""))
    if args.onnx:
        print(f"  onnx ({r['onnx_form']})    {args.onnx}: {r['onnx_bytes']:,} bytes; onnxruntime agrees on "
              f"{100 * r['onnx_equal_predictions']:.2f}% of {r['onnx_images']} predictions, largest "
              f"logit difference {r['onnx_max_logit_diff']:.2g}")
    if args.entropy_code:
        how = "entropy coded" if r["entropy_coding_used"] else "plain (coding would not make it smaller)"
        print(f"  entropy coded  {args.entropy_code}: {r['entropy_coded_bytes']:,} bytes, {how}; "
              f"{r['entropy_coded_vs_ideal']:.3f}x the ideal")


if __name__ == "__main__":
    sys.exit(main())
