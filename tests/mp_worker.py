"""One process of a multi-process training run, started by ``accelerate launch`` in test_multiprocess.

Runs ``trainer.train.loop.train`` exactly as the CLI does and records, for the test to check:
  - every file-system write under ``--watch`` (Python audit events: open for writing, mkdir,
    rename/replace, remove), so the test can prove that only the main process writes files;
  - the samples each ``next_batch`` call handed this process, so the test can prove that the
    processes saw different data;
  - this process's LoRA weights after the last step, so the test can prove the gradients were
    synchronised (identical weights everywhere).
The record goes to ``--dump/rank-N.json`` and ``--dump/rank-N.safetensors`` after training, when
write recording has stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_recording = True
_writes: list[str] = []


def _audit(watch: str):
    def hook(event: str, args: tuple) -> None:
        if not _recording:
            return
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
            paths = [path] if writing else []
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
            paths = [args[0]]
        elif event == "os.rename":  # os.rename and os.replace
            paths = [args[0], args[1]]
        else:
            return
        for path in paths:
            if isinstance(path, (str, bytes, os.PathLike)):
                text = os.fsdecode(path)
                if os.path.abspath(text).startswith(watch):
                    _writes.append(f"{event} {text}")
    return hook


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--settings", required=True, help="JSON object of flat config overrides")
    parser.add_argument("--watch", required=True, help="record writes under this folder")
    parser.add_argument("--dump", required=True, help="folder for this process's record")
    parser.add_argument("--stop-after", type=int, default=0)
    args = parser.parse_args()
    sys.addaudithook(_audit(os.path.abspath(args.watch)))

    import torch
    from safetensors.torch import save_file

    import trainer.train.loop as loop
    from trainer.config.presets import resolve_config
    from trainer.lora import inject as lora_mod
    from trainer.train.events import RunCommands, RunFinished, StepProgress
    from trainer.train.session import Session

    torch.set_num_threads(1)
    sessions: list[Session] = []
    batches: list[list] = []
    open_session = loop.open_session

    def capture_session(*a, **kw):
        sessions.append(open_session(*a, **kw))
        return sessions[-1]

    next_batch = Session.next_batch

    def record_batch(self):
        epoch, refs = next_batch(self)
        batches.append([epoch, [[ref.index, ref.slot, int(ref.flip)] for ref in refs]])
        return epoch, refs

    loop.open_session = capture_session
    Session.next_batch = record_batch

    config = resolve_config("character", overrides=json.loads(args.settings))
    commands = RunCommands()
    finished = None
    for event in loop.train(config, commands):
        if isinstance(event, StepProgress) and event.step == args.stop_after:
            commands.stop()
        if isinstance(event, RunFinished):
            finished = event
    global _recording
    _recording = False

    session = sessions[0]
    rank = session.accelerator.process_index
    weights = {}
    for component, model in session.trainable_models().items():
        for key, value in lora_mod.lora_state(session.accelerator.unwrap_model(model)).items():
            weights[f"{component}.{key}"] = value.detach().float().cpu().contiguous()
    dump = Path(args.dump)
    dump.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(dump / f"rank-{rank}.safetensors"))
    record = {
        "rank": rank,
        "num_processes": session.accelerator.num_processes,
        "distributed_type": str(session.accelerator.distributed_type),
        "batches": batches,
        "writes": _writes,
        "finished": None if finished is None else {"step": finished.step, "output": str(finished.output),
                                                 "stopped_early": finished.stopped_early},
    }
    (dump / f"rank-{rank}.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
