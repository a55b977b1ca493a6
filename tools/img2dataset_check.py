"""End-to-end check of ``capgap curate`` on folders written by the real img2dataset.

Serves real photos (scikit-learn's ``china.jpg`` / ``flower.jpg`` and crops of them) from
a local ``http.server`` on 127.0.0.1, plus one URL that answers 404, runs img2dataset on
that URL list in webdataset and parquet output modes, then ``capgap curate --input
FOLDER`` (no trailing slash; a random-init micro CLIP, nothing downloaded) on each
folder, and checks that every downloaded row is curated or rejected and the failed one
is in ``errors/`` as ``source_failed`` with img2dataset's message. Prints the counts.

img2dataset is not a capgap dependency (it pins pandas < 3): install it in a venv of its
own and pass its executable.

    python -m venv /tmp/i2d && /tmp/i2d/bin/pip install img2dataset
    .venv/bin/python tools/img2dataset_check.py --img2dataset /tmp/i2d/bin/img2dataset
"""

from __future__ import annotations

import argparse
import functools
import http.server
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def photos(folder: Path) -> list[tuple[str, str]]:
    """(file name, caption) of JPEG photos written under ``folder``: the two originals and
    three crops / resizes of each."""
    import sklearn.datasets

    images = Path(sklearn.datasets.__file__).parent / "images"
    out = []
    for name, caption in (("china", "a temple in china"), ("flower", "a flower close up")):
        image = Image.open(images / f"{name}.jpg").convert("RGB")
        w, h = image.size
        variants = {
            "full": image,
            "left": image.crop((0, 0, w // 2, h)),
            "centre": image.crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4)),
            "small": image.resize((w // 3, h // 3)),
        }
        for label, variant in variants.items():
            file = f"{name}_{label}.jpg"
            buffer = io.BytesIO()
            variant.save(buffer, "JPEG", quality=90)
            (folder / file).write_bytes(buffer.getvalue())
            out.append((file, f"{caption} ({label})"))
    return out


def serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # img2dataset's requests are not news
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def run_img2dataset(exe: str, url_list: Path, out: Path, mode: str) -> None:
    cmd = [
        exe,
        f"--url_list={url_list}",
        "--input_format=parquet",
        "--url_col=url",
        "--caption_col=caption",
        f"--output_format={mode}",
        f"--output_folder={out}",
        "--processes_count=1",
        "--thread_count=4",
        "--image_size=256",
        "--resize_mode=keep_ratio",
        "--retries=0",
        "--enable_wandb=False",
        "--distributor=multiprocessing",
    ]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)


def curate(folder: Path, output: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from bad_inputs import CURATE_OVERRIDES

    argv = [sys.executable, "-m", "capgap.pipeline.cli", "curate"]
    argv += ["--input", str(folder), "--output", str(output), "--set", "max_error_fraction=1"]
    for override in CURATE_OVERRIDES:
        if not override.startswith("decode.max_bytes"):
            argv += ["--set", override]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"capgap curate failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads((output / "manifest.json").read_text())


def rows(folder: Path) -> list[dict]:
    files = sorted(folder.glob("*.parquet"))
    return [r for f in files for r in pq.read_table(f).to_pylist()]


def check(mode: str, exe: str, work: Path, url_list: Path, n_photos: int) -> dict:
    shards = work / f"i2d_{mode}"
    run_img2dataset(exe, url_list, shards, mode)
    listing = sorted(p.name for p in shards.iterdir())
    manifest = curate(shards, work / f"out_{mode}")
    counts = manifest["counts"]
    kept = rows(work / f"out_{mode}" / "curated") + rows(work / f"out_{mode}" / "rejected")
    errors = rows(work / f"out_{mode}" / "errors")
    failed = [e for e in errors if e["reason"] == "source_failed"]
    problems = []
    if len(kept) != n_photos:
        problems.append(f"{len(kept)} rows curated or rejected, {n_photos} photos downloaded")
    if len(errors) != 1 or len(failed) != 1:
        problems.append(f"errors/: {[(e['reason'], e['message']) for e in errors]}")
    elif "404" not in failed[0]["message"]:
        problems.append(f"the failed row's message lost img2dataset's: {failed[0]['message']}")
    if counts["rows_in"] != n_photos + 1:
        problems.append(f"rows_in {counts['rows_in']} != {n_photos + 1}")
    return {
        "mode": mode,
        "img2dataset_files": listing,
        "counts": {k: counts[k] for k in ("rows_in", "curated", "rejected", "errors")},
        "by_reason": counts["by_reason"],
        "failed_row": failed[0] if failed else None,
        "skipped_files": manifest["input"].get("skipped_files"),
        "metadata_files": manifest["input"].get("metadata_files"),
        "problems": problems,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--img2dataset", default="img2dataset", help="img2dataset executable")
    parser.add_argument("--work", default=None, help="folder for inputs and outputs (kept)")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="img2dataset_check_"))
    served = work / "www"
    served.mkdir(parents=True, exist_ok=True)
    listed = photos(served)
    server, port = serve(served)
    try:
        urls = [f"http://127.0.0.1:{port}/{name}" for name, _ in listed]
        captions = [caption for _, caption in listed]
        urls.append(f"http://127.0.0.1:{port}/missing.jpg")  # 404: img2dataset's failed row
        captions.append("a photo that is not there")
        url_list = work / "urls.parquet"
        pq.write_table(pa.table({"url": urls, "caption": captions}), url_list)
        results = [
            check(m, args.img2dataset, work, url_list, len(listed))
            for m in ("webdataset", "parquet")
        ]
    finally:
        server.shutdown()
    print(json.dumps({"work": str(work), "results": results}, indent=1, default=str))
    return 1 if any(r["problems"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
