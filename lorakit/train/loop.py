"""The training loop, top to bottom: check -> data -> model -> LoRA -> optimizer -> steps -> adapter, plots, report.

Reads like nanoGPT's train.py on purpose: one function owns the loop and every other piece is a small helper
above or below it. DDP comes from torchrun's environment (gloo on CPU, NCCL on GPU): each rank trains on its
shard of every epoch, gradients are averaged, rank 0 alone writes the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lorakit import LoraModel
from lorakit.errors import ConfigError, LorakitError
from lorakit.multi.parallel import add_seeded_adapter
from lorakit.optim import create_lorafa_optimizer, create_optimizer
from lorakit.train import checkpoint, parallel, tasks
from lorakit.train.config import DataSection, TrainConfig, load_config, to_toml
from lorakit.train.data import batch_indices
from lorakit.train.plots import plot_run
from lorakit.train.tracking import Progress, Tracker, check_available

try:  # POSIX advisory locks: a run folder held by a running `lorakit train`
    import fcntl
except ImportError:  # Windows
    fcntl = None

ADAPTER_DIR = "adapter"
CONFIG_FILE = "config.toml"
SUMMARY_FILE = "summary.json"
# Written first into every run folder `lorakit train` creates: --overwrite deletes only folders that carry it
MARKER_FILE = ".lorakit-run"


class TrainingStopped(LorakitError):
    """The run cannot go on (the loss became NaN or inf); its last good checkpoint is kept."""


class TrainingInterrupted(LorakitError):
    """Ctrl-C (SIGINT) or SIGTERM stopped the run; its last checkpoint is kept and --resume continues it exactly."""


@dataclass
class RunResult:
    """What a finished run reports, also written to summary.json in its folder."""

    folder: str
    task: str
    metric: str
    before: dict[str, float]
    after: dict[str, float]
    trainable_params: int
    total_params: int
    adapter_bytes: int
    model_bytes: int
    steps: int
    train_examples: int
    seconds: float
    step_seconds: float  # the mean, compiling (and recording CUDA graphs) included
    data_wait_fraction: float
    peak_memory_bytes: int
    baseline: dict[str, float] = dataclasses.field(default_factory=dict)  # e.g. majority-class accuracy
    median_step_seconds: float = 0.0  # what a step takes once compiled: the few compiling steps barely move it
    compiled: bool = False  # the model's blocks ran under torch.compile (run.compile)
    cuda_graphs: bool = False  # ... and replayed as CUDA graphs (run.compile_mode)
    fused_head_loss: bool = False  # the loss came from the head in chunks, never the full logits (run.fused_head_loss)
    already_finished: bool = False  # a resumed run that had finished: nothing was done


@dataclass
class _Env:
    """Where this process runs: its rank among `world` processes and its device."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool = False  # train() started the process group, so it ends it (a caller's own it leaves alone)

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class _Setup:
    """Everything the loop needs, built and checked before the first step."""

    folder: Path
    prepared: tasks.Prepared
    model: LoraModel
    wrapped: nn.Module  # what the loop calls: the model (one process, ddp), or its FSDP2 form
    optimizer: torch.optim.Optimizer
    scheduler: Any
    max_steps: int
    batches_per_epoch: int
    model_bytes: int
    compiled: parallel.Compiled
    fused: tasks.FusedHead | None  # the model split at its output head, when run.fused_head_loss applies
    lock: int | None = None  # rank 0: a descriptor holding the run folder's lock until the run ends


