"""Static screening of uploaded models and datasets (the rules: docs/reliability.md, "Hostile input").

Nothing here deserializes an upload: zips are read through their directory and streamed, pickles
are walked opcode by opcode with `pickletools.genops` (never executed), ONNX is walked at the
protobuf wire level, .npy / safetensors headers, the .pt2 program's JSON and a parquet footer's Thrift are
parsed as data, and text datasets are decoded as they stream.
Standard library only: the API process must not import torch or onnx.

One module per format (pt2, onnx_model, package, hf, npz, safetensors_header, text, parquet), the shared parts
beside them (common, zips, pickles, protobuf, inputs), and child: `screen` runs sniff_model / sniff_dataset in a
child process with a time budget.
"""

from app.files.screening.child import screen
from app.files.screening.common import ScreeningError, Sniffed
from app.files.screening.models import sniff_model
from app.files.screening.npz import sniff_dataset
from app.files.screening.pickles import PICKLE_ALLOWLIST, scan_pickle
from app.files.screening.zips import MAX_RATIO, RATIO_FREE_BYTES

__all__ = ["MAX_RATIO", "PICKLE_ALLOWLIST", "RATIO_FREE_BYTES", "ScreeningError", "Sniffed", "scan_pickle", "screen",
           "sniff_dataset", "sniff_model"]
