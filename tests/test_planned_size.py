"""The plan names the size of the file a run writes, header included (issue 18 item 8).

Two runs whose headers differ in length (a long trigger and tag list, buckets of several sizes,
another optimiser) are planned, trained for two steps and compared with the file they wrote.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from trainer.config.presets import resolve_config
from trainer.data.scan import scan_dataset
from trainer.lora.sizing import architecture_for
from trainer.train.events import RunCommands, RunFinished
from trainer.train.loop import train
from trainer.train.planned_size import planned_file_size

# The start time's digits and the run's session id are the only header values fixed by the run itself.
RUN_ONLY_BYTES = 16


def write_dataset(folder: Path, sizes: list[tuple[int, int]], caption: str) -> Path:
    folder.mkdir(parents=True)
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (40 * i % 255, 90, 160)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(caption.format(i=i), encoding="utf-8")
    return folder


@pytest.mark.parametrize("sizes, caption, settings", [
    ([(64, 64)] * 3, "zxq, picture {i}", {}),
    ([(64, 64), (128, 64), (64, 128), (128, 128)], "zxqlongtrigger, red scarf, tag{i}, another tag {i}, blue sky",
     {"trigger": "zxqlongtrigger", "optimizer": "adafactor", "rank": 8, "alpha": 8, "buckets": True,
      "resolution": 128}),
])
def test_the_planned_size_is_the_written_size(tiny_sd1_dir: Path, tmp_path: Path, one_torch_thread, sizes, caption,
                                              settings) -> None:
    data = write_dataset(tmp_path / "data", sizes, caption)
    config = resolve_config("character-lite", overrides={
        "base": str(tiny_sd1_dir), "data": str(data), "output": str(tmp_path / "out" / "run.safetensors"),
        "rank": 4, "alpha": 4, "steps": 2, "resolution": 64, "sample_every": 0, "save_every": 0, **settings})
    arch = architecture_for(config.model.base)
    _, planned = planned_file_size(config, arch, scan_dataset(config.data), config.data.resolution)
    finished = [e for e in train(config, RunCommands()) if isinstance(e, RunFinished)][0]
    written = Path(finished.output).stat().st_size
    assert written == finished.size_bytes
    assert abs(planned - written) <= RUN_ONLY_BYTES, (planned, written)
