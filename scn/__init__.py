"""Self-Compressing Neural Networks: networks that shrink their own bits and channels.

The few names most users need:

    model = scn.quantize_(scn.models.build("SmallCNN"), scn.SelfCompress())  # convert in place
    loss = task_loss + gamma * scn.size_loss(model)                     # train
    scn.size_report(model).bits_per_weight                              # measure
    scn.save(model, "model.scn"); model, header = scn.load("model.scn") # packed file
    scn.export_onnx(model, "model.onnx")                                # integer-weight ONNX

(The size report is exported as `size_report`: `scn.report` is the plotting module.)
"""

from scn.format import load, save
from scn.methods import FixedBits, Float, Scheme, SelfCompress, quantize_
from scn.onnx_export import export_onnx
from scn.size import report as size_report
from scn.size import size_loss

__all__ = ["FixedBits", "Float", "Scheme", "SelfCompress", "export_onnx", "load", "quantize_", "save",
           "size_loss", "size_report"]
