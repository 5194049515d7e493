"""The student recipe that runs on every Ray Train worker (DDP: NCCL on GPU, gloo on CPU).

Every epoch a worker streams its share of the train split (trainers/student_data.py), takes
optimizer steps of ``global_batch_size`` rows with the configured KD loss, and evaluates its
share of the validation set carved from train (``student_data.student_splits``); after the last
epoch, with ``score_test``, its share of the test split. The predictions are gathered so that
every rank reports the same metrics. Rank 0 writes a checkpoint at the end of every epoch and, with
``checkpoint_every_steps``, inside it:

* ``model.safetensors`` and ``student.json`` (trainers/student.py);
* ``optimizer.safetensors`` + ``trainer_state.json``: the optimizer's tensors, and its param groups,
  the scheduler, where the run stands (epoch, step, the epoch's loss sums so far over all ranks)
  and the world sizes used, as JSON. No pickle, as everywhere in the project;
* ``history.json``: every finished epoch's metrics, so that a resumed run still has its curves.

Ray Train keeps the checkpoint under ``storage_path/name``. When a worker dies, or the run is
restarted under the same name, training resumes at the batch after the last checkpoint
(:func:`resume`): the weights are loaded with the student's own checks (state digest, same
student), and a resumed run's losses and metrics are those of an uninterrupted one — the data
order is a pure function of (seed, epoch) and nothing else in an epoch draws random numbers,
so the model, optimizer, scheduler and the epoch's sums are all there is to restore.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from featurestore.errors import UserError
from featurestore.partition import World
from featurestore.pixels import PixelViewSpec
from featurestore.specs import ExtractorSpec
from featurestore.store import FeatureStore
from featurestore.views import get_table
from trainers.labels import evaluate_label, prediction
from trainers.knowledge import knowledge_hashes
from trainers.losses import LossSpec, StudentOutputs, Targets, student_loss
from trainers.student import (StudentError, StudentSpec, build_student, decoder_for, restore_student, save_student,
                              view_size)
from trainers.student_data import (DecodedImages, StoredImages, StoredPooledFeatures, StudentStream, batch_plan,
                                   student_splits)
from trainers.student_features import stored_pooled
from trainers.student_views import stored_views

OPTIMIZER_FILE, STATE_FILE, HISTORY_FILE = "optimizer.safetensors", "trainer_state.json", "history.json"


class UnreadableImages(UserError, RuntimeError):
    """Too many of an epoch's images could not be read, or no longer match the index."""


@dataclass(frozen=True)
class RunState:
    """Where a run stands: ``epoch`` in progress (or next), optimizer ``step`` reached in it, and
    the epoch's loss sums and rows so far, summed over all ranks (a mid-epoch checkpoint's)."""

    epoch: int = 0
    step: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    rows_seen: float = 0.0
    unreadable: int = 0


def save_trainer_state(directory: str, optimizer: torch.optim.Optimizer, scheduler, run_state: RunState,
                       world_sizes: list[int]) -> None:
    """Optimizer tensors as safetensors (``<param index>.<name>``), everything else as JSON."""
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors = {f"{index}.{name}": value.detach().cpu().contiguous()
               for index, entry in state["state"].items() for name, value in entry.items()}
    save_file(tensors, os.path.join(directory, OPTIMIZER_FILE))
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump({"param_groups": state["param_groups"], "scheduler": scheduler.state_dict(),
                   "state": dataclasses.asdict(run_state), "world_sizes": world_sizes}, f)


