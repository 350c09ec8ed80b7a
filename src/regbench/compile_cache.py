"""Where torch.compile keeps compiled code, and whether that folder may be trusted (no torch imported here).

torch's inductor caches compiled kernels (shared libraries it loads), FX graphs and AOT-autograd graphs (pickles
it loads) in ``TORCHINDUCTOR_CACHE_DIR``. Unset, importing ``torch._dynamo`` sets it to
``<tempdir>/torchinductor_<user>`` and creates that folder: a shared, predictable name, so another local user
who creates it first decides what a compiled run loads, i.e. runs code as you. Hence:

- :func:`set_env` (called by ``import regbench``, before any regbench module imports torch) points the variable
  at ``$XDG_CACHE_HOME/regbench/inductor`` (``~/.cache/regbench/inductor``), created 0700; without a usable
  home folder, at a fresh private temporary folder (removed at exit) in which nothing is compiled;
- :func:`problem` (before every compile, regbench.accel) refuses a folder, the user's own
  ``TORCHINDUCTOR_CACHE_DIR`` / ``TRITON_CACHE_DIR`` included, that is owned by someone else or that others can
  write (it or a folder above it, unless sticky), and makes an accepted one 0700.
"""

from __future__ import annotations

import atexit
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Optional

ENV = "TORCHINDUCTOR_CACHE_DIR"
# The value set_env gave ENV (inherited by sweep jobs): ENV equal to it is regbench's default, not the user's.
MARK = "REGBENCH_INDUCTOR_DEFAULT"
NO_HOME = ("no cache folder of yours for compiled code ($XDG_CACHE_HOME unset and $HOME not a folder); fix: set "
           "XDG_CACHE_HOME or TORCHINDUCTOR_CACHE_DIR to a folder of yours")


def default_folder() -> Optional[Path]:
    """$XDG_CACHE_HOME/regbench/inductor, else $HOME/.cache/regbench/inductor; None without a usable home."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec: a relative value is ignored
        return Path(xdg) / "regbench" / "inductor"
    home = os.environ.get("HOME")
    if home is None:
        try:
            home = str(Path.home())
        except (RuntimeError, KeyError):
            return None
    if not (os.path.isabs(home) and os.path.isdir(home)):
        return None
    return Path(home) / ".cache" / "regbench" / "inductor"


def torch_default() -> str:
    """The folder torch sets ENV to when it finds it unset (torch._inductor.runtime.cache_dir_utils.
    default_cache_dir): a value equal to it was put there by an import of torch._dynamo / torchvision before
    regbench's, not chosen by the user."""
    import getpass
    import re

    try:
        user = re.sub(r'[\\/:*?"<>|]', "_", getpass.getuser())
    except (KeyError, OSError):
        return ""
    return os.path.join(tempfile.gettempdir(), "torchinductor_" + user)


def _chosen_by_user(value: Optional[str]) -> bool:
    return bool(value) and value not in (os.environ.get(MARK), torch_default())


def set_env() -> None:
    """Point ENV at regbench's folder (created 0700) unless the user named one; see the module's text."""
    if _chosen_by_user(os.environ.get(ENV)):
        return  # the user's own: checked by problem() before anything is compiled
    folder = default_folder()
    try:
        if folder is None:
            raise OSError
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:  # torch's import would create <tempdir>/torchinductor_<user>: a private folder instead
        folder = Path(tempfile.mkdtemp(prefix="regbench-nocache-"))
        atexit.register(shutil.rmtree, folder, True)
    os.environ[ENV] = os.environ[MARK] = str(folder)


def folder() -> tuple[Optional[Path], Optional[str]]:
    """(the folder compiled code is cached in, None), or (None, why nothing may be compiled)."""
    value = os.environ.get(ENV)
    if not _chosen_by_user(value):  # regbench's default: follow XDG_CACHE_HOME / HOME as they are
        default = default_folder()
        if default is None:
            return None, NO_HOME
        os.environ[ENV] = os.environ[MARK] = str(default)
        value = str(default)
    where = Path(os.path.abspath(value))
    reason = problem(where, ENV)
    if reason is None and os.environ.get("TRITON_CACHE_DIR"):
        reason = problem(Path(os.path.abspath(os.environ["TRITON_CACHE_DIR"])), "TRITON_CACHE_DIR")
    return (None, reason) if reason else (where, None)


def problem(path: Path, variable: str) -> Optional[str]:
    """Why ``path`` must not hold code this process loads (None: it may; it is then 0700). Created when missing."""
    fix = f"fix: remove it, or set {variable} to a folder of yours"
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        real = Path(os.path.realpath(path))
        st = os.stat(real)
    except OSError as e:
        return f"the compile cache {path} cannot be created ({e.strerror or e}); fix: set {variable} to a folder of yours"
    me = os.geteuid()
    for part in (path, *path.parents):  # the path as given: torch opens it, links and all
        up = os.lstat(part)
        if stat.S_ISLNK(up.st_mode) and up.st_uid not in (me, 0):
            return (f"the compile cache {path} passes through {part}, a symbolic link owned by user "
                    f"{_user(up.st_uid)} (who can point it elsewhere at any time); {fix}")
        if part != path and stat.S_ISDIR(up.st_mode) and up.st_mode & 0o022 and not up.st_mode & stat.S_ISVTX:
            return f"the compile cache {path} lies in {part}, which another user can write (and so replace it); {fix}"
    if not stat.S_ISDIR(st.st_mode):
        return f"the compile cache {path} is not a folder; {fix}"
    if st.st_uid != me:
        return (f"the compile cache {path} is owned by user {_user(st.st_uid)}, not you (code loaded from it would run "
                f"as you); {fix}")
    if st.st_mode & 0o022:
        return f"the compile cache {path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); {fix}"
    for above in real.parents:
        up = os.stat(above)
        shared = up.st_mode & 0o022 and not up.st_mode & stat.S_ISVTX
        if up.st_uid not in (me, 0) or shared:
            return (f"the compile cache {path} lies in {above}, which another user can {'write' if shared else 'own'} "
                    f"(and so replace the cache); {fix}")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(real, 0o700)
    return None


def _user(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"
