"""The training loop: build everything from the config, train, evaluate, checkpoint, log.

Host syncs happen only at log and eval steps: losses, aux terms and routing statistics stay on the
device between.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import subprocess
import time
from contextlib import nullcontext
from functools import partial, wraps
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from omegaconf import OmegaConf

from moa_train.config_format import CHECKPOINT_FORMAT
from moa_train.io import atomic_write_text
from moa_train.metrics.flops import device_name, peak_cache, peak_flops, peak_kind
from moa_train.metrics.sinks import MetricsLogger, build_logger, truncate_jsonl
from moa_train.models.backends import kernel_settings
from moa_train.models.routing import detached, routing_metrics
from moa_train.progress import progress
from moa_train.train import distributed, eval_run
from moa_train.train.bcd import NO_GRAPH, GatePhases, wants_bcd
from moa_train.train.checkpoint import (
    CheckpointError,
    average_checkpoints,
    checkpoints_in,
    load_latest,
    rng_state,
    set_rng_state,
)
from moa_train.train.cuda_graph import WARMUP_STEPS, CapturedStep
from moa_train.train.guard import MAX_SANE_WEIGHT, DivergedError, NonFiniteGuard, recovery
from moa_train.train.optim import apply_settings, build_optimizer, build_scheduler, lr_factor
from moa_train.train.preemption import EvaluationStopped, Preempted, StopSignals
from moa_train.train.runlock import RunLock
from moa_train.train.schedule import (
    Checkpointer,
    EarlyStopping,
    Evaluator,
    Meter,
    resume_target,
)
from moa_train.train.tasks import make_task
from moa_train.train.window import LossWindow
from moa_train.validation import ConfigError, check_run_folder, leaves, parse_duration

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "trainer.device: cuda was asked for but no GPU is visible; allowed here: auto, cpu"
        )
    return torch.device(name)


def git_sha() -> str | None:
    """The checkout's commit; MOA_GIT_SHA where the code travels without its .git (a copied working
    tree)."""
    if os.environ.get("MOA_GIT_SHA"):
        return os.environ["MOA_GIT_SHA"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            text=True,
            capture_output=True,
            timeout=5,
        )
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# what a resumed run cannot change: the weights' shapes and the data (vocabulary included) they were
# trained on; data.root and data.cache_dir only say where the same data lives
FIXED_ON_RESUME = ("model", "data")
MOVABLE = ("data.root", "data.cache_dir")


def check_fixed_settings(saved: dict, cfg) -> None:
    """ConfigError naming the first key of FIXED_ON_RESUME, task.name or the task's fixed keys whose
    value differs from the checkpoint's (keys the checkpoint's config lacks, added since it was
    written, are taken as unchanged; an older layout is upgraded first)."""
    from moa_train.train.tasks import saved_config, task_class

    current = OmegaConf.to_container(cfg, resolve=True)
    saved = saved_config(saved)
    fixed = ("task.name", *task_class(cfg.task.name).fixed_keys)
    for group in (*FIXED_ON_RESUME, "task"):
        old, new = dict(leaves(saved.get(group) or {}, group)), dict(leaves(current[group], group))
        for key, value in new.items():
            if group == "task" and key not in fixed:
                continue
            if key in old and key not in MOVABLE and old[key] != value:
                raise ConfigError(
                    f"trainer.resume: {key} is {old[key]!r} in the checkpoint but {value!r} now; a "
                    f"resumed run keeps its architecture and data: resume with {key}={old[key]} or "
                    "start over with trainer.resume=false in a new hydra.run.dir"
                )


def check_resume(cfg, run_dir: Path) -> None:
    """What can refuse the resume that `cfg` asks for in `run_dir`, as the trainer will meet it: no
    checkpoint where trainer.resume requires one, none that reads, one refused unread (pickled), a
    changed architecture or data. The entry point runs it before anything is written into the
    folder; the checkpoint is mapped, not read into memory."""
    target = resume_target(cfg.trainer.resume, Path(run_dir))
    if target is not None:
        _, state, _ = load_latest(target, mmap=True)
        check_fixed_settings(state["config"], cfg)


def finished_summary(cfg, run_dir: Path) -> dict | None:
    """summary.json of the run in `run_dir` where resuming it as `cfg` asks (trainer.resume
    auto/true) would train no step: its newest checkpoint is at trainer.max_steps or later, or
    early stopping (still on) ended it, and summary.json was written at that step (the final
    evaluations ran). Its files are then left as they are. None where there is work to do: no
    summary, a raised trainer.max_steps, a stop at trainer.max_time, a newer checkpoint.
    ConfigError, as a resume, where the command changes the run's model or data."""
    t, path = cfg.trainer, Path(run_dir) / "summary.json"
    if t.resume not in (True, "true", "auto") or not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    stopper = EarlyStopping(t.early_stopping.patience, t.early_stopping.min_delta)
    steps, reason = summary.get("steps"), summary.get("stop_reason")
    could_be_done = isinstance(steps, int) and (
        steps >= t.max_steps or (reason == "early_stopping" and stopper.patience)
    )
    if reason == "max_time" or not could_be_done or not checkpoints_in(Path(run_dir)):
        return None
    _, state, _ = load_latest(Path(run_dir), mmap=True)
    check_fixed_settings(state["config"], cfg)  # another model is refused, as ever
    stopper.load_state_dict(state["early_stopping"])
    done = state["step"] >= t.max_steps or stopper.done
    return summary if done and state["step"] == steps else None