def load_trainer_state(directory: str, optimizer: torch.optim.Optimizer, scheduler) -> tuple[RunState, list[int]]:
    """Restore what :func:`save_trainer_state` wrote; returns the run state it was saved at and
    the world sizes the run has used."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, STATE_FILE)) as f:
        meta = json.load(f)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(os.path.join(directory, OPTIMIZER_FILE)).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    return RunState(**meta["state"]), list(meta["world_sizes"])


def load_history(directory: str) -> list[dict]:
    """Per-epoch metrics saved with a checkpoint; empty for checkpoints written before they were."""
    path = os.path.join(directory, HISTORY_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def resume(directory: str, model, optimizer: torch.optim.Optimizer, scheduler,
           config: dict) -> tuple[RunState, list[dict], list[int]]:
    """Restore a run from its checkpoint ``directory``: the model through the student's checked
    loading (``trainers.student.restore_student``: a corrupt or mixed checkpoint, or one of another
    student, is a ``StudentError``, never silently loaded), then the optimizer, the scheduler, the
    history and where in the epoch it stopped. Returns the state to continue from, the history
    so far and the world sizes used so far."""
    extra = restore_student(model, directory)
    mine = {"knowledge_entry": config["knowledge_entry"], "loss": config["loss"],
            "global_batch_size": config["global_batch_size"]}
    if changed := sorted(k for k, v in mine.items() if extra.get(k) != v):
        raise StudentError(f"checkpoint {directory} was trained with another {' and '.join(changed)} "
                           f"({', '.join(f'{k}={extra.get(k)!r}' for k in changed)}); give this run another name "
                           "to start it afresh")
    state, world_sizes = load_trainer_state(directory, optimizer, scheduler)
    if (extra.get("epoch"), extra.get("step")) != (state.epoch, state.step):
        raise StudentError(f"checkpoint {directory}: the weights are from epoch {extra.get('epoch')} step "
                           f"{extra.get('step')} but the optimizer state from epoch {state.epoch} step "
                           f"{state.step}; the checkpoint is mixed from two saves")
    history = load_history(directory)
    if [h.get("epoch") for h in history] != list(range(state.epoch)):
        raise StudentError(f"checkpoint {directory}: {HISTORY_FILE} does not hold epochs 0..{state.epoch - 1}")
    return state, history, world_sizes


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


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
    """Ray Train's entry point on every worker."""
    StudentRecipe(config).run()


