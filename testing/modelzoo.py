"""Small real models for tests: trained in seconds on sklearn's bundled digits, written in every input format."""

from __future__ import annotations

import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

SEED = 0
HOLDOUT = 360

# Sources of model.py for packages: standalone text, so a package never depends on the test module.
MLP_SOURCE = '''\
from torch import nn


def build_model():
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(),
        nn.Linear(128, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )
'''

CNN_SOURCE = '''\
from torch import nn


def build_model():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )
'''


# The benchmarks' reference sizes (bench/RESULTS.md, measured facts: MLP 167k, CNN ~373k parameters): large
# enough that a file's fixed overhead (graph structure, headers, manifests: a few KB) does not decide a size
# ratio, as it does for the tests' small models.
MLP_BENCH_SOURCE = MLP_SOURCE.replace("nn.Linear(64, 128), nn.ReLU(),\n        nn.Linear(128, 64), nn.ReLU(),\n"
                                      "        nn.Linear(64, 10),",
                                      "nn.Linear(64, 512), nn.ReLU(),\n        nn.Linear(512, 256), nn.ReLU(),\n"
                                      "        nn.Linear(256, 10),")
CNN_BENCH_SOURCE = CNN_SOURCE.replace("nn.Conv2d(1, 16, 3, padding=1)", "nn.Conv2d(1, 32, 3, padding=1)").replace(
    "nn.Conv2d(16, 32, 3, padding=1)", "nn.Conv2d(32, 64, 3, padding=1)").replace(
    "nn.Linear(32 * 4 * 4, 64), nn.ReLU(),\n        nn.Linear(64, 10),",
    "nn.Linear(64 * 4 * 4, 336), nn.ReLU(),\n        nn.Linear(336, 10),")


def build_from_source(source: str) -> nn.Module:
    """Run a model.py source text and return its build_model()."""
    namespace: dict = {}
    exec(compile(source, "<model.py>", "exec"), namespace)  # our own constant sources only
    return namespace["build_model"]()


@lru_cache(maxsize=1)
def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): digits as float32 in [0, 1], shape (N, 64); 360 held out; fixed seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(x))
    test, train = order[:HOLDOUT], order[HOLDOUT:]
    return x[train], y[train], x[test], y[test]


def as_images(x: np.ndarray) -> np.ndarray:
    """(N, 64) -> (N, 1, 8, 8) for the CNN."""
    return np.ascontiguousarray(x.reshape(-1, 1, 8, 8))


def _train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float = 3e-3) -> nn.Module:
    torch.manual_seed(SEED)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def train_mlp(epochs: int = 20, source: str = MLP_SOURCE) -> nn.Module:
    """The 64 -> 128 -> 64 -> 10 ReLU MLP of MLP_SOURCE (or `source`), trained on digits (hold-out accuracy > 0.9)."""
    torch.manual_seed(SEED)
    x, y, _, _ = digits_split()
    return _train(build_from_source(source), x, y, epochs)


def train_cnn(epochs: int = 8, source: str = CNN_SOURCE) -> nn.Module:
    """The small CNN of CNN_SOURCE (or `source`) on (N, 1, 8, 8) digits."""
    torch.manual_seed(SEED)
    x, y, _, _ = digits_split()
    return _train(build_from_source(source), as_images(x), y, epochs)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.inference_mode():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def export_pt2(model: nn.Module, example: np.ndarray, path: Path | str, dynamic_batch: bool = True) -> Path:
    """torch.export the model (batch dim dynamic by default) and save it as .pt2."""
    path = Path(path)
    ex = torch.from_numpy(np.ascontiguousarray(example[:2] if len(example) >= 2 else np.repeat(example, 2, 0)))
    dynamic = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    ep = torch.export.export(model.eval(), (ex,), dynamic_shapes=dynamic)
    torch.export.save(ep, str(path))
    return path


def export_onnx(model: nn.Module, example: np.ndarray, path: Path | str) -> Path:
    """One-file ONNX (dynamo exporter, external_data=False) with a dynamic batch dim; input named input_0."""
    path = Path(path)
    ex = torch.from_numpy(np.ascontiguousarray(example[:2] if len(example) >= 2 else np.repeat(example, 2, 0)))
    torch.onnx.export(model.eval(), (ex,), str(path), dynamo=True, external_data=False,
                      dynamic_shapes=({0: torch.export.Dim("batch")},), input_names=["input_0"],
                      output_names=["output"])
    return path


def write_package(model: nn.Module, path: Path | str, model_source: str,
                  example_inputs: list[np.ndarray] | None = None) -> Path:
    """A model package zip: model.py (the given source), weights.safetensors, optional example inputs."""
    from safetensors.torch import save as save_tensors

    path = Path(path)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model.py", model_source)
        zf.writestr("weights.safetensors", save_tensors(state))
        if example_inputs is not None:
            zf.writestr("example_inputs.safetensors", save_tensors(
                {f"input_{i}": torch.from_numpy(np.ascontiguousarray(a)) for i, a in enumerate(example_inputs)}))
    return path