def finished_message(run_dir: Path, summary: dict) -> str:
    """The one line that says a command found its run finished and changed nothing."""
    early = summary.get("stop_reason") == "early_stopping"
    how = (
        "turn early stopping off (trainer.early_stopping.patience=null)"
        if early
        else "raise trainer.max_steps"
    )
    return (
        f"{run_dir}: this run finished at step {summary['steps']}"
        f"{' (early stopping)' if early else ''}; nothing to train, so its summary.json, "
        f"metrics.jsonl and logs are left as they are; to train on, {how}; to evaluate it again, "
        "add trainer.eval_only=true"
    )


OOM_WORDS = (
    "out of memory",
    "not enough memory",
    "can't allocate memory",
    "cannot allocate memory",
)


def out_of_memory(exc: BaseException) -> bool:
    """A CUDA or CPU allocation failure (the CPU allocator raises a plain RuntimeError, NumPy a
    MemoryError)."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in OOM_WORDS)
    )


def oom_error(cfg, size, device: torch.device) -> ConfigError:
    """The one line for an out-of-memory error in the first steps: the sizes (the task's StepSize)
    are too large for the device."""
    return ConfigError(
        f"{size.key}: out of memory in the first training step on {device_name(device)}: "
        f"{size.text} over trainer.grad_accum={cfg.trainer.grad_accum} micro-batches does not fit; "
        f"lower {size.lower}, or raise trainer.grad_accum"
    )


class StepResult(NamedTuple):
    """What one optimizer step leaves on the device: the mean CE and aux terms over its
    micro-batches, the last micro-batch's routing records, the gradient norm and whether the step
    was skipped (not finite)."""

    ce: torch.Tensor
    aux: dict
    routings: list
    grad_norm: torch.Tensor
    skipped: torch.Tensor


def accum_weights(task, batches: list, norm: str = "mean") -> list:
    """The weight of each micro-batch's (per-token) loss in the step's mean: 1 each (`mean`), or
    (`tokens`, fairseq's normalisation: the step's summed losses over its total target tokens) its
    share of the step's tokens times the number of micro-batches, so that the step's loss is
    sum_i loss_i * tokens_i / sum_i tokens_i."""
    if norm == "mean" or len(batches) == 1:
        return [1.0] * len(batches)
    tokens = [task.n_tokens(b) for b in batches]
    total = sum(tokens)
    return [len(batches) * t / total for t in tokens]


def with_kernel_settings(method):
    """`method` run within the trainer's kernel settings (TF32, SDPA backend), restored after it:
    the trainer changes no process-wide setting outside its own calls."""

    @wraps(method)
    def within(self, *args, **kwargs):
        if self.__dict__.get("in_kernel_settings"):  # fit's steps: applied once, by fit
            return method(self, *args, **kwargs)
        self.in_kernel_settings = True
        try:
            with self.kernel_settings():
                return method(self, *args, **kwargs)
        finally:
            self.in_kernel_settings = False

    return within


class Trainer:
    def __init__(self, cfg, run_dir: Path):
        self.start_time = time.perf_counter()
        # training wall time of the sessions before this one (a resumed run's checkpoint)
        self.wall_before = 0.0
        self.cfg, self.run_dir = cfg, Path(run_dir)
        t = cfg.trainer
        self.dist = distributed.init()
        self.device = distributed.local_device(resolve_device(t.device), self.dist)
        seed_everything(t.seed)  # the same on every rank: identical initial weights
        use_bf16 = t.precision == "bf16"
        # no autocast weight cache: it cannot live inside a CUDA-graph capture, and each weight is
        # cast once anyway
        self.autocast = (
            partial(torch.autocast, self.device.type, dtype=torch.bfloat16, cache_enabled=False)
            if use_bf16
            else nullcontext
        )

        with distributed.main_first(self.dist):
            self.task = make_task(cfg, self.device, self.dist)
        self.model = self.task.model.to(self.device)
        # DDP / FSDP / the model itself
        self.train_model = distributed.wrap(
            self.model, t.strategy, self.dist, self.device, t.ddp_bucket_mb
        )
        if self.dist.active:
            # each rank its own dropout masks (nanoGPT's seed offset)
            torch.manual_seed(t.seed + self.dist.rank)
        self.forward, self.forward_loss = self.model, self.loss
        if t.compile:  # the model for evaluation; the model + losses as one graph for training
            backend = t.compile_backend or (
                "inductor" if self.device.type == "cuda" else "aot_eager"
            )
            mode = t.compile_mode if backend == "inductor" else None  # modes are inductor's
            self.forward = torch.compile(self.model, backend=backend, mode=mode)
            self.forward_loss = torch.compile(self.loss, backend=backend, mode=mode)
        # block coordinate descent (MAE): the gate on its own SGD, in its own phases (train/bcd.py)
        self.phases = GatePhases(self.model, cfg.model) if wants_bcd(cfg.model) else None
        self.use_graph = (
            bool(t.cuda_graphs)
            and self.device.type == "cuda"
            and self.task.cuda_graphs_ok
            and not self.dist.active
            and self.phases is None
        )
        if t.cuda_graphs and self.phases is not None:
            log.info(NO_GRAPH)
        elif t.cuda_graphs and not self.use_graph:
            log.info(
                "trainer.cuda_graphs: needs a CUDA device, fixed batch shapes and one process (DDP "
                "and FSDP communicate during the backward); running the step eagerly"
            )
        # eager warm-up steps run by this process (a resumed run warms up too)
        self.graph, self.warmed_up = None, 0
        self.optimizer = build_optimizer(
            self.model,
            cfg.optim,
            self.device,
            capturable=self.use_graph,
            exclude=frozenset(self.phases.ids) if self.phases else frozenset(),
        )
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, t.max_steps)
        self.guard = NonFiniteGuard(self.optimizer, t.max_bad_steps, self.device)
        self.losses = LossWindow()  # train losses since the last log step
        self.early_stopping = EarlyStopping(t.early_stopping.patience, t.early_stopping.min_delta)
        self.max_time = parse_duration(t.max_time)  # seconds of this process, or None
        self.checkpointer = Checkpointer(cfg, self.run_dir, self.dist, self.task.best_metric)
        self.evaluator = Evaluator(
            t.eval_interval, self.evaluate, self.checkpointer, self.early_stopping
        )
        self.meter = Meter(self.sync)
        self.batches = self.task.batches
        self.step, self.tokens_seen, self.wandb_id = 0, 0, None
        # optimizer steps run by this process (its first ones warm up and capture)
        self.steps_run = 0
        self.flops_per_token = self.task.flops_per_token()
        self.peak = peak_flops(self.device, peak_kind(t.precision, t.tf32))
        self.warned_peak = False
        self.stop = None  # the StopSignals while training

    def kernel_settings(self):
        """The context of every step and evaluation: trainer.tf32 and trainer.sdpa_backend applied,
        the caller's settings back on exit."""
        return kernel_settings(self.cfg.trainer.tf32, self.cfg.trainer.sdpa_backend)

    @property
    def last_checkpoint(self) -> Path | None:
        return self.checkpointer.last

    def wall_s(self) -> float:
        """Training wall time of every session of the run (the checkpoint carries the earlier
        ones')."""
        return self.wall_before + time.perf_counter() - self.start_time

    # --- state ------------------------------------------------------------------------------------
    def components(self) -> dict:
        """Checkpoint key -> the component whose state (state_dict / load_state_dict) it holds."""
        return {
            "scheduler": self.scheduler,
            "data": self.batches,
            "guard": self.guard,
            "window": self.losses,
            "early_stopping": self.early_stopping,
        }

    def state_dict(self) -> dict:
        """The checkpoint: the trainer's own keys, each component's state under its key
        (`components`), and the top-level keys the checkpointer (best_val) and the evaluator
        (pending_eval) own."""
        state = {
            "checkpoint_format": CHECKPOINT_FORMAT,
            "model": distributed.model_state(self.model, self.dist),
            "optimizer": distributed.optimizer_state(self.model, self.optimizer, self.dist),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "rng": distributed.gather_objects(rng_state(), self.dist)
            if self.dist.active
            else rng_state(),
            "wandb_id": self.wandb_id,
            "wall_s": self.wall_s(),
            "vocab_size": self.model.vocab_size,
            "pad_id": getattr(self.model, "pad_id", None),
            # moa-generate refuses a run folder's tokenizer.json that is not this one
            "tokenizer": self.task.tokenizer_id,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            **self.checkpointer.state_dict(),
            **self.evaluator.state_dict(),
        }
        state.update({key: part.state_dict() for key, part in self.components().items()})
        return state

    def load_state_dict(self, state: dict, weights_only: bool = False) -> None:
        """Restore a checkpoint's state (in the current layout: load_checkpoint upgrades older
        ones). weights_only: the weights, the step and the guard's counts only."""
        if not weights_only:  # eval_only may score the weights on other data
            check_fixed_settings(state["config"], self.cfg)
        try:
            distributed.load_model_state(self.model, state["model"], self.dist)
        except (RuntimeError, KeyError, ValueError) as exc:
            first = str(exc).splitlines()[0]
            raise CheckpointError(
                f"trainer.resume: the checkpoint does not fit this model ({first}); resume with "
                "the run's own config or use trainer.resume=false in a new run folder"
            ) from None
        # what the weights were trained on: eval.json records it too
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        parts = self.components()
        parts.pop("guard").load_state_dict(state["guard"])
        if weights_only:
            return
        distributed.load_optimizer_state(self.model, self.optimizer, state["optimizer"], self.dist)
        for key, part in parts.items():
            part.load_state_dict(state[key])
        # a changed lr or schedule takes effect
        apply_settings(self.optimizer, self.scheduler, self.cfg.optim)
        self.checkpointer.load_state_dict(state)
        self.evaluator.load_state_dict(state)
        self.wandb_id, self.wall_before = state["wandb_id"], state["wall_s"]
        rng = distributed.rank_rng(state["rng"], self.dist)
        if rng is not None:
            set_rng_state(rng)

    def save(self, is_best: bool) -> None:
        # a run that has diverged writes no checkpoint
        self.guard.check(self.step, self.checkpointer.last_sane)
        # nor one whose weights are lost (a step applied with an infinite lr)
        large = self.check_weights()
        # the state on every rank: FSDP gathers the shards
        self.checkpointer.write(self.state_dict(), is_best, large)

    def check_weights(self) -> int:
        """DivergedError unless every weight of every rank is finite (such weights are no recovery
        point); else how many are above MAX_SANE_WEIGHT in magnitude (the checkpoint is then not
        sane)."""
        weights = [distributed.local_part(p.detach()) for p in self.model.parameters()]
        bad = sum((~torch.isfinite(w)).sum() for w in weights)
        if distributed.global_max(torch.as_tensor(bad).cpu()) > 0:
            raise DivergedError(
                f"weights: {int(bad)} model weights are not finite at step {self.step}, so no "
                f"checkpoint of it is written; {recovery(self.checkpointer.last_sane)}"
            )
        large = sum((w.abs() > MAX_SANE_WEIGHT).sum() for w in weights)
        return distributed.global_max(torch.as_tensor(large).cpu())

    def maybe_resume(self, weights_only: bool = False) -> Path | None:
        found = self.checkpointer.load(
            self.cfg.trainer.resume, "cpu" if self.dist.active else self.device
        )
        if found is None:
            return None
        path, state = found
        self.load_state_dict(state, weights_only)
        self.checkpointer.resumed(path, state)
        log.info("resumed from %s at step %d", path, self.step)
        return path

    # --- steps ------------------------------------------------------------------------------------
    def loss(self, batch, all_aux: bool) -> tuple:
        """(total loss, CE, unweighted aux terms reduced over layers, routing records) of one
        micro-batch; aux terms with a zero coefficient are computed only when `all_aux` (log steps).
        The function compiled for training (self.forward_loss) and the one moa-bench explains."""
        with self.autocast():
            return self.task.loss(self.train_model, batch, all_aux)

    def draw_batches(self) -> list:
        """The micro-batches of one optimizer step, from the task."""
        return [self.task.next_batch() for _ in range(self.cfg.trainer.grad_accum)]

    def step_body(self, batches: list, log_step: bool) -> tuple:
        """Forward and backward over the micro-batches, clipping, the optimizer update (skipped
        where the loss or the gradient is not finite): all that a CUDA graph captures. Returns
        device tensors (mean CE, mean aux terms, the last micro-batch's routing records, grad norm,
        the skipped flag); a log step also computes every aux term."""
        cfg, n = self.cfg, len(batches)
        weights = accum_weights(self.task, batches, cfg.trainer.grad_accum_norm)
        loss_sum, ce_sum, aux_sum = 0.0, 0.0, {}
        for i, (batch, w) in enumerate(zip(batches, weights, strict=True)):
            with distributed.grad_sync(self.train_model, i == n - 1):
                loss, ce, aux, routings = self.forward_loss(batch, log_step)
                (loss * w / n).backward()
            loss_sum = loss_sum + loss.detach() * w
            ce_sum = ce_sum + ce.detach() * w
            aux_sum = {k: aux_sum.get(k, 0.0) + v.detach() * w for k, v in aux.items()}
        gate_step = self.phases is not None and self.phases.is_gate_step(self.step)
        # the block that moves this step (BCD: the gate or the experts; else every parameter)
        params = self.phases.block(gate_step) if self.phases else self.model.parameters()
        if cfg.trainer.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.trainer.grad_clip)
        else:
            norm = self.grad_norm(params)
        norm = distributed.full(norm)  # FSDP: the replicated norm of the whole gradient
        bad = self.guard.step(loss_sum, norm, self.phases.step if gate_step else None)
        return ce_sum / n, {k: v / n for k, v in aux_sum.items()}, detached(routings), norm, bad

    @with_kernel_settings
    def train_step(self, log_step: bool, batches: list | None = None) -> StepResult:
        """One optimizer step on `batches` (default: drawn from the task), counters untouched:
        eager, or a CUDA-graph replay after a few eager warm-up steps on a side stream."""
        batches = self.draw_batches() if batches is None else batches
        self.step_tokens = sum(self.task.n_tokens(b) for b in batches)
        self.lr = self.cfg.optim.lr * lr_factor(
            self.step, self.cfg.schedule, self.cfg.trainer.max_steps
        )
        if not self.use_graph:
            out = self.step_body(batches, log_step)
            self.optimizer.zero_grad(set_to_none=True)
            if self.phases is not None:
                self.phases.zero_grad()
        elif self.graph is None and self.warmed_up < WARMUP_STEPS:
            self.warmed_up += 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                # all aux terms, as the captured graph computes them
                out = self.step_body(batches, True)
                self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            if self.graph is None:
                self.graph = CapturedStep(self.step_body, batches)
            out = self.graph.replay(batches)
        self.scheduler.step()
        return StepResult(*out)

    @with_kernel_settings
    def train_steps(
        self, n: int = 1, log_step: bool = False, batches: list | None = None
    ) -> StepResult:
        """`n` optimizer steps, each advancing the step counter, the tokens seen, the loss window
        and the meter: the one place they advance (fit, moa-bench). `batches`: the same
        micro-batches every step (moa-bench's fixed batch, no data work); default: drawn from the
        task. `log_step`: all aux terms computed (fit's log steps). Returns the last step's
        StepResult."""
        for _ in range(n):
            out = self.train_step(log_step, batches)
            self.step += 1
            self.steps_run += 1
            self.tokens_seen += self.step_tokens
            self.losses.add(out.ce, out.aux, out.skipped)
            self.meter.add(self.step_tokens)
        return out

    def checked_step(self, log_step: bool) -> StepResult:
        """One step of train_steps; an out-of-memory error in this process's first steps (the
        warm-up and CUDA-graph capture included) is the sizes' fault and becomes one line naming
        them. A later one stays a bug report."""
        try:
            return self.train_steps(1, log_step)
        except (RuntimeError, MemoryError) as exc:
            if self.steps_run > WARMUP_STEPS or not out_of_memory(exc):
                raise
            raise oom_error(self.cfg, self.task.step_size(self.cfg), self.device) from None

    def grad_norm(self, params=None) -> torch.Tensor:
        params = self.model.parameters() if params is None else params
        grads = [p.grad for p in params if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())

    @with_kernel_settings
    def evaluate(self, split: str, prefix: str, final: bool = False) -> dict:
        # a signal ends evaluation in one process only: under torchrun the ranks would leave its
        # collectives at different batches, so they finish it and agree on the signal at the next
        # log step
        stop = None if self.dist.active else self.stop
        return self.task.evaluate(self.forward, split, prefix, self.autocast, final, stop)

    def validate(self, logger) -> bool:
        """The evaluator's validation at this step, and its line in the log; whether it is the best
        so far."""
        val, is_best = self.evaluator.validate(self.step, logger)
        log.info("step %d: %s", self.step, self.task.headline_of(val))
        return is_best

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # --- runs -------------------------------------------------------------------------------------
    @with_kernel_settings
    def fit(self) -> dict:
        # one trainer per run folder
        lock = RunLock(self.run_dir).acquire() if self.dist.main else None
        try:
            return self._fit()
        finally:
            if lock is not None:
                lock.release()

    def _fit(self) -> dict:
        """The schedule: resume; train (train_until_stop); then test, unless trainer.max_time
        stopped the run (resuming it goes on)."""
        t = self.cfg.trainer
        # first what can refuse the run (a changed model or data), then writing into the folder
        resumed = self.maybe_resume()
        self.checkpointer.start(self.step)
        # the run's history continues from the checkpoint's step (from step 0 without one)
        if self.dist.main:
            self.task.save_tokenizer(self.run_dir)
            truncate_jsonl(self.run_dir / "metrics.jsonl", self.step)
        logger = self.build_logger(None if resumed is None else self.step)
        self.wandb_id = logger.wandb_id
        bar = progress(total=t.max_steps, initial=self.step, desc="train", unit="step")
        self.stop = stop = StopSignals().install()
        test = {}
        try:
            # the interrupted process was stopped while validating this step
            if self.evaluator.pending:
                self.save(self.validate(logger))
            reason = self.train_until_stop(logger, bar)
            if reason != "max_time":
                # resumed at max_steps: report the checkpoint's validation loss
                if not self.evaluator.last and self.step > 0:
                    self.evaluator.last = self.evaluate("val", "val")
                test = self.final_test()
                logger.log(self.step, test)
        # the final evaluations: the last step's checkpoint is written, resuming reruns them
        except EvaluationStopped:
            raise Preempted(
                stop.received, self.step, self.last_checkpoint, self.run_dir, self.dist.rank
            ) from None
        finally:
            bar.close()
            logger.close()
            stop.restore()
            self.stop = None
        return self.write_summary({**self.evaluator.last, **test, **self.stop_record(reason)})

    def train_until_stop(self, logger, bar) -> str:
        """Per step: train, log, validate, checkpoint; until trainer.max_steps, a signal (Preempted
        once this step's checkpoint is written), trainer.max_time or early stopping (after this
        step's checkpoint). Returns why it stopped: max_steps, max_time or early_stopping."""
        t = self.cfg.trainer
        # a resumed run that early stopping had ended
        stopped = "early_stopping" if self.early_stopping.done else None
        self.meter.restart()
        while self.step < t.max_steps and stopped is None:
            last = self.step + 1 == t.max_steps
            log_now = (self.step + 1) % t.log_interval == 0 or last
            out = self.checked_step(log_now)
            bar.update(1)
            if log_now:
                logged = self.log_train(logger, out)
                bar.set_postfix(
                    loss=f"{logged['train/loss']:.4f}",
                    tok_s=f"{logged['perf/tokens_per_s']:,.0f}",
                )
            validated = self.evaluator.due(self.step, last)
            is_best = validated and self.validate_until_stopped(logger)
            # under torchrun the ranks compare notes at log steps only (a collective), so all
            # stop together
            signum, late = (
                distributed.agreed_stop(self.stop.received, self.out_of_time(), self.dist)
                if log_now or not self.dist.active
                else (None, False)
            )
            early = (
                validated
                and self.early_stopping.patience > 0
                and distributed.any_rank(self.early_stopping.done)
            )
            stopped = "max_time" if late else "early_stopping" if early else None
            if self.checkpointer.due(self.step, last) or signum or stopped:
                self.save(is_best)
                self.meter.restart()
            if signum:
                raise Preempted(
                    signum, self.step, self.last_checkpoint, self.run_dir, self.dist.rank
                )
        return "max_steps" if self.step >= t.max_steps else stopped

    def out_of_time(self) -> bool:
        """Whether this process has run for trainer.max_time (counted from the trainer's start)."""
        return self.max_time is not None and time.perf_counter() - self.start_time >= self.max_time

    def stop_record(self, reason: str) -> dict:
        """summary.json's record of why training stopped (logged too, unless at max_steps)."""
        if reason == "max_steps":
            return {"stop_reason": reason}
        if reason == "max_time":
            detail = (
                f"trainer.max_time={self.cfg.trainer.max_time} reached after "
                f"{time.perf_counter() - self.start_time:.0f} s in this process; checkpoint "
                f"{self.last_checkpoint}; no final test: to go on, run the same command with "
                f"hydra.run.dir={self.run_dir}"
            )
        else:
            detail = (
                f"early stopping: {self.early_stopping.reason(self.checkpointer.metric)}; "
                f"checkpoint {self.last_checkpoint}"
            )
        log.info("stopped at step %d: %s", self.step, detail)
        return {"stop_reason": reason, "stop_detail": detail}

    def validate_until_stopped(self, logger) -> bool:
        """validate; a signal that stops it is seen by fit next: this step's checkpoint, then the
        stop."""
        try:
            return self.validate(logger)
        except EvaluationStopped:
            return False
        finally:
            self.meter.restart()  # evaluation time is not step time

    def final_test(self) -> dict:
        """The test evaluation at the end, on the average of the last `task.average_last`
        checkpoints if set."""
        n = self.cfg.task.average_last
        if not n:
            return self.evaluate("test", "test", final=True)
        paths = self.checkpointer.history()[-n:]
        if len(paths) < n:
            log.warning(
                "task.average_last=%d: this run has %d step checkpoints; %s",
                n,
                len(paths),
                "averaging those" if paths else "testing the current weights",
            )
        if not paths:
            return self.evaluate("test", "test", final=True)
        current = {k: v.clone() for k, v in self.model.state_dict().items()}
        # averaged on the CPU
        distributed.load_model_state(self.model, average_checkpoints(paths), self.dist)
        log.info(
            "test: weights averaged over %d checkpoints (%s .. %s)",
            len(paths),
            paths[0].name,
            paths[-1].name,
        )
        out = {**self.evaluate("test", "test", final=True), "test/averaged_checkpoints": len(paths)}
        self.model.load_state_dict(current)
        return out

    def build_logger(self, resumed_step: int | None = None) -> MetricsLogger:
        """The sinks (metrics.jsonl, TensorBoard, W&B) on rank 0; the other ranks log nowhere."""
        if not self.dist.main:
            return MetricsLogger([])
        return build_logger(
            self.cfg,
            self.run_dir,
            OmegaConf.to_container(self.cfg, resolve=True),
            self.wandb_id,
            resumed_step,
        )

    def log_train(self, logger, out: StepResult) -> dict:
        step_ms, tok_s = self.meter.close()
        losses = self.losses.pop()
        # CE of each slice
        losses["train/loss"] = distributed.global_sum(losses["train/loss"]) / self.dist.world
        metrics = {
            **losses,
            "lr": self.lr,
            "grad_norm": out.grad_norm,
            "train/skipped_steps": self.guard.skipped,
            **routing_metrics(self.model.sites, out.routings),
            "perf/step_ms": step_ms,
            "perf/tokens_per_s": tok_s,
            "perf/mfu": self.flops_per_token * tok_s / (self.peak * self.dist.world),
            "tokens_seen": self.tokens_seen,
        }
        logged = logger.log(self.step, metrics)
        log.info(
            "step %d: loss %.4f | %.1f ms/step | %.0f tok/s | mfu %.2f%%",
            self.step,
            logged["train/loss"],
            step_ms,
            tok_s,
            100 * logged["perf/mfu"],
        )
        if logged["perf/mfu"] > 1.0 and not self.warned_peak:
            self.warned_peak = True
            log.warning(
                "perf/mfu is above 100%%: the peak measured for this device (%.3g FLOP/s, in %s) "
                "is lower than this run's rate; other work probably ran during the measurement; "
                "delete that file to measure it again",
                self.peak,
                peak_cache(),
            )
        self.guard.check(self.step, self.checkpointer.last_sane)
        return logged

    @with_kernel_settings
    def eval_only(self) -> dict:
        """Valid and test of the checkpoint trainer.resume names; eval.json in the run folder
        (summary.json is the training run's, never written here)."""
        path = self.maybe_resume(weights_only=True)
        if path is None:
            raise ConfigError(
                "trainer.eval_only: no checkpoint found; set trainer.resume=PATH to a checkpoint "
                "file or run folder"
            )
        metrics = {**self.evaluate("val", "val"), **self.evaluate("test", "test", final=True)}
        logger = self.build_logger()
        logger.log(self.step, metrics)
        logger.close()
        log.info("eval_only: %s", self.task.headline_of(metrics))
        return self.write_summary({**metrics, "checkpoint": str(Path(path).resolve())}, "eval.json")

    def write_summary(self, metrics: dict, name: str = "summary.json") -> dict:
        best, metric = self.checkpointer.best, self.checkpointer.metric
        summary = {
            "params_total": self.model.num_params(non_embedding=False),
            "params_non_embedding": self.model.num_params(),
            **metrics,
            f"{metric}_best": best if math.isfinite(best) else metrics.get(metric),
            "steps": self.step,
            "skipped_steps": self.guard.skipped.item(),
            "tokens_seen": self.tokens_seen,
            "wall_s": self.wall_s(),
            "wall_s_session": time.perf_counter() - self.start_time,
            "step_ms_median": self.meter.median_step_ms(),
            "flops_per_token": self.flops_per_token,
            "peak_flops": self.peak,
            "device_name": device_name(self.device),
            "world_size": self.dist.world,
            "torch_version": torch.__version__,
            "git_sha": git_sha(),
            **self.task.summary(),
            # the metrics a sweep's summary shows for this run: the task's
            "summary_keys": list(self.task.summary_keys),
        }
        if self.dist.main:
            atomic_write_text(self.run_dir / name, json.dumps(summary, indent=1))
        return summary


