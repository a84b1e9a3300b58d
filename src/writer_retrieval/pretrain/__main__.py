"""Command line for torchrun: python -m writer_retrieval.pretrain --job inputs.json --out DIR."""
import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ..logs import stage_logging
from . import METHODS, run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m writer_retrieval.pretrain",
                                     description=f"self-supervised pretraining ({', '.join(METHODS)})")
    parser.add_argument("--job", required=True,
                        help='JSON file: {"inputs": {"page_masks": [...]} or {"patch_shards": [...], "doc_ids": [...]}, '
                             '"settings": {...}, "device": "auto | cpu | cuda"} (the pretrain rule\'s inputs.json)')
    parser.add_argument("--out", required=True, help="output folder (checkpoint.pt, backbone.pt, log.parquet)")
    parser.add_argument("--log", default=None, help="log file (rank 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    rank = int(os.environ.get("RANK", "0"))
    with stage_logging(args.log if rank == 0 else None, "pretrain") as logger:
        if rank != 0:
            logger.setLevel(logging.WARNING)
        job = json.loads(Path(args.job).read_text())
        summary = run(job["inputs"], job["settings"], args.out, device=job["device"], progress=not args.no_progress)
        if rank == 0:
            logger.info("pretrain done: %s", json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