class StudentRecipe:
    """One worker's run, in torchtune's recipe shape: :meth:`setup` (model, optimizer, resume,
    streams), :meth:`train` (epochs of optimizer steps), :meth:`save` (a checkpoint at the end of
    each epoch and every ``checkpoint_every_steps`` steps).

    An optimizer step takes ``global_batch_size`` rows: each of the ``world_size`` workers forwards
    its quota of them as ``accumulation`` micro-batches (``student_data.batch_plan``; quotas differ
    by one row when the world size does not divide the global batch, and the loss is scaled so
    that the step's gradient is still the global batch's mean), so elastic resizes keep the
    experiment.
    On CUDA the forward runs under bf16 autocast with channels-last images, and loss sums stay on
    the device: the host syncs once per ``log_every_steps`` steps, not per step.
    """

    def __init__(self, config: dict):
        import ray.train

        self.config = config
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.batches = batch_plan(config["global_batch_size"], self.world_size, config.get("micro_batch_size"))
        self.accumulation = self.batches.accumulation

    def run(self) -> None:
        self.setup()
        self.train()

    # -- setup -----------------------------------------------------------------------------------

    def setup(self) -> None:
        import ray.train
        import ray.train.torch

        config = self.config
        if config["deterministic"]:  # before the first cuBLAS call; see README "Reproducibility"
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        self.device = ray.train.torch.get_device()
        self.cuda = self.device.type == "cuda"
        torch.manual_seed(config["seed"])
        self.spec = StudentSpec.from_json(config["student"])
        self.loss_spec = LossSpec(**config["loss"])
        self.model = build_student(self.spec).to(self.device)
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(trainable, lr=config["lr"])
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=config["lr_step_epochs"], gamma=0.1)
        self.state, self.history, self.world_sizes = RunState(), [], []
        if checkpoint := ray.train.get_checkpoint():
            with checkpoint.as_directory() as directory:
                self.state, self.history, self.world_sizes = resume(directory, self.model, self.optimizer,
                                                                    self.scheduler, config)
        if not self.world_sizes or self.world_sizes[-1] != self.world_size:
            self.world_sizes = [*self.world_sizes, self.world_size]
        self.ddp_model = ray.train.torch.prepare_model(self.model, parallel_strategy_kwargs={
            "find_unused_parameters": False}) if self.world_size > 1 else self.model
        store = FeatureStore(config["store"], create=False)
        knowledge = store.open(config["knowledge_entry"])
        table = get_table(store, config["dataset_table"],
                          columns=("uri", "split", "votes", "mean_score", "tag1", "tag2"))
        hashes = knowledge_hashes(knowledge)
        views = stored_views(config["store"], PixelViewSpec.from_json(config["view"])) \
            if config["images"] == "stored" else None
        self.pooled = stored_pooled(config["store"], ExtractorSpec.from_json(config["pooled"]), views) \
            if config.get("pooled") else None
        self.streams = {split: self._stream(data, views, knowledge.layout.shard_rows, train=split == "train")
                        for split, data in student_splits(table, hashes, self.spec.label,
                                                          config["val_fraction"]).items()}

    def _stream(self, data, views, locality_rows: int, train: bool) -> StudentStream:
        """A split's stream: the frozen backbone's stored pooled features, the stored ``views``, or
        decoding (``views`` None) in blocks of ``locality_rows`` knowledge rows; the train split in
        the global batch's quotas."""
        config = self.config
        if self.pooled is not None:
            images = StoredPooledFeatures(config["store"], self.pooled, data)
        elif views is not None:
            images = StoredImages(config["store"], views, data)
        else:
            images = DecodedImages(data, decoder_for(self.spec, self.device), view_size(self.spec.view), locality_rows)
        batch = self.batches if train else max(self.batches.micro_sizes(0))
        return StudentStream(config["store"], config["knowledge_entry"], data, self.spec.label,
                             World(self.rank, self.world_size), batch, images, config["seed"],
                             window_blocks=config["window_blocks"], channels_last=self.cuda, pin_memory=self.cuda,
                             tag_width=self.spec.tag_width)

    # -- train -----------------------------------------------------------------------------------

    def steps_per_epoch(self, epoch: int) -> int:
        return -(-self.streams["train"].steps(epoch) // self.accumulation)

    def train(self) -> None:
        config, label, device = self.config, self.spec.label, self.device
        every, log_every = config["checkpoint_every_steps"], config["log_every_steps"]
        for epoch in range(self.state.epoch, config["epochs"]):
            started = time.perf_counter()
            resumed = self.state if self.state.epoch == epoch else RunState(epoch)
            step, steps = resumed.step, self.steps_per_epoch(epoch)
            self.ddp_model.train()
            # this rank's share of the sums; a resumed epoch's earlier sums (all ranks') start on rank 0
            sums = {k: torch.tensor(v if self.rank == 0 else 0.0, dtype=torch.float64, device=device)
                    for k, v in resumed.sums.items()}
            rows_seen = torch.tensor(resumed.rows_seen if self.rank == 0 else 0.0, dtype=torch.float64, device=device)
            earlier_unreadable = resumed.unreadable if self.rank == 0 else 0
            stream = self.streams["train"]
            batches, micro = stream.steps(epoch), 0
            for batch in stream.epoch(epoch, start_batch=step * self.accumulation):
                ends_step = micro == self.accumulation - 1 or step * self.accumulation + micro + 1 == batches
                weight = batch.weight.to(device, non_blocking=True)
                total, terms = self._forward(batch, weight, sync=ends_step)
                n = weight.sum().double()
                rows_seen += n
                for name, value in {"loss": total.detach(), **terms}.items():
                    sums[name] = sums.get(name, torch.zeros((), dtype=torch.float64, device=device)) + value.double() * n
                micro += 1
                if ends_step:
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    step, micro = step + 1, 0
                    if log_every and step % log_every == 0 and self.rank == 0:
                        print(f"[train_student] epoch {epoch} step {step}/{steps}: loss "
                              f"{float(sums['loss'] / rows_seen.clamp(min=1)):.4f}", flush=True)
                    if every and step % every == 0 and step < steps:
                        self.save(RunState(epoch, step, *self._totals(sums, rows_seen, earlier_unreadable)))
            self.scheduler.step()
            totals, seen, unreadable = self._totals(sums, rows_seen, earlier_unreadable)
            self._check_unreadable(epoch, unreadable)
            metrics = {name: value / max(seen, 1.0) for name, value in totals.items()}
            metrics.update({"epoch": epoch, "train_rows_seen": int(seen), "unreadable_rows": unreadable,
                            "lr": self.optimizer.param_groups[0]["lr"], "steps": steps,
                            "global_batch_size": config["global_batch_size"], "world_sizes": list(self.world_sizes),
                            **{f"val_{k}": v for k, v in validate(self.ddp_model, self.streams["val"], label,
                                                                     device, self.pooled is not None).items()},
                            "epoch_seconds": time.perf_counter() - started})
            self.history.append(metrics)
            self.state = RunState(epoch + 1)
            if epoch == config["epochs"] - 1 and config["score_test"]:  # reported, not part of the history
                metrics = {**metrics, **{f"test_{k}": v for k, v in validate(
                    self.ddp_model, self.streams["test"], label, device, self.pooled is not None).items()}}
            self.save(self.state, metrics)

    def _forward(self, batch, weight: torch.Tensor, sync: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of one micro-batch; gradients all-reduce only on the step's last.
        A student with tags gets the batch's two-hot vectors as input (multi-modal) and/or as the
        target of its tag head (``multitask``)."""
        device, label = self.device, self.spec.label
        images = batch.images.to(device, non_blocking=True)
        tags = None if batch.tags is None else batch.tags.to(device, non_blocking=True)
        no_sync = self.ddp_model.no_sync() if self.world_size > 1 and not sync else contextlib.nullcontext()
        with no_sync:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
                f_s, logits, *tag_logits = self.ddp_model(images, tags, predict_tags=self.spec.tag_head,
                                                          pooled=self.pooled is not None)
            f_s, logits = f_s.float(), logits.float()
            outputs = StudentOutputs(logits[:, 0] if label == "binary" else prediction(label, logits), f_s,
                                     tag_logits[0].float() if tag_logits else None)
            targets = Targets(batch.gt.to(device, non_blocking=True), batch.teacher_prediction.to(device, non_blocking=True),
                              batch.teacher_feature.to(device, non_blocking=True), tags)
            total, terms = student_loss(self.loss_spec, outputs, targets, weight)
            (total * self.batches.loss_scale(len(batch.rows))).backward()
        return total, terms

    def _totals(self, sums: dict[str, torch.Tensor], rows_seen: torch.Tensor,
                earlier_unreadable: int) -> tuple[dict[str, float], float, int]:
        """The epoch's sums so far over all ranks (one host sync)."""
        names = sorted(sums)
        local = torch.stack([sums[n] for n in names] + [rows_seen, torch.tensor(
            float(self.streams["train"].unreadable.count + earlier_unreadable), dtype=torch.float64, device=self.device)])
        if _distributed():
            torch.distributed.all_reduce(local)
        values = local.cpu().tolist()
        return dict(zip(names, values[:-2])), values[-2], int(values[-1])

    def _check_unreadable(self, epoch: int, unreadable: int) -> None:
        stream, limit = self.streams["train"], self.config["max_unreadable_fraction"]
        if unreadable > limit * len(stream.data):
            example = stream.unreadable.example or "(on another worker)"
            raise UnreadableImages(
                f"{unreadable} of {len(stream.data)} train images could not be used in epoch {epoch} "
                f"(more than max_unreadable_fraction={limit}); e.g. {example}. Point dataset.path at "
                "where the images are now, or re-extract if they changed")

    # -- save ------------------------------------------------------------------------------------

    def save(self, state: RunState, metrics: dict | None = None) -> None:
        """Report to Ray Train, with a checkpoint from rank 0: at an epoch's end (``state.step``
        0 of the next epoch) or after ``state.step`` optimizer steps of ``state.epoch``."""
        import ray.train

        epoch, step = (state.epoch - 1, None) if state.step == 0 else (state.epoch, state.step)
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if self.rank == 0:
                save_student(directory, self.model, self.spec, extra={
                    "epoch": state.epoch, "step": state.step, "knowledge_entry": self.config["knowledge_entry"],
                    "loss": self.config["loss"], "global_batch_size": self.config["global_batch_size"]})
                save_trainer_state(directory, self.optimizer, self.scheduler, state, self.world_sizes)
                with open(os.path.join(directory, HISTORY_FILE), "w") as f:
                    json.dump(self.history, f)
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics or {"epoch": epoch, "step": step}, checkpoint=checkpoint)


@torch.inference_mode()
def validate(model, stream: StudentStream, label: str, device: torch.device, pooled: bool = False) -> dict:
    """Metrics over the whole split: each rank predicts its partition, every rank gets all of it.
    ``pooled``: the stream yields a frozen backbone's pooled features, not images."""
    model.eval()
    rows, preds, gts = [], [], []
    for batch in stream.epoch(0):
        keep = batch.weight.numpy() > 0
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            _, logits = model(batch.images.to(device, non_blocking=True),
                              None if batch.tags is None else batch.tags.to(device, non_blocking=True), pooled=pooled)
        pred = prediction(label, logits).float().cpu().numpy()
        rows.append(batch.rows[keep])
        preds.append(pred[keep])
        gts.append(batch.gt.numpy()[keep])
    if not rows:  # an empty split: every rank has zero steps (equal steps per rank)
        return {}
    all_rows, pred, gt = (_gather_rows(np.concatenate(parts), device) for parts in (rows, preds, gts))
    assert len(np.unique(all_rows)) == len(all_rows), "a row was predicted twice"
    return {k: v for k, v in evaluate_label(label, pred, gt).items() if v is not None}
