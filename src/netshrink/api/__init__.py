"""The Python front door: one verb per task over any ``nn.Module`` and plain data.

    import netshrink
    pruned = netshrink.prune(model, netshrink.ChannelPruneConfig(ratio=0.3), example_input=x)
    tuned = netshrink.distill(pruned, model, train_loader, netshrink.DistillConfig(epochs=1))
    int8 = netshrink.quantize(tuned, netshrink.PTQConfig(), calibration=calib_loader)
    print(int8.measure(test_loader))
    int8.save("model.onnx"); netshrink.load("model.onnx")(images)

Every verb returns a ``Compressed``: call it on a batch, ``evaluate``, ``measure``, ``save``.
"""

from netshrink.api.data import IterableSplit, as_split
from netshrink.api.result import Compressed
from netshrink.api.run import run
from netshrink.api.search import compress, study
from netshrink.api.verbs import (
    DistillConfig,
    distill,
    export,
    load,
    measure,
    prune,
    quantize,
    train_model,
)
from netshrink.bench import MeasureOptions
from netshrink.compress import CompressConfig
from netshrink.models import ModelSpec, build_model
from netshrink.prune.blocks import BlockPruneConfig
from netshrink.prune.channel import ChannelPruneConfig
from netshrink.prune.magnitude import MagnitudePruneConfig
from netshrink.prune.nm import NMPruneConfig
from netshrink.quant.kmeans import KMeansConfig
from netshrink.quant.ptq import PTQConfig
from netshrink.quant.qat import QATConfig
from netshrink.stages.quant import Bf16Config, DynamicConfig, ExportConfig, Fp16Config
from netshrink.stages.train import FinetuneConfig
from netshrink.train.config import TrainConfig

__all__ = [
    "Bf16Config",
    "BlockPruneConfig",
    "ChannelPruneConfig",
    "CompressConfig",
    "Compressed",
    "DistillConfig",
    "DynamicConfig",
    "ExportConfig",
    "FinetuneConfig",
    "Fp16Config",
    "IterableSplit",
    "KMeansConfig",
    "MagnitudePruneConfig",
    "MeasureOptions",
    "ModelSpec",
    "NMPruneConfig",
    "PTQConfig",
    "QATConfig",
    "TrainConfig",
    "as_split",
    "build_model",
    "compress",
    "distill",
    "export",
    "finetune",
    "load",
    "measure",
    "prune",
    "quantize",
    "run",
    "study",
]

# ``netshrink.train`` is the training package: the verb is ``finetune``.
finetune = train_model
