"""What every benchmark needs: interleaved timing with warm-up and medians, peak memory, output.

Timing. Cases that are compared with each other run *interleaved*: after one warm-up call each,
round r calls every case once, in an order rotated by r. Load from other processes or thermal
drift then hits all cases alike, so the ratios stay meaningful on a busy machine even when the
absolute seconds do not. Each case reports the best (minimum) and the median of its rounds;
ratios use the best: interference from other processes only ever adds time, so the minimum is
the closest reading of what the code itself costs (the reasoning of ``timeit``). Process CPU
time is recorded too, but threads spinning while a sibling is descheduled inflate it on a busy
machine, so it is no better a measure there.

Memory. A case's peak is what it would need on its own: the bytes of the tensors it keeps
(weights, LoRA parameters, optimiser state) plus the largest transient growth measured during
any of its calls (activations, gradients, temporaries). On CUDA the transient is
``max_memory_allocated - memory_allocated`` around the call; on CPU it is the growth of the
process's peak resident set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` before
each call, after returning freed heap pages with ``malloc_trim``). Several models can thus live
in one process, as interleaving needs, without their weights counting against each other.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

MiB = 1024**2
GiB = 1024**3


# --- timing ----------------------------------------------------------------------------------


@dataclass
class CaseResult:
    """Seconds of each timed call of one case and its largest transient memory growth."""

    name: str
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)  # process CPU time (all threads) of each call
    transient_bytes: int = 0
    resident_bytes: int = 0  # tensors the case keeps between calls (set by the caller)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def best(self) -> float:
        return min(self.seconds) if self.seconds else float("nan")

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_seconds) if self.cpu_seconds else float("nan")

    @property
    def spread(self) -> float:
        """(median - best) / best: how much interference the timed calls saw."""
        if len(self.seconds) < 2:
            return 0.0
        return (self.median - self.best) / self.best

    @property
    def peak_bytes(self) -> int:
        return self.resident_bytes + self.transient_bytes


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so a wall-clock reading covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_interleaved(
    cases: dict[str, Callable[[], Any]],
    device: torch.device,
    *,
    warmup: int = 1,
    rounds: int = 3,
    log: Callable[[str], None] = print,
) -> dict[str, CaseResult]:
    """Warm each case up, then time ``rounds`` rounds of every case, rotating the order."""
    probe = MemoryProbe(device)
    results = {name: CaseResult(name) for name in cases}
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            seconds, _, grown = _timed_call(cases[name], device, probe)
            results[name].transient_bytes = max(results[name].transient_bytes, grown)
            log(f"  warm-up  {name:<34} {seconds:7.2f} s")
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, cpu, grown = _timed_call(cases[name], device, probe)
            results[name].seconds.append(seconds)
            results[name].cpu_seconds.append(cpu)
            results[name].transient_bytes = max(results[name].transient_bytes, grown)
            log(f"  round {r + 1}  {name:<34} {seconds:7.2f} s")
    return results


def time_once(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall seconds of one call (GPU work included) and its return value."""
    synchronize(device)
    start = time.perf_counter()
    value = fn()
    synchronize(device)
    return time.perf_counter() - start, value


def _timed_call(fn: Callable[[], Any], device: torch.device, probe: MemoryProbe) -> tuple[float, float, int]:
    """(wall seconds, process CPU seconds, transient bytes) of one call."""
    probe.start()
    cpu_start = time.process_time()
    seconds, _ = time_once(fn, device)
    return seconds, time.process_time() - cpu_start, probe.stop()


# --- memory ----------------------------------------------------------------------------------