def train(cfg, run_dir: Path, overrides: list | None = None) -> dict:
    """Train per `cfg`, writing into `run_dir`; returns summary.json's dict (a finished run that
    this would not change is left as it is: finished_summary). With trainer.eval_only, evaluate the
    checkpoint trainer.resume names with the run's own config (see eval_run), writing eval.json
    into `run_dir` (trainer.resume=auto/true: into `run_dir`/eval/<date_time>/, removed again if
    the evaluation fails); `overrides` are the command line's, whose evaluation settings apply."""
    run_dir = Path(run_dir)
    if not cfg.trainer.eval_only:
        if (finished := finished_summary(cfg, run_dir)) is not None:
            log.info("%s", finished_message(run_dir, finished))
            return finished
        return run_trainer(cfg, run_dir)
    cfg, out = eval_run.prepare(cfg, run_dir, overrides)
    try:
        return run_trainer(cfg, out)
    finally:
        if out != run_dir and distributed.from_env().main:
            eval_run.discard_unfinished(out)


def run_trainer(cfg, run_dir: Path) -> dict:
    """Train, or evaluate (trainer.eval_only), with the config `cfg` as given, in `run_dir`."""
    check_run_folder(run_dir, cfg)  # a multirun job or an in-process call has had no precheck
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    trainer = Trainer(cfg, run_dir)
    log.info("%s", banner(trainer))
    summary = trainer.eval_only() if cfg.trainer.eval_only else trainer.fit()
    stopped = summary.get("stop_reason", "max_steps")
    done = "done" if stopped == "max_steps" else f"done ({stopped.replace('_', ' ')})"
    log.info(
        "%s: %s | wall %.1f s | run folder %s",
        done,
        trainer.task.headline_of(summary) or "no evaluation yet",
        time.perf_counter() - start,
        run_dir,
    )
    return summary


def banner(trainer: Trainer) -> str:
    """The run's first line: what is trained, how big, where, and the folder that will hold its
    results."""
    cfg, model, device = trainer.cfg, trainer.model, trainer.device
    where = device_name(device) if device.type == "cpu" else f"{device} ({device_name(device)})"
    if trainer.dist.active:
        where += f" x {trainer.dist.world} processes"
    return (
        f"run: model {cfg.model.name} on {cfg.data.name} | "
        f"{model.num_params(non_embedding=False):,} parameters ({model.num_params():,} "
        f"non-embedding) | device {where} | run folder {trainer.run_dir}"
    )
