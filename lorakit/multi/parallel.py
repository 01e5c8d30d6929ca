"""Several adapters trained at once over one copy of the base: one forward and one backward per step for all of them.

Each job brings its own batches, optimizer, schedule, step count and LoRA config. A step concatenates one
micro-batch of every live job (padded to the longest sequence; padded positions are masked and their labels
ignored), runs the model once with `adapter_names` routing each row to its job's adapter, and backpropagates

    loss = sum_j mean_loss_j / grad_accum_j

Rows are independent through the model, so adapter j's gradient is exactly the gradient of its own mean loss,
as in a run of job j alone; each job then clips and steps only its own adapter's parameters. A job that has done
its steps drops out of the following batches.

Activation checkpointing works too: the forward it recomputes in backward replays the step's routing (LoraModel
marks a routed call's outputs), so each job's rows still use its own adapter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, LorakitError
from lorakit.model import LoraModel

Batch = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]  # (logits of a job's rows, their labels) -> mean loss
IGNORE = -100  # the label id cross-entropy skips


def mean_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy averaged over the labels that are not IGNORE (-100): one per row, or one per token."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE)


@dataclass
class ParallelJob:
    """One adapter to train: its name, LoRA config, batches and optimizer settings.

    batches: yields the job's micro-batches (dicts of tensors with "labels"), at least steps * grad_accum of them.
    optimizer: builds the job's optimizer from its adapter's parameters (default AdamW, lr 1e-3).
    scheduler: builds the job's learning-rate schedule from its optimizer (default: none, a constant rate).
    seed: the adapter's initial factors depend on it alone, so a run of this job alone starts from the same ones.
    """

    name: str
    lora_config: LoraConfig
    batches: Iterable[Batch]
    steps: int
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] = field(default=lambda p: torch.optim.AdamW(p))
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None
    grad_accum: int = 1
    max_grad_norm: float = 0.0  # 0: no clipping
    seed: int = 0


@dataclass
class JobStep:
    """What one optimizer step of one job reports: mean loss over its micro-batches, the lr it used, grad norm."""

    step: int
    loss: float
    lr: float
    grad_norm: float
    examples: int
    done: bool


@dataclass
class JobCounters:
    """A job's position: micro-batches taken, and the summed loss and examples of its unfinished accumulation."""

    micro: int
    loss: float
    examples: int


@dataclass
class _Running:
    """A job's live state: its parameters, optimizer, schedule, batch iterator and counters."""

    job: ParallelJob
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    batches: Iterator[Batch]
    micro: int = 0
    step: int = 0
    loss: float | Tensor = 0.0  # summed on the device until a report reads it back
    examples: int = 0

    @property
    def done(self) -> bool:
        return self.step >= self.job.steps