class MemoryProbe:
    """Transient memory growth during a stretch of code: CUDA allocator peak or CPU peak RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._base = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            trim_host_memory()
            reset_peak_rss()
            self._base = current_rss()

    def stop(self) -> int:
        if self.device.type == "cuda":
            synchronize(self.device)
            return max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
        return max(0, peak_rss() - self._base)


def _proc_status(field_name: str) -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def current_rss() -> int:
    """Resident set size of this process in bytes (0 where /proc is missing)."""
    return _proc_status("VmRSS")


def peak_rss() -> int:
    """Peak resident set since the last ``reset_peak_rss`` (process lifetime where it can't reset)."""
    value = _proc_status("VmHWM")
    if value:
        return value
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Make the peak RSS start again from the current RSS (Linux >= 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def trim_host_memory() -> None:
    """Hand freed heap pages back to the OS so RSS reflects live memory (glibc only)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def tensor_bytes(modules: Iterable[torch.nn.Module] = (), optimizer: torch.optim.Optimizer | None = None,
                 device: torch.device | None = None) -> int:
    """Bytes of the distinct tensors (parameters, buffers, optimiser state) held on ``device``."""
    seen: set[tuple[str, int]] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if device is not None and t.device.type != device.type:
            return
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()

    for module in modules:
        for t in module.parameters():
            add(t)
        for t in module.buffers():
            add(t)
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    add(value)
    return total


# --- output ----------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table (markdown-compatible), columns padded to their widest cell."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def gib(n: float) -> float:
    return round(n / GiB, 3)


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on (compare numbers only between identical environments)."""
    import diffusers
    import peft
    import transformers

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = gib(torch.cuda.get_device_properties(device).total_memory)
    return info


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n", encoding="utf-8")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def resolve_device(name: str) -> torch.device:
    """The benchmark device; a clear exit instead of a stack trace when CUDA is asked for but absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but PyTorch sees no CUDA GPU here "
                         f"(torch {torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA). "
                         "Run on a GPU machine with a CUDA build of PyTorch, or use --device cpu.")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name}: the benchmarks support cpu and cuda.")
    return device


def quiet_libraries() -> None:
    """Offline and without progress bars: benchmarks build their models locally."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


# --- the benchmark model: real SD 1.5 architecture, random weights ------------------------------

SD15_CONFIG_DIR = Path(__file__).resolve().parent.parent / "trainer" / "models" / "configs" / "sd15"
TOKENIZER_DIR = SD15_CONFIG_DIR.parent / "clip_tokenizer"


def write_random_sd15(folder: str | Path, seed: int = 0, log: Callable[[str], None] = print) -> Path:
    """Save SD 1.5 (UNet 860M, VAE 84M, CLIP-L text encoder 123M) with random weights as a
    diffusers folder. Weights are stored in fp16, like the usual 2 GB SD 1.5 files; loading
    upcasts them. Reuses ``folder`` when it already holds a complete model."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    if (folder / "model_index.json").is_file() and any((folder / "unet").glob("*.safetensors")):
        log(f"Using the random SD 1.5 already in {folder}")
        return folder
    log(f"Building SD 1.5 with random weights (seed {seed}) from {SD15_CONFIG_DIR} ...")
    start = time.perf_counter()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG_DIR / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG_DIR / "text_encoder"))
    pipe = StableDiffusionPipeline(
        vae=vae.half(), text_encoder=text_encoder.half(), unet=unet.half(),
        tokenizer=CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR)),
        scheduler=PNDMScheduler.from_pretrained(SD15_CONFIG_DIR, subfolder="scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    log(f"  written to {folder} in {time.perf_counter() - start:.0f} s")
    return folder


def write_pattern_images(folder: str | Path, count: int, side: int, caption: str = "zxq person") -> Path:
    """``count`` deterministic, structured JPEG pictures (``side`` px squares) with .txt captions."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    for i in range(count):
        rng = np.random.default_rng(i)
        base = rng.uniform(40, 215, size=3)
        img = np.stack([base[0] + 60 * np.sin(xx / (9 + i % 7)), base[1] + 60 * np.cos(yy / (7 + i % 5)),
                        base[2] + 40 * np.sin((xx + yy) / (13 + i))], axis=-1)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(folder / f"img{i:03d}.jpg", quality=92)
        (folder / f"img{i:03d}.txt").write_text(f"{caption}, picture {i}, outdoors", encoding="utf-8")
    return folder
