"""Running the stages inside a container image: a machine profile's ``container:`` key.

``make image`` (``scripts/build_image.sh``) builds the project's image from the pinned files (a Debian base
from Debian's packages, the Python packages of ``requirements.lock`` in ``/opt/venv``) and writes its
manifest, ``/virgo-image.json``: every file of the image with its type, mode, size and SHA-256 (a link with
its target). The image's **digest** is the SHA-256 of that file list, so two builds that install the same
files have the same digest, whatever their timestamps.

A profile with ``container:`` runs the work inside the image: on a ``local`` machine every stage process
starts itself again inside it (:func:`enter`), on a ``slurm`` machine every ``srun`` step of the batch
script is wrapped (:func:`command`); the checkout, the user's home, the temporary folder and the profile's
``bind`` list are bound in at the same paths. Before any work the image is checked against its manifest
(:func:`check`): a missing or damaged image is refused in one line. A process inside an image knows it
from the manifest at its root (:func:`current`); every output's provenance stamp and ``version.lock`` then
name the image's digest, and ``virgo-exps verify`` says which image made a result, or that none did.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import virgo_exps
from virgo_exps.config import ConfigError, spec, validate
from virgo_exps.paths import main_checkout

MANIFEST = "virgo-image.json"  # at the image's root
RUNTIMES = ("charliecloud", "apptainer", "podman")
IMAGE_PYTHON = "/opt/venv/bin/python"
IMAGE_PATH = "/opt/venv/bin:/usr/local/bin:/usr/bin:/bin"
# Folders of the host that a runtime binds by itself; a path under them needs no bind of ours.
SELF_BOUND = {"charliecloud": ("/dev", "/proc", "/sys", "/tmp"), "apptainer": ("/dev", "/proc", "/sys", "/tmp")}
# The image's own folders: a host path under them cannot be bound without hiding the image's files.
IMAGE_OWN = ("/bin", "/boot", "/etc", "/lib", "/lib64", "/opt", "/sbin", "/usr", "/var")


def _one_of(*options) -> dict:
    return {"check": lambda v: v in options, "allowed": "one of " + ", ".join(options)}


@dataclass(frozen=True)
class Container:
    """A profile's ``container:`` mapping, checked by the same validator as params.yaml."""

    runtime: str = spec("charliecloud", **_one_of(*RUNTIMES), doc="the container runtime that runs the image")
    image: str = spec(
        "",
        lambda v: bool(v.strip()),
        "a path: a directory or SquashFS file (charliecloud), a .sif, .sqfs or directory (apptainer), an image "
        "name (podman)",
        "the image; relative paths from the main checkout, ~ and $VARS expanded",
    )
    bind: tuple[str, ...] = spec((), None, "a list of host paths", "more host folders bound in at the same path")
    gpu: bool = spec(False, None, "true or false", "give the image the node's GPUs (apptainer --nv)")

    def image_path(self) -> Path:
        path = Path(os.path.expandvars(os.path.expanduser(self.image)))
        return path if path.is_absolute() else main_checkout() / path


def parse(raw, where: str) -> Container | None:
    """The ``container:`` of a profile (``where`` names it in a message), or None without one."""
    if raw is None:
        return None
    values = validate(Container, raw, f"{where}: container", sep=".")
    if "image" not in values:
        raise ConfigError(f"{where}: container.image: missing; expected the image to run (built by `make image`)")
    return Container(**values)


# --- the manifest and the digest ---------------------------------------------------------------------------


def _entry(root: Path, path: Path, hashed: bool) -> list:
    st = path.lstat()
    rel = path.relative_to(root).as_posix()
    mode = f"{stat.S_IMODE(st.st_mode):04o}"
    if stat.S_ISLNK(st.st_mode):
        return [rel, "l", mode, 0, os.readlink(path)]
    if stat.S_ISDIR(st.st_mode):
        return [rel, "d", mode, 0, ""]
    if stat.S_ISREG(st.st_mode):
        if not hashed:
            return [rel, "f", mode, st.st_size, ""]
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return [rel, "f", mode, st.st_size, h.hexdigest()]
    return [rel, "o", mode, 0, ""]  # a device or fifo node: its kind is content, nothing else