def train(
    config: TrainConfig,
    overwrite: bool = False,
    resume: Path | None = None,
    on_step: Callable[[int], None] | None = None,
) -> RunResult:
    """Runs `config` to the end and returns its report; `on_step(step)` is called after each optimizer step."""
    env = _setup_env()
    if resume is not None:
        _check_folder(Path(resume), config, overwrite, resume=True)
        if (Path(resume) / SUMMARY_FILE).is_file():  # written last: the run is complete, resuming changes nothing
            saved = json.loads((Path(resume) / SUMMARY_FILE).read_text())
            if env.owns_group:
                parallel.end([])
            return RunResult(**{**saved, "already_finished": True})
    run = _setup(config, env, overwrite, resume)
    try:
        with _signals_interrupt():
            result = _run(config, env, run, resume, on_step)
    except KeyboardInterrupt:
        raise TrainingInterrupted(_interrupt_message(run.folder)) from None
    finally:
        if run.lock is not None:
            os.close(run.lock)
        if run.compiled.graphs:
            _release_graphs()
    if env.owns_group:  # after a run that succeeded only: a failed one may leave a collective waiting on a peer
        sharded_over = parallel.meshes(run.wrapped)
        del run  # the model holds the process group: it goes first
        parallel.end(sharded_over)
    return result


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler's or `kill`'s) stops the run as Ctrl-C does, so both end with one line saying how to
    resume; only the main thread can set a handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt_message(folder: Path) -> str:
    step = checkpoint.saved_step(folder)
    if step is None:
        return (
            f"interrupted before the first checkpoint, so there is nothing to resume; start it again with "
            f"lorakit train {folder / CONFIG_FILE} --overwrite"
        )
    return (
        f"interrupted; {folder} keeps its checkpoint of step {step}; continue it, to the same result as an "
        f"uninterrupted run, with: lorakit train --resume {folder}"
    )


def _run(
    config: TrainConfig, env: _Env, run: _Setup, resume: Path | None, on_step: Callable[[int], None] | None
) -> RunResult:
    """The run set up by _setup: the eval before, the steps, the eval after, the report."""
    folder, prepared, model, optimizer, scheduler = run.folder, run.prepared, run.model, run.optimizer, run.scheduler
    max_steps, optim = run.max_steps, config.optim
    start_step = 0
    if resume is not None:
        start_step = checkpoint.load(folder, model, optimizer, scheduler, env.rank)
        _truncate_metrics(folder, start_step, max_steps, env)
    tracker = Tracker(folder if env.main else None, config.run, config.to_dict(), resume is not None)
    if resume is not None:
        before = _read_summary_before(folder)
    else:
        torch.manual_seed(config.seed + env.rank)  # dropout: different per rank, the same in every run
        random.seed(config.seed + env.rank)
        before = evaluate(model, prepared, config, env, run.fused, run.compiled.graphs)
        tracker.log("eval", 0, before)
        _write_json(folder / "before.json", before, env)
    progress = Progress(config.run.progress if env.main else "none", max_steps, start_step, config.run.log_every)
    if resume is None:
        progress.eval(0, before)
    timing = {"wait": 0.0, "total": 0.0, "times": []}  # times: each step's seconds
    window: list[float] = []  # losses since the last log line: the logged loss is their mean

    # -- the loop ------------------------------------------------------------------------------------------------
    for step in range(start_step, max_steps):
        t0 = time.perf_counter()
        loss, examples = _accumulate_gradients(run, config, step, env, timing)
        grad_norm = _clip(model, optim.max_grad_norm)
        loss = _mean_over_ranks(loss, env)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            progress.close()
            tracker.close()
            raise TrainingStopped(_stop_message(folder, step + 1, loss, grad_norm))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss)
        dt = time.perf_counter() - t0
        timing["total"] += dt
        timing["times"].append(dt)
        done = step + 1
        throughput = examples * env.world / dt
        if done % config.run.log_every == 0 or done == max_steps:
            mean_loss, window = sum(window) / len(window), []
            tracker.log(
                "train", done, {"loss": mean_loss, "lr": lr, "grad_norm": grad_norm, "examples_per_s": throughput}
            )
        progress.update({"loss": loss, "lr": lr, "ex/s": throughput})
        if done % config.run.eval_every == 0 and done != max_steps:
            scores = evaluate(model, prepared, config, env, run.fused, run.compiled.graphs)
            tracker.log("eval", done, scores)
            progress.eval(done, scores)
        if done % config.run.checkpoint_every == 0 or done == max_steps:
            checkpoint.save(folder, done, model, optimizer, scheduler, env.rank)
        if on_step is not None:
            on_step(done)
    progress.close()

    after = evaluate(model, prepared, config, env, run.fused, run.compiled.graphs)
    tracker.log("eval", max_steps, after)
    progress.eval(max_steps, after)
    tracker.close()
    return _finish(folder, model, config, env, before, after, max_steps, prepared, run, timing)


