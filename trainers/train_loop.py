"""The student recipe that runs on every Ray Train worker (DDP: NCCL on GPU, gloo on CPU).

Every epoch a worker streams its partition of the train split (trainers/student_data.py), takes
steps with the configured KD loss, and evaluates its partition of the test split. The
predictions are gathered so that every rank reports the same validation metrics. Rank 0 then
writes a checkpoint:

* ``model.safetensors`` and ``student.json`` (trainers/student.py);
* ``optimizer.safetensors`` + ``trainer_state.json``: the optimizer's tensors, and its param groups,
  the scheduler and the epoch as JSON. No pickle, as everywhere in the project;
* ``history.json``: every epoch's metrics so far, so that a resumed run still has its training
  curves.

Ray Train keeps the checkpoint under ``storage_path/name``. When a worker dies, or the run is
restarted under the same name, training resumes at the epoch after the last checkpoint
(:func:`resume`): the weights are loaded with the student's own checks (state digest, same
student), and a resumed run's per-epoch losses and metrics are those of an uninterrupted one —
the data order is a pure function of (seed, epoch) and nothing else in an epoch draws random
numbers, so the model, optimizer and scheduler state are all there is to restore.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
import torch

from featurestore.errors import UserError
from featurestore.partition import World
from featurestore.store import FeatureStore
from featurestore.views import get_table
from trainers.labels import evaluate_label, prediction
from trainers.knowledge import knowledge_hashes
from trainers.losses import LossSpec, StudentOutputs, Targets, student_loss
from trainers.student import (StudentError, StudentSpec, build_student, decoder_for, restore_student, save_student,
                              view_size)
from trainers.student_data import StudentStream, split_rows

OPTIMIZER_FILE, STATE_FILE, HISTORY_FILE = "optimizer.safetensors", "trainer_state.json", "history.json"


class UnreadableImages(UserError, RuntimeError):
    """Too many of an epoch's images could not be read, or no longer match the index."""


def save_trainer_state(directory: str, optimizer: torch.optim.Optimizer, scheduler, epoch: int) -> None:
    """Optimizer tensors as safetensors (``<param index>.<name>``), everything else as JSON."""
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors = {f"{index}.{name}": value.detach().cpu().contiguous()
               for index, entry in state["state"].items() for name, value in entry.items()}
    save_file(tensors, os.path.join(directory, OPTIMIZER_FILE))
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump({"param_groups": state["param_groups"], "scheduler": scheduler.state_dict(), "epoch": epoch}, f)


