"""Preload throughput and warm-preload latency.

Goals (issue 3): a cold preload moves data at least 0.9x as fast as `cp -r` followed by `sha256sum` of the same
files (hashing included in both), and a warm preload of a 20 GB artifact takes under 100 ms.

Cold: a synthetic artifact of random bytes; each round runs the peer (`cp -r` + `sha256sum`) and our preload
into fresh directories, alternating which goes first; the figure is the median over rounds and the ratio of
medians. Warm: a 20 GB artifact of sparse files (no disk used) whose cache entry is complete; the figure is the
median of repeated `preload` calls, each of which checks the marker, the manifest and every file's size.

    .venv/bin/python benchmarks/preload.py --json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from pipeline.cache import preload
from pipeline.quantize.recipe import Artifact, ArtifactFile, Calibration, Recipe
from pipeline.source import ModelSource


def write_artifact(directory: Path, files: dict[str, int], hashes: dict[str, str] | None = None) -> None:
    """Write artifact.json for the files already in ``directory`` (hashing them unless ``hashes`` is given)."""
    listing = []
    for name, size in files.items():
        digest = (hashes or {}).get(name)
        if digest is None:
            digest = hashlib.sha256((directory / name).read_bytes()).hexdigest()
        listing.append(ArtifactFile(name=name, size=size, sha256=digest))
    artifact = Artifact(
        id=directory.name,
        path=str(directory),
        format="compressed-tensors",
        backend="llmcompressor",
        source=ModelSource(kind="local", repo="local/bench", sha="0" * 40, files=[]),
        recipe=Recipe(method="awq", calibration=Calibration()),
        calibration_sha256="0" * 64,
        tool_versions={},
        files=listing,
    )
    (directory / "artifact.json").write_text(artifact.manifest_json())


def cold(work: Path, size_mb: int, rounds: int) -> dict[str, object]:
    source = work / "cold-artifact"
    source.mkdir()
    shard = size_mb // 4
    files = {}
    for i in range(4):  # four shards, like a sharded checkpoint
        name = f"model-0000{i + 1}-of-00004.safetensors"
        with open(source / name, "wb") as handle:
            for _ in range(shard):
                handle.write(os.urandom(1 << 20))
        files[name] = shard << 20
    write_artifact(source, files)
    total = sum(files.values())
    ours, peer = [], []
    for round_ in range(rounds):
        order = ("peer", "ours") if round_ % 2 == 0 else ("ours", "peer")
        for which in order:
            dest = work / f"{which}-{round_}"
            start = time.perf_counter()
            if which == "peer":
                subprocess.run(["cp", "-r", str(source), str(dest)], check=True)
                names = [str(dest / n) for n in files]
                subprocess.run(["sha256sum", *names], check=True, capture_output=True)
                peer.append(time.perf_counter() - start)
            else:
                preload(source, dest)
                ours.append(time.perf_counter() - start)
            shutil.rmtree(dest)
    ours_mb_s = total / 1e6 / statistics.median(ours)
    peer_mb_s = total / 1e6 / statistics.median(peer)
    return {
        "size_mb": round(total / 1e6, 1),
        "rounds": rounds,
        "preload_mb_s": round(ours_mb_s, 1),
        "cp_plus_sha256sum_mb_s": round(peer_mb_s, 1),
        "ratio": round(ours_mb_s / peer_mb_s, 3),
        "goal_ratio": 0.9,
        "preload_seconds": [round(s, 3) for s in ours],
        "peer_seconds": [round(s, 3) for s in peer],
    }


def warm(work: Path, size_gb: int, repeats: int) -> dict[str, object]:
    source = work / "warm-artifact"
    source.mkdir()
    shards = 10
    shard = size_gb * (1 << 30) // shards
    zero_hash = hashlib.sha256()
    block = bytes(8 << 20)
    for _ in range(shard // len(block)):
        zero_hash.update(block)
    zero_hash.update(bytes(shard % len(block)))
    files = {f"model-{i:05d}-of-{shards:05d}.safetensors": shard for i in range(shards)}
    for name in files:
        with open(source / name, "wb") as handle:
            handle.truncate(shard)  # sparse: 2 GB each, no disk used
    write_artifact(source, files, {name: zero_hash.hexdigest() for name in files})
    cache_root = work / "warm-cache"
    # Lay out the complete cache entry as a finished preload leaves it (files, artifact.json, then the marker
    # with the manifest digest), without copying 20 GB: the cached files are sparse too.
    target = cache_root / source.name
    target.mkdir(parents=True)
    for name in files:
        with open(target / name, "wb") as handle:
            handle.truncate(shard)
    from pipeline.cache import MARKER, artifact_plan

    shutil.copy2(source / "artifact.json", target / "artifact.json")
    marker = {"manifest_sha256": artifact_plan(source).digest(), "verified_at": "-"}
    (target / MARKER).write_text(json.dumps(marker))
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        entry = preload(source, cache_root)
        timings.append(time.perf_counter() - start)
        assert entry.skipped, "the warm preload must be a skip"
    return {
        "size_gb": round(sum(files.values()) / 1e9, 1),
        "files": shards,
        "repeats": repeats,
        "median_ms": round(statistics.median(timings) * 1000, 2),
        "max_ms": round(max(timings) * 1000, 2),
        "goal_ms": 100,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=512, help="cold artifact size (default 512)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warm-gb", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="preload-bench-", dir=os.environ.get("BENCH_DIR")) as tmp:
        work = Path(tmp)
        result: dict[str, dict[str, object]] = {
            "cold": cold(work, args.size_mb, args.rounds),
            "warm": warm(work, args.warm_gb, 20),
        }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    c, w = result["cold"], result["warm"]
    print(f"cold: preload {c['preload_mb_s']} MB/s vs cp + sha256sum {c['cp_plus_sha256sum_mb_s']} MB/s")
    print(f"      ratio {c['ratio']} (goal >= 0.9)")
    print(f"warm: {w['median_ms']} ms median for {w['size_gb']} GB (goal < 100 ms)")


if __name__ == "__main__":
    main()
