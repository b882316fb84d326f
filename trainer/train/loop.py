"""The training loop: ``train(config, commands)`` yields typed progress events.

Setup (model, data, LoRA, optimiser, caches) lives in ``trainer.train.session``; checkpoints,
sampling and export are named functions. What is left here is the loop itself.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

import torch

from trainer.config.schema import StudioConfig, save_toml
from trainer.core.atomic import atomic_write_text, write_error
from trainer.core.devices import is_out_of_memory
from trainer.core.errors import CheckpointError, TrainingError
from trainer.train.checkpoints import (
    damaged,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from trainer.train.events import (
    CheckpointSaved,
    Event,
    Notice,
    RunCommands,
    RunFinished,
    RunStarted,
    StepProgress,
)
from trainer.train.export import export_lora
from trainer.train.losses import diffusion_loss, prediction_target
from trainer.train.noise import noisy_latents, sample_noise, sample_timesteps
from trainer.train.run_outputs import RunOutputs
from trainer.train.session import Session, open_session
from trainer.train.transfers import Reading, StepReadback, to_device

EMA_DECAY = 0.9  # smoothing of the loss curve shown to the user


def training_step(session: Session) -> torch.Tensor:
    """One forward/backward over one batch; returns the (detached) loss."""
    model, cfg = session.model, session.config
    epoch, refs = session.next_batch()
    latents, time_ids = session.latents_for(refs)  # time_ids: SDXL size/crop conditioning, else None
    captions = [session.training_set.caption_for(ref, epoch, cfg.train.seed) for ref in refs]
    noise = sample_noise(latents, cfg.train, session.noise_generator)
    timesteps = sample_timesteps(len(refs), model.noise_scheduler.config.num_train_timesteps, cfg.train,
                                 session.noise_generator, latents.device)
    noisy = noisy_latents(model.noise_scheduler, latents, noise, timesteps, cfg.train.ip_noise_gamma,
                          session.noise_generator)
    with session.accelerator.autocast():
        with torch.set_grad_enabled(len(session.trainable_models()) > 1):  # a text encoder trains too
            text, pooled = session.text_embeddings_for(captions)  # pooled: SDXL only, else None
        added = None if pooled is None else {"text_embeds": pooled, "time_ids": time_ids}
        prediction = model.unet(noisy, timesteps, text, added_cond_kwargs=added).sample
        target = prediction_target(model.noise_scheduler, latents, noise, timesteps)
        mask = session.masks_for(refs, latents.shape[-2:])  # masked loss: [B,1,h,w] or None
        weights = session.training_set.loss_weights(refs)  # prior_loss_weight of reg pictures, or None
        loss = diffusion_loss(prediction, target, model.noise_scheduler, timesteps, cfg.train,
                              mask=mask, sample_weights=None if weights is None else weights.to(latents.device))
    session.accelerator.backward(loss / cfg.optim.grad_accum)
    return loss.detach()


def train(config: StudioConfig, commands: RunCommands | None = None) -> Iterator[Event]:
    """Run (or resume) the training ``config`` describes, yielding progress as it goes."""
    commands = commands or RunCommands()
    notices: list[Notice] = []
    session = open_session(config, lambda level, text: notices.append(Notice(level, text)))
    yield from notices
    notices.clear()
    is_main = session.accelerator.is_main_process
    if is_main:
        try:
            session.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # e.g. a file where a folder should be, a read-only drive
            raise write_error(session.run_dir, exc) from None
        save_toml(config, session.run_dir / "config.toml")
        atomic_write_text(session.run_dir / "dataset-report.txt", session.lint.summary_text())
    outputs = RunOutputs(session) if is_main else None  # samples, epoch files, validation, metrics
    yield Notice("info", "Preparing latents and text embeddings…")
    with session.accelerator.main_process_first(), out_of_memory_as_training_error(session, "while preparing latents"):
        session.warm_caches(lambda level, text: notices.append(Notice(level, text)))  # others read the main's disk cache
    yield from notices
    start_step, planned_steps = resume_if_asked(session)
    if start_step:
        yield Notice("info", f"Resuming from the checkpoint of step {start_step}.")
    if start_step and planned_steps not in (None, session.total_steps):
        yield Notice("info", f"The run was planned for {planned_steps} steps and now runs to {session.total_steps}: "
                             "the learning-rate schedule follows the new length from here.")
    yield RunStarted(session.total_steps, start_step, len(session.training_set.items), config.train.batch_size,
                     session.run_dir, str(session.device), sum(p.numel() for g in session.optimizer.param_groups for p in g["params"]))
    if outputs:
        yield from outputs.start(start_step)

    params = [p for group in session.optimizer.param_groups for p in group["params"]]
    step = saved_step = start_step
    stopped = False
    readback = StepReadback(session.device)
    progress = ProgressTracker(session, start_step, time.perf_counter())
    while step < session.total_steps and not stopped:
        with out_of_memory_as_training_error(session, f"at step {step + 1}"):
            loss = optimizer_step(session, params)
        step += 1

        # The loss is read one step late on a GPU (trainer.train.transfers). With several processes the
        # commands travel with it as votes, so that all of them act at the same step; a single
        # process acts on a command as soon as its client has seen this step's events.
        for reading in readback.push(step, step_values(session, loss, commands), session.lr_scheduler.get_last_lr()[0]):
            yield tracked(outputs, progress.update(reading))
        if session.accelerator.num_processes == 1:
            progress.take_commands(commands)

        every = config.output
        if outputs:  # samples, epoch files (their samples first: a file's preview), validation loss
            yield from outputs.after_step(step, commands.take_sample_request()
                                          or bool(every.sample_every and step % every.sample_every == 0))
        if progress.save_voted or (every.save_every and step % every.save_every == 0):
            for reading in readback.drain():  # a NaN in a pending step must not reach a checkpoint
                yield tracked(outputs, progress.update(reading))
            yield save_run_checkpoint(session, step)
            saved_step, progress.save_voted = step, False
        stopped = progress.stop_voted

    for reading in readback.drain():
        yield tracked(outputs, progress.update(reading))
    if saved_step != step:
        yield save_run_checkpoint(session, step)  # a stopped or finished run can always be resumed
    session.accelerator.wait_for_everyone()
    if is_main:
        output, extras = export_lora(session, step)
        events, suggestion, parity_warning = outputs.finish(step, output)  # best-epoch hint, the file re-rendered
        yield from events
        yield from (Notice(level, text) for level, text in (("info", suggestion), ("warning", parity_warning)) if text)
        yield RunFinished(step, output, output.stat().st_size, stopped_early=step < session.total_steps,
                          extra_outputs=tuple(extras), suggestion=suggestion, parity_warning=parity_warning)
    session.accelerator.end_training()


def tracked(outputs: RunOutputs | None, event: StepProgress) -> StepProgress:
    """The step's progress, also written to metrics.jsonl on the main process."""
    return outputs.track(event) if outputs else event