def load_trainer_state(directory: str, optimizer: torch.optim.Optimizer, scheduler) -> int:
    """Restore what :func:`save_trainer_state` wrote; returns the epoch it was saved after."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, STATE_FILE)) as f:
        meta = json.load(f)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(os.path.join(directory, OPTIMIZER_FILE)).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    return int(meta["epoch"])


def load_history(directory: str) -> list[dict]:
    """Per-epoch metrics saved with a checkpoint; empty for checkpoints written before they were."""
    path = os.path.join(directory, HISTORY_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def resume(directory: str, model, optimizer: torch.optim.Optimizer, scheduler, config: dict) -> tuple[int, list[dict]]:
    """Restore a run from its checkpoint ``directory``: the model through the student's checked
    loading (``trainers.student.restore_student``: a corrupt or mixed checkpoint, or one of another
    student, is a ``StudentError``, never silently loaded), then the optimizer, the scheduler and
    the history. Returns the epoch to continue at and the history so far."""
    extra = restore_student(model, directory)
    mine = {"knowledge_entry": config["knowledge_entry"], "loss": config["loss"]}
    if changed := sorted(k for k, v in mine.items() if extra.get(k) != v):
        raise StudentError(f"checkpoint {directory} was trained with another {' and '.join(changed)} "
                           f"({', '.join(f'{k}={extra.get(k)!r}' for k in changed)}); give this run another name "
                           "to start it afresh")
    epoch = load_trainer_state(directory, optimizer, scheduler)
    if extra.get("epoch") != epoch:
        raise StudentError(f"checkpoint {directory}: the weights are from epoch {extra.get('epoch')} but the "
                           f"optimizer state from epoch {epoch}; the checkpoint is mixed from two saves")
    history = load_history(directory)
    if history and [h.get("epoch") for h in history] != list(range(epoch + 1)):
        raise StudentError(f"checkpoint {directory}: {HISTORY_FILE} does not hold epochs 0..{epoch}")
    return epoch + 1, history


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _sum(value: float, device: torch.device) -> float:
    if not _distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item())


def _gather_rows(array: np.ndarray, device: torch.device) -> np.ndarray:
    """Every rank's rows of ``array``, concatenated in rank order. Tensors, not
    ``all_gather_object``: ranks may hold different row counts, and nothing gets pickled."""
    if not _distributed():
        return array
    local = torch.as_tensor(array).to(device)
    count = torch.tensor([local.shape[0]], device=device)
    counts = [torch.zeros_like(count) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(counts, count)
    padded = local.new_zeros((int(max(counts).item()), *local.shape[1:]))
    padded[:local.shape[0]] = local
    parts = [torch.zeros_like(padded) for _ in counts]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([part[:int(n.item())] for part, n in zip(parts, counts)]).cpu().numpy()


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config["seed"])
    spec = StudentSpec.from_json(config["student"])
    loss_spec = LossSpec(**config["loss"])
    label = spec.label

    model = build_student(spec).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config["lr"])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config["lr_step_epochs"], gamma=0.1)
    start_epoch, history = 0, []
    if checkpoint := ray.train.get_checkpoint():
        with checkpoint.as_directory() as directory:
            start_epoch, history = resume(directory, model, optimizer, scheduler, config)
    ddp_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False}) \
        if world_size > 1 else model

    store = FeatureStore(config["store"], create=False)
    knowledge = store.open(config["knowledge_entry"])
    table = get_table(store, config["dataset_table"], columns=("uri", "split", "votes", "mean_score"))
    hashes = knowledge_hashes(knowledge)
    decoder = decoder_for(spec, device)
    streams = {split: StudentStream(config["store"], config["knowledge_entry"],
                                    split_rows(table, hashes, split, label), label,
                                    World(rank, world_size), config["batch_size"], decoder, view_size(spec.view),
                                    config["seed"], locality_rows=knowledge.layout.shard_rows)
               for split in ("train", "test")}
    max_unreadable = config["max_unreadable_fraction"]

    for epoch in range(start_epoch, config["epochs"]):
        started = time.perf_counter()
        ddp_model.train()
        sums: dict[str, float] = {}
        rows_seen = 0.0
        for batch in streams["train"].epoch(epoch):
            weight = batch.weight.to(device)
            f_s, logits = ddp_model(batch.images.to(device, non_blocking=True))
            outputs = StudentOutputs(logits[:, 0] if label == "binary" else prediction(label, logits), f_s)
            targets = Targets(batch.gt.to(device), batch.teacher_prediction.to(device),
                              batch.teacher_feature.to(device))
            total, terms = student_loss(loss_spec, outputs, targets, weight)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            n = float(weight.sum())
            rows_seen += n
            for name, value in {"loss": total.detach(), **terms}.items():
                sums[name] = sums.get(name, 0.0) + float(value) * n
        scheduler.step()
        rows_seen = _sum(rows_seen, device)
        unreadable = int(_sum(float(streams["train"].unreadable.count), device))
        if unreadable > max_unreadable * len(streams["train"].data):
            example = streams["train"].unreadable.example or "(on another worker)"
            raise UnreadableImages(
                f"{unreadable} of {len(streams['train'].data)} train images could not be used in epoch {epoch} "
                f"(more than max_unreadable_fraction={max_unreadable}); e.g. {example}. Point dataset.path at "
                "where the images are now, or re-extract if they changed")
        metrics = {name: _sum(value, device) / max(rows_seen, 1.0) for name, value in sums.items()}
        metrics.update({"epoch": epoch, "train_rows_seen": int(rows_seen), "unreadable_rows": unreadable,
                        "lr": optimizer.param_groups[0]["lr"],
                        **{f"val_{k}": v for k, v in validate(ddp_model, streams["test"], label, device).items()},
                        "epoch_seconds": time.perf_counter() - started})
        history.append(metrics)
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if rank == 0:
                save_student(directory, model, spec, extra={"epoch": epoch, "knowledge_entry": config["knowledge_entry"],
                                                            "loss": config["loss"]})
                save_trainer_state(directory, optimizer, scheduler, epoch)
                with open(os.path.join(directory, HISTORY_FILE), "w") as f:
                    json.dump(history, f)
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint)


@torch.inference_mode()
def validate(model, stream: StudentStream, label: str, device: torch.device) -> dict:
    """Metrics over the whole split: each rank predicts its partition, every rank gets all of it."""
    model.eval()
    rows, preds, gts = [], [], []
    for batch in stream.epoch(0):
        keep = batch.weight.numpy() > 0
        _, logits = model(batch.images.to(device))
        pred = prediction(label, logits).float().cpu().numpy()
        rows.append(batch.rows[keep])
        preds.append(pred[keep])
        gts.append(batch.gt.numpy()[keep])
    if not rows:  # an empty test split: every rank has zero steps (equal steps per rank)
        return {}
    all_rows, pred, gt = (_gather_rows(np.concatenate(parts), device) for parts in (rows, preds, gts))
    assert len(np.unique(all_rows)) == len(all_rows), "a test row was predicted twice"
    return {k: v for k, v in evaluate_label(label, pred, gt).items() if v is not None}
