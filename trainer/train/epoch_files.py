"""Loadable LoRA files during a run, named as kohya names them, so an artist can pick the epoch.

``out/zxq.safetensors`` is the final file; ``out/zxq-000004.safetensors`` the weights after epoch 4
(``output.save_lora_every``), ``out/zxq-step00000500.safetensors`` after step 500
(``save_lora_every_steps``). Each is written by the same code as the final file (same keys,
metadata with its own ``ss_epoch``/``ss_steps``/``sshs_model_hash``, export dtype), atomically, with
A1111 sidecars whose preview is the sample of the same step. The number comes from the step, so a
resumed run continues the numbering; ``keep_lora_last`` deletes the oldest beyond K.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from trainer.lora.sidecars import remove_sidecars, sidecar_for_export, write_sidecars
from trainer.train.events import LoraSaved
from trainer.train.export import last_sample, save_lora_file

EPOCH_DIGITS = 6  # kohya: f"{output_name}-{epoch:06d}"
STEP_DIGITS = 8  # kohya: f"{output_name}-step{step:08d}"


@dataclass(frozen=True)
class SavedLora:
    """One epoch or step file of a run."""

    path: Path
    epoch: int | None  # the epoch of an epoch file, None for a step file
    step: int | None  # the step of a step file, None for an epoch file (read ss_steps for it)

    @property
    def label(self) -> str:
        return f"epoch {self.epoch}" if self.epoch is not None else f"step {self.step}"


def epoch_file(output: str | Path, epoch: int) -> Path:
    output = Path(output)
    return output.with_name(f"{output.stem}-{epoch:0{EPOCH_DIGITS}d}.safetensors")


def step_file(output: str | Path, step: int) -> Path:
    output = Path(output)
    return output.with_name(f"{output.stem}-step{step:0{STEP_DIGITS}d}.safetensors")


def list_saved_loras(output: str | Path) -> list[SavedLora]:
    """The epoch files (by epoch), then the step files (by step), of the run writing ``output``."""
    output = Path(output)
    pattern = re.compile(rf"^{re.escape(output.stem)}-(?:(\d{{{EPOCH_DIGITS}}})|step(\d{{{STEP_DIGITS}}}))\.safetensors$")
    found = []
    for path in output.parent.iterdir() if output.parent.is_dir() else ():
        if (match := pattern.match(path.name)) and path.is_file():
            epoch, step = match.groups()
            found.append(SavedLora(path, int(epoch) if epoch else None, int(step) if step else None))
    return sorted(found, key=lambda s: (s.epoch is None, s.epoch or 0, s.step or 0))


def due_file(session, step: int) -> Path | None:
    """The file to write after ``step``, if one is due: an epoch just ended on a multiple of
    ``save_lora_every``, or ``step`` is a multiple of ``save_lora_every_steps``."""
    out = session.config.output
    if out.save_lora_every:
        epoch = session.epoch_at(step)
        if epoch > session.epoch_at(step - 1) and epoch % out.save_lora_every == 0:
            return epoch_file(out.output, epoch)
    if out.save_lora_every_steps and step % out.save_lora_every_steps == 0:
        return step_file(out.output, step)
    return None


def save_run_lora(session, step: int, path: Path) -> LoraSaved:
    """Write the LoRA of the weights now to ``path`` (with sidecars), then keep the newest K."""
    info, _ = save_lora_file(session, step, path)
    if session.config.output.sidecars:
        write_sidecars(path, sidecar_for_export(info), preview=last_sample(session.run_dir, step))
    return LoraSaved(step, session.epoch_at(step), path, prune_saved_loras(session.config.output.output,
                                                                           session.config.output.keep_lora_last))


def prune_saved_loras(output: str | Path, keep: int) -> tuple[Path, ...]:
    """Delete all but the newest ``keep`` epoch/step files (and their sidecars); 0 keeps all."""
    if not keep:
        return ()
    saved = list_saved_loras(output)
    epochs = [s for s in saved if s.epoch is not None]
    steps = [s for s in saved if s.step is not None]
    removed = []
    for group in (epochs, steps):
        for old in group[:-keep]:
            old.path.unlink(missing_ok=True)
            remove_sidecars(old.path)
            removed.append(old.path)
    return tuple(removed)