@torch.no_grad()
def evaluate(model: nn.Module, prepared: tasks.Prepared, config: TrainConfig, env: _Env | None = None,
             fused: tasks.FusedHead | None = None, graphs: bool = False) -> dict:  # fmt: skip
    """The task's metrics over the whole eval set (every rank computes the same numbers); `graphs`: the blocks
    replay CUDA graphs, so each batch is marked as a new step."""
    device = env.device if env else next(model.parameters()).device
    model.eval()
    loss_sum, count, correct = 0.0, 0, 0
    size = config.optim.batch_size * 2  # no activations kept for backward: twice the batch fits
    with _autocast(config, env) if env else nullcontext():
        for i in range(0, len(prepared.eval), size):
            batch = {k: v.to(device) for k, v in prepared.collate(prepared.eval[i : i + size]).items()}
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            scores = tasks.score(config.task, model, batch, fused)
            loss_sum, count, correct = loss_sum + scores.loss_sum.item(), count + scores.count, correct + scores.correct
    if count == 0:
        return {}
    return tasks.metrics(config.task, loss_sum, count, correct)


# -- before the loop -------------------------------------------------------------------------------------------------
def _setup(config: TrainConfig, env: _Env, overwrite: bool, resume: Path | None) -> _Setup:
    """Checks, data, model, LoRA, optimizer and schedule; the run folder is created only once all of them work."""
    check_available(config.run)
    folder = Path(resume) if resume is not None else config.resolved_out_dir()
    _check_folder(folder, config, overwrite, resume is not None)
    prepared = tasks.prepare(config)  # bad data fails here: nothing has been written yet
    base = tasks.build_model(config, prepared)
    _no_kv_cache(base)
    model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    model = LoraModel(base)
    add_seeded_adapter(model, "default", config.lora_config(), config.seed)  # the seed alone fixes the init
    tasks.check_outputs(model, prepared, torch.device("cpu"))  # labels beyond the head fail before the folder exists
    _gradient_checkpointing(model, config)
    wrapped = parallel.wrap(model, config.run.distributed, env.world, env.device)  # before the optimizer: FSDP
    fused = tasks.fused_head(config, model, prepared, env.world)  # checked eagerly, before blocks are compiled
    mode = _compile_mode(config, env)
    _check_graphs(config, env, mode)
    run = config.run
    compiled = parallel.compile_blocks(model, run.compile, run.compile_backend, env.device, mode)
    optim = config.optim
    per_epoch = len(batch_indices(len(prepared.train), optim.batch_size, config.seed, 0, env.rank, env.world))
    from_epochs = max(1, math.ceil(optim.epochs * per_epoch / optim.grad_accum))
    max_steps = optim.max_steps if optim.max_steps is not None and optim.max_steps > 0 else from_epochs
    optimizer = _optimizer(model, config)
    scheduler = _scheduler(optimizer, config, max_steps)
    lock = None
    if env.main:
        _start_folder(folder, config, overwrite, resume is not None)
        lock = _hold(folder)
    _barrier(env)
    return _Setup(
        folder, prepared, model, wrapped, optimizer, scheduler, max_steps, per_epoch, model_bytes, compiled, fused, lock
    )


def _release_graphs() -> None:
    """Frees what the run's CUDA graphs hold: torch keeps every recorded graph and its memory pool (the activations
    of a step) for as long as the process lives, so each finished run of a sweep in one process would keep its own
    on the GPU. The run's compiled layers are never called again; compiled code elsewhere compiles anew."""
    torch.compiler.reset()


