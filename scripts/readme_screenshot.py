"""Regenerate docs/report.png, the report screenshot in the README.

    python scripts/readme_screenshot.py            # needs chromium on PATH

Builds the nested_cnn sample, dumps it with --backward, and screenshots report.html.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "sample_models.build", str(work), "--only", "nested_cnn"],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        subprocess.run(
            [
                sys.executable,
                "-m",
                "fvis",
                "dump",
                str(work / "nested_cnn.state_dict.pt"),
                "--arch",
                "sample_models.zoo:Classifier",
                "--input",
                str(work / "nested_cnn.input.pt"),
                "--backward",
                "--out",
                str(work / "out"),
                "--quiet",
            ],
            check=True,
            cwd=ROOT,
        )
        target = ROOT / "docs" / "report.png"
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--no-first-run",
                "--hide-scrollbars",
                f"--user-data-dir={work / 'profile'}",
                "--window-size=1280,1000",
                "--virtual-time-budget=3000",
                f"--screenshot={target}",
                (work / "out" / "report.html").as_uri(),
            ],
            check=True,
            capture_output=True,
        )
        print(f"wrote {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
