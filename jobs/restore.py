"""Restore images in bulk on a Ray cluster.

    ray job submit --working-dir . -- python jobs/restore.py s3://bucket/shards s3://bucket/restored --model denoise-gray

Same options as `restoration restore`; exits non-zero with the reason on failure.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run(["restore", *sys.argv[1:]]))
