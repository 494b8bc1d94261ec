"""Drill images, built locally with no registry (or pulled, when the user opts in).

`python -m runbook.drill.images build` is what `make images` runs. Every image carries a label
with the hash of its inputs, so a rebuild happens only when those inputs changed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from runbook.drill.versions import VERSIONS, AppVersion

HERE = Path(__file__).resolve().parent
INPUTS_LABEL = "io.togather.drill.inputs"
BASE_PACKAGES = ("python3", "python3-psycopg", "postgresql-15", "caddy", "ca-certificates",
                 "gzip")
BASE_REPOSITORY = "togather-drill-base"
LOCAL_POSTGRES = "togather-drill-postgres:15"
LOCAL_CADDY = "togather-drill-caddy:2"
OFFICIAL_POSTGRES = "postgres:16-alpine"
OFFICIAL_CADDY = "caddy:2-alpine"
BUILD_HINT = "make images"


class ImageError(RuntimeError):
    """A drill image is missing or cannot be built; the message names the fix."""


@dataclass(frozen=True)
class ImageSet:
    postgres: str
    caddy: str
    base: str | None  # None when the user pulls official images


def pull_mode() -> bool:
    """Official images only when the user explicitly opts in: nothing pulls by default."""
    mode = os.environ.get("RUNBOOK_IMAGES", "local")
    if mode not in ("local", "pull"):
        raise ImageError(f"RUNBOOK_IMAGES={mode!r} is not valid; use 'local' (default) or 'pull'")
    return mode == "pull"


def _hash(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()[:16]


def base_inputs() -> str:
    return _hash(b"bookworm", " ".join(BASE_PACKAGES).encode(), b"minbase-v1")


def base_image() -> str:
    return f"{BASE_REPOSITORY}:{base_inputs()}"


def image_labels(image: str) -> dict[str, str] | None:
    """The image's labels, or None when the image is not present locally."""
    proc = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{json .Config.Labels}}", image],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        return None
    import json

    return json.loads(proc.stdout.strip() or "null") or {}


def image_present(image: str) -> bool:
    return image_labels(image) is not None


def _run(cmd: list[str], **kw: object) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise ImageError(f"{shlex.join(cmd[:3])} failed: " + " | ".join(tail))


def debian_mirror() -> str:
    """The machine's own Debian mirror, read from its apt sources (never hard-coded)."""
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        uri = None
        for line in path.read_text().splitlines():
            if line.startswith("URIs:"):
                uri = line.split()[1]
            if line.startswith("Suites:") and uri and "security" not in uri:
                return uri
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            words = line.split()
            if words[:1] == ["deb"] and "security" not in line:
                return next(w for w in words[1:] if w.startswith(("http:", "https:")))
    raise ImageError("cannot find a Debian mirror in /etc/apt/sources*; "
                     "set RUNBOOK_IMAGES=pull on a machine with a registry")


PULL_BASE_DOCKERFILE = """\
FROM debian:bookworm
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \\
      --no-install-recommends %(packages)s && rm -rf /var/lib/apt/lists/*
ENV LANG=C.UTF-8
"""