def _compile_mode(config: TrainConfig, env: _Env) -> str:
    """run.compile_mode, "auto" resolved: "reduce-overhead" (each block's kernels replayed as a CUDA graph, with no
    launch from the host) where batches take few shapes and graphs hold (a GPU, inductor, no gradient
    checkpointing, no FSDP2), else "default". Graphs take a small model's step from bound by the host's launches to
    bound by the GPU (3.3x on a 24-layer, 512-wide Llama on an H100) and leave a large one's as it was; a batch of a
    new shape records again, so text padded to each batch's longest (any length) stays on the default mode."""
    run = config.run
    if run.compile_mode != "auto":
        return run.compile_mode
    one_shape = config.task == "classification" or _few_lengths(config.data)
    holds = env.device.type == "cuda" and run.compile_backend == "inductor" and not config.model.gradient_checkpointing
    sharded = env.world > 1 and run.distributed == "fsdp"
    return "reduce-overhead" if one_shape and holds and not sharded else "default"


GRAPH_LENGTHS = 8  # batch lengths a text run may take and still replay CUDA graphs under compile_mode auto


def _few_lengths(data: DataSection) -> bool:
    """Text batches take at most GRAPH_LENGTHS lengths: padded to max_length, or to multiples of
    pad_to_multiple_of up to it (each new length records its graphs once, then replays them)."""
    multiple = data.pad_to_multiple_of
    return data.padding == "max_length" or (multiple is not None and -(-data.max_length // multiple) <= GRAPH_LENGTHS)


def _check_graphs(config: TrainConfig, env: _Env, mode: str) -> None:
    """CUDA graphs replay a block's kernels as recorded; FSDP2's gathers around every block and a recomputing
    backward (gradient checkpointing) run the blocks in ways a recording cannot follow."""
    run = config.run
    if not parallel.replays_graphs(mode) or env.device.type != "cuda":
        return
    if config.model.gradient_checkpointing:
        raise ConfigError(
            f"run.compile_mode = {mode!r} replays CUDA graphs, which a backward that recomputes the "
            "blocks (model.gradient_checkpointing) breaks; set run.compile_mode = 'default' (or "
            "'max-autotune-no-cudagraphs'), or model.gradient_checkpointing = false"
        )
    if env.world > 1 and run.distributed == "fsdp":
        raise ConfigError(
            f"run.compile_mode = {mode!r} replays CUDA graphs, which FSDP2's sharded blocks cannot "
            "use; set run.compile_mode = 'default' (or 'max-autotune-no-cudagraphs'), or run.distributed = 'ddp'"
        )
    if config.task != "classification" and not _few_lengths(config.data):
        warnings.warn(
            f"run.compile_mode = {mode!r} records CUDA graphs for every batch shape, and with text padded to each "
            "batch's longest every new length records again (time and GPU memory); set data.padding = "
            f"'max_length', or data.pad_to_multiple_of to at least max_length / {GRAPH_LENGTHS}",
            stacklevel=2,
        )


def _setup_env() -> _Env:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    owns = world > 1 and not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Env(int(os.environ.get("RANK", "0")), world, device, owns)


def _check_folder(folder: Path, config: TrainConfig, overwrite: bool, resume: bool) -> None:
    """Refuses to mix two runs in one folder; a resumed run must have the config it started with."""
    if resume:
        saved_file = folder / CONFIG_FILE
        if not saved_file.is_file():
            raise ConfigError(f"{folder} is not a run folder (no {CONFIG_FILE}); pass the folder of the run to resume")
        saved = load_config(saved_file).to_dict()
        differences = checkpoint.config_differences(saved, config.to_dict())
        if differences:
            raise ConfigError(
                f"cannot resume {folder} with a different config ({'; '.join(differences)}); resume with the "
                f"run's own config (lorakit train --resume {folder}) or start a new run in another folder"
            )
    else:
        _check_new_folder(folder, overwrite)


def _check_new_folder(folder: Path, overwrite: bool) -> None:
    """A new run gets a folder of its own; --overwrite deletes only a folder an earlier run marked as its own."""
    resolved, cwd = folder.resolve(), Path.cwd().resolve()
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve() or resolved in (cwd, *cwd.parents):
        raise ConfigError(
            f"run.out_dir {folder} is the filesystem root, your home or the current directory (or one above it); "
            "a run needs a folder of its own, e.g. --run.out_dir=runs/my-run"
        )
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"run.out_dir {folder} is a file; choose a folder path")
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"run folder {folder} exists; pass --overwrite to replace it, --resume {folder} to continue it, "
                "or choose another --run.out_dir"
            )
        if not (folder / MARKER_FILE).is_file():
            raise ConfigError(
                f"{folder} was not created by lorakit train (it has no {MARKER_FILE}), so --overwrite will not "
                "delete it; choose another --run.out_dir, or remove the folder yourself"
            )
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create run folder {folder}: {existing} is not a writable folder")


