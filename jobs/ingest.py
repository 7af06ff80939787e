"""Write images as Parquet input shards from a Ray cluster.

    ray job submit --working-dir . -- python jobs/ingest.py s3://bucket/raw-images s3://bucket/shards

Same options as `restoration ingest`; exits non-zero with the reason on failure.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run(["ingest", *sys.argv[1:]]))
