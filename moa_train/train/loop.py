"""The training loop: build everything from the config, train, evaluate, checkpoint, log.

Host syncs happen only at log and eval steps: losses, aux terms and routing statistics stay on the device between.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import statistics
import subprocess
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from moa_train.config import TRANSLATION_DATA, ConfigError, check_run_folder
from moa_train.metrics.flops import device_name, peak_flops, peak_kind
from moa_train.metrics.sinks import MetricsLogger, build_logger, truncate_jsonl
from moa_train.models.attention.mha import select_sdpa_backend
from moa_train.models.routing import detached, routing_metrics
from moa_train.progress import progress
from moa_train.train import distributed, eval_run
from moa_train.train.checkpoint import (
    CheckpointError,
    average_checkpoints,
    checkpoints_in,
    drop_later_checkpoints,
    load_latest,
    remove_temp_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_checkpoints,
)
from moa_train.train.cuda_graph import WARMUP_STEPS, CapturedStep
from moa_train.train.guard import DivergedError, NonFiniteGuard
from moa_train.train.optim import apply_settings, build_optimizer, build_scheduler, lr_factor
from moa_train.train.preemption import EvaluationStopped, Preempted, StopSignals
from moa_train.train.runlock import RunLock
from moa_train.train.tasks import make_task
from moa_train.train.window import LossWindow

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device: cuda was asked for but no GPU is visible; allowed here: auto, cpu")
    return torch.device(name)


def git_sha() -> str | None:
    """The checkout's commit; MOA_GIT_SHA where the code travels without its .git (a copied working tree)."""
    if os.environ.get("MOA_GIT_SHA"):
        return os.environ["MOA_GIT_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, text=True,
                             capture_output=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resume_target(resume, run_dir: Path) -> Path | None:
    """The checkpoint file or run folder to resume from, following trainer.resume = auto | true | false | PATH."""
    if resume in (False, "false", None):
        return None
    if resume in (True, "true", "auto"):
        if not checkpoints_in(run_dir):
            if resume == "auto":
                return None
            raise ConfigError(f"trainer.resume: true but the run folder {run_dir} holds no checkpoint; "
                              "use auto, false or a PATH")
        return run_dir
    target = Path(str(resume)).expanduser()
    if not checkpoints_in(target):
        raise ConfigError(f"trainer.resume: {resume!r} is neither a checkpoint file nor a run folder with one")
    return target


# what a resumed run cannot change: the weights' shapes and the data (vocabulary included) they were trained on;
# data.root and data.cache_dir only say where the same data lives
FIXED_ON_RESUME = ("model", "data")
MOVABLE = ("data.root", "data.cache_dir")


def _leaves(tree: dict, prefix: str) -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}"
        out.update(_leaves(value, name) if isinstance(value, dict) else {name: value})
    return out


def check_fixed_settings(saved: dict, cfg) -> None:
    """ConfigError naming the first key of FIXED_ON_RESUME whose value differs from the checkpoint's (keys the
    checkpoint's config lacks, added since it was written, are taken as unchanged)."""
    current = OmegaConf.to_container(cfg, resolve=True)
    for group in FIXED_ON_RESUME:
        old, new = _leaves(saved.get(group) or {}, group), _leaves(current[group], group)
        for key, value in new.items():
            if key in old and key not in MOVABLE and old[key] != value:
                raise ConfigError(f"trainer.resume: {key} is {old[key]!r} in the checkpoint but {value!r} now; a "
                                  f"resumed run keeps its architecture and data: resume with {key}={old[key]} or "
                                  "start over with trainer.resume=false in a new hydra.run.dir")


OOM_WORDS = ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory")


def out_of_memory(exc: BaseException) -> bool:
    """A CUDA or CPU allocation failure (the CPU allocator raises a plain RuntimeError, NumPy a MemoryError)."""
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in OOM_WORDS))


def oom_error(cfg, device: torch.device) -> ConfigError:
    """The one line for an out-of-memory error in the first steps: the sizes are too large for the device."""
    t = cfg.trainer
    sizes = (f"data.max_tokens={cfg.data.max_tokens}" if cfg.data.name in TRANSLATION_DATA
             else f"trainer.batch_size={t.batch_size} x trainer.block_size={t.block_size}")
    return ConfigError(f"{sizes.partition('=')[0]}: out of memory in the first training step on "
                       f"{device_name(device)}: {sizes} over trainer.grad_accum={t.grad_accum} micro-batches does not "
                       f"fit; lower {sizes.partition('=')[0]}"
                       f"{'' if 'max_tokens' in sizes else ' or trainer.block_size'}, or raise trainer.grad_accum")


