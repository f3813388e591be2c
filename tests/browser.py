"""The headless Chromium that browser tests drive through playwright.

Playwright's own browser downloads are not used: the tests run Debian's ``chromium`` package,
which ``scripts/services.sh start`` (and so ``scripts/test.sh``) installs with apt when it is
missing. ``FACECLUSTER_CHROMIUM`` names another Chromium build to use instead. A missing browser
fails the test that needs it; it never skips it.

    from playwright.sync_api import sync_playwright
    from browser import CHROMIUM_ARGS, chromium_path

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
"""

from __future__ import annotations

import os
import shutil

ENV = "FACECLUSTER_CHROMIUM"
NAMES = ("chromium", "chromium-browser")  # Debian's package, and the name other distributions use

# Tests run as root (CI too), where Chromium cannot start its sandbox. Playwright passes
# --no-sandbox itself unless launched with chromium_sandbox=True; it is spelled out here so a
# launch as root never depends on that default. Smooth scrolling is off because on a busy CI
# machine an animated Home followed by End lost the End (3 runs in 11 failed under a CPU hog,
# 0 in 8 without the animation); a key's scroll then lands in one step.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-smooth-scrolling"]

INSTALL_HINT = (
    "install Debian's Chromium with `apt-get install -y chromium` as root (`bash scripts/services.sh "
    f"start`, and so scripts/test.sh, does this when it is missing), or set {ENV} to a Chromium executable"
)


def chromium_path() -> str:
    """Path of the Chromium executable: ``$FACECLUSTER_CHROMIUM``, else chromium or chromium-browser
    on PATH. Raises RuntimeError saying how to install one when there is none."""
    wanted = os.environ.get(ENV, "").strip()
    if wanted:
        found = shutil.which(wanted)  # a path is checked as is, a bare name looked up on PATH
        if not found:
            raise RuntimeError(f"{ENV}={wanted!r} is not an executable Chromium; {INSTALL_HINT}")
        return found
    for name in NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError(f"no Chromium for the browser tests ({' or '.join(NAMES)} is not on PATH); {INSTALL_HINT}")
