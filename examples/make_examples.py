"""Writes the examples the README and docs/api.md use: a tiny MLP as `.pt2` and an eval set as `.npz`.

    .venv/bin/python examples/make_examples.py [FOLDER]      (default: the folder of this script; `make examples`)

mlp.pt2   a 64 -> 128 -> 64 -> 10 ReLU MLP trained on sklearn's digits (8x8 images flattened to 64 floats in
          [0, 1]), exported with torch.export and a dynamic batch dimension, so it runs at any batch size:
              batch = torch.export.Dim("batch")
              program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: batch},))
          (an example of 2 rows: torch specialises a batch of 1 to a constant)
eval.npz  the 360 held-out digits: `x` (360, 64) float32 and `labels` (360,) int64

Deterministic (the test model zoo's fixed seeds, testing/modelzoo.py); needs torch and scikit-learn (both in the venv
`make install` makes). Prints one line per file written and nothing else.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: testing.modelzoo

from testing import modelzoo  # noqa: E402


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    _, _, x_eval, y_eval = modelzoo.digits_split()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = modelzoo.train_mlp()
        written = [modelzoo.export_pt2(model, x_eval, folder / "mlp.pt2", dynamic_batch=True),
                   modelzoo.write_npz(folder / "eval.npz", x_eval, y_eval)]
    for path in written:
        print(path)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
