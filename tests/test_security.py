"""Nobody else gets in, and no file can run code: pickles never loaded, headers checked before
allocating, the server local by default and serving only the project folder, uploads kept inside it."""

from __future__ import annotations

import ast
import dataclasses
import pickle
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from child_process import REPO, child_env
from conftest import app_error

from trainer.config.schema import TrainConfig
from trainer.core.errors import StudioError

APP_PORT = 7950  # app_server's first port for this module
SCANNED = ("trainer", "app", "bench")

# Modules whose loaders execute code from the data they read.
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
# Calls that unpickle (or fetch and unpickle) however they are spelled.
UNSAFE_CALLS = {("torch", "load"), ("jit", "load"), ("hub", "load"), ("hub", "load_state_dict_from_url"),
                ("torch", "hub"), ("np", "load"), ("numpy", "load")}
UNSAFE_KEYWORDS = {("allow_pickle", True), ("weights_only", False), ("use_safetensors", False)}
# from_pretrained on these reads JSON/text files only.
TEXT_ONLY_LOADERS = ("Tokenizer", "Config", "Scheduler", "Processor")
ALLOWED: dict[str, set[str]] = {}  # "path:line" exceptions, each with a reason (none needed today)


def unsafe_loads(source: str, filename: str) -> list[str]:
    """Every place in ``source`` that could unpickle a file (strings and comments don't count)."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where} from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "load" for a in node.names):
            found.append(f"{where} from torch import load")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, (ast.Name, ast.Attribute)):
            owner = node.value.id if isinstance(node.value, ast.Name) else node.value.attr
            if (owner, node.attr) in UNSAFE_CALLS:
                found.append(f"{where} {owner}.{node.attr}")
        elif isinstance(node, ast.Call):
            for keyword in node.keywords:
                value = keyword.value.value if isinstance(keyword.value, ast.Constant) else None
                if (keyword.arg, value) in UNSAFE_KEYWORDS:
                    found.append(f"{where} {keyword.arg}={value}")
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "from_pretrained":
                receiver = ast.unparse(func.value)
                safe = any(k.arg == "use_safetensors" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe and not receiver.endswith(TEXT_ONLY_LOADERS):
                    found.append(f"{where} {receiver}.from_pretrained without use_safetensors=True")
    return [f for f in found if f.rsplit(" ", 1)[0] not in ALLOWED.get(filename, set())]


def test_the_scanner_finds_every_spelling() -> None:
    planted = """
import pickle
from dill import loads
import torch
from torch import load
x = torch.load("a.ckpt")
y = torch.load("a.ckpt", weights_only=False)
z = numpy.load("a.npy", allow_pickle=True)
m = UNet2DConditionModel.from_pretrained("folder")
t = CLIPTokenizer.from_pretrained("folder")  # text files only: fine
s = "torch.load is only mentioned in a string"
"""
    found = unsafe_loads(planted, "planted.py")
    assert sorted(int(f.split(":")[1].split()[0]) for f in found) == [2, 3, 5, 6, 7, 7, 8, 8, 9], found


def test_no_code_path_can_unpickle_a_file() -> None:
    found = []
    for package in SCANNED:
        for path in sorted((REPO / package).rglob("*.py")):
            relative = str(path.relative_to(REPO))
            found += unsafe_loads(path.read_text(encoding="utf-8"), relative)
    assert not found, "pickle loading found (LoRA Studio reads safetensors only):\n" + "\n".join(found)


def test_training_resume_and_export_never_unpickle(tiny_sd1_dir: Path, image_folder: Path, tmp_path: Path,
                                                   monkeypatch) -> None:
    """The runtime side of the scan: a run with checkpoints, a resume and an export, with every
    unpickling entry point booby-trapped."""
    from trainer.config.presets import resolve_config
    from trainer.train.events import RunCommands, RunFinished, StepProgress
    from trainer.train.loop import train

    def refuse(*args, **kwargs):
        raise AssertionError("something unpickled")

    for owner, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(owner, name, refuse)
    settings = dict(base=str(tiny_sd1_dir), data=str(image_folder), output=str(tmp_path / "lora.safetensors"),
                    rank=4, steps=4, save_every=2, seed=1)
    commands = RunCommands()
    for event in train(resolve_config("character-lite", overrides=settings), commands):
        if isinstance(event, StepProgress) and event.step == 2:
            commands.stop()
    events = list(train(resolve_config("character-lite", overrides={**settings, "resume": "auto"})))
    assert isinstance(events[-1], RunFinished) and events[-1].step == 4


@pytest.mark.parametrize("header_length", [2**40, 200 * 2**20])
def test_base_models_and_checkpoints_with_absurd_headers_are_refused_cheaply(tmp_path: Path,
                                                                             header_length: int) -> None:
    """safetensors files claiming a huge header: a clear error, and nothing near that size allocated."""
    import resource

    from trainer.config.schema import ModelConfig
    from trainer.models.loading import load_base_model
    from trainer.train.checkpoints import load_checkpoint, save_checkpoint

    bogus = struct.pack("<Q", header_length) + b'{"a":' + b" " * 100
    model = tmp_path / "model.safetensors"
    model.write_bytes(bogus)
    checkpoint = save_checkpoint(tmp_path / "checkpoints", 1, {"x": torch.ones(2)}, keep_last=1)
    (checkpoint / "tensors.safetensors").write_bytes(bogus)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(StudioError, match="model.safetensors cannot be read"):
        load_base_model(ModelConfig(base=str(model)))
    with pytest.raises(StudioError, match="damaged"):
        load_checkpoint(checkpoint)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 100 * 1024, f"peak memory grew by {grown_kib} KiB"


# --- the server ----------------------------------------------------------------------------------


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _outbound_address() -> str | None:
    """This machine's address on its default route, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_the_server_answers_on_loopback_only(app_server) -> None:
    parsed = urllib.parse.urlparse(app_server.url)
    assert parsed.hostname == "127.0.0.1"
    assert _status(app_server.url + "/") == 200
    address = _outbound_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address to try")
    with socket.socket() as outside, pytest.raises(OSError):
        outside.settimeout(5)
        outside.connect((address, parsed.port))