def optimizer_step(session: Session, params: list[torch.Tensor]) -> torch.Tensor:
    """One optimiser step over ``grad_accum`` batches; returns their mean loss, still on the device."""
    cfg = session.config
    losses = [training_step(session) for _ in range(cfg.optim.grad_accum)]  # DDP syncs gradients in backward
    if cfg.optim.max_grad_norm:
        session.accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
    session.optimizer.step()
    if session.ema is not None:
        session.ema.update()
    session.lr_scheduler.step()
    session.optimizer.zero_grad(set_to_none=True)
    return torch.stack(losses).mean()


def step_values(session: Session, loss: torch.Tensor, commands: RunCommands) -> torch.Tensor:
    """[mean loss, processes that want to stop, processes that want a checkpoint], on the device;
    a single process leaves the votes at 0 (it reads its commands directly)."""
    if session.accelerator.num_processes == 1:
        return torch.cat([loss.float().reshape(1), loss.new_zeros(2, dtype=torch.float32)])
    flags = torch.tensor([float(commands.stop_requested), float(commands.take_save_request())])
    values = torch.cat([loss.float().reshape(1), to_device(flags, session.device)])
    values = session.accelerator.reduce(values, "sum")
    return torch.cat([values[:1] / session.accelerator.num_processes, values[1:]])