def build_base(log: bool = True) -> str:
    image = base_image()
    if image_present(image):
        return image
    if pull_mode():  # the user opted in to a registry: Debian's image plus the same packages
        dockerfile = PULL_BASE_DOCKERFILE % {"packages": " ".join(BASE_PACKAGES)}
        _build(image, dockerfile, {}, base_inputs(), {})
        return image
    if shutil.which("debootstrap") is None:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            _run(["apt-get", "install", "-y", "-qq", "debootstrap"],
                 env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        else:
            raise ImageError("debootstrap is missing; install it (apt-get install debootstrap) "
                             "or set RUNBOOK_IMAGES=pull")
    if log:
        print(f"images: building {image} with debootstrap (about a minute)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="togather-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        _run(["debootstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
              "bookworm", str(rootfs), debian_mirror()])
        shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run(
            ["docker", "import", "--change", f"LABEL {INPUTS_LABEL}={base_inputs()}",
             "--change", "ENV LANG=C.UTF-8", "-", image],
            stdin=tar.stdout, capture_output=True, text=True, check=False,
        )
        tar.wait()
        if imp.returncode != 0 or tar.returncode != 0:
            raise ImageError(f"docker import of {image} failed: {imp.stderr.strip()}")
    return image


def _build(image: str, dockerfile: str, files: dict[str, bytes], inputs: str,
           build_args: dict[str, str]) -> bool:
    """docker build from an in-memory context; False when the image is already up to date."""
    labels = image_labels(image)
    if labels is not None and labels.get(INPUTS_LABEL) == inputs:
        return False
    with tempfile.TemporaryDirectory(prefix="togather-build-") as tmp:
        for name, data in files.items():
            path = Path(tmp) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        (Path(tmp) / "Dockerfile").write_text(dockerfile)
        cmd = ["docker", "build", "-q", "--label", f"{INPUTS_LABEL}={inputs}", "-t", image]
        for key, value in build_args.items():
            cmd += ["--build-arg", f"{key}={value}"]
        _run([*cmd, tmp])
    return True


def _migration_files(schema: int) -> dict[str, bytes]:
    files = {}
    for path in sorted((HERE / "app" / "migrations").glob("*.sql")):
        if int(path.name.split("_", 1)[0]) <= schema:
            files[f"migrations/{path.name}"] = path.read_bytes()
    return files


APP_DOCKERFILE = """\
ARG BASE
FROM ${BASE}
COPY server.py /app/server.py
COPY migrations/ /app/migrations/
ENV APP_VERSION=%(tag)s GIT_COMMIT=%(commit)s BUILD_DATE=%(build_date)s \\
    APP_BEHAVIOUR=%(behaviour)s KNOWN_SCHEMA=%(schema)d MIGRATIONS_DIR=/app/migrations PORT=8080
LABEL org.opencontainers.image.revision=%(commit)s org.opencontainers.image.version=%(tag)s
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["python3", "/app/server.py"]
"""


def build_app(version: AppVersion, base: str) -> bool:
    files = {"server.py": (HERE / "app" / "server.py").read_bytes(),
             **_migration_files(version.schema)}
    if not any(name.startswith("migrations/") for name in files):
        files["migrations/.keep"] = b""
    dockerfile = APP_DOCKERFILE % {
        "tag": version.tag, "commit": version.git_commit, "build_date": "2026-01-01T00:00:00Z",
        "behaviour": version.behaviour.value, "schema": version.schema,
    }
    inputs = _hash(base.encode(), dockerfile.encode(),
                   *(name.encode() + data for name, data in sorted(files.items())))
    return _build(version.image, dockerfile, files, inputs, {"BASE": base})


def build_postgres(base: str) -> bool:
    files = {"postgres-entrypoint.sh": (HERE / "images" / "postgres-entrypoint.sh").read_bytes()}
    dockerfile = (HERE / "images" / "postgres.Dockerfile").read_text()
    inputs = _hash(base.encode(), dockerfile.encode(), *files.values())
    return _build(LOCAL_POSTGRES, dockerfile, files, inputs, {"BASE": base})


def build_caddy(base: str) -> bool:
    dockerfile = "ARG BASE\nFROM ${BASE}\nENTRYPOINT []\n"
    return _build(LOCAL_CADDY, dockerfile, {}, _hash(base.encode(), dockerfile.encode()),
                  {"BASE": base})


def selected() -> ImageSet:
    if pull_mode():
        return ImageSet(postgres=OFFICIAL_POSTGRES, caddy=OFFICIAL_CADDY, base=None)
    return ImageSet(postgres=LOCAL_POSTGRES, caddy=LOCAL_CADDY, base=base_image())


def build_all(versions: Iterable[AppVersion] = VERSIONS.values()) -> list[str]:
    """Make every drill image present; returns the images that were (re)built."""
    built: list[str] = []
    base = build_base()
    if pull_mode():
        for image in (OFFICIAL_POSTGRES, OFFICIAL_CADDY):
            if not image_present(image):
                _run(["docker", "pull", image])  # explicit opt-in: RUNBOOK_IMAGES=pull
                built.append(image)
    else:
        if build_postgres(base):
            built.append(LOCAL_POSTGRES)
        if build_caddy(base):
            built.append(LOCAL_CADDY)
    for version in versions:
        if build_app(version, base):
            built.append(version.image)
    if built:  # rebuilt images leave their predecessors dangling: remove only ours
        subprocess.run(["docker", "image", "prune", "-f", "--filter", f"label={INPUTS_LABEL}"],
                       capture_output=True, check=False)
    return built


def missing(versions: Iterable[AppVersion] = VERSIONS.values()) -> list[str]:
    images = selected()
    wanted = [images.postgres, images.caddy, *(v.image for v in versions)]
    return [image for image in wanted if not image_present(image)]


def require(versions: Iterable[AppVersion] = VERSIONS.values()) -> ImageSet:
    """Fail with one clear line when an image is absent; never pulls."""
    absent = missing(versions)
    if absent:
        raise ImageError(f"drill image {absent[0]} is not present locally"
                         f"{f' (and {len(absent) - 1} more)' if len(absent) > 1 else ''}; "
                         f"build it with `{BUILD_HINT}`")
    return selected()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runbook.drill.images")
    parser.add_argument("command", choices=["build", "check", "list"])
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            built = build_all()
            print(f"images: {len(built)} built, all present"
                  + (f" ({', '.join(built)})" if built else ""), file=sys.stderr)
        elif args.command == "check":
            require()
            print("images: all present", file=sys.stderr)
        else:
            images = selected()
            for image in (images.postgres, images.caddy, *(v.image for v in VERSIONS.values())):
                print(image)
    except ImageError as exc:
        print(f"images: error: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