def test_only_the_project_folder_is_served(app_server, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the browser")
    inside = app_server.projects.root / "outputs" / "shared.txt"
    inside.parent.mkdir(parents=True, exist_ok=True)
    inside.write_text("a project file")
    file_url = app_server.url + "/gradio_api/file="
    assert _status(file_url + urllib.parse.quote(str(inside))) == 200  # the route works ...
    for outside in (secret, Path("/etc/passwd"), REPO / "trainer" / "cli.py",
                    app_server.projects.root / ".." / secret.name):
        assert _status(file_url + urllib.parse.quote(str(outside))) in (403, 404), outside  # ... for project files only


def test_uploaded_file_names_cannot_leave_the_project_folder(app_server, app_client, tmp_path: Path) -> None:
    from conftest import make_pattern_image
    from gradio_client import handle_file

    sneaky = tmp_path / "..\\..\\..\\escape.png"  # a legal Linux file name that reads as a path on Windows
    make_pattern_image((64, 64), 1).save(sneaky, format="PNG")
    lora = tmp_path / "..\\..\\evil.safetensors"
    import safetensors.torch

    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    safetensors.torch.save_file({f"{stem}.lora_down.weight": torch.zeros(2, 32),
                                 f"{stem}.lora_up.weight": torch.zeros(32, 2)}, str(lora))
    before = set(tmp_path.parent.rglob("*"))
    *_, status, _, _ = app_client.predict("../../../../escaped-set", [handle_file(sneaky)], "", 64,
                                          api_name="/upload_images")
    assert "Added 1 picture" in status
    app_client.predict([handle_file(lora)], api_name="/upload_loras")

    root = app_server.projects.root
    landed = [p for p in root.rglob("*") if "escape" in p.name or "evil" in p.name]
    assert {p.relative_to(root).parts[0] for p in landed} >= {"datasets", "loras"}, landed
    assert all(p.resolve().is_relative_to(root) for p in landed)
    assert (root / "datasets" / "escaped-set" / "escape.png").is_file()
    assert (root / "loras" / "evil.safetensors").is_file()
    outside = [p for p in set(tmp_path.parent.rglob("*")) - before
               if not p.resolve().is_relative_to(root) and ("escape" in p.name or "evil" in p.name)]
    assert not outside, outside


def test_listen_without_auth_warns_in_a_real_launch(tmp_path: Path) -> None:
    from app.launch import free_port

    port = free_port("127.0.0.1", 7940)
    env = child_env(GRADIO_ANALYTICS_ENABLED="False", CI="1")
    proc = subprocess.Popen([sys.executable, "-m", "app", "--listen", "--no-browser", "--port", str(port),
                             "--projects", str(tmp_path / "projects")], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, seen = time.monotonic() + 120, ""
        while "Add --auth user:password" not in seen and time.monotonic() < deadline and proc.poll() is None:
            seen += proc.stderr.readline()
        assert "WARNING: --listen without --auth" in seen, seen
        assert "Add --auth user:password" in seen
        from gradio_client import Client

        # the real --listen wiring confines request paths

        url = f"http://127.0.0.1:{port}"
        while time.monotonic() < deadline and proc.poll() is None:  # the warning comes before the server is up
            try:
                if _status(url + "/") == 200:
                    break
            except OSError:
                time.sleep(0.5)
        client = Client(url, verbose=False, download_files=False)
        assert "outside the folders this server may read" in app_error(client.predict, "/etc/passwd",
                                                                        api_name="/inspect_lora")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- what requests may name (issue 19, items 1-3) ----------------------------------------------

SECRET = b"root:x:0:0:TOPSECRET-TOKEN:/root:/bin/bash\n"
STEM = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
DEMO = "Demo model (tiny, random: makes noise, for trying the app)"
DEMO_SETTINGS = {"steps": 1, "rank": 4, "alpha": 4, "resolution": 64, "sample_every": 0, "save_every": 0}


def _traces_of(content: bytes) -> list[str]:
    """Every way an error message could quote a file's first bytes."""
    head = content[:8]
    number = struct.unpack("<Q", head)[0]
    return [head.decode(), repr(head), f"{number}", f"{number:,}", head.hex(), "TOPSECRET"]


def _write_lora(path: Path) -> Path:
    import safetensors.torch

    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({f"{STEM}.lora_down.weight": torch.randn(2, 32), f"{STEM}.lora_up.weight": torch.randn(32, 2),
                                 f"{STEM}.alpha": torch.tensor(2.0)}, str(path))
    return path


def _slot(path) -> list[dict]:
    return [{"file": str(path), "weight": 0.8, "enabled": True}]


# (endpoint, arguments for a path) for every endpoint that takes a file or folder path
# (endpoint, arguments for a path p and a good LoRA in the projects folder) for every endpoint that takes a path
PATH_ENDPOINTS = [
    ("/inspect_lora", lambda p, good: (str(p),)),
    ("/resize_lora", lambda p, good: (str(p), 2, None, "")),
    ("/merge_loras", lambda p, good: ([str(good), str(p)], "", None, "")),
    ("/bake_checkpoint", lambda p, good: (str(p), [str(good)], "", "")),  # the base model
    ("/bake_checkpoint", lambda p, good: (DEMO, [str(p)], "", "")),
    ("/generate", lambda p, good: (DEMO, _slot(p), "zxq", "", 1, 1, 5.0, 0, 0, "Euler a", 1, False)),
    ("/generate", lambda p, good: (str(p), [], "zxq", "", 1, 1, 5.0, 0, 0, "Euler a", 1, False)),
]


def _good_lora(server) -> Path:
    path = server.projects.loras_dir / "good.safetensors"
    return path if path.is_file() else _write_lora(path)


@pytest.mark.parametrize(("endpoint", "arguments"), PATH_ENDPOINTS, ids=[f"{e}-{i}" for i, (e, _) in enumerate(PATH_ENDPOINTS)])
@pytest.mark.parametrize("suffix", [".safetensors", ""])
def test_errors_about_a_file_never_quote_its_content(app_server, app_client, tmp_path: Path, endpoint: str, arguments,
                                                     suffix: str) -> None:
    secret = tmp_path / f"passwd{suffix}"
    secret.write_bytes(SECRET)
    message = app_error(app_client.predict, *arguments(secret, _good_lora(app_server)), api_name=endpoint)
    assert not [t for t in _traces_of(SECRET) if t in message], message


def test_the_cli_does_not_quote_a_file_either(tmp_path: Path) -> None:
    secret = tmp_path / "passwd.safetensors"
    secret.write_bytes(SECRET)
    result = subprocess.run([sys.executable, "-m", "trainer.cli", "inspect", str(secret)], cwd=REPO, env=child_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "passwd.safetensors cannot be read" in result.stderr
    assert not [t for t in _traces_of(SECRET) if t in result.stderr], result.stderr


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Files outside any projects folder: a LoRA, a folder of pictures, a folder the local user allows."""
    from conftest import write_image_folder

    root = tmp_path_factory.mktemp("outside")
    return {"lora": _write_lora(root / "private" / "theirs.safetensors"), "pictures": write_image_folder(root / "pics"),
            "allowed_lora": _write_lora(root / "shared" / "ok.safetensors"), "allowed": root / "shared",
            "root": root}


@pytest.fixture(scope="module")
def listening(tmp_path_factory: pytest.TempPathFactory, tiny_sd1_dir: Path, outside: dict[str, Path]):
    """The app as ``--listen --allow-folder <shared>`` sets it up (bound to 127.0.0.1 for the test)."""
    from browser.app_server import running_app
    from gradio_client import Client

    root = tmp_path_factory.mktemp("listening-projects")
    with running_app(root, tiny_sd1_dir, first_port=8050, listen=True, allowed_folders=[outside["allowed"]]) as server:
        (server.projects.loras_dir / "link.safetensors").symlink_to(outside["lora"])  # a way out via a symlink
        yield server, Client(server.url, verbose=False, download_files=False)


def _escapes(server, outside: dict[str, Path]) -> dict[str, Path | str]:
    root = server.projects.root
    return {"absolute path": outside["lora"], "/etc/passwd": Path("/etc/passwd"),
            "dot-dot from the projects folder": root / "loras" / ".." / ".." / outside["lora"].relative_to(root.parent),
            "symlink inside pointing out": root / "loras" / "link.safetensors",
            "home folder": "~/.bashrc"}


ESCAPES = ["absolute path", "/etc/passwd", "dot-dot from the projects folder", "symlink inside pointing out",
           "home folder"]


@pytest.mark.parametrize("escape", ESCAPES)
@pytest.mark.parametrize(("endpoint", "arguments"), PATH_ENDPOINTS, ids=[f"{e}-{i}" for i, (e, _) in enumerate(PATH_ENDPOINTS)])
def test_with_listen_request_paths_stay_in_the_allowed_folders(listening, outside, escape: str, endpoint: str,
                                                               arguments) -> None:
    server, client = listening
    target = _escapes(server, outside)[escape]
    message = app_error(client.predict, *arguments(target, _good_lora(server)), api_name=endpoint)
    assert "outside the folders this server may read" in message and "--allow-folder" in message


@pytest.mark.parametrize("field", ["base", "base_config", "reg_data"])
def test_with_listen_training_paths_stay_in_the_allowed_folders(listening, outside, field: str) -> None:
    server, client = listening
    client.predict("mine", "", 64, api_name="/add_examples")
    base = str(outside["root"]) if field == "base" else DEMO
    settings = {**DEMO_SETTINGS, **({field: str(outside["pictures"])} if field != "base" else {})}
    for endpoint in ("/check_training", "/start_training"):
        message = app_error(client.predict, "mine", base, "character-lite", "", settings, api_name=endpoint)
        assert "outside the folders this server may read" in message
    message = app_error(client.predict, "mine", str(outside["pictures"]), "", 64, api_name="/import_folder")
    assert "outside the folders this server may read" in message


def test_with_listen_the_projects_and_allowed_folders_still_work(listening, outside) -> None:
    server, client = listening
    inside = _write_lora(server.projects.loras_dir / "mine.safetensors")
    for path in (inside, outside["allowed_lora"]):
        summary, _ = client.predict(str(path), api_name="/inspect_lora")
        assert path.name in summary
    *_, status, _ = client.predict("examples", "", 64, api_name="/add_examples")  # the bundled pictures
    assert "Added 8 pictures" in status


def test_without_listen_the_local_user_may_name_any_path(app_client, outside) -> None:
    summary, _ = app_client.predict(str(outside["lora"]), api_name="/inspect_lora")
    assert "theirs.safetensors" in summary
    _, _, _, status, *_ = app_client.predict("local", str(outside["pictures"]), "", 64, api_name="/import_folder")
    assert "Added 8 pictures" in status


RUN_NAMES = ["../../elsewhere/victim", "../victim", "/tmp/victim", "..", "victim/../../x", ".hidden"]


@pytest.mark.parametrize("name", RUN_NAMES)
def test_run_names_from_a_request_stay_in_the_runs_folder(app_server, app_client, name: str) -> None:
    from trainer.config.presets import resolve_config
    from trainer.config.schema import save_toml

    runs = app_server.projects.runs_dir
    victim = (runs / f"{name}_run").resolve()  # where today's code would look
    if not victim.is_relative_to(runs.resolve()):
        victim.mkdir(parents=True, exist_ok=True)
        save_toml(resolve_config("character-lite"), victim / "config.toml")
    message = app_error(app_client.predict, name, api_name="/resume_training")
    assert "is not a valid run name" in message


@pytest.mark.parametrize("name", ["../../../outside.png", "..\\..\\outside.png", "/etc/passwd"])
def test_file_names_from_a_request_stay_in_the_dataset_folder(app_server, app_client, tmp_path: Path, name: str) -> None:
    from app.access import child_path, safe_name

    app_client.predict("names", "", 64, api_name="/add_examples")
    folder = app_server.projects.dataset_dir("names")
    decoy = folder.parent.parent / Path(name.replace("\\", "/")).name
    before = decoy.exists()
    assert "is not a valid file name" in app_error(app_client.predict, "names", name, "", 64, api_name="/remove_picture")
    assert decoy.exists() == before and len(list(folder.glob("*.png"))) == 8
    assert child_path(folder, safe_name(name)).parent == folder
    with pytest.raises(StudioError, match="not a valid"):
        child_path(folder, name)


# --- resuming on other weights (issue 19, item 6) ------------------------------------------------


def _stopped_run(base: Path, data: Path, out: Path) -> dict:
    """A character-lite run on ``base`` stopped at step 2 of 4, with a checkpoint; returns its settings."""
    from trainer.config.presets import resolve_config
    from trainer.train.events import RunCommands, StepProgress
    from trainer.train.loop import train

    settings = dict(base=str(base), data=str(data), output=str(out), rank=4, steps=4, save_every=2, seed=1)
    commands = RunCommands()
    for event in train(resolve_config("character-lite", overrides=settings), commands):
        if isinstance(event, StepProgress) and event.step == 2:
            commands.stop()
    return settings


def _resume_cli(settings: dict) -> subprocess.CompletedProcess:
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]
    return subprocess.run([sys.executable, "-m", "trainer.cli", "train", "--preset", "character-lite", *flags,
                           "--resume", "auto"], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=600)


def test_resuming_after_the_base_weights_were_replaced_is_refused(tiny_sd1_dir: Path, image_folder: Path,
                                                                  tmp_path: Path) -> None:
    import shutil

    import safetensors.torch

    base = tmp_path / "model"
    shutil.copytree(tiny_sd1_dir, base)
    settings = _stopped_run(base, image_folder, tmp_path / "out" / "lora.safetensors")
    weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = safetensors.torch.load_file(str(weights))
    name = next(k for k in sorted(tensors) if k.endswith("attn2.to_k.weight"))
    tensors[name] = tensors[name] + 0.01  # other weights, same file name, same size
    safetensors.torch.save_file(tensors, str(weights))

    exported = (tmp_path / "out" / "lora.safetensors").read_bytes()  # the stop exported step 2
    result = _resume_cli(settings)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "other base model weights" in result.stderr and "Resume with the original model" in result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "out" / "lora.safetensors").read_bytes() == exported  # nothing trained on


def test_the_base_hash_is_computed_once_per_file_version(tiny_sd1_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import shutil

    from trainer.models import identity

    base = tmp_path / "model"
    shutil.copytree(tiny_sd1_dir, base)
    cache = tmp_path / "hashes.json"
    hashed: list[str] = []
    real = identity.tensor_bytes_sha256
    monkeypatch.setattr(identity, "tensor_bytes_sha256", lambda p: hashed.append(p.parent.name) or real(p))
    first = identity.base_weights_hash(str(base), cache)
    assert sorted(hashed) == ["text_encoder", "unet", "vae"]
    hashed.clear()
    assert identity.base_weights_hash(str(base), cache) == first and hashed == []  # all from the cache
    vae = base / "vae" / "diffusion_pytorch_model.safetensors"
    raw = bytearray(vae.read_bytes())
    raw[-1] ^= 1  # one bit of one weight
    vae.write_bytes(bytes(raw))
    assert identity.base_weights_hash(str(base), cache) != first and hashed == ["vae"]


@dataclasses.dataclass(frozen=True)
class _NewKnobs(TrainConfig):
    """TrainConfig as a later version might have it: one more field, defaulting to today's behaviour."""

    new_knob: float = 0.0


@pytest.mark.parametrize(("knob", "same"), [(0.0, True), (0.5, False)])
def test_a_new_defaulted_config_field_keeps_every_fingerprint(knob: float, same: bool, image_folder: Path) -> None:
    from trainer.config.presets import resolve_config
    from trainer.data.scan import scan_dataset
    from trainer.data.training_set import TrainingSet
    from trainer.train.fingerprint import legacy_fingerprint, run_fingerprint

    config = resolve_config("character-lite", overrides={"data": str(image_folder), "rank": 4, "seed": 3})
    scan = scan_dataset(config.data)
    training_set = TrainingSet(scan, config.data, 64)
    later = dataclasses.replace(config, train=_NewKnobs(**dataclasses.asdict(config.train), new_knob=knob))
    assert (run_fingerprint(later, training_set, "abc") == run_fingerprint(config, training_set, "abc")) is same
    assert (legacy_fingerprint(later, training_set) == legacy_fingerprint(config, training_set)) is same
    assert run_fingerprint(config, training_set, "abc") != run_fingerprint(config, training_set, "abd")


def test_checkpoints_of_the_earlier_fingerprint_still_resume(image_folder: Path) -> None:
    """The scheme before the base hash hashed every field: its checkpoints match ``legacy_fingerprint``."""
    import hashlib
    import json

    from trainer.config.presets import resolve_config
    from trainer.config.schema import config_to_dict
    from trainer.data.scan import scan_dataset
    from trainer.data.training_set import TrainingSet
    from trainer.train.fingerprint import LEGACY_FIELDS, legacy_fingerprint

    config = resolve_config("character-lite", overrides={"data": str(image_folder), "rank": 4, "lr": 3e-4})
    training_set = TrainingSet(scan_dataset(config.data), config.data, 64)
    settings = config_to_dict(config)  # the earlier run_fingerprint, as it was written
    settings.pop("output")
    for volatile in ("device", "cache_latents", "cache_text", "grad_checkpointing", "compile", "steps", "epochs"):
        settings["train"].pop(volatile)
    settings = {s: {k: v for k, v in values.items() if k in LEGACY_FIELDS[s].split()} for s, values in settings.items()}
    data = [(i.sha256, i.caption, i.repeats) for i in training_set.items]
    earlier = hashlib.sha256(json.dumps({"settings": settings, "data": data}, sort_keys=True,
                                        default=str).encode()).hexdigest()
    assert legacy_fingerprint(config, training_set) == earlier


# --- launch flags (issue 19, item 4) ------------------------------------------------------------


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write in (root ignores permission bits: a read-only file system then)."""
    import os

    if os.geteuid() == 0:
        return Path("/sys/kernel")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


LAUNCH_CASES = [
    ("port above 65535", lambda t: ["--port", "70000"], "70000 is not a port number; use one from 1 to 65535"),
    ("negative port", lambda t: ["--port", "-1"], "-1 is not a port number; use one from 1 to 65535"),
    ("port zero", lambda t: ["--port", "0"], "0 is not a port number"),
    ("port not a number", lambda t: ["--port", "http"], "'http' is not a port number"),
    ("projects is a file", lambda t: ["--projects", str(t / "notes.txt")], "is a file, not a folder"),
    ("projects read-only", lambda t: ["--projects", str(_unwritable_folder(t))], "Cannot write in the projects folder"),
    ("projects under a read-only folder", lambda t: ["--projects", str(_unwritable_folder(t) / "new")],
     "Cannot write in the projects folder"),
]
LAUNCHERS = {"lora-studio": ["-c", "from app.cli import main; raise SystemExit(main())"],  # the console script
             "python -m app": ["-m", "app"]}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
@pytest.mark.parametrize(("flags", "words"), [c[1:] for c in LAUNCH_CASES], ids=[c[0] for c in LAUNCH_CASES])
def test_bad_launch_flags_are_clear_errors(tmp_path: Path, launcher: str, flags, words: str) -> None:
    (tmp_path / "notes.txt").write_text("not a folder")
    arguments = ["--no-browser", "--port", "7999", "--projects", str(tmp_path / "projects"), *flags(tmp_path)]
    result = subprocess.run([sys.executable, *LAUNCHERS[launcher], *arguments], cwd=REPO,
                            env=child_env(GRADIO_ANALYTICS_ENABLED="False", CI="1"), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr, result.stderr
