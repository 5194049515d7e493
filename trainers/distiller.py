"""The knowledge distiller (paper §III-B, Fig. 5): generic semantic features → aesthetic features.

BatchNorm1d over the GSF input, then three Linear layers with ReLU between them. The input of the
last Linear is the teacher aesthetic feature f_t; the last Linear's output gives the teacher
prediction: a softmax over the 10 rating bins (D_t, eq. 6), a sigmoid probability of "high
aesthetics" (eq. 12) or a scalar score (eq. 13).

Hidden widths: the paper does not state them. The default (2048, 512) follows the head that
MLSP features were introduced with (Hosu et al., wide first layer to mix ~23k inputs), and keeps
f_t at 512 so the stored knowledge of AVA is 0.5 GB and the student's FC network stays small.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn

from trainers.labels import check_label, output_width, prediction
from trainers.losses import bce_loss, emd_loss, score_mse


@dataclass(frozen=True)
class DistillerSpec:
    """Everything that determines a fitted distiller; hashed into the knowledge entry's key."""

    backbones: tuple[str, ...]
    label: str = "distribution"
    hidden: tuple[int, int] = (2048, 512)
    epochs: int = 12
    batch_size: int = 512
    lr: float = 3e-5
    lr_step_epochs: int = 3
    lr_gamma: float = 0.1
    seed: int = 0

    def __post_init__(self):
        check_label(self.label)
        if len(self.hidden) != 2 or min(self.hidden) < 1:
            raise ValueError("hidden must be two positive widths (the first two Linear layers)")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be ≥ 1 and lr > 0")

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def output_width(self) -> int:
        return output_width(self.label)


class Distiller(nn.Module):
    def __init__(self, in_features: int, hidden: tuple[int, int], output_width: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(in_features)
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.head = nn.Linear(hidden[1], output_width)

    def forward(self, gsf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f_t, logits): the teacher aesthetic feature and the head's raw output."""
        f_t = torch.relu(self.fc2(torch.relu(self.fc1(self.norm(gsf)))))
        return f_t, self.head(f_t)


def loss_for(label: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The distiller's loss against the ground truth: EMD on the softmax (eq. 3), BCE on the logit
    (eq. 12, finite where log(sigmoid) would underflow), squared error on the score (eq. 13)."""
    if label == "distribution":
        return emd_loss(target, torch.softmax(logits, dim=1))
    return bce_loss(target, logits[:, 0]) if label == "binary" else score_mse(target, logits[:, 0])


BatchStream = Iterator[tuple[torch.Tensor, torch.Tensor]]  # (GSF batch, target batch)


def fit(spec: DistillerSpec, in_features: int, batches_for_epoch, device: torch.device,
        log=lambda message: None) -> tuple[Distiller, list[dict]]:
    """Adam with a step schedule, as in the paper. ``batches_for_epoch(epoch)`` yields
    (GSF batch, target batch) pairs of *training rows only*; it owns shuffling and streaming."""
    torch.manual_seed(spec.seed)
    model = Distiller(in_features, spec.hidden, spec.output_width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=spec.lr_step_epochs, gamma=spec.lr_gamma)
    history = []
    for epoch in range(spec.epochs):
        model.train()
        total, rows = 0.0, 0
        for gsf, target in batches_for_epoch(epoch):
            if len(gsf) < 2:  # BatchNorm needs two rows; a lone remainder row is skipped this epoch
                continue
            gsf, target = gsf.to(device, torch.float32), target.to(device)
            loss = loss_for(spec.label, model(gsf)[1], target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, rows = total + float(loss.detach()) * len(gsf), rows + len(gsf)
        schedule.step()
        history.append({"epoch": epoch, "loss": total / max(rows, 1), "rows": rows,
                        "lr": optimizer.param_groups[0]["lr"]})
        log(f"epoch {epoch + 1}/{spec.epochs}: loss {history[-1]['loss']:.4f} over {rows} rows")
    return model.eval(), history


@torch.inference_mode()
def infer(model: Distiller, label: str, gsf: np.ndarray, device: torch.device,
          batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(f_t, prediction) for every row of ``gsf``, as float32 arrays."""
    features, outputs = [], []
    for start in range(0, len(gsf), batch_size):
        x = torch.from_numpy(np.asarray(gsf[start:start + batch_size], np.float32)).to(device)
        f_t, logits = model(x)
        features.append(f_t.float().cpu().numpy())
        outputs.append(prediction(label, logits).float().cpu().numpy())
    width = model.fc2.out_features
    if not features:
        return np.zeros((0, width), np.float32), np.zeros((0,), np.float32)
    return np.concatenate(features), np.concatenate(outputs)


def matching_scores(read_train, train_rows: int, train_score: np.ndarray, test: np.ndarray,
                    chunk: int = 4096) -> np.ndarray:
    """Table IV: each test image takes the score of its nearest training image (cosine similarity).

    ``read_train(start, stop)`` returns training rows ``[start, stop)``: the training set is
    scanned block by block for each block of ``test``, so memory is bounded by two blocks.
    """
    def unit(x):
        x = np.asarray(x, np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    test_u = unit(test)
    best = np.full(len(test), -np.inf, np.float32)
    out = np.zeros(len(test), np.float32)
    for start in range(0, train_rows, chunk):
        sims = test_u @ unit(read_train(start, min(start + chunk, train_rows))).T
        top = np.argmax(sims, axis=1)
        value = sims[np.arange(len(test)), top]
        better = value > best
        best[better], out[better] = value[better], train_score[start + top[better]]
    return out