def _start_folder(folder: Path, config: TrainConfig, overwrite: bool, resume: bool) -> None:
    try:
        _make_folder(folder, config, overwrite, resume)
    except OSError as err:
        raise ConfigError(
            f"cannot write the run folder {folder} ({err.strerror}); choose another --run.out_dir"
        ) from None


def _make_folder(folder: Path, config: TrainConfig, overwrite: bool, resume: bool) -> None:
    if overwrite and not resume and (folder / MARKER_FILE).is_file():
        os.close(_hold(folder))  # never delete the folder of a run that is still going
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not resume:
        _claim(folder)
        # the resolved folder is recorded, so `--resume` finds the same place
        resolved = dataclasses.replace(config, run=dataclasses.replace(config.run, out_dir=str(folder)))
        tmp = folder / (CONFIG_FILE + ".tmp")
        tmp.write_text(to_toml(resolved))
        os.replace(tmp, folder / CONFIG_FILE)


def _claim(folder: Path) -> None:
    """Writes the marker only if no other run did since this one checked the folder (two runs started at once)."""
    try:
        descriptor = os.open(folder / MARKER_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        raise ConfigError(
            f"run folder {folder} was just taken by another `lorakit train` started at the same time; two runs "
            "never share a folder: choose another --run.out_dir"
        ) from None
    with os.fdopen(descriptor, "w") as marker:
        marker.write("a run folder made by `lorakit train`; --overwrite may delete it\n")


def _hold(folder: Path) -> int:
    """An exclusive lock on the folder's marker, held by the open descriptor returned until it is closed (or the
    process dies, even by SIGKILL); a folder another run holds is refused, not written over."""
    descriptor = os.open(folder / MARKER_FILE, os.O_RDWR | os.O_CREAT)
    if fcntl is None:  # Windows: no advisory locks; the marker's exclusive creation still guards a new folder
        return descriptor
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise ConfigError(
            f"run folder {folder} is in use by another `lorakit train` running now; wait for it to end, or choose "
            "another --run.out_dir"
        ) from None
    return descriptor


def _no_kv_cache(base: nn.Module) -> None:
    """Training and scoring never read a KV cache, but a transformers decoder builds one by default (use_cache).
    Compiled layers (run.compile) would then each guard on their own cache slot: one graph per layer, and past
    torch's recompile limit (8) every further layer runs eagerly. Off in this run's copy of the config only."""
    config = getattr(base, "config", None)
    if getattr(config, "use_cache", False):
        config.use_cache = False


def _gradient_checkpointing(model: LoraModel, config: TrainConfig) -> None:
    if not config.model.gradient_checkpointing:
        return
    kwargs = {"use_reentrant": False}  # works with frozen inputs (LoRA)
    if hasattr(model.model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model.model, "gradient_checkpointing_enable"):
        model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ConfigError(
            f"model.gradient_checkpointing needs a transformers model; {config.model.source} has no "
            "gradient_checkpointing_enable(); set it to false"
        )


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """torch.optim.<name> over the trainable parameters (the adapter and modules_to_save copies), with LoRA+'s
    groups when optim.loraplus_lr_ratio is set; lorakit.optim builds it, as for any user's loop."""
    optim = config.optim
    if optim.name.lower() == "lorafa":
        return _lorafa_optimizer(model, config)
    cls = getattr(torch.optim, optim.name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        names = sorted(n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type) and n[0].isupper())
        raise ConfigError(
            f"optim.name {optim.name!r} is not a torch.optim optimizer; choose one of {names}, or LoraFA "
            "(LoRA-FA's projected-gradient AdamW)"
        )
    loraplus = {"loraplus_lr_ratio": optim.loraplus_lr_ratio, "loraplus_lr_embedding": optim.loraplus_lr_embedding}
    try:
        return create_optimizer(model, cls, lr=optim.lr, weight_decay=optim.weight_decay, **loraplus, **optim.kwargs)
    except TypeError as err:
        raise ConfigError(f"torch.optim.{optim.name} does not take these arguments ({err}); fix optim.kwargs") from None


def _lorafa_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """optim.name = "LoraFA": lorakit.optim.create_lorafa_optimizer; optim.kwargs may hold betas, eps, correct_bias."""
    optim = config.optim
    if optim.loraplus_lr_ratio is not None:
        raise ConfigError(
            "optim.name = 'LoraFA' and optim.loraplus_lr_ratio do not combine (LoRA-FA steps B alone, A is frozen); "
            "unset one of them"
        )
    unknown = sorted(set(optim.kwargs) - {"betas", "eps", "correct_bias"})
    if unknown:
        raise ConfigError(f"optim.kwargs {unknown} are not LoraFA's; it takes betas, eps and correct_bias")
    lora = config.lora_config()
    kwargs = {k: tuple(v) if k == "betas" else v for k, v in optim.kwargs.items()}
    return create_lorafa_optimizer(
        model, lora.r, lora.lora_alpha, lr=optim.lr, weight_decay=optim.weight_decay, **kwargs
    )


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, max_steps: int) -> Any:
    """Linear warm-up, then linear decay to 0, cosine decay to 0, or a constant rate."""
    optim = config.optim
    warmup = optim.warmup_steps or int(optim.warmup_ratio * max_steps)
    schedule = optim.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, max_steps - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _autocast(config: TrainConfig, env: _Env) -> Any:
    """bf16 autocast where it pays (GPU, or when asked); adapters and optimizer state stay fp32."""
    precision = config.optim.precision
    enabled = precision == "bf16" or (precision == "auto" and env.device.type == "cuda")
    return torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=enabled)


