"""What a request may name: the path rule for ``--listen`` and the name rule for everything.

**Paths.** On this computer only (the default, 127.0.0.1) the person at the keyboard may type any
path: reading their own files is the point. With ``--listen`` the server answers other machines,
and a typed path would let them read any file the server can, so every path a request names must
lie inside the projects folder, a folder the local user allowed (``--allow-folder DIR``, or one
absolute path per line in ``<projects>/allowed-folders.txt``) or the bundled example pictures.
Paths are resolved (symlinks followed, ``..`` removed) before the check, and the check comes before
anything touches the file, so an answer never tells whether a file outside exists.

**Names.** Run, dataset and file names from a request never leave their folder: ``safe_name``
turns an upload's name into a plain file name; ``child_path`` refuses a name that is not one
(``../../elsewhere/victim``) instead of guessing what was meant.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from trainer.core.errors import StudioError

ALLOWED_FOLDERS_FILE = "allowed-folders.txt"
_UNSAFE = re.compile(r"[^\w.\- ()+,@]+")


@dataclass(frozen=True)
class PathRule:
    """Where request paths may point: anywhere (``confined=False``) or under ``roots`` only."""

    confined: bool = False
    roots: tuple[Path, ...] = ()

    @classmethod
    def for_server(cls, projects_root: Path, *, listen: bool, allowed: Iterable[str | Path] = ()) -> PathRule:
        from app.bundled import asset_path

        folders = [projects_root, asset_path("examples"), *allowed, *_allowed_in_file(projects_root)]
        return cls(confined=listen, roots=tuple(dict.fromkeys(Path(f).expanduser().resolve() for f in folders)))

    def allows(self, raw: str | Path) -> bool:
        if not self.confined:
            return True
        try:
            resolved = Path(str(raw)).expanduser().resolve()
        except (OSError, RuntimeError):  # a symlink loop
            return False
        return any(within(resolved, root) for root in self.roots)

    def check(self, raw: str | Path, what: str = "path") -> Path:
        """``raw`` as a path when the rule allows it, else a ``StudioError`` that names the rule."""
        if not self.allows(raw):
            raise StudioError(
                f"The {what} {raw} is outside the folders this server may read.",
                hint="With --listen, paths must be inside the projects folder or a folder added on the server "
                     f"(--allow-folder DIR, or a line in {ALLOWED_FOLDERS_FILE} in the projects folder). "
                     "Upload the file instead, or ask the server's owner to add the folder.")
        return Path(str(raw)).expanduser()


def within(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or below it (both already absolute; no file system access)."""
    return path == folder or path.is_relative_to(folder)


def safe_name(raw: str, what: str = "name") -> str:
    """``raw`` reduced to a plain file name: no folders, no leading dots, no odd characters."""
    text = unicodedata.normalize("NFC", str(raw)).replace("\\", "/").strip()
    text = text.rsplit("/", 1)[-1]  # any directory part (including ../) is dropped
    text = _UNSAFE.sub("_", text).strip(" .")
    if not text or set(text) <= {"_"}:
        raise StudioError(f"'{raw}' cannot be used as a {what}.",
                          hint="Use letters, digits, spaces, dots, dashes or underscores.")
    return text[:120]


def child_path(folder: Path, raw: str, what: str = "name") -> Path:
    """``folder / raw`` for a plain name from a request; a name that would leave ``folder`` is refused."""
    text = str(raw or "").strip()
    try:
        plain = safe_name(text, what) == text
    except StudioError:
        plain = False
    target = Path(folder) / text
    if not plain or not within(Path(folder).absolute() / text, Path(folder).absolute()) or target.parent != folder:
        raise StudioError(f"'{raw}' is not a valid {what}: it must be a plain name inside {folder.name}/.",
                          hint="Pick one from the list; names cannot contain folders, '..' or a leading dot.")
    return target


def _allowed_in_file(projects_root: Path) -> list[Path]:
    """The folders the local user listed in ``allowed-folders.txt`` (absolute paths; '#' starts a comment)."""
    try:
        lines = (Path(projects_root) / ALLOWED_FOLDERS_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    folders = [Path(line.split("#", 1)[0].strip()).expanduser() for line in lines]
    return [f for f in folders if str(f) not in ("", ".") and f.is_absolute()]