class ProgressTracker:
    """Turns read-back step values into StepProgress events and collects the processes' votes;
    a non-finite loss ends the run."""

    def __init__(self, session: Session, start_step: int, started: float) -> None:
        self.session, self.start_step, self.started = session, start_step, started
        self.stop_voted = self.save_voted = False

    def take_commands(self, commands: RunCommands) -> None:
        """Act on the commands of a single process's client directly (no vote needed)."""
        self.stop_voted = self.stop_voted or commands.stop_requested
        self.save_voted = self.save_voted or commands.take_save_request()

    def update(self, reading: Reading) -> StepProgress:
        s, step = self.session, reading.step
        loss, stop_votes, save_votes = reading.values.tolist()
        if not math.isfinite(loss):
            raise TrainingError(f"The loss became {loss} at step {step}; the weights are unusable from here.",
                                hint="Lower the learning rate, or use fp32/bf16 precision; the last checkpoint was kept.")
        self.stop_voted = self.stop_voted or stop_votes > 0
        self.save_voted = self.save_voted or save_votes > 0
        s.loss_ema = loss if s.loss_ema is None else EMA_DECAY * s.loss_ema + (1 - EMA_DECAY) * loss
        elapsed = time.perf_counter() - self.started
        rate = (step - self.start_step) / elapsed if elapsed > 0 else 0.0
        return StepProgress(step, s.total_steps, s.epoch_at(step), loss, s.loss_ema, reading.context, rate,
                            (s.total_steps - step) / rate if rate else float("inf"))


@contextlib.contextmanager
def out_of_memory_as_training_error(session: Session, where: str) -> Iterator[None]:
    """Turn running out of memory into a TrainingError that names the settings to lower."""
    try:
        yield
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        session.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        cfg = session.config
        device = "GPU" if session.device.type in ("cuda", "mps") else "CPU"
        settings = (f"resolution {session.resolution} px, batch size {cfg.train.batch_size}, rank {cfg.network.rank}, "
                    f"gradient checkpointing {'on' if session.grad_checkpointing else 'off'}")
        fixes = ["lower the resolution (--resolution)", "the batch size (--batch-size)", "or the rank (--rank)"]
        if not session.grad_checkpointing:
            fixes.insert(0, "turn on gradient checkpointing (--grad-checkpointing)")
        raise TrainingError(f"Ran out of {device} memory {where} ({settings}).",
                            hint=f"To fit: {', '.join(fixes)}; close other programs using the {device}. "
                                 "Checkpoints already saved were kept.") from None


def save_run_checkpoint(session: Session, step: int) -> CheckpointSaved:
    state = session.resume_state()  # every process calls this: it gathers the per-process RNG states
    path = session.run_dir / "checkpoints" / f"step-{step:06d}"
    if session.accelerator.is_main_process:
        path = save_checkpoint(session.run_dir / "checkpoints", step, state, session.config.output.keep_last)
    session.accelerator.wait_for_everyone()
    return CheckpointSaved(step, path)


def resume_if_asked(session: Session) -> tuple[int, int | None]:
    """Restore the checkpoint ``output.resume`` names ('auto' = latest of this output); returns its
    step and the run length it was planned for (0, None: a fresh run)."""
    wanted = session.config.output.resume
    if not wanted:
        return 0, None
    if wanted == "auto":
        found = list_checkpoints(session.run_dir / "checkpoints")
        if not found:
            return 0, None  # nothing to resume: a fresh run
        path = found[-1].path
    else:
        from pathlib import Path

        path = Path(wanted)
        if not path.is_dir():
            raise CheckpointError(f"No checkpoint folder at {path}.",
                                  hint="Use --resume auto, or the path of a step-NNNNNN folder inside the run's checkpoints.")
    step, state = load_checkpoint(path)
    try:
        session.restore(state, path)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:  # a key or value mangled inside
        raise damaged(path, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'a missing part'}") from None
    return step, state.get("total_steps")