def add_seeded_adapter(model: LoraModel, name: str, config: LoraConfig, seed: int) -> None:
    """model.add_adapter under torch's RNG seeded with `seed` (and restored after): the factors depend on the seed
    alone, not on what ran before, so a parallel job and a run of it alone start from the same adapter."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model.add_adapter(name, config)


def check_jobs(model: LoraModel, jobs: list[ParallelJob]) -> None:
    """Refuses, before any adapter is added, jobs that cannot train side by side on one shared base."""
    if not jobs:
        raise ConfigError("no jobs to train; pass at least one ParallelJob")
    seen: set[str] = set()
    for job in jobs:
        if job.name in seen:
            raise ConfigError(f"two jobs are named {job.name!r}; give every job its own adapter name")
        if job.name in model.peft_config:
            raise ConfigError(f"job {job.name!r}: the model has an adapter of that name already; rename the job")
        seen.add(job.name)
        counts = (job.steps, job.grad_accum)
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts):
            raise ConfigError(
                f"job {job.name!r}: steps and grad_accum must be integers >= 1, got {job.steps!r}, {job.grad_accum!r}"
            )
        _check_shares_base(job)


def _check_shares_base(job: ParallelJob) -> None:
    """Jobs share one base: a job may not change it (trained biases, PiSSA/OLoRA init, Delta-LoRA's updates of W)."""
    config = job.lora_config
    problem = None
    if config.bias != "none":
        problem = f"bias={config.bias!r} trains the base's biases, which every job shares; use bias='none'"
    elif isinstance(config.init_lora_weights, str) and config.init_lora_weights.startswith(("pissa", "olora")):
        problem = f"init_lora_weights={config.init_lora_weights!r} rewrites the shared base weights; use True"
    elif config.target_parameters:
        problem = "target_parameters adapters change the shared weight itself, so rows cannot be routed to them"
    elif config.variant == "delta_lora":
        problem = "Delta-LoRA updates the shared base weights after each step; train it on its own"
    if problem:
        raise ConfigError(f"job {job.name!r} cannot train in parallel: {problem}")


class ParallelTrainer:
    """Trains `jobs` together over `model`'s one base; each step() runs the base once for all live jobs.

    model: a LoraModel (its existing adapters stay as they are), or a bare model, which gets wrapped.
    loss_fn: (logits of a job's rows, their labels) -> mean loss; cross-entropy ignoring -100 by default
    (a causal LM passes one that shifts the labels).
    pad_values: the fill per input key when sequences of different lengths are padded to the longest
    (labels -100 and attention_mask 0 always; input_ids defaults to the model config's pad_token_id).
    """

    def __init__(self, model: nn.Module, jobs: list[ParallelJob], loss_fn: LossFn = mean_cross_entropy,
                 pad_values: dict[str, int] | None = None,
                 forward_context: Callable[[], AbstractContextManager] = nullcontext) -> None:  # fmt: skip
        self.model = model if isinstance(model, LoraModel) else LoraModel(model)
        check_jobs(self.model, jobs)
        self.loss_fn = loss_fn
        self.forward_context = forward_context
        self.pad_values = {"input_ids": _pad_token_id(self.model), **(pad_values or {}), **_FIXED_PADS}
        before = _Snapshot.take(self.model)
        try:
            for job in jobs:
                add_seeded_adapter(self.model, job.name, job.lora_config, job.seed)
            self._running = [self._start(job) for job in jobs]
            _check_disjoint(self._running)
        except BaseException:  # a job that fails to start leaves the model as it was, so a fixed call can run
            for job in reversed(jobs):
                if job.name in self.model.peft_config:
                    self.model.delete_adapter(job.name)
            before.restore(self.model)
            raise
        before.restore(self.model)
        self.train_live()

    def _start(self, job: ParallelJob) -> _Running:
        """The job's optimizer and schedule, built while its adapter is the only trainable one, so an optimizer
        factory that reads the model (lorakit.optim's LoRA+ groups) sees this job's parameters alone."""
        self.model.set_adapter(job.name)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = job.optimizer(params)
        scheduler = job.scheduler(optimizer) if job.scheduler is not None else None
        return _Running(job, params, optimizer, scheduler, iter(job.batches))

    def train_live(self) -> None:
        """Live jobs' parameters take gradients, finished jobs' do not (call it after set_adapter, e.g. to evaluate
        one job alone)."""
        for running in self._running:
            for param in running.params:
                param.requires_grad_(not running.done)

    @property
    def live(self) -> list[str]:
        """The names of the jobs that still have steps to do."""
        return [r.job.name for r in self._running if not r.done]

    def parameters_of(self, name: str) -> list[nn.Parameter]:
        """The parameters job `name` trains (its adapter factors and modules_to_save copies)."""
        return self._job(name).params

    def optimizer_of(self, name: str) -> tuple[torch.optim.Optimizer, Any]:
        """Job `name`'s optimizer and schedule (None: a constant rate), e.g. to checkpoint or restore them."""
        running = self._job(name)
        return running.optimizer, running.scheduler

    def counters(self, name: str) -> JobCounters:
        """Where job `name` is: micro-batches taken, and the loss and examples of its unfinished accumulation."""
        running = self._job(name)
        return JobCounters(running.micro, float(running.loss), running.examples)

    def restore(self, name: str, counters: JobCounters) -> None:
        """Continues job `name` from `counters` (its batches must start at micro-batch counters.micro); its weights,
        optimizer and schedule are restored by the caller (through parameters_of and optimizer_of)."""
        running = self._job(name)
        running.micro, running.loss, running.examples = counters.micro, counters.loss, counters.examples
        running.step = counters.micro // running.job.grad_accum
        self.train_live()

    def _job(self, name: str) -> _Running:
        return next(r for r in self._running if r.job.name == name)

    def step(self) -> dict[str, JobStep]:
        """One micro-batch of every live job through one forward and backward; returns a report for each job
        whose optimizer stepped (every step with grad_accum 1)."""
        running = [r for r in self._running if not r.done]
        if not running:
            return {}
        batches = [self._next_batch(r) for r in running]
        inputs, sizes = concat_batches(batches, self.pad_values)
        labels = inputs.pop("labels").split(sizes)
        rows = [r.job.name for r, n in zip(running, sizes, strict=True) for _ in range(n)]
        self.model.train()
        with self.forward_context():
            out = self.model(**inputs, adapter_names=rows)
            # split, not slices: the backward of split is one concatenation; each slice's would zero-fill a
            # gradient the size of all the logits
            logits = (out if isinstance(out, Tensor) else out.logits).split(sizes)
            losses = [
                self.loss_fn(part, lab) / r.job.grad_accum for r, part, lab in zip(running, logits, labels, strict=True)
            ]
        torch.stack(losses).sum().backward()
        reports = {}
        for r, loss, batch in zip(running, losses, batches, strict=True):
            r.micro, r.loss, r.examples = r.micro + 1, r.loss + loss.detach(), r.examples + len(batch["labels"])
            if r.micro % r.job.grad_accum == 0:
                reports[r.job.name] = _optimizer_step(r)
        _read_back(reports)
        if any(report.done for report in reports.values()):
            self.train_live()
        return reports

    def run(self, on_step: Callable[[dict[str, JobStep]], None] | None = None) -> dict[str, list[float]]:
        """Steps until every job is done; returns each job's loss per optimizer step."""
        losses: dict[str, list[float]] = {r.job.name: [] for r in self._running}
        while self.live:
            reports = self.step()
            for name, report in reports.items():
                losses[name].append(report.loss)
            if on_step is not None:
                on_step(reports)
        return losses

    def _next_batch(self, running: _Running) -> Batch:
        job = running.job
        try:
            batch = next(running.batches)
        except StopIteration:
            raise LorakitError(
                f"job {job.name!r} ran out of batches after {running.micro} micro-batches; it needs "
                f"steps * grad_accum = {job.steps * job.grad_accum}: give it more batches or fewer steps"
            ) from None
        labels = batch.get("labels") if isinstance(batch, dict) else None
        if not isinstance(labels, Tensor) or labels.dim() == 0 or len(labels) == 0:
            # an empty batch's mean loss is NaN; its job would report NaN and step on no gradient
            found = "no rows" if isinstance(labels, Tensor) else f"no 'labels' tensor (keys: {sorted(batch)})"
            raise LorakitError(
                f"job {job.name!r}: micro-batch {running.micro} has {found}; every batch needs at least one row, "
                "with its labels under 'labels'"
            )
        return batch


_FIXED_PADS = {"labels": IGNORE, "attention_mask": 0}


def _optimizer_step(r: _Running) -> JobStep:
    """Clip, step and schedule job r's own parameters; the report carries the lr this step used."""
    max_norm = r.job.max_grad_norm if r.job.max_grad_norm > 0 else math.inf
    with_grad = [p for p in r.params if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(with_grad, max_norm) if with_grad else 0.0
    lr = r.optimizer.param_groups[0]["lr"]
    r.optimizer.step()
    if r.scheduler is not None:
        r.scheduler.step()
    r.optimizer.zero_grad(set_to_none=True)
    r.step += 1
    report = JobStep(r.step, r.loss, lr, grad_norm, r.examples, r.done)
    r.loss, r.examples = 0.0, 0
    return report


def _read_back(reports: dict[str, JobStep]) -> None:
    """The reports' losses and gradient norms, still tensors on the device, as floats in one transfer: a read per
    job and value would stall the GPU between the jobs' optimizer steps, twice a job."""
    fields = [(rep, f) for rep in reports.values() for f in ("loss", "grad_norm")]
    fields = [(rep, f) for rep, f in fields if isinstance(getattr(rep, f), Tensor)]
    if fields:
        device = getattr(fields[0][0], fields[0][1]).device
        values = torch.stack([getattr(rep, f).detach().float().reshape(()).to(device) for rep, f in fields]).tolist()
        for (rep, f), value in zip(fields, values, strict=True):
            setattr(rep, f, value)


def concat_batches(batches: list[Batch], pad_values: dict[str, int]) -> tuple[Batch, list[int]]:
    """The batches' rows stacked into one batch, sequences right-padded to the longest; and each batch's row count.

    Padded positions get attention_mask 0 (a mask of ones is added where a padded batch had none) and labels
    IGNORE, so every row's real tokens see exactly what they would see in their own batch.
    """
    keys = set(batches[0])
    for i, batch in enumerate(batches):
        if set(batch) != keys:
            raise LorakitError(f"batch {i} has keys {sorted(batch)}, batch 0 has {sorted(keys)}; give every job the "
                               "same inputs")  # fmt: skip
    lengths = {b["input_ids"].shape[1] for b in batches} if "input_ids" in keys else set()
    if len(lengths) > 1 and "attention_mask" not in keys:
        batches = [{**b, "attention_mask": torch.ones_like(b["input_ids"])} for b in batches]
    merged = {key: _pad_and_cat([b[key] for b in batches], pad_values.get(key, 0)) for key in batches[0]}
    return merged, [len(next(iter(batch.values()))) for batch in batches]


def _pad_and_cat(tensors: list[Tensor], fill: int) -> Tensor:
    if tensors[0].dim() < 2:
        return torch.cat(tensors)
    width = max(t.shape[1] for t in tensors)
    tail = [0, 0] * (tensors[0].dim() - 2)  # F.pad lists the last dimension first; dim 1 is the sequence
    return torch.cat([F.pad(t, [*tail, 0, width - t.shape[1]], value=fill) for t in tensors])


def _pad_token_id(model: LoraModel) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return pad if isinstance(pad, int) else 0


@dataclass
class _Snapshot:
    """What starting the jobs changes on the model's existing adapters: which are active and train, and which of
    their parameters take gradients (an adapter loaded frozen stays frozen)."""

    names: list[str]
    inference_mode: dict[str, bool]
    requires_grad: list[tuple[nn.Parameter, bool]]

    @classmethod
    def take(cls, model: LoraModel) -> _Snapshot:
        active, trainable = model.active_adapters, model.state.trainable
        names = [n for n in active if n in trainable] or active  # set_adapter(names) gives this active set again
        modes = {n: c.inference_mode for n, c in model.peft_config.items()}
        return cls(names, modes, [(p, p.requires_grad) for p in model.parameters()])

    def restore(self, model: LoraModel) -> None:
        if self.names:
            model.set_adapter(self.names)
        for name, mode in self.inference_mode.items():
            model.peft_config[name].inference_mode = mode
        for param, flag in self.requires_grad:
            param.requires_grad_(flag)


def _check_disjoint(running: list[_Running]) -> None:
    """Every job trains parameters of its own (an adapter loaded for inference, or a shared bias, would not)."""
    seen: set[int] = set()
    for r in running:
        if not r.params or seen & {id(p) for p in r.params}:
            raise LorakitError(f"job {r.job.name!r} has no parameters of its own to train; check its LoRA config")
        seen |= {id(p) for p in r.params}


def train_parallel(model: nn.Module, jobs: list[ParallelJob], loss_fn: LossFn = mean_cross_entropy) -> LoraModel:
    """Trains every job to its end (see ParallelTrainer) and returns the LoraModel holding their adapters."""
    trainer = ParallelTrainer(model, jobs, loss_fn)
    trainer.run()
    return trainer.model