def write_npz(path: Path | str, inputs: np.ndarray | dict[str, np.ndarray], labels: np.ndarray | None = None) -> Path:
    """A dataset file: one input array (key `x`) or several named ones, plus optional `labels`."""
    path = Path(path)
    arrays = dict(inputs) if isinstance(inputs, dict) else {"x": inputs}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to a str path without it
        np.savez(f, **arrays)
    return path


def write_examples(folder: Path | str) -> dict[str, Path]:
    """Trains the digits MLP and writes it in every input format, plus an eval dataset (README walk-through)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _, _, x_test, y_test = digits_split()
    mlp = train_mlp()
    return {
        "pt2": export_pt2(mlp, x_test, folder / "mlp.pt2"),
        "onnx": export_onnx(mlp, x_test, folder / "mlp.onnx"),
        "package": write_package(mlp, folder / "mlp.zip", MLP_SOURCE),
        "eval": write_npz(folder / "eval.npz", x_test, y_test),
    }


if __name__ == "__main__":
    import sys

    for kind, written in write_examples(sys.argv[1] if len(sys.argv) > 1 else "examples").items():
        print(f"{kind:8s} {written}")


# A small ResNet (stem + 3 residual stages with batch norm, linear head) on digits upsampled to 16x16.
# The residual adds and the 1x1 downsample shortcuts are what structural pruning must keep consistent.
RESNET_SOURCE = '''\
from torch import nn


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, widths=(24, 48, 96), classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.layer1 = Block(widths[0], widths[0], 1)
        self.layer2 = Block(widths[0], widths[1], 2)
        self.layer3 = Block(widths[1], widths[2], 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


def build_model():
    return ResNet()
'''
RESNET_SIZE = 16
# The benchmark's ResNet: wider, on 32x32 inputs (bench/RESULTS.md's reference net is of this size, where compute,
# not per-layer overhead, dominates latency as in real models).
RESNET_BENCH_SOURCE = RESNET_SOURCE.replace("widths=(24, 48, 96)", "widths=(32, 64, 128)")
RESNET_BENCH_SIZE = 32


def as_resnet_input(x: np.ndarray, size: int = RESNET_SIZE) -> np.ndarray:
    """(N, 64) -> (N, 1, size, size): the 8x8 digits upsampled bilinearly for the ResNet."""
    t = torch.from_numpy(np.ascontiguousarray(x.reshape(-1, 1, 8, 8), dtype=np.float32))
    up = nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return np.ascontiguousarray(up.numpy())


def train_resnet(epochs: int = 4, source: str = RESNET_SOURCE, size: int = RESNET_SIZE) -> nn.Module:
    """The ResNet of `source` on (N, 1, size, size) digits (hold-out accuracy > 0.95), its batch-norm statistics
    re-estimated over the training set at the end (the running averages of a short training lag behind)."""
    torch.manual_seed(SEED)
    x, y, _, _ = digits_split()
    net = _train(build_from_source(source), as_resnet_input(x, size), y, epochs)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    net.train()
    with torch.no_grad():
        inputs = torch.from_numpy(as_resnet_input(x, size))
        for start in range(0, len(inputs), 64):
            net(inputs[start:start + 64])
    return net.eval()


# --------------------------------------------------------------------------------------------------
# A tiny BERT (Hugging Face folder format): digits as token sequences, one token per pixel.

BERT_SEQ = 65


CLS_TOKEN = 17


def digits_tokens(x: np.ndarray) -> np.ndarray:
    """(N, 64) digits in [0, 1] -> (N, 65) int64 token ids: a [CLS] token (the classifier reads the first
    position), then the pixel values 0..16."""
    pixels = np.rint(np.asarray(x) * 16).astype(np.int64)
    return np.ascontiguousarray(np.concatenate([np.full((len(pixels), 1), CLS_TOKEN, np.int64), pixels], axis=1))


def build_tiny_bert(epochs: int = 6, train: bool = True, hidden: int = 32, intermediate: int = 64,
                    lr: float = 3e-3, one_cycle: bool = False) -> nn.Module:
    """BertForSequenceClassification (2 layers, hidden 32, 4 heads, MLP 64 unless given) trained on digit tokens.
    `one_cycle`: warm up to `lr` then anneal (and decay weights by 0.01), which a post-norm transformer needs to
    learn well from scratch (measured at hidden 128: 92% instead of the low 60s at a constant rate)."""
    import transformers

    torch.manual_seed(SEED)
    config = transformers.BertConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=intermediate, max_position_embeddings=BERT_SEQ, num_labels=10,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    net = transformers.BertForSequenceClassification(config)
    if not train:
        return net.eval()
    x, y, _, _ = digits_split()
    xt, yt = torch.from_numpy(digits_tokens(x)), torch.from_numpy(y)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01 if one_cycle else 0.0)
    steps = epochs * -(-len(xt) // 32)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1) \
        if one_cycle else None
    gen = torch.Generator().manual_seed(SEED)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(net(input_ids=xt[idx]).logits, yt[idx]).backward()
            opt.step()
            if schedule is not None:
                schedule.step()
    return net.eval()


def write_hf_zip(model: nn.Module, path: Path | str) -> Path:
    """save_pretrained (safetensors) zipped flat: config.json + model.safetensors."""
    import tempfile

    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(Path(tmp).iterdir()):
                zf.write(f, f.name)
    return path