def scan(root: str | os.PathLike, hashed: bool = True) -> list[list]:
    """Every entry under ``root`` but the manifest, sorted: ``[path, kind, mode, size, sha256 or target]``."""
    root = Path(root)
    out = []
    for top, dirs, files in os.walk(root):
        dirs.sort()
        here = Path(top)
        for name in sorted(dirs) + sorted(files):
            path = here / name
            if path == root / MANIFEST:
                continue
            out.append(_entry(root, path, hashed))
    out.sort(key=lambda e: e[0])
    return out


def digest_of(files: list[list]) -> str:
    text = json.dumps(files, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def write_manifest(root: str | os.PathLike, inputs: dict) -> dict:
    """Write ``root/virgo-image.json`` (the file list, its digest and the build's inputs); return it."""
    files = scan(root)
    manifest = {"format": 1, "digest": digest_of(files), "inputs": inputs, "files": files}
    target = Path(root) / MANIFEST
    target.write_text(json.dumps(manifest, separators=(",", ":")) + "\n")
    target.chmod(0o644)
    return manifest


def derive(base: str | os.PathLike, dest: str | os.PathLike, tops: list[str]) -> dict:
    """``dest``: the image folder ``base`` (``root/`` and ``image.json``) with the empty top folders ``tops``
    added, for charliecloud to bind a checkout, home or TMPDIR that lies elsewhere onto. The files are hard
    links to the base's (nothing is copied or hashed again: the manifest is the base's plus the new
    folders); ``virgo.sqfs`` is a link to the base's, which serves a cluster. Returns the new ``image.json``."""
    started = time.monotonic()
    base, dest = Path(base).resolve(), Path(dest)
    info = json.loads((base / "image.json").read_text())
    old = json.loads((base / "root" / MANIFEST).read_text())
    bad = [t for t in tops if not re.fullmatch(r"/[^/]+", t) or (base / "root" / t[1:]).exists()]
    if bad:
        raise ConfigError(f"container: {bad[0]} is not a top folder the image {base} lacks")
    work = dest.parent / f".{dest.name}.{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        # hard links: the same file system as the cache, and no byte of the base is written through them
        linked = subprocess.run(["cp", "-al", str(base / "root"), str(work / "root")], capture_output=True, text=True)
        if linked.returncode:
            shutil.rmtree(work / "root", ignore_errors=True)
            subprocess.run(["cp", "-a", str(base / "root"), str(work / "root")], check=True)
        root = work / "root"
        (root / MANIFEST).unlink()  # a link to the base's manifest: replaced, never written through
        for top in tops:
            (root / top[1:]).mkdir(mode=0o755)
            os.chmod(root / top[1:], 0o755)
        files = sorted(old["files"] + [_entry(root, root / t[1:], True) for t in tops], key=lambda e: e[0])
        inputs = {**old.get("inputs", {}), "base": old["digest"], "added_top_folders": " ".join(sorted(tops))}
        manifest = {"format": 1, "digest": digest_of(files), "inputs": inputs, "files": files}
        (root / MANIFEST).write_text(json.dumps(manifest, separators=(",", ":")) + "\n")
        (root / MANIFEST).chmod(0o644)
        if (base / "virgo.sqfs").is_file():  # the base's, whose own manifest names the base's digest
            (work / "virgo.sqfs").symlink_to(base / "virgo.sqfs")
        info = {**info, "digest": manifest["digest"], "files": len(files), "base": str(base), "squashfs_bytes": None}
        info["build_seconds"] = round(time.monotonic() - started, 1)  # the derivation's own
        info["added_top_folders"] = sorted(tops)
        (work / "image.json").write_text(json.dumps(info, indent=1))
        work.chmod(0o755)
        try:
            work.rename(dest)
        except OSError:
            if not (dest / "image.json").is_file():  # another build made it meanwhile: keep that one
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return info


def _squashfs_read(image: Path, inner: str) -> str:
    tool = shutil.which("unsquashfs")
    if tool is None:
        raise ConfigError(f"container.image: {image} is a SquashFS file and unsquashfs is not installed to check it")
    done = subprocess.run([tool, "-cat", str(image), inner], capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(
            f"container.image: {image}: its {inner} cannot be read ({done.stderr.strip()[:200] or 'unsquashfs failed'}"
            "); the file is damaged or not an image of `make image`: rebuild it"
        )
    return done.stdout


def _squashfs_cut(image: Path) -> str | None:
    """Why a SquashFS file is not whole (its superblock says how many bytes it uses), or None."""
    with open(image, "rb") as fh:
        head = fh.read(96)
    if head[:4] != b"hsqs":
        return "it is not a SquashFS file"
    used = int.from_bytes(head[40:48], "little")
    size = image.stat().st_size
    return f"it is cut short ({size} of its {used} bytes)" if size < used else None


def read_manifest(image: str | os.PathLike) -> dict:
    """The manifest of an image folder or SquashFS file; a ConfigError when there is none to read."""
    image = Path(image)
    if not image.exists():
        raise ConfigError(f"container.image: {image} does not exist; build it with `make image`")
    if image.is_file() and (why := _squashfs_cut(image)):
        raise ConfigError(f"container.image: {image} is damaged: {why}; rebuild it with `make image`")
    try:
        text = (image / MANIFEST).read_text() if image.is_dir() else _squashfs_read(image, MANIFEST)
        manifest = json.loads(text)
        files, digest = manifest["files"], manifest["digest"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"container.image: {image}: no readable {MANIFEST} ({type(exc).__name__}); it is not an image of "
            "`make image` or it is damaged: rebuild it"
        ) from None
    if digest_of(files) != digest:
        raise ConfigError(f"container.image: {image}: its manifest does not match its own digest; rebuild the image")
    return manifest


_LISTED = re.compile(r"^([-dlcbps][-rwxsStT]{9})\s+\S+\s+(.+?)\s+\d{4}-\d\d-\d\d \d\d:\d\d (.*)$")


def _squashfs_listing(image: Path) -> list[list]:
    """``[path, kind, size]`` of every entry of a SquashFS image, from its index (no data is read)."""
    done = subprocess.run(
        [shutil.which("unsquashfs") or "unsquashfs", "-lln", "-d", "", str(image)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise ConfigError(f"container.image: {image}: its index cannot be read; the file is damaged: rebuild it")
    out = []
    for line in done.stdout.splitlines():  # mode owner size-or-device date time path[ -> target]
        m = _LISTED.match(line)
        if not m:
            continue
        mode, size, path = m.groups()
        kind = {"-": "f", "d": "d", "l": "l"}.get(mode[0], "o")
        path = path.split(" -> ")[0] if kind == "l" else path
        out.append([path.lstrip("/"), kind, int(size) if kind == "f" and size.isdigit() else 0])
    return [e for e in out if e[0] and e[0] != MANIFEST]


def problems(image: str | os.PathLike, hashed: bool = False) -> tuple[dict, list[str]]:
    """The manifest and how the image differs from it: every file there with its kind and size (and, with
    ``hashed``, its content), and nothing more."""
    image = Path(image)
    manifest = read_manifest(image)
    want = {e[0]: e for e in manifest["files"]}
    if image.is_dir():
        have = {e[0]: [e[0], e[1], e[3], e[4]] for e in scan(image, hashed)}
        want_cmp = {k: [e[0], e[1], e[3], e[4] if (hashed or e[1] == "l") else ""] for k, e in want.items()}
    else:
        have = {e[0]: e for e in _squashfs_listing(image)}
        want_cmp = {k: [e[0], e[1], e[3]] for k, e in want.items()}
    found = []
    for path in sorted(set(want_cmp) | set(have)):
        if path not in have:
            found.append(f"{path}: missing")
        elif path not in want_cmp:
            found.append(f"{path}: not in the manifest")
        elif have[path] != want_cmp[path]:
            found.append(f"{path}: differs from the manifest")
    return manifest, found


def check(c: Container) -> str:
    """The image's digest after checking it against its manifest (kinds and sizes), or a ConfigError."""
    path = c.image_path()
    if c.runtime == "podman" and not path.exists():
        return c.image  # an image name in podman's own store: podman checks it
    manifest, found = problems(path)
    if found:
        raise ConfigError(
            f"container.image: {path} is damaged: {len(found)} file(s) differ from its manifest (first: "
            f"{found[0]}); rebuild it with `make image`"
        )
    return manifest["digest"]


# --- inside the image ----------------------------------------------------------------------------------------


@cache
def current() -> str | None:
    """The digest of the image this process runs in, from the manifest at its root; None outside any."""
    try:
        return json.loads(Path("/", MANIFEST).read_text())["digest"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --- the command that runs inside ----------------------------------------------------------------------------


def code_root() -> Path:
    """The folder the running ``virgo_exps`` package is in: the same code runs inside the image."""
    return Path(virgo_exps.__file__).resolve().parents[1]


def host_paths(c: Container) -> list[Path]:
    """What the work needs from the host: the working folder, the code, the main checkout, home, the
    temporary folder and the profile's ``bind`` list."""
    paths = [Path.cwd(), code_root(), main_checkout(), Path.home()]
    if os.environ.get("TMPDIR"):
        paths.append(Path(os.environ["TMPDIR"]))
    return [p.resolve() for p in paths] + extra_paths(c)


def extra_paths(c: Container) -> list[Path]:
    """The profile's ``bind`` list, ``~`` and ``$VARS`` expanded."""
    return [Path(os.path.expandvars(os.path.expanduser(b))) for b in c.bind]


def binds(c: Container, paths: list[Path] | None = None) -> list[str]:
    """The host folders bound in (``paths``, default :func:`host_paths`), each at its own path. Charliecloud
    binds only onto folders the image has (``make image`` makes the usual top folders of clusters), so it
    binds the top folder of each path."""
    out: list[str] = []
    for path in host_paths(c) if paths is None else paths:
        text = path.as_posix()
        own = next((o for o in IMAGE_OWN if text == o or text.startswith(o + "/")), None)
        if own:
            raise ConfigError(
                f"container: {text} is needed inside the image but lies under {own}, which the image has of its "
                "own; move it (the checkout, home, TMPDIR or a bind) elsewhere"
            )
        if any(text == s or text.startswith(s + "/") for s in SELF_BOUND.get(c.runtime, ())):
            continue
        if c.runtime == "charliecloud":
            text = "/" + path.parts[1] if len(path.parts) > 1 else text
        if text not in out and not any(text.startswith(b + "/") for b in out):
            out = [b for b in out if not b.startswith(text + "/")] + [text]
    return sorted(out)


def missing_mount_points(c: Container) -> list[str]:
    """Charliecloud: the bind targets a folder image lacks (it cannot make them in a read-only image)."""
    path = c.image_path()
    if c.runtime != "charliecloud" or not path.is_dir():
        return []
    return [b for b in binds(c) if not (path / b.lstrip("/")).is_dir()]


def prefix(
    c: Container,
    cwd: str | os.PathLike | None = None,
    src: str | os.PathLike | None = None,
    paths: list[Path] | None = None,
) -> list[str]:
    """The words that run a command inside the image (the command follows them), in ``cwd``, with the
    package of ``src`` (default: the running one) and ``paths`` bound in (default: :func:`host_paths`)."""
    cwd = str(cwd or Path.cwd())
    env = {"PATH": IMAGE_PATH, "VIRTUAL_ENV": "/opt/venv", "PYTHONPATH": str(src or code_root())}
    image = str(c.image_path()) if c.runtime != "podman" or c.image_path().exists() else c.image
    if c.runtime == "charliecloud":
        sets = [f"--set-env={k}={v}" for k, v in env.items()]
        return ["ch-run", "--unset-env=PIP_*", *sets, "-c", cwd, *(f"--bind={b}" for b in binds(c, paths)), image, "--"]
    if c.runtime == "apptainer":
        opts = ["--nv"] if c.gpu else []
        # Apptainer keeps its own PATH handling: the programs are named by their path in the image.
        opts += [f"--env={k}={v}" for k, v in env.items() if k != "PATH"]
        bound = binds(c, paths)
        return ["apptainer", "exec", *opts, "--pwd", cwd, *(["--bind", ",".join(bound)] if bound else []), image]
    opts = ["--device", "nvidia.com/gpu=all"] if c.gpu else []
    opts += [f"--env={k}={v}" for k, v in env.items()]
    vols = [f"--volume={b}:{b}" for b in binds(c, paths)]
    # a folder image runs as a root file system; anything else names an image of podman's own store
    what = ["--rootfs", image] if Path(image).is_dir() else [image]
    user = ["--userns=keep-id"] if os.getuid() else []  # rootless: the caller's own uid inside
    shared = ["--rm", "--env-host", "--network=host", "--ipc=host"]  # the caller's environment, network, memory
    return ["podman", "run", *shared, *user, *opts, *vols, "-w", cwd, *what]


def command(c: Container, argv: list[str], cwd: str | os.PathLike | None = None) -> list[str]:
    """``argv`` (its first word a program of the image, or ``python``) run inside the image."""
    argv = [IMAGE_PYTHON if argv[0] in ("python", "python3", sys.executable) else argv[0], *argv[1:]]
    return [*prefix(c, cwd), *argv]


def runtime_refusal(c: Container) -> str | None:
    """Why the runtime cannot start here (not installed), or None."""
    program = {"charliecloud": "ch-run", "apptainer": "apptainer", "podman": "podman"}[c.runtime]
    if shutil.which(program) is None:
        return f"container.runtime: {c.runtime} needs `{program}` on PATH, which is not found; install it"
    return None


def enter(c: Container, argv: list[str] | None = None) -> None:
    """Start this process again inside the image (no return), after checking the image; nothing when this
    process already runs in one."""
    if current() is not None:
        return
    why = runtime_refusal(c)
    if why:
        raise ConfigError(why)
    check(c)
    missing = missing_mount_points(c)
    if missing:
        raise ConfigError(
            f"container.image: {c.image_path()} has no folder {missing[0]} to bind the host's {missing[0]} onto; "
            f"run `make image` in a checkout under {missing[0]} (it adds the top folders of the checkout, home and "
            f'TMPDIR), or name it: `make image IMAGE_MOUNTS="... {missing[0]}"`'
        )
    cmd = command(c, [IMAGE_PYTHON, *(argv if argv is not None else sys.argv)])
    env = dict(os.environ)
    env.setdefault("USER", env.get("LOGNAME") or _user())
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, env)


def _user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def main(argv: list[str] | None = None) -> int:
    """``python -m virgo_exps.container manifest DIR [KEY=VALUE ...]`` and ``... derive BASE DEST /TOP ...``
    (used by ``make image``), or ``... verify IMAGE`` (every file's content against the manifest)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[0] == "manifest":
        inputs = dict(a.split("=", 1) for a in argv[2:])
        manifest = write_manifest(argv[1], inputs)
        print(json.dumps({"digest": manifest["digest"], "files": len(manifest["files"])}))
        return 0
    if len(argv) >= 4 and argv[0] == "derive":
        info = derive(argv[1], argv[2], argv[3:])
        print(json.dumps({"digest": info["digest"], "files": info["files"]}))
        return 0
    if len(argv) == 2 and argv[0] == "verify":
        try:
            manifest, found = problems(argv[1], hashed=Path(argv[1]).is_dir())
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 3
        for line in found[:20]:
            print(f"  {line}")
        verdict = f"{len(found)} file(s) differ" if found else "every file as built"
        print(f"{argv[1]}: {manifest['digest']}: {verdict}")
        return 3 if found else 0
    usage = "manifest DIR [KEY=VALUE ...] | derive BASE DEST /TOP ... | verify IMAGE"
    print(f"usage: python -m virgo_exps.container {usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