# -- inside the loop -------------------------------------------------------------------------------------------------
def _accumulate_gradients(run: _Setup, config: TrainConfig, step: int, env: _Env, timing: dict) -> tuple[float, int]:
    """Forward and backward over the grad_accum micro-batches of one optimizer step; (mean loss, examples).

    Gradients are averaged over ranks at the last micro-batch only (no sync before it), as one big batch would.
    """
    wrapped, prepared, per_epoch = run.wrapped, run.prepared, run.batches_per_epoch
    wrapped.train()
    accum = config.optim.grad_accum
    loss_sum, examples = 0.0, 0
    graphs = run.compiled.graphs
    params = [p for p in wrapped.parameters() if p.requires_grad] if graphs else []
    for micro in range(accum):
        t_data = time.perf_counter()
        batch = _batch(prepared, config, step * accum + micro, per_epoch, env)
        timing["wait"] += time.perf_counter() - t_data
        sync = micro == accum - 1 or env.world == 1
        if graphs:  # a new step for CUDA graph trees: the last one's outputs may be written over
            torch.compiler.cudagraph_mark_step_begin()
        missing = [p.grad is None for p in params]
        with _autocast(config, env), parallel.no_sync(wrapped, sync):
            loss = tasks.score(config.task, wrapped, batch, run.fused).mean_loss() / accum
        loss.backward()
        if graphs:
            parallel.graph_safe_gradients(params, missing)
        if sync:
            parallel.average_gradients(wrapped, env.world)
        loss_sum += loss.item()
        examples += len(batch["labels"])
    return loss_sum, examples


def _batch(prepared: tasks.Prepared, config: TrainConfig, k: int, per_epoch: int, env: _Env) -> dict:
    """Micro-batch number k of the whole run, for this rank; a pure function of k, which makes resume exact."""
    epoch, position = divmod(k, per_epoch)
    indices = batch_indices(len(prepared.train), config.optim.batch_size, config.seed, epoch, env.rank, env.world)
    batch = prepared.collate([prepared.train[i] for i in indices[position]])
    return {key: value.to(env.device, non_blocking=True) for key, value in batch.items()}