def headline(metrics: dict) -> str:
    """The evaluation figures worth a log line, whichever the task reports: loss and bpc (LM), BLEU and chrF."""
    shown = ("loss", "bpc", "bleu", "chrf")
    return " | ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.partition("/")[2] in shown)


class Trainer:
    def __init__(self, cfg, run_dir: Path):
        self.start_time = time.perf_counter()
        self.cfg, self.run_dir = cfg, Path(run_dir)
        t = cfg.trainer
        self.dist = distributed.init()
        self.device = distributed.local_device(resolve_device(t.device), self.dist)
        seed_everything(t.seed)  # the same on every rank: identical initial weights
        torch.backends.cuda.matmul.allow_tf32 = bool(t.tf32)
        torch.backends.cudnn.allow_tf32 = bool(t.tf32)
        select_sdpa_backend(t.sdpa_backend)
        use_bf16 = t.precision == "bf16"
        # no autocast weight cache: it cannot live inside a CUDA-graph capture, and each weight is cast once anyway
        self.autocast = (partial(torch.autocast, self.device.type, dtype=torch.bfloat16, cache_enabled=False)
                         if use_bf16 else nullcontext)

        with distributed.main_first(self.dist):
            self.task = make_task(cfg, self.device, self.dist)
        self.model = self.task.model.to(self.device)
        # DDP / FSDP / the model itself
        self.train_model = distributed.wrap(self.model, t.strategy, self.dist, self.device, t.ddp_bucket_mb)
        if self.dist.active:
            torch.manual_seed(t.seed + self.dist.rank)  # each rank its own dropout masks (nanoGPT's seed offset)
        self.forward, self.forward_loss = self.model, self._forward_loss
        if t.compile:  # the model for evaluation; the model + losses as one graph for training
            backend = t.compile_backend or ("inductor" if self.device.type == "cuda" else "aot_eager")
            mode = t.compile_mode if backend == "inductor" else None  # modes are inductor's
            self.forward = torch.compile(self.model, backend=backend, mode=mode)
            self.forward_loss = torch.compile(self._forward_loss, backend=backend, mode=mode)
        self.use_graph = (bool(t.cuda_graphs) and self.device.type == "cuda" and self.task.cuda_graphs_ok
                          and not self.dist.active)
        if t.cuda_graphs and not self.use_graph:
            log.info("trainer.cuda_graphs: needs a CUDA device, fixed batch shapes and one process (DDP and FSDP "
                     "communicate during the backward); running the step eagerly")
        self.graph, self.warmed_up = None, 0  # eager warm-up steps run by this process (a resumed run warms up too)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device, capturable=self.use_graph)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, t.max_steps)
        self.guard = NonFiniteGuard(self.optimizer, t.max_bad_steps, self.device)
        self.losses = LossWindow()  # train losses since the last log step
        self.last_checkpoint = None
        self.resumed_from = None  # (checkpoint path, its step) when the run resumed
        self.failed = ()  # newer checkpoints the resume skipped: they failed their check
        self.batches = self.task.batches
        self.step, self.tokens_seen, self.best_val, self.wandb_id = 0, 0, math.inf, None
        self.flops_per_token = self.task.flops_per_token()
        self.peak = peak_flops(self.device, peak_kind(t.precision, t.tf32), cfg.data.cache_dir)
        self.step_ms: list = []
        self.stop = None  # the StopSignals while training
        self.pending_eval = False  # a validation stopped by a signal, to be run first by the resumed process
        self.last_val = {}

    # --- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model": distributed.model_state(self.model, self.dist),
            "optimizer": distributed.optimizer_state(self.model, self.optimizer, self.dist),
            "scheduler": self.scheduler.state_dict(), "step": self.step, "tokens_seen": self.tokens_seen,
            "best_val": self.best_val, "data": self.batches.state_dict(),
            "rng": distributed.gather_objects(rng_state(), self.dist) if self.dist.active else rng_state(),
            "wandb_id": self.wandb_id, "guard": self.guard.state_dict(), "window": self.losses.state_dict(),
            "pending_eval": self.pending_eval,
            "vocab_size": self.model.vocab_size,
            "pad_id": getattr(self.model, "pad_id", None),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def load_state_dict(self, state: dict, weights_only: bool = False) -> None:
        if not weights_only and "config" in state:  # eval_only may score the weights on other data
            check_fixed_settings(state["config"], self.cfg)
        try:
            distributed.load_model_state(self.model, state["model"], self.dist)
        except (RuntimeError, KeyError, ValueError) as exc:
            first = str(exc).splitlines()[0]
            raise CheckpointError(f"trainer.resume: the checkpoint does not fit this model ({first}); resume with "
                                  "the run's own config or use trainer.resume=false in a new run folder") from None
        self.step = state["step"]
        if weights_only:
            return
        distributed.load_optimizer_state(self.model, self.optimizer, state["optimizer"], self.dist)
        self.scheduler.load_state_dict(state["scheduler"])
        apply_settings(self.optimizer, self.scheduler, self.cfg.optim)  # a changed lr or schedule takes effect
        self.tokens_seen, self.best_val = state["tokens_seen"], state["best_val"]
        self.batches.load_state_dict(state["data"])
        self.wandb_id = state.get("wandb_id")
        self.pending_eval = state.get("pending_eval", False)
        if "guard" in state:  # checkpoints written before non-finite steps were skipped lack these two
            self.guard.load_state_dict(state["guard"])
            self.losses.load_state_dict(state["window"])
        rng = distributed.rank_rng(state["rng"], self.dist)
        if rng is not None:
            set_rng_state(rng)

    def save(self, is_best: bool) -> None:
        self.guard.check(self.step, self.last_checkpoint)  # a run that has diverged writes no checkpoint
        self.check_weights_finite()  # nor one whose weights are lost (a step applied with an infinite lr)
        state = self.state_dict()  # on every rank: FSDP gathers the shards
        if self.dist.main:  # enough step files kept for the final checkpoint averaging
            keep = max(self.cfg.trainer.keep_checkpoints, self.cfg.eval.average_last or 0)
            self.last_checkpoint = save_checkpoint(state, self.run_dir / "checkpoints", keep, is_best)
        distributed.barrier(self.dist)  # no rank reads checkpoints/ while rank 0 writes

    def check_weights_finite(self) -> None:
        """DivergedError unless every weight of every rank is finite: such weights are no recovery point."""
        bad = sum((~torch.isfinite(distributed.local_part(p.detach()))).sum() for p in self.model.parameters())
        if distributed.global_max(torch.as_tensor(bad).cpu()) > 0:
            raise DivergedError(
                f"weights: {int(bad)} model weights are not finite at step {self.step}, so no checkpoint of it is "
                f"written; the last good checkpoint is {self.last_checkpoint or 'none (nothing was saved)'}; "
                "check optim.lr and the other optim.* values, try a trainer.grad_clip or trainer.precision=fp32")

    def maybe_resume(self, weights_only: bool = False) -> Path | None:
        target = resume_target(self.cfg.trainer.resume, self.run_dir)
        if target is None:
            return None
        path, state, self.failed = load_latest(target, "cpu" if self.dist.active else self.device)
        self.load_state_dict(state, weights_only)
        self.last_checkpoint, self.resumed_from = path, (path, self.step)
        log.info("resumed from %s at step %d", path, self.step)
        return path

    # --- steps -------------------------------------------------------------------------------------------------
    def _forward_loss(self, batch, all_aux: bool) -> tuple:
        """(total loss, CE, unweighted aux terms reduced over layers, routing records); aux terms with a zero
        coefficient are computed only when `all_aux` (log steps)."""
        with self.autocast():
            return self.task.loss(self.train_model, batch, all_aux)

    def step_body(self, batches: list, log_step: bool) -> tuple:
        """Forward and backward over the micro-batches, clipping, the optimizer update (skipped where the loss or
        the gradient is not finite): all that a CUDA graph captures. Returns device tensors (mean CE, mean aux
        terms, the last micro-batch's routing records, grad norm, the skipped flag); a log step also computes
        every aux term."""
        cfg, n = self.cfg, len(batches)
        loss_sum, ce_sum, aux_sum = 0.0, 0.0, {}
        for i, batch in enumerate(batches):
            with distributed.grad_sync(self.train_model, i == n - 1):
                loss, ce, aux, routings = self.forward_loss(batch, log_step)
                (loss / n).backward()
            loss_sum = loss_sum + loss.detach()
            ce_sum = ce_sum + ce.detach()
            aux_sum = {k: aux_sum.get(k, 0.0) + v.detach() for k, v in aux.items()}
        if cfg.trainer.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.trainer.grad_clip)
        else:
            norm = self.grad_norm()
        norm = distributed.full(norm)  # FSDP: the replicated norm of the whole gradient
        bad = self.guard.step(loss_sum, norm)
        return ce_sum / n, {k: v / n for k, v in aux_sum.items()}, detached(routings), norm, bad

    def train_step(self, log_step: bool) -> tuple:
        """One optimizer step: eager, or a CUDA-graph replay after a few eager warm-up steps on a side stream."""
        batches = [self.task.next_batch() for _ in range(self.cfg.trainer.grad_accum)]
        self.step_tokens = sum(self.task.n_tokens(b) for b in batches)
        self.lr = self.cfg.optim.lr * lr_factor(self.step, self.cfg.schedule, self.cfg.trainer.max_steps)
        if not self.use_graph:
            out = self.step_body(batches, log_step)
            self.optimizer.zero_grad(set_to_none=True)
        elif self.graph is None and self.warmed_up < WARMUP_STEPS:
            self.warmed_up += 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                out = self.step_body(batches, True)  # all aux terms, as the captured graph computes them
                self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.current_stream(self.device).wait_stream(side)
        else:
            if self.graph is None:
                self.graph = CapturedStep(self.step_body, batches)
            out = self.graph.replay(batches)
        self.scheduler.step()
        return out

    def checked_step(self, log_step: bool, steps_run: int) -> tuple:
        """train_step; an out-of-memory error in this process's first steps (the warm-up and CUDA-graph capture
        included) is the sizes' fault and becomes one line naming them. A later one stays a bug report."""
        try:
            return self.train_step(log_step)
        except (RuntimeError, MemoryError) as exc:
            if steps_run > WARMUP_STEPS or not out_of_memory(exc):
                raise
            raise oom_error(self.cfg, self.device) from None

    def grad_norm(self) -> torch.Tensor:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())

    def evaluate(self, split: str, prefix: str, final: bool = False) -> dict:
        # a signal ends evaluation in one process only: under torchrun the ranks would leave its collectives at
        # different batches, so they finish it and agree on the signal at the next log step
        stop = None if self.dist.active else self.stop
        return self.task.evaluate(self.forward, split, prefix, self.autocast, final, stop)

    def validate(self, logger) -> bool:
        """Evaluate the val split at this step and log it; whether it is the best so far. EvaluationStopped by a
        signal marks the validation pending: the checkpoint written next records it for the resumed process."""
        self.pending_eval = True
        val = self.evaluate("val", "val")
        self.pending_eval = False
        is_best = val["val/loss"] < self.best_val
        self.best_val = min(self.best_val, val["val/loss"])
        logger.log(self.step, {**val, "val/loss_best": self.best_val})
        log.info("step %d: %s", self.step, headline(val))
        self.last_val = val
        return is_best

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # --- runs --------------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        lock = RunLock(self.run_dir).acquire() if self.dist.main else None  # one trainer per run folder
        try:
            return self._fit()
        finally:
            if lock is not None:
                lock.release()

    def _fit(self) -> dict:
        t = self.cfg.trainer
        resumed = self.maybe_resume()
        if self.dist.main:  # the run's history continues from the checkpoint's step (from step 0 without one)
            remove_temp_files(self.run_dir / "checkpoints")
            truncate_jsonl(self.run_dir / "metrics.jsonl", self.step)
        if resumed is not None and self.dist.main:
            drop_later_checkpoints(self.run_dir / "checkpoints", self.step, self.failed)
        logger = self.build_logger(None if resumed is None else self.step)
        self.wandb_id = logger.wandb_id
        bar = progress(total=t.max_steps, initial=self.step, desc="train", unit="step")
        self.stop = stop = StopSignals().install()
        first_step = self.step
        try:
            if self.pending_eval:  # the interrupted process was stopped while validating this step
                self.save(self.validate(logger))
            window = self.open_window()
            while self.step < t.max_steps:
                last = self.step + 1 == t.max_steps
                log_now = (self.step + 1) % t.log_interval == 0 or last
                ce, aux, routings, norm, bad = self.checked_step(log_now, self.step - first_step)
                self.step += 1
                self.tokens_seen += self.step_tokens
                window["steps"] += 1
                window["tokens"] += self.step_tokens
                self.losses.add(ce, aux, bad)
                bar.update(1)
                if log_now:
                    logged = self.log_train(logger, window, routings, norm)
                    bar.set_postfix(loss=f"{logged['train/loss']:.4f}", tok_s=f"{logged['perf/tokens_per_s']:,.0f}")
                    window = self.open_window()
                is_best = False
                if self.step % t.eval_interval == 0 or last:
                    try:
                        is_best = self.validate(logger)
                    except EvaluationStopped:  # the signal is seen below: this step's checkpoint, then the stop
                        pass
                    window = self.open_window()  # evaluation time is not step time
                on_save_step = (self.step % t.eval_interval == 0 if t.save_interval is None
                                else self.step % t.save_interval == 0)
                # under torchrun the ranks compare notes at log steps only (a collective), so all stop together
                stopping = distributed.agreed_signal(stop.received, self.dist) if log_now or not self.dist.active \
                    else None
                if on_save_step or last or stopping:
                    self.save(is_best)
                    window = self.open_window()
                if stopping:
                    raise Preempted(stopping, self.step, self.last_checkpoint, self.run_dir, self.dist.rank)
            if not self.last_val and self.step > 0:  # resumed at max_steps: report the checkpoint's validation loss
                self.last_val = self.evaluate("val", "val")
            test = self.final_test()
            logger.log(self.step, test)
        except EvaluationStopped:  # the final evaluations: the last step's checkpoint is written, resuming reruns them
            raise Preempted(stop.received, self.step, self.last_checkpoint, self.run_dir, self.dist.rank) from None
        finally:
            bar.close()
            logger.close()
            stop.restore()
            self.stop = None
        return self.write_summary({**self.last_val, **test})

    def final_test(self) -> dict:
        """The test evaluation at the end, on the average of the last `eval.average_last` checkpoints if set."""
        n = self.cfg.eval.average_last
        if not n:
            return self.evaluate("test", "test", final=True)
        paths = self.step_history()[-n:]
        if len(paths) < n:
            log.warning("eval.average_last=%d: this run has %d step checkpoints; %s", n, len(paths),
                        "averaging those" if paths else "testing the current weights")
        if not paths:
            return self.evaluate("test", "test", final=True)
        current = {k: v.clone() for k, v in self.model.state_dict().items()}
        distributed.load_model_state(self.model, average_checkpoints(paths), self.dist)  # averaged on the CPU
        log.info("test: weights averaged over %d checkpoints (%s .. %s)", len(paths), paths[0].name, paths[-1].name)
        out = {**self.evaluate("test", "test", final=True), "test/averaged_checkpoints": len(paths)}
        self.model.load_state_dict(current)
        return out

    def step_history(self) -> list:
        """The run's step checkpoints, oldest first: its own, after those of the folder it resumed from (up to the
        resumed step) when that is another one (trainer.resume=PATH from a new run folder)."""
        own = self.run_dir / "checkpoints"
        paths = step_checkpoints(own) if own.is_dir() else []
        if self.resumed_from is not None:
            source, step = self.resumed_from
            if source.parent.resolve() != own.resolve():
                paths = [p for p in step_checkpoints(source.parent) if p.name <= f"step_{step:07d}.pt"] + paths
        return paths

    def build_logger(self, resumed_step: int | None = None) -> MetricsLogger:
        """The sinks (metrics.jsonl, TensorBoard, W&B) on rank 0; the other ranks log nowhere."""
        if not self.dist.main:
            return MetricsLogger([])
        return build_logger(self.cfg, self.run_dir, OmegaConf.to_container(self.cfg, resolve=True), self.wandb_id,
                            resumed_step)

    def open_window(self) -> dict:
        """Start a timing window; the device is synchronised so the window times only what follows."""
        self.sync()
        return {"t0": time.perf_counter(), "steps": 0, "tokens": 0}

    def log_train(self, logger, window: dict, routings: list, grad_norm) -> dict:
        self.sync()
        n = window["steps"]
        elapsed = time.perf_counter() - window["t0"]
        step_ms = 1000 * elapsed / n
        self.step_ms.append(step_ms)
        tok_s = window["tokens"] / elapsed
        losses = self.losses.pop()
        losses["train/loss"] = distributed.global_sum(losses["train/loss"]) / self.dist.world  # CE of each slice
        metrics = {**losses, "lr": self.lr, "grad_norm": grad_norm,
                   "train/skipped_steps": self.guard.skipped, **routing_metrics(self.model.sites, routings),
                   "perf/step_ms": step_ms, "perf/tokens_per_s": tok_s,
                   "perf/mfu": self.flops_per_token * tok_s / (self.peak * self.dist.world),
                   "tokens_seen": self.tokens_seen}
        logged = logger.log(self.step, metrics)
        log.info("step %d: loss %.4f | %.1f ms/step | %.0f tok/s | mfu %.2f%%", self.step, logged["train/loss"],
                 step_ms, tok_s, 100 * logged["perf/mfu"])
        self.guard.check(self.step, self.last_checkpoint)
        return logged

    def eval_only(self) -> dict:
        """Valid and test of the checkpoint trainer.resume names; eval.json in the run folder (summary.json is the
        training run's, never written here)."""
        path = self.maybe_resume(weights_only=True)
        if path is None:
            raise ConfigError("trainer.eval_only: no checkpoint found; set trainer.resume=PATH to a checkpoint "
                              "file or run folder")
        metrics = {**self.evaluate("val", "val"), **self.evaluate("test", "test", final=True)}
        logger = self.build_logger()
        logger.log(self.step, metrics)
        logger.close()
        log.info("eval_only: %s", headline(metrics))
        return self.write_summary({**metrics, "checkpoint": str(Path(path).resolve())}, "eval.json")

    def write_summary(self, metrics: dict, name: str = "summary.json") -> dict:
        steady = self.step_ms[1:] if len(self.step_ms) > 1 else self.step_ms  # the first window holds warm-up
        summary = {
            "params_total": self.model.num_params(non_embedding=False),
            "params_non_embedding": self.model.num_params(),
            **metrics,
            "val/loss_best": self.best_val if math.isfinite(self.best_val) else metrics.get("val/loss"),
            "steps": self.step,
            "skipped_steps": self.guard.skipped.item(),
            "tokens_seen": self.tokens_seen,
            "wall_s": time.perf_counter() - self.start_time,
            "step_ms_median": statistics.median(steady) if steady else None,
            "flops_per_token": self.flops_per_token,
            "peak_flops": self.peak,
            "device_name": device_name(self.device),
            "world_size": self.dist.world,
            "torch_version": torch.__version__,
            "git_sha": git_sha(),
        }
        if getattr(self.task, "last_signature", None):
            summary["bleu_signature"] = self.task.last_signature
        if self.dist.main:
            (self.run_dir / name).write_text(json.dumps(summary, indent=1))
        return summary


