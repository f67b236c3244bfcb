"""Make `dvc plots show` render offline: a DVC HTML template with vega inlined.

DVC's default page loads vega, vega-lite and vega-embed from a CDN, so on a machine without
internet its interactive plots stay blank. This fetches the exact versions DVC's page asks for
from the npm registry (``$NPM_CONFIG_REGISTRY``; checked against npm's sha512 integrity), inlines
their minified builds into ``.dvc/plots-offline.html`` (git-ignored) and points this clone's DVC
at it (``dvc config --local plots.html_template``). scripts/setup.sh runs it; run it again by hand
with ``python -m scripts.offline_plots``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from llmpipe.params import load_section
from steps.fetch import FetchSettings, make_session

# package: (version, npm's dist.integrity, the build DVC's CDN URL resolves to)
PACKAGES = {
    "vega": (
        "5.20.2",
        "sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw==",
        "package/build/vega.min.js",
    ),
    "vega-lite": (
        "5.2.0",
        "sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw==",
        "package/build/vega-lite.min.js",
    ),
    "vega-embed": (
        "6.18.2",
        "sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg==",
        "package/build/vega-embed.min.js",
    ),
}
TEMPLATE_NAME = "plots-offline.html"  # relative to .dvc/, where DVC resolves plots.html_template
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
%s
    <style>table { border-spacing: 15px; }</style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def fetch_build(name: str, registry: str) -> str:
    """The package's minified build, from its npm tarball after the integrity check."""
    version, integrity, member = PACKAGES[name]
    url = f"{registry.rstrip('/')}/{name}/-/{name}-{version}.tgz"
    response = make_session(load_section("fetch", FetchSettings)).get(url, timeout=(10, 60))
    response.raise_for_status()
    digest = "sha512-" + base64.b64encode(hashlib.sha512(response.content).digest()).decode()
    if digest != integrity:
        raise ValueError(f"{url}: integrity mismatch: expected {integrity}, got {digest}")
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as tar:
        return tar.extractfile(member).read().decode("utf-8")


def write_template(dvc_dir: Path, registry: str) -> Path:
    scripts = "\n".join(
        f"    <script>/* {name} {PACKAGES[name][0]} */\n{fetch_build(name, registry)}\n    </script>"
        for name in PACKAGES
    )
    # "{plot_divs}" and "{refresh_tag}" are DVC's placeholders; "{scripts}" is left out on purpose,
    # so DVC adds no CDN <script> tags. str.replace, not format: the scripts are full of braces.
    path = dvc_dir / TEMPLATE_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(PAGE.replace("%s", scripts, 1), encoding="utf-8")
    tmp.replace(path)
    return path


def main() -> None:
    registry = os.environ.get("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org")
    try:
        path = write_template(Path(".dvc"), registry)
    except Exception as exc:  # plots still work online with DVC's own page: say so, do not fail setup
        sys.exit(f"offline_plots: could not vendor vega ({exc}); `dvc plots show` will load it from a CDN")
    subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "plots.html_template", TEMPLATE_NAME], check=True)
    print(f"offline_plots: {path} ({path.stat().st_size // 1024} KiB); dvc plots show renders offline")


if __name__ == "__main__":
    main()