def _clip(model: nn.Module, max_norm: float) -> float:
    """Clips to max_norm (0: no clipping) and returns the norm before clipping, over all ranks' shards."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP


def _mean_over_ranks(value: float, env: _Env) -> float:
    if env.world == 1:
        return value
    tensor = torch.tensor([value], device=env.device)
    dist.all_reduce(tensor)
    return tensor.item() / env.world


def _barrier(env: _Env) -> None:
    if env.world > 1:
        dist.barrier()


# -- after the loop --------------------------------------------------------------------------------------------------
def _finish(folder: Path, model: LoraModel, config: TrainConfig, env: _Env, before: dict, after: dict, steps: int,
            prepared: tasks.Prepared, run: _Setup, timing: dict) -> RunResult:  # fmt: skip
    """Saves the adapter (atomically), plots and summary.json on rank 0; returns the report on every rank."""
    trainable, total = model.get_nb_trainable_parameters()
    adapter = folder / ADAPTER_DIR
    tmp = folder / (ADAPTER_DIR + ".tmp")
    if env.main:
        shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, is_main_process=env.main)  # every rank: under FSDP the shards are gathered
    if env.main:
        shutil.rmtree(adapter, ignore_errors=True)
        os.replace(tmp, adapter)
    _barrier(env)
    metric, _ = tasks.primary_metric(config.task)
    result = RunResult(
        folder=str(folder),
        task=config.task,
        metric=metric,
        before=before,
        after=after,
        trainable_params=trainable,
        total_params=total,
        adapter_bytes=sum(f.stat().st_size for f in adapter.iterdir() if f.is_file()),
        model_bytes=run.model_bytes,
        steps=steps,
        train_examples=len(prepared.train),
        seconds=timing["total"],
        step_seconds=timing["total"] / max(len(timing["times"]), 1),
        median_step_seconds=statistics.median(timing["times"]) if timing["times"] else 0.0,
        data_wait_fraction=timing["wait"] / max(timing["total"], 1e-9),
        peak_memory_bytes=_peak_memory(env, run.compiled.graphs),
        baseline=tasks.majority_baseline(config.task, prepared),
        compiled=bool(run.compiled),
        cuda_graphs=bool(run.compiled) and run.compiled.graphs,
        fused_head_loss=run.fused is not None,
    )
    if env.main:
        if config.run.plots:
            plot_run(folder, metric)
        _write_json(folder / SUMMARY_FILE, asdict(result), env)
    return result


def _peak_memory(env: _Env, graphs: bool = False) -> int:
    """Peak GPU memory, or this process's peak resident memory on CPU. CUDA graphs allocate from pools the
    allocated count leaves out, so under them the peak reserved (a bound from above) is what the run took."""
    if env.device.type == "cuda":
        peak = torch.cuda.max_memory_reserved if graphs else torch.cuda.max_memory_allocated
        return peak(env.device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _write_json(path: Path, data: dict, env: _Env) -> None:
    if env.main:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)


def _read_summary_before(folder: Path) -> dict:
    path = folder / "before.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _truncate_metrics(folder: Path, step: int, max_steps: int, env: _Env) -> None:
    """Drops records an interrupted run wrote after its last checkpoint: the resumed run writes them again.

    The final eval is logged after the last checkpoint, so at step == max_steps it goes too."""
    path = folder / "metrics.jsonl"
    if not (env.main and path.is_file()):
        return
    records = [(line, json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    final = step == max_steps
    keep = [
        line for line, r in records if r["step"] < step or (r["step"] == step and not (final and r["kind"] == "eval"))
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _stop_message(folder: Path, step: int, loss: float, grad_norm: float) -> str:
    last = checkpoint.saved_step(folder)
    kept = f"its last good checkpoint (step {last}) is kept in {folder}" if last else "no checkpoint was written yet"
    return (
        f"training stopped at step {step}: the loss became {loss} (gradient norm {grad_norm}) and the update was not "
        f"applied; {kept}; lower optim.lr, set optim.max_grad_norm, or check the data for extreme values, then start "
        "a new run"
    )