def train(cfg, run_dir: Path, overrides: list | None = None) -> dict:
    """Train per `cfg`, writing into `run_dir`; returns summary.json's dict. With trainer.eval_only, evaluate the
    checkpoint trainer.resume names with the run's own config (see eval_run), writing eval.json into `run_dir`
    (trainer.resume=auto/true: into `run_dir`/eval/<date_time>/); `overrides` are the command line's, whose
    evaluation settings apply."""
    run_dir = Path(run_dir)
    if cfg.trainer.eval_only:
        cfg, run_dir = eval_run.prepare(cfg, run_dir, overrides)
    check_run_folder(run_dir, cfg)  # a multirun job or an in-process call has had no precheck
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    trainer = Trainer(cfg, run_dir)
    log.info("%s", banner(trainer))
    summary = trainer.eval_only() if cfg.trainer.eval_only else trainer.fit()
    log.info("done: %s | wall %.1f s | run folder %s", headline(summary), time.perf_counter() - start, run_dir)
    return summary


def banner(trainer: Trainer) -> str:
    """The run's first line: what is trained, how big, where, and the folder that will hold its results."""
    cfg, model, device = trainer.cfg, trainer.model, trainer.device
    where = device_name(device) if device.type == "cpu" else f"{device} ({device_name(device)})"
    if trainer.dist.active:
        where += f" x {trainer.dist.world} processes"
    return (f"run: model {cfg.model.name} on {cfg.data.name} | {model.num_params(non_embedding=False):,} parameters "
            f"({model.num_params():,} non-embedding) | device {where} | run folder {trainer.run_dir}")
